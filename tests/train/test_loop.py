"""`sift loop` (LLM2LLM): failure selection, the augmentation prompt and parser, lineage, the filters
on new records, and whole loops on a tiny student with a loopback OpenAI-compatible teacher."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from filters.rules import parse_rules
from pipeline.errors import SiftError
from pipeline.io.artifacts import read_json, read_jsonl, write_json, write_jsonl
from pipeline.llm2llm import augment as llm2llm
from pipeline.settings import (
    DistillSettings,
    ExportSettings,
    FilterSettings,
    LoopSettings,
    StudentSettings,
    TeacherSettings,
    TrainSettings,
)
from pipeline.stages.loop import filter_new, loop, original_records, pool_instructions
from pipeline.teachers.prompts import load
from tests.pipeline.openai_server import FakeOpenAI

FAILURE = {"id": "ex_1", "instruction": "Classify the sentiment of the review.", "input": "I loved it.",
           "output": "Positive", "score": 0.25}


# ---------------------------------------------------------------- pure parts


def test_failures_are_strictly_below_the_threshold_worst_first() -> None:
    scores = [{"id": "b", "score": 0.2}, {"id": "a", "score": 0.2}, {"id": "c", "score": 0.5},
              {"id": "d", "score": 0.0}, {"id": "e", "score": 0.9}]
    assert [f["id"] for f in llm2llm.select_failures(scores, threshold=0.5)] == ["d", "a", "b"]
    assert [f["id"] for f in llm2llm.select_failures(scores, threshold=0.5, limit=2)] == ["d", "a"]
    assert llm2llm.select_failures(scores, threshold=0.0) == []
    assert len(llm2llm.select_failures(scores, threshold=1.0)) == 5


def test_the_augmentation_prompt_shows_the_failure_and_the_wrong_answer() -> None:
    template = load(llm2llm.AUGMENT_PROMPT)
    sampling = llm2llm.augment_sampling(temperature=0.7, top_p=0.9, max_tokens=300, count=3, seed=5)
    request = llm2llm.augment_request(template, sampling, FAILURE, answer="Negative", count=3)
    assert request.prompt is not None
    assert "Write 3 new tasks" in request.prompt
    assert "1. Instruction: Classify the sentiment of the review.\n1. Input:\nI loved it.\n1. Output:\nPositive" \
        in request.prompt
    assert "wrong answer to task 1 was:\nNegative" in request.prompt
    assert request.prompt.endswith("###\n2. Instruction:")
    assert request.sampling.stop == ("5. Instruction", "\n5.")  # tasks 2, 3, 4 are the new ones
    no_input = llm2llm.augment_request(template, sampling, {**FAILURE, "input": ""}, answer="", count=1)
    assert "1. Input:\n<noinput>\n" in no_input.prompt and "was:\n(no answer)" in no_input.prompt


def test_parsed_examples_carry_their_lineage_and_count_is_capped() -> None:
    reply = (" Classify the mood of the tweet as happy or sad.\n2. Input:\nRain again today.\n2. Output:\nSad\n###\n"
             "3. Instruction: Label this product review as positive or negative.\n3. Input:\n<noinput>\n"
             "3. Output:\nNegative\n###\n4. Instruction: One too many tasks for the count.\n"
             "4. Input:\nx\n4. Output:\ny")
    records, problems = llm2llm.parse_augmentation(reply, FAILURE, round_index=2, count=2, truncated=False)
    assert [r["instruction"] for r in records] == ["Classify the mood of the tweet as happy or sad.",
                                                   "Label this product review as positive or negative."]
    assert records[1]["input"] == ""
    for r in records:
        assert r["loop"] == {"round": 2, "parent_id": "ex_1", "parent_score": 0.25,
                             "parent_instruction": FAILURE["instruction"]}
        assert r["id"].startswith("loop_") and r["task_id"] == r["id"] and r["source"] == "loop"
    assert [p.reason for p in problems] == ["over_count"]
    # a truncated reply loses its last chunk; garbage gives problems, never an exception
    cut, cut_problems = llm2llm.parse_augmentation(reply, FAILURE, round_index=1, count=5, truncated=True)
    assert len(cut) == 2 and [p.reason for p in cut_problems] == ["truncated_chunk"]
    assert llm2llm.parse_augmentation("", FAILURE, round_index=1, count=2, truncated=False)[0] == []
    assert llm2llm.parse_augmentation("\x00###{", FAILURE, round_index=1, count=2, truncated=False)[0] == []


def test_a_task_number_the_teacher_echoes_is_not_part_of_the_instruction() -> None:
    reply = ("\n2. Write a short note saying that you are a doctor.\n2. Input:\n<noinput>\n2. Output:\nI'm a doctor."
             "\n###\n3. Instruction:\n3. 10 tips for sleeping well, in a list.\n3. Input:\n<noinput>\n"
             "3. Output:\n- Rest")
    records, _ = llm2llm.parse_augmentation(reply, FAILURE, round_index=1, count=2, truncated=False)
    assert [r["instruction"] for r in records] == ["Write a short note saying that you are a doctor.",
                                                   "10 tips for sleeping well, in a list."]
    assert llm2llm.unnumbered("3.5 is more than 3; explain why.") == "3.5 is more than 3; explain why."
    assert llm2llm.unnumbered("7.") == "7."


def test_grades_read_yes_and_no() -> None:
    assert llm2llm.grade_score("Yes, it is.") == 1.0
    assert llm2llm.grade_score("no") == 0.0
    assert llm2llm.grade_score("maybe") is None
    template = load(llm2llm.GRADE_PROMPT)
    req = llm2llm.grade_request(template, llm2llm.Sampling(temperature=0.0, max_tokens=4), FAILURE, "Negative")
    assert req.messages is not None and "### Student's answer\nNegative" in req.messages[-1]["content"]


def test_new_records_go_through_the_rules_and_dedup_against_everything_so_far() -> None:
    pool = [("ex_1", FAILURE["instruction"]), ("ex_2", "Write a haiku about the sea in winter.")]
    new = [llm2llm.new_record(item, FAILURE, round_index=1) for item in (
        {"instruction": "Classify the sentiment of this review.", "input": "Bad.", "output": "Negative"},  # near copy
        {"instruction": "Name the capital city of the country given below.", "input": "France", "output": "Paris"},
        {"instruction": "Name the capital city of the country given below.", "input": "France", "output": "Paris"},
        {"instruction": "Name the capital of the country below.", "input": "Peru", "output": "Lima"},  # like #2
        {"instruction": "Too short", "input": "", "output": "x"},
        {"instruction": "Repeat the following word exactly as it is.", "input": "echo", "output": "echo"},
    )]
    kept, rejected = filter_new(new, pool, {"ex_1", "ex_2"}, rules=parse_rules("self-instruct"),
                                rouge_threshold=0.7)
    assert [r["input"] for r in kept] == ["France"]
    reasons = {r["record"]["input"]: (r["reason"], r.get("nearest_id")) for r in rejected}
    assert reasons["Bad."] == ("rouge_duplicate", "ex_1")
    assert reasons["Peru"] == ("rouge_duplicate", new[1]["id"])  # against a record kept just before
    assert reasons[""][0] == "too_short"
    assert reasons["echo"][0] == "input_equals_output"
    assert sum(r["reason"] == "duplicate_example" for r in rejected) == 1
    assert len(kept) + len(rejected) == len(new)


# ---------------------------------------------------------------- whole loops

WORDS = ("river mountain garden violin planet recipe harbor lantern meadow castle desert island comet "
         "forest bridge engine pepper marble canyon glacier").split()
VERBS = ("Describe", "Explain", "Summarize", "Compare", "List", "Rewrite", "Classify", "Translate")


def teacher_reply(body: dict) -> tuple[str, str]:
    """Alpaca-format tasks derived from the prompt's hash: distinct, deterministic, filter-proof."""
    prompt = body.get("prompt") or body["messages"][-1]["content"]
    if "Student's answer" in prompt:  # the grader
        return ("no" if "###" in prompt else "yes"), "stop"
    count = int(re.search(r"Write (\d+) new tasks", prompt).group(1))
    h = hashlib.sha256(prompt.encode()).digest()
    chunks = []
    for k in range(count):
        words = [WORDS[(h[k * 4 + j]) % len(WORDS)] for j in range(4)]
        number = k + 2
        head = "" if k == 0 else f"{number}. Instruction: "
        chunks.append(f"{head}{VERBS[h[k] % len(VERBS)]} the {words[0]} near the {words[1]} in {k + 1} "
                      f"sentences about {words[2]} and {words[3]} {h.hex()[k * 6:k * 6 + 6]}.\n"
                      f"{number}. Input:\n<noinput>\n{number}. Output:\nThe {words[0]} stands by the {words[1]}.")
    return " " + "\n###\n".join(chunks), "stop"


def make_run(runs: Path, n: int = 12) -> Path:
    run = runs / "r"
    run.mkdir(parents=True)
    topics = ["capital of france", "primary color", "healthy tips", "spanish hello", "cat and dog story",
              "summarize the text", "red color", "walk every day", "sleep well", "eat vegetables", "paris",
              "hola", "story about a cat", "a dog story"]
    write_jsonl(run / "filtered.jsonl", [
        {"id": f"ex_{i}", "task_id": f"t{i}", "instruction": f"Answer question number {i} about the {topics[i]}.",
         "input": "", "output": f"the answer is {topics[i]}"} for i in range(n)])
    write_jsonl(run / "seeds.jsonl", [
        {"id": "seed_task_0", "instruction": "Give three tips for staying healthy.", "is_classification": False,
         "instances": [{"input": "", "output": "eat vegetables sleep well and walk every day"}]}])
    return run


def loop_options(tiny: Path, url: str, *, train: dict | None = None, distill: dict | None = None,
                 filter: dict | None = None, **extra: object) -> dict:
    """loop()'s sections for a small loop on the tiny student and the loopback teacher: `extra` are
    loop.* fields; train, distill and filter fields go in their own dicts."""
    return {"run": "r", "teacher": TeacherSettings(model="fake", backend="openai", base_url=url),
            "student": StudentSettings(model=str(tiny)),
            "train": TrainSettings(**{"epochs": 2, "max_steps": 2, "batch_size": 4, **(train or {})}),
            "distill": DistillSettings(**(distill or {})), "filter": FilterSettings(**(filter or {})),
            "loop": LoopSettings(**{"max_new_tokens": 8, "per_failure": 2, "max_failures": 3, "eval_limit": 6,
                                    "teacher_batch_size": 2, **extra})}


def test_two_rounds_write_loop_json_and_lineage_on_every_added_record(
        runs: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(runs)
    with FakeOpenAI(reply=teacher_reply) as server:
        loop(**loop_options(tiny_model_dir, server.url, rounds=2))
    result = read_json(run / "loop.json")
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    originals = original_records(run, train_on_seeds=True)
    assert len(originals) == 13  # 12 generated + 1 seed example
    for info in result["rounds"]:
        assert info["eval"]["examples"] == 6
        assert info["eval"]["failures"] >= info["augment"]["failures_used"] == 3  # a random student fails
        assert info["augment"]["requests"] == 3 and info["augment"]["candidates"] == 6
        assert info["augment"]["new_records"] + info["augment"]["rejected"] == 6
        assert info["train"]["step"] == 2 and info["train"]["eval_loss_after"] is not None
    r1, r2 = result["rounds"]
    assert r2["data"]["records"] == r1["data"]["records"] + r1["augment"]["new_records"]
    assert r1["data"]["valid"] == r2["data"]["valid"]  # the validation split is fixed at round 0
    data = read_jsonl(run / "loop" / "data.jsonl")
    assert len(data) == 13 + result["data"]["added"] and len({d["id"] for d in data}) == len(data)
    scored = {s["id"] for s in read_jsonl(run / "loop" / "round-1" / "scores.jsonl")}
    original_ids = {o["id"] for o in originals}
    for d in data:
        lineage = d["metadata"]["loop"]
        if d["id"] in original_ids:
            assert lineage == {"round": 0}
            continue
        assert lineage["round"] in (1, 2)
        assert lineage["parent_id"] in scored & original_ids  # augmented from an original example only
        assert lineage["parent_score"] < 0.5
    train_ids = {json.loads(line)["id"] for line in (run / "loop" / "round-2" / "train.jsonl").open()}
    assert {a["id"] for a in read_jsonl(run / "loop" / "round-1" / "added.jsonl")} <= train_ids
    out = capsys.readouterr().out
    assert "round 1:" in out and "round 2:" in out and "failures" in out
    # every round starts from the same base model on the same split: round 2 logs round 1's measurement
    assert r1["train"]["eval_loss_before"] is not None
    assert r2["train"]["eval_loss_before"] == r1["train"]["eval_loss_before"]
    first = [json.loads(line) for line in (run / "loop" / "round-2" / "student" / "metrics.jsonl").open()][0]
    assert first["kind"] == "eval" and first["step"] == 0 and first["reused"] is True


def test_a_rerun_does_nothing_more_rounds_extend_and_changed_settings_are_refused(
        runs: Path, tiny_model_dir: Path) -> None:
    run = make_run(runs)
    with FakeOpenAI(reply=teacher_reply) as server:
        loop(**loop_options(tiny_model_dir, server.url, rounds=1))
        first = (run / "loop" / "round-1" / "added.jsonl").read_bytes()
        calls = len(server.bodies)
        loop(**loop_options(tiny_model_dir, server.url, rounds=1))
        assert len(server.bodies) == calls  # nothing asked again
        loop(**loop_options(tiny_model_dir, server.url, rounds=2))
        assert (run / "loop" / "round-1" / "added.jsonl").read_bytes() == first
        assert len(read_json(run / "loop.json")["rounds"]) == 2
        with pytest.raises(SiftError, match=r"changed: loop.fail_below\)"):
            loop(**loop_options(tiny_model_dir, server.url, rounds=2, fail_below=0.3))
        with pytest.raises(SiftError, match=r"changed: filter.threshold, train.lr\)"):
            loop(**loop_options(tiny_model_dir, server.url, rounds=2, train={"lr": 1e-3}, filter={"threshold": 0.5}))
        # where the models run and how the teacher is reached may change
        options = loop_options(tiny_model_dir, server.url, rounds=2)
        loop(**{**options, "student": StudentSettings(model=str(tiny_model_dir), device="cpu"),
                "teacher": TeacherSettings(model="fake", backend="openai", base_url=server.url,
                                           options="timeout=30")})
        # a loop begun before a setting existed ran with its default, and carries on
        settings = read_json(run / "loop" / "settings.json")
        write_json(run / "loop" / "settings.json", {k: v for k, v in settings.items() if not k.startswith("distill")})
        loop(**loop_options(tiny_model_dir, server.url, rounds=2))
        with pytest.raises(SiftError, match=r"changed: distill.enabled, distill.teacher\)"):
            loop(**loop_options(tiny_model_dir, server.url, rounds=2,
                                distill={"enabled": True, "teacher": str(tiny_model_dir)}))
        # a loop started before settings had sections is not compared field by field with the wrong names
        write_json(run / "loop" / "settings.json", {"student": str(tiny_model_dir), "threshold": 0.5})
        with pytest.raises(SiftError, match="started by an earlier sift"):
            loop(**loop_options(tiny_model_dir, server.url, rounds=2))


def test_a_round_that_adds_nothing_is_finished_and_the_loop_extends_past_it(runs: Path, tiny_model_dir: Path) -> None:
    run = make_run(runs)
    with FakeOpenAI(reply=lambda body: ("no tasks here, sorry", "stop")) as server:
        loop(**loop_options(tiny_model_dir, server.url, rounds=1))
        assert (run / "loop" / "round-1" / "added.jsonl").read_bytes() == b""
        loop(**loop_options(tiny_model_dir, server.url, rounds=1))  # the rerun reads the empty round back
        loop(**loop_options(tiny_model_dir, server.url, rounds=2))
    result = read_json(run / "loop.json")
    assert [r["augment"]["new_records"] for r in result["rounds"]] == [0, 0] and result["data"]["added"] == 0


def test_judge_metric_scores_with_the_teachers_verdict(runs: Path, tiny_model_dir: Path) -> None:
    run = make_run(runs)
    with FakeOpenAI(reply=teacher_reply) as server:
        loop(**loop_options(tiny_model_dir, server.url, rounds=1, metric="judge", train_on_seeds=False))
    scores = read_jsonl(run / "loop" / "round-1" / "scores.jsonl")
    assert len(scores) == 6 and all(s["score"] in (0.0, 1.0) and "grade" in s for s in scores)
    info = read_json(run / "loop.json")["rounds"][0]
    assert info["eval"]["failures"] == sum(s["score"] == 0.0 for s in scores)


def test_distill_rounds_learn_from_the_teachers_distribution(runs: Path, tiny_model_dir: Path) -> None:
    """distill.enabled: each round's student trains with the KL to distill.teacher (here the student's
    own base, which shares its tokenizer), from a top-k cache per round."""
    run = make_run(runs)
    with FakeOpenAI(reply=teacher_reply) as server:
        loop(**loop_options(tiny_model_dir, server.url, rounds=2,
                            distill={"enabled": True, "teacher": str(tiny_model_dir), "top_k": 8}))
    for r in (1, 2):
        config = read_json(run / "loop" / f"round-{r}" / "student" / "train_config.json")
        assert config["distill"]["teacher"] == str(tiny_model_dir) and config["distill"]["top_k"] == 8
        assert list((run / "loop" / f"round-{r}" / "student" / "teacher_topk").iterdir())  # this round's cache
    assert read_json(run / "loop" / "settings.json")["distill.teacher"] == str(tiny_model_dir)


def test_distill_without_local_teacher_weights_or_tokenizer_is_refused_first(runs: Path, tmp_path: Path,
                                                                          tiny_model_dir: Path) -> None:
    from tests.train.conftest import make_tokenizer
    from tests.train.test_distill import _save_folder

    run = make_run(runs)
    with pytest.raises(SiftError) as e:  # an openai teacher's weights are not here
        loop(**loop_options(tiny_model_dir, "http://127.0.0.1:9/v1", rounds=1, distill={"enabled": True}))
    assert e.value.field == "distill.teacher"
    other = _save_folder(tmp_path / "other", make_tokenizer(specials=["<|im_end|>", "<|im_start|>", "<|endoftext|>",
                                                                       "[UNK]"]))
    with pytest.raises(SiftError, match="do not share a tokenizer") as e:
        loop(**loop_options(tiny_model_dir, "http://127.0.0.1:9/v1", rounds=1,
                            distill={"enabled": True, "teacher": str(other)}))
    assert e.value.field == "distill.teacher"
    assert not (run / "loop").exists()


@pytest.mark.parametrize(("argv", "field"), [
    (["--loop.rounds", "0"], "loop.rounds"), (["--loop.metric", "bleu"], "loop.metric"),
    (["--loop.per_failure", "0"], "loop.per_failure"), (["--filter.rules", "nonsense"], "filter.rules"),
    (["--export.valid_fraction", "1.0"], "export.valid_fraction"), (["--loop.max_failures", "-1"], "loop.max_failures"),
    (["--distill.alpha", "2"], "distill.alpha"), (["--train.lr", "0"], "train.lr"),
    (["--loop.policy", "learned"], "loop.policy"),
])
def test_bad_options_fail_before_anything_loads(runs: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                                field: str) -> None:
    from pipeline.cli import main

    make_run(runs)
    try:
        code = main(["loop", "--run", "r", *argv])
    except SystemExit as e:  # argparse refuses a value outside a flag's choices itself
        code = e.code
    assert code == 2 and field in capsys.readouterr().err
    assert not (runs / "r" / "loop").exists()


def test_bad_sections_built_in_code_are_refused_too() -> None:
    from pipeline.settings import SettingsError

    with pytest.raises(SettingsError) as e:
        LoopSettings(metric="bleu")  # type: ignore[arg-type]
    assert e.value.field == "metric"
    with pytest.raises(SettingsError, match="use one of fixed, learned"):
        LoopSettings(policy="greedy")  # type: ignore[arg-type]
    with pytest.raises(SettingsError) as e:
        ExportSettings(valid_fraction=1.0)
    assert e.value.field == "valid_fraction"


def test_a_missing_filtered_file_names_the_stage_to_run(runs: Path) -> None:
    (runs / "r").mkdir(parents=True)
    with pytest.raises(SiftError, match="sift filter"):
        loop(run="r")


def test_pool_holds_every_instruction_once(runs: Path) -> None:
    run = make_run(runs, n=3)
    pool = pool_instructions(original_records(run, train_on_seeds=True), run / "seeds.jsonl")
    texts = [t for _, t in pool]
    assert len(texts) == len(set(texts)) == 4


# ---------------------------------------------------------------- killed and rerun


def _loop_command(tiny: Path, url: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "pipeline.cli", "loop", "--run", "r", "--student.model", str(tiny),
            "--teacher.model", "fake", "--teacher.backend", "openai", "--teacher.base_url", url,
            "--train.epochs", "2", "--train.max_steps", "2", "--train.batch_size", "4", "--loop.rounds", "2",
            "--loop.max_new_tokens", "8", "--loop.per_failure", "2", "--loop.max_failures", "3",
            "--loop.eval_limit", "6", "--loop.teacher_batch_size", "2"]


def _comparable(loop_json: dict) -> list[dict]:
    """loop.json's rounds without the wall-clock figures."""
    out = []
    for r in loop_json["rounds"]:
        train = {k: v for k, v in r["train"].items() if k not in ("train_seconds", "tokens_per_s")}
        out.append({**{k: v for k, v in r.items() if k != "seconds"}, "train": train})
    return out


@pytest.mark.slow
def test_a_loop_killed_at_each_step_finishes_with_the_same_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import REPO

    results = {}
    with FakeOpenAI(reply=teacher_reply) as server:
        argv = _loop_command(tiny_model_dir, server.url)
        for name, milestones in (("clean", []), ("killed", [
                "loop/round-1/student/metrics.jsonl", "loop/round-1/score.journal", "loop/round-1/augment.journal",
                "loop/round-2/train.jsonl", "loop/round-2/score.journal"])):
            runs = tmp_path / name
            make_run(runs)
            env = {**os.environ, "SIFT_RUNS_DIR": str(runs), "PYTHONPATH": str(REPO)}
            kills = 0
            for milestone in milestones:
                proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                while proc.poll() is None and not (runs / "r" / milestone).exists():
                    time.sleep(0.01)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    kills += proc.wait() == -signal.SIGKILL
            done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stderr[-2000:]
            assert kills == len(milestones)
            results[name] = runs / "r"
    clean, killed = results["clean"], results["killed"]
    assert (killed / "loop" / "data.jsonl").read_bytes() == (clean / "loop" / "data.jsonl").read_bytes()
    for r in (1, 2):
        for f in ("added.jsonl", "added.rejected.jsonl", "scores.jsonl"):
            assert (killed / "loop" / f"round-{r}" / f).read_bytes() == (clean / "loop" / f"round-{r}" / f).read_bytes()
    assert _comparable(read_json(killed / "loop.json")) == _comparable(read_json(clean / "loop.json"))
    ids = [d["id"] for d in read_jsonl(killed / "loop" / "data.jsonl")]
    assert len(ids) == len(set(ids))
