"""`sift loop` with several teachers: failures spread by share, lineage naming the teacher, and the
learned policy (Thompson sampling, pipeline/llm2llm/policy.py) moving share towards the
teacher whose additions help, on a tiny student with one loopback server serving two teachers."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.io.artifacts import read_json, read_jsonl
from pipeline.llm2llm import policy as teacher_policy
from pipeline.settings import LoopSettings, StudentSettings, TeacherSettings, TrainSettings
from pipeline.stages.loop import loop
from tests.pipeline.openai_server import FakeOpenAI
from tests.train.test_loop import WORDS, make_run, teacher_reply


def copier_and_noise(body: dict) -> tuple[str, str]:
    """Two teachers on one server, told apart by the model name: `copier` answers a failure with
    copies of its reference answer (the instruction behind a distinct ten-word lead-in, so the
    ROUGE-L filter keeps every copy); `noise` with unrelated tasks (test_loop's teacher)."""
    prompt = body.get("prompt") or body["messages"][-1]["content"]
    if body["model"] != "copier-model":
        return teacher_reply(body)
    task = re.search(r"###\n1\. Instruction: (.*)\n1\. Input:\n(.*)\n1\. Output:\n(.*)\n###", prompt, re.S)
    assert task is not None, prompt
    instruction, answer = task.group(1).strip(), task.group(3).strip()
    count = int(re.search(r"Write (\d+) new tasks", prompt).group(1))
    chunks = []
    for k in range(count):
        h = hashlib.sha256(f"{instruction}|{k}".encode()).digest()
        lead = " ".join(WORDS[b % len(WORDS)] for b in h[:10])
        head = "" if k == 0 else f"{k + 2}. Instruction: "
        chunks.append(f"{head}{lead.capitalize()}: {instruction[0].lower()}{instruction[1:]}\n"
                      f"{k + 2}. Input:\n<noinput>\n{k + 2}. Output:\n{answer}")
    return " " + "\n###\n".join(chunks), "stop"


def oracle_student(round_dir: Path, rows: list[dict], **_: object) -> list[dict]:
    """The controlled student: it answers an example correctly (score 1) exactly when its round's
    training data holds an added copy of that example's answer, made for it, and fails otherwise.
    It stands in for `score_examples` only; training, teachers, filters and the policy are real."""
    learned = {(r["metadata"]["loop"]["parent_id"], r["messages"][-1]["content"])
               for r in read_jsonl(round_dir / "train.jsonl") if r.get("metadata", {}).get("loop", {}).get("round")}
    out = []
    for row in rows:
        ok = (row["id"], row["output"]) in learned
        out.append({"id": row["id"], "score": 1.0 if ok else 0.0, "answer": row["output"] if ok else "",
                    "stopped": True, "tokens": 1})
    return out


@pytest.fixture
def student(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.stages.loop.score_examples", oracle_student)


def teachers_file(tmp_path: Path, url: str, shares: tuple[float, float] = (1, 1)) -> str:
    p = tmp_path / "teachers.yaml"
    p.write_text(f"teachers:\n  - name: copier\n    model: copier-model\n    backend: openai\n    base_url: {url}\n"
                 f"    share: {shares[0]}\n  - name: noise\n    model: noise-model\n    backend: openai\n"
                 f"    base_url: {url}\n    share: {shares[1]}\n")
    return str(p)


def options(tiny: Path, teachers: str, **extra: object) -> dict:
    """loop()'s sections: a pool of teachers, the tiny student; `extra` are loop.* fields."""
    return {"run": "r", "teacher": TeacherSettings(pool=teachers), "student": StudentSettings(model=str(tiny)),
            "train": TrainSettings(max_steps=1, batch_size=4),
            "loop": LoopSettings(**{"train_on_seeds": False, "max_new_tokens": 4, "per_failure": 2, "max_failures": 6,
                                    "eval_limit": 8, "teacher_batch_size": 4, **extra})}


def test_learned_policy_moves_share_to_the_teacher_whose_additions_help(runs: Path, tiny_model_dir: Path,
                                                                          tmp_path: Path, student: None) -> None:
    run = make_run(runs)
    with FakeOpenAI(reply=copier_and_noise) as server:
        loop(**options(tiny_model_dir, teachers_file(tmp_path, server.url), rounds=3, policy="learned"))
    rounds = read_json(run / "loop.json")["rounds"]
    shares = [r["teachers"]["shares"] for r in rounds]
    assert shares[0] == {"copier": 1.0, "noise": 1.0}  # round 1: the given shares
    assert rounds[0]["teachers"]["sent"] == {"copier": 3, "noise": 3}  # 6 failures, within one of 3 each
    ev = rounds[1]["teachers"]["evidence"]  # round 1's additions, measured in round 2
    assert ev["copier"]["sent"] == 3 and ev["copier"]["improved"] == 3 and ev["copier"]["mean_delta"] == 1.0
    assert ev["noise"]["sent"] == 3 and ev["noise"]["improved"] == 0
    assert shares[1]["copier"] > 0.9 > 0.1 > shares[1]["noise"]
    assert shares[2]["copier"] >= shares[1]["copier"]
    assert rounds[2]["teachers"]["posterior"]["copier"][0] > rounds[1]["teachers"]["posterior"]["copier"][0]
    for r in rounds:  # every added record names its teacher, and the counts match
        added = read_jsonl(run / "loop" / f"round-{r['round']}" / "added.jsonl", allow_empty=True)
        counts: dict[str, int] = {}
        for a in added:
            assert r["teachers"]["served"][a["loop"]["parent_id"]] == a["loop"]["teacher"]
            counts[a["loop"]["teacher"]] = counts.get(a["loop"]["teacher"], 0) + 1
        assert counts == r["teachers"]["new_records"]
        assert sum(u["requests"] for u in r["teachers"]["usage"].values()) == r["augment"]["requests"]


def test_fixed_policy_keeps_the_shares_records_the_evidence_and_resumes(runs: Path, tiny_model_dir: Path,
                                                                          tmp_path: Path, student: None) -> None:
    run = make_run(runs)
    with FakeOpenAI(reply=copier_and_noise) as server:
        spec = teachers_file(tmp_path, server.url, shares=(1, 2))
        loop(**options(tiny_model_dir, spec, rounds=1))
        asked = len(server.bodies)
        loop(**options(tiny_model_dir, spec, rounds=1))
        assert len(server.bodies) == asked  # a finished round is not redone
        loop(**options(tiny_model_dir, spec, rounds=2))
        with pytest.raises(SiftError, match=r"changed: loop.policy\)"):
            loop(**options(tiny_model_dir, spec, rounds=2, policy="learned"))
        edited = Path(spec).read_text().replace("share: 2", "share: 3")
        Path(spec).write_text(edited)
        with pytest.raises(SiftError, match=r"changed: teachers\)"):
            loop(**options(tiny_model_dir, spec, rounds=2))
    rounds = read_json(run / "loop.json")["rounds"]
    assert [r["teachers"]["shares"] for r in rounds] == [{"copier": 1.0, "noise": 2.0}] * 2
    assert rounds[0]["teachers"]["sent"] == {"copier": 2, "noise": 4}
    assert rounds[1]["teachers"]["evidence"]["copier"]["improved"] == 2  # evidence is kept under fixed too


def test_learned_policy_needs_several_teachers(runs: Path) -> None:
    make_run(runs)
    with pytest.raises(SiftError, match="needs several teachers") as e:
        loop(run="r", loop=LoopSettings(policy="learned"))
    assert e.value.field == "loop.policy"


# ---------------------------------------------------------------- the policy alone


def test_evidence_counts_improved_targets_and_unserved_failures() -> None:
    served = {"f1": "a", "f2": "a", "f3": "b", "f4": "b"}
    before = {"f1": 0.0, "f2": 0.2, "f3": 0.1, "f4": 0.0}
    after = {"f1": 1.0, "f2": 0.1, "f3": 0.1, "f4": 0.5}
    ev = teacher_policy.evidence(served, before, after, {"a": {"f1", "f2"}, "b": {"f3"}}, {"a": 4, "b": 1},
                                 names=["a", "b"], valid_loss_delta=-0.5)
    assert ev["a"]["improved"] == 1 and ev["a"]["failures"] == 1 and ev["a"]["successes"] == pytest.approx(1.8)
    # b: f3 did not improve; f4 improved but b added nothing for it, so it cannot take the credit
    assert ev["b"]["improved"] == 0 and ev["b"]["failures"] == 2 and ev["b"]["successes"] == pytest.approx(0.2)
    # c was sent f5 but failed it, so a served it: a failed trial for c, none for a
    ev = teacher_policy.evidence({"f5": "a"}, {"f5": 0.0}, {"f5": 0.0}, {}, {}, names=["a", "c"],
                                 valid_loss_delta=None, assigned={"f5": "c"})
    assert ev["c"]["passed_on"] == 1 and ev["c"]["failures"] == 1 and ev["a"]["failures"] == 1


def test_thompson_shares_follow_the_evidence_and_can_reach_zero() -> None:
    even = teacher_policy.thompson_shares({"a": [1, 1], "b": [1, 1]}, seed=0, round_index=2)
    assert abs(even["a"] - 0.5) < 0.02 and abs(sum(even.values()) - 1) < 0.002
    lopsided = teacher_policy.thompson_shares({"a": [13, 1], "b": [1, 13]}, seed=0, round_index=2)
    assert lopsided == {"a": 1.0, "b": 0.0}
    assert teacher_policy.thompson_shares({"a": [3, 2], "b": [2, 3]}, seed=4, round_index=3) == \
        teacher_policy.thompson_shares({"a": [3, 2], "b": [2, 3]}, seed=4, round_index=3)  # seeded: a resume agrees
    post = teacher_policy.posterior([{"a": {"successes": 2, "failures": 1}}, {}], ["a", "b"])
    assert post == {"a": [3.0, 2.0], "b": [1.0, 1.0]}
