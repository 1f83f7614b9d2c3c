"""The whole pipeline on the embedded model, through the CLI, with small budgets (slow; CI runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.io.artifacts import read_json, read_jsonl
from tests.conftest import REPO

STAGES = ["seeds", "generate", "classify", "instances", "filter", "export", "train", "eval", "loop", "report"]


@pytest.mark.slow
def test_every_stage_on_the_embedded_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.io.models import embedded_dir

    if not embedded_dir().exists():
        pytest.fail("the embedded model is missing: run `sift model fetch` (make setup)")
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path))
    run = ["--run", "e2e"]
    d = tmp_path / "e2e"
    assert main(["seeds", str(REPO / "seeds" / "default.jsonl"), *run]) == 0
    assert main(["generate", *run, "--generate.n", "10", "--generate.batch_size", "8", "--generate.max_tokens", "160",
                 "--generate.max_requests", "64"]) == 0
    assert main(["classify", *run, "--classify.batch_size", "16"]) == 0
    assert main(["instances", *run, "--instances.batch_size", "16", "--instances.max_tokens", "120"]) == 0
    assert main(["filter", *run]) == 0
    assert main(["export", *run]) == 0
    assert main(["train", *run, "--train.max_steps", "3", "--train.batch_size", "4", "--train.grad_accum", "1",
                 "--train.eval_steps", "100", "--train.save_steps", "2", "--train.resume"]) == 0
    assert main(["eval", *run, "--eval.limit", "3", "--eval.max_new_tokens", "24"]) == 0
    assert main(["loop", *run, "--loop.rounds", "2", "--no-loop.train_on_seeds", "--train.max_steps", "1",
                 "--train.batch_size", "4", "--loop.eval_limit", "4", "--loop.max_failures", "2",
                 "--loop.max_new_tokens", "24", "--loop.augment_max_tokens", "200"]) == 0
    assert main(["report", *run]) == 0
    check_run(d)


def check_run(d: Path) -> None:
    """What a working pipeline leaves in the run folder `d` after the commands above."""
    generated = read_json(d / "generate.stats.json")
    assert generated["kept"] == 10 and generated["stage"] == "generate" and generated["unit"] == "instructions"
    assert generated["read"] == generated["kept"] + sum(generated["rejected_by_reason"].values())
    instances = read_jsonl(d / "instances.jsonl", allow_empty=True)
    assert len(instances) + len(read_jsonl(d / "instances.rejected.jsonl", allow_empty=True)) == 10
    funnel = read_json(d / "funnel.json")
    kept = read_jsonl(d / "filtered.jsonl")
    rejected = read_jsonl(d / "filtered.rejected.jsonl", allow_empty=True)
    assert funnel["kept"] == len(kept) and funnel["input"] == len(kept) + len(rejected)
    assert all(r["provenance"]["teacher"]["name"] == "smollm2-135m-instruct" for r in kept)
    classified = read_jsonl(d / "classified.jsonl")
    assert len(classified) + len(read_jsonl(d / "classified.rejected.jsonl", allow_empty=True)) == 10
    assert all(isinstance(r["is_classification"], bool) for r in classified)
    # every kept record is in exactly one of train, valid and the export's contamination ledger
    exported = [r["id"] for name in ("train.jsonl", "valid.jsonl") for r in read_jsonl(d / name, allow_empty=True)]
    if (d / "export.rejected.jsonl").exists():
        exported += [r["id"] for r in read_jsonl(d / "export.rejected.jsonl", allow_empty=True)]
    assert sorted(exported) == sorted(r["id"] for r in kept)
    from safetensors.torch import load_file

    lora_b = [v for k, v in load_file(d / "student" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().sum()) > 0 for v in lora_b)  # 3 steps moved the adapter off zero
    evaluated = read_json(d / "eval.json")["valid"]
    n_valid = len(read_jsonl(d / "valid.jsonl"))
    assert evaluated["examples"] == min(3, n_valid) and evaluated["base"]["model"] == "smollm2-135m-instruct"
    for side in ("base", "student"):  # a real model on real answers: finite, plausible numbers
        m = evaluated[side]
        assert 1 < m["perplexity"] < 1e4 and 0 <= m["rouge_l"] <= 1 and 0 <= m["stop_rate"] <= 1
    for key, delta in evaluated["delta"].items():
        assert delta == pytest.approx(evaluated["student"][key] - evaluated["base"][key], abs=1e-9)
    assert all(isinstance(s["student"], str) and isinstance(s["base"], str) for s in evaluated["samples"])
    html = (d / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html
    from tests.pipeline.test_report import CHROMIUM, _check_in_browser

    if CHROMIUM:  # the page of a real run renders, every image loads, no console errors
        shot = d / "report.png"
        result = _check_in_browser(d / "report.html", shot)
        assert result["images"] and shot.stat().st_size > 10_000
    loop = read_json(d / "loop.json")
    assert [r["round"] for r in loop["rounds"]] == [1, 2]
    assert all(r["eval"]["examples"] == 4 for r in loop["rounds"])
    # lineage on the records that exist: the originals are filtered.jsonl, in order, marked round 0
    data = read_jsonl(d / "loop" / "data.jsonl")
    originals, added = data[:len(kept)], data[len(kept):]
    assert [r["id"] for r in originals] == [r["id"] for r in kept]
    assert all(r["metadata"]["loop"] == {"round": 0} for r in originals)
    assert len(added) == loop["data"]["added"] == sum(r["augment"]["new_records"] for r in loop["rounds"])
    original_ids = {r["id"] for r in originals}
    for r in loop["rounds"]:
        round_dir = d / "loop" / f"round-{r['round']}"
        scores = read_jsonl(round_dir / "scores.jsonl")  # the student answered, and was scored, on 4 originals
        assert len(scores) == 4 and {s["id"] for s in scores} <= original_ids
        a = r["augment"]
        assert a["failures_used"] == min(r["eval"]["failures"], 2)
        assert a["requests"] == a["failures_used"]  # one teacher request per failure augmented
        # the failures augmented are the worst-scored below the threshold (0.5), at most 2, ties by id
        used = {s["id"] for s in sorted((s for s in scores if s["score"] is not None and s["score"] < 0.5),
                                        key=lambda s: (s["score"], s["id"]))[:2]}
        assert len(used) == a["failures_used"]
        new = read_jsonl(round_dir / "added.jsonl", allow_empty=True)
        ledger = read_jsonl(round_dir / "added.rejected.jsonl", allow_empty=True)
        assert len(new) == a["new_records"] and len(ledger) == a["rejected"]
        for rec in new:  # whatever the teacher added carries its round and a parent among those failures
            assert rec["loop"]["round"] == r["round"] and rec["loop"]["parent_id"] in used
        for e in ledger:  # and so does every row it wrote that was turned away (parse problem, filter, error)
            parent = e.get("parent_id") or (e.get("record") or {}).get("loop", {}).get("parent_id") or (
                e["id"] if e["reason"] == "teacher_error" else None)
            assert parent in used, e
    assert all(a["metadata"]["loop"]["round"] in (1, 2) and a["metadata"]["loop"]["parent_id"] in original_ids
               for a in added)
    assert 'id="loop"' in html
    manifest = read_json(d / "manifest.json")
    assert set(STAGES) <= set(manifest["stages"])
    from pipeline.io.artifacts import file_sha256

    for name in ("filtered.jsonl", "train.jsonl", "loop/data.jsonl"):  # the recorded hashes are the files'
        assert manifest["artifacts"][name]["sha256"] == file_sha256(d / name)
