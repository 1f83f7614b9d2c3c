"""`sift federate`: client split, settings on resume, and Flower's simulation engine on the tiny model
(privacy of every reply, a failing client, resume after the last finished round)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.federated.state import adapter_path, read_state
from pipeline.settings import FederateSettings, LoraSettings, SettingsError, StudentSettings, TrainSettings
from pipeline.stages import federate as fed
from pipeline.stages.export import write_splits
from tests.train.conftest import save_tiny

PAIRS = [("give three tips for staying healthy", "eat vegetables sleep well and walk every day"),
         ("what is the capital of france", "the capital of france is paris"),
         ("translate hello to spanish", "hola"),
         ("name a primary color", "red is a primary color"),
         ("summarize the text below", "a short story about a cat and a dog")]


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


def filtered(path: Path, n: int = 30, tasks: int = 6) -> list[dict]:
    recs = [{"id": f"ex{i}", "task_id": f"task{i % tasks}", "provenance": {"seed_ids": [f"s{i % 4}", "x"]},
             "instruction": PAIRS[i % 5][0], "input": "", "output": PAIRS[(i * 3) % 5][1]} for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return recs


def test_split_keeps_groups_whole_and_ignores_file_order(tmp_path: Path) -> None:
    recs = filtered(tmp_path / "a.jsonl")
    parts = fed.split_groups(tmp_path / "a.jsonl", 3, "task_id", seed=0)
    assert sorted(len(p) for p in parts) == [10, 10, 10]  # 6 tasks of 5 records, two tasks each
    task = {r["id"]: r["task_id"] for r in recs}
    owners = {task[i]: k for k, p in enumerate(parts) for i in p}
    assert len(owners) == 6 and all(owners[task[i]] == k for k, p in enumerate(parts) for i in p)
    (tmp_path / "b.jsonl").write_text("".join(reversed((tmp_path / "a.jsonl").read_text().splitlines(True))))
    assert fed.split_groups(tmp_path / "b.jsonl", 3, "task_id", seed=0) == parts
    by_seed = fed.split_groups(tmp_path / "a.jsonl", 2, "provenance.seed_ids", seed=0)  # a list: its first item
    assert sorted(len(p) for p in by_seed) == [14, 16]


def test_split_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    filtered(path, n=4)
    with path.open("a") as f:
        f.write(json.dumps({"id": "z", "instruction": "q", "input": "", "output": "a"}) + "\n")
    with pytest.raises(SiftError) as e:
        fed.split_groups(path, 2, "task_id", seed=0)
    assert (e.value.line, e.value.field) == (5, "task_id")
    filtered(path, n=4)  # four tasks
    with pytest.raises(SiftError, match="only 4 distinct values of 'task_id', fewer than 5 clients"):
        fed.split_groups(path, 5, "task_id", seed=0)


def test_changed_settings_are_refused_before_any_training(runs: Path, tmp_path: Path) -> None:
    filtered(runs / "r" / "filtered.jsonl")
    heldout = tmp_path / "heldout.jsonl"
    filtered(heldout, n=3)
    members, data = fed.split_clients(runs / "r", 3, "task_id", 0.2, 0)
    assert data == {"source": "filtered.jsonl", "contaminated": 0}
    assert [c["name"] for c in members] == ["client-0", "client-1", "client-2"]
    assert all(c["valid"] >= 1 and c["train"] >= 1 for c in members)
    settings = {"local": {"local_steps": 4}, "aggregation": "fedavg"}
    state = fed.check_settings(runs / "r", settings, members)
    assert state["rounds"] == []
    (runs / "r" / "federate.json").write_text(json.dumps({**state, "target_rounds": 1}))
    assert fed.check_settings(runs / "r", settings, members)["settings"] == settings
    with pytest.raises(SiftError, match=r"changed: aggregation, local"):
        fed.check_settings(runs / "r", {"local": {"local_steps": 8}, "aggregation": "exact"}, members)
    with pytest.raises(SiftError, match="changed: clients"):
        fed.check_settings(runs / "r", settings, members[:2])


def test_the_split_trains_on_what_export_would_selected_and_decontaminated(runs: Path, capsys) -> None:
    """A record that copies an answer of the general held-out set (which the server evaluates on by
    default) goes to no client, and with a scored.jsonl only the score stage's selection is split."""
    from train.general_set import load_general

    d = runs / "r"
    recs = filtered(d / "filtered.jsonl")
    task = next(t for t in load_general() if len(t["output"].split()) >= 13)
    leak = {**recs[0], "id": "leak", "output": task["output"]}
    (d / "filtered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [leak, *recs]), encoding="utf-8")
    members, data = fed.split_clients(d, 3, "task_id", 0.2, 0)
    assert data == {"source": "filtered.jsonl", "contaminated": 1}
    split = [json.loads(x)["id"] for c in members for name in ("train.jsonl", "valid.jsonl")
             for x in (Path(c["dir"]) / name).read_text().splitlines()]
    assert sorted(split) == sorted(r["id"] for r in recs)  # everything but the leak, once
    ledger = [json.loads(x) for x in (d / "federate" / "clients" / "export.rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"], r["eval_ids"]) for r in ledger] == [("leak", "contaminated", [task["id"]])]

    scored = [r for r in [leak, *recs] if r["id"] in {"leak", "ex1", "ex2", "ex3", "ex4", "ex5", "ex6", "ex7"}]
    (d / "scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scored), encoding="utf-8")
    members, data = fed.split_clients(d, 3, "task_id", 0.2, 0)
    assert data == {"source": "scored.jsonl", "contaminated": 1}
    split = [json.loads(x)["id"] for c in members for name in ("train.jsonl", "valid.jsonl")
             for x in (Path(c["dir"]) / name).read_text().splitlines()]
    assert sorted(split) == [f"ex{i}" for i in range(1, 8)]


def _client_run(runs: Path, name: str, pairs: list[tuple[str, str]]) -> list[str]:
    recs = [{"id": f"{name}{i}", "instruction": q, "input": "", "output": a} for i, (q, a) in enumerate(pairs)]
    write_splits(runs / name, recs[:-1], recs[-1:])
    return [r[k] for r in recs for k in ("instruction", "output")]


def test_the_student_device_reaches_the_clients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A round's config, as the server sends it, through the ClientApp: the client loads the student on
    student.device (resolved there: auto is the CPU here), not on a device of its own choosing."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

    from pipeline.federated.apps import build_client_app
    from pipeline.io import models
    from train import fedlocal

    local = fedlocal.LocalSettings(student=StudentSettings(model=str(save_tiny(tmp_path / "tiny")), device="auto"),
                                   lora=LoraSettings(r=4, alpha=8), train=TrainSettings(max_length=48),
                                   local_steps=1)
    adapter = fedlocal.initial_adapter(local)
    monkeypatch.setattr(fedlocal, "_CACHE", {})  # the client process builds its own model
    loads: list[str] = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda spec, **kw: loads.append(kw["device"]) or real(spec, **kw))
    _client_run(tmp_path / "runs", "a", PAIRS[:3])
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="",
                        created_at=0.0, ttl=3600.0, message_type=MessageType.EVALUATE)
    message = Message(metadata=metadata, content=RecordDict({
        "arrays": ArrayRecord(adapter), "config": ConfigRecord({**local.to_config(), "round": 0})}))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = build_client_app([str(tmp_path / "runs" / "a")])(message, context)
    assert not reply.has_error() and reply.content["metrics"]["tokens"] > 0
    assert loads == ["auto"]
    assert fedlocal.peft_model(local)[0].device.type == "cpu"


def test_simulated_clients_get_a_share_of_the_gpu_when_the_student_runs_on_one() -> None:
    assert fed.client_resources(4, "cuda") == {"num_cpus": 1, "num_gpus": 0.25}
    assert fed.client_resources(3, "cpu") == {"num_cpus": 1, "num_gpus": 0.0}


@pytest.mark.parametrize(("field", "value"), [("aggregation", "median"), ("engine", "ray"), ("clients", 0)])
def test_federate_settings_are_checked_in_code_too(field: str, value: object) -> None:
    with pytest.raises(SettingsError) as e:
        FederateSettings(**{field: value})
    assert e.value.field == field


@pytest.mark.slow
def test_simulation_privacy_failing_client_and_resume(runs: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Three parties on Flower's simulation engine; the third's examples are all longer than
    max_length, so its local training fails every round. Every reply reaching the server is recorded."""
    model = save_tiny(tmp_path / "tiny")
    texts = _client_run(runs, "a", [("give three tips for staying healthy", "eat vegetables sleep well"),
                                    ("what is the capital of france", "paris"), ("name a primary color", "red")])
    texts += _client_run(runs, "b", [("translate hello to spanish", "hola"), ("summarize the text below",
                                      "a short story about a cat and a dog"), ("name a primary color", "blue")])
    long = " ".join(["a short story about a cat and a dog"] * 12)
    texts += _client_run(runs, "c", [("summarize the text below", long), ("tell a story", long)])
    heldout = tmp_path / "general.jsonl"
    filtered(heldout, n=4)
    seen: list = []
    real = fed.run_simulation_engine
    monkeypatch.setattr(fed, "run_simulation_engine", lambda d, c, **kw: real(d, c, observe=seen.append, **kw))
    options = dict(run="fed", student=StudentSettings(model=str(model)), lora=LoraSettings(r=4, alpha=8),
                   train=TrainSettings(batch_size=2, grad_accum=1, max_length=48, precision="fp32"))
    federation = FederateSettings(client_runs="a,b,c", local_steps=2, eval_file=str(heldout))
    fed.federate(federate=dataclasses.replace(federation, rounds=1), **options)

    state = read_state(runs / "fed")
    assert [c["name"] for c in state["clients"]] == ["a", "b", "c"]
    assert state["settings"]["local"]["student.device"] == "auto"  # what the server sends every client
    (r1,) = state["rounds"]
    assert sorted(r1["trained"]) == ["client-0", "client-1"]  # partitions 0 and 1: a and b
    assert r1["trained"]["client-0"]["examples"] == 2
    assert [f["error"] for f in r1["failed"]] == ["client 2: SiftError"]  # type only, no message
    assert r1["heldout_nll"] > 0 and state["initial"]["heldout_nll"] > 0
    first = adapter_path(runs / "fed", 1).read_bytes()

    # privacy: every reply holds only adapter tensors and numbers, and no client's text
    from flwr.app import ArrayRecord, MetricRecord

    assert len(seen) == 3 * 3  # initial evaluation, then train and evaluate of round 1, three clients each
    blob = b""
    for reply in seen:
        if reply.has_error():
            blob += reply.error.reason.encode()
            continue
        assert set(reply.content.keys()) <= {"arrays", "metrics"}
        for key, record in reply.content.items():
            assert isinstance(record, ArrayRecord if key == "arrays" else MetricRecord)
            if key == "arrays":
                assert all(".lora_" in name for name in record)
                blob += b"".join(record[name].data for name in record)
            else:
                assert all(isinstance(v, int | float) for v in record.values())
                blob += repr(dict(record)).encode()
    assert len(blob) > 10_000  # the adapters are there to search
    for text in texts:
        assert text.encode() not in blob

    # killed: `sift federate --rounds 2` SIGKILLs itself while writing round 2 into federate.json
    # (its adapter is on disk, the round is not); round 1 stays, nothing is half-written
    args = ["federate", "--run", "fed", "--federate.rounds", "2", "--federate.client-runs", "a,b,c",
            "--federate.local-steps", "2", "--federate.eval-file", str(heldout), "--student.model", str(model),
            "--lora.r", "4", "--lora.alpha", "8", "--train.batch-size", "2", "--train.grad-accum", "1",
            "--train.max-length", "48", "--train.precision", "fp32"]
    log = tmp_path / "killed.log"
    with log.open("w") as out:  # a session of its own: Ray's daemons go with it
        child = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, "SIFT_TEST_KILL_AT": "federate.json:2:mid"}, start_new_session=True)
        try:
            assert child.wait(timeout=900) == -signal.SIGKILL, log.read_text()[-3000:]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
    assert [r["round"] for r in read_state(runs / "fed")["rounds"]] == [1]
    assert adapter_path(runs / "fed", 2).is_file() and list((runs / "fed").glob(".federate.json.*.tmp"))

    # rerun: the same command continues after round 1 from its adapter
    fed.federate(federate=dataclasses.replace(federation, rounds=2), **options)
    state2 = read_state(runs / "fed")
    assert [r["round"] for r in state2["rounds"]] == [1, 2]
    assert state2["rounds"][0] == r1 and adapter_path(runs / "fed", 1).read_bytes() == first
    assert not list((runs / "fed").glob(".federate.json.*.tmp"))
    assert state2["rounds"][1]["failed"][0]["error"] == "client 2: SiftError"
    with pytest.raises(SiftError, match="changed: local"):
        fed.federate(federate=dataclasses.replace(federation, rounds=3, local_steps=3), **options)


def test_report_section_shows_rounds_curves_and_failures(tmp_path: Path) -> None:
    from pipeline.views.federated import federate_section

    assert "No federate.json" in federate_section(tmp_path)
    valid = {"client-0": {"valid_nll": 2.0, "valid_tokens": 9}, "client-1": {"valid_nll": None, "valid_tokens": 0}}
    state = {"settings": {"aggregation": "exact", "heldout_kind": "general", "heldout": "g.jsonl",
                          "local": {"local_steps": 4}},
             "clients": [{"name": "a", "dir": "x"}, {"name": "b", "dir": "y"}],
             "initial": {"heldout_nll": 3.0, "clients_valid": valid},
             "rounds": [{"round": 1, "heldout_nll": 2.5, "clients_valid": valid, "trained": {"client-0": {}},
                         "failed": [{"node": 7, "error": "client 1: SiftError"}], "seconds": 12.0}]}
    (tmp_path / "federate.json").write_text(json.dumps(state))
    html = federate_section(tmp_path)
    assert "data:image/png;base64," in html and "client 1: SiftError" in html and "2.5000" in html
    assert "aggregation <b>exact</b>" in html
