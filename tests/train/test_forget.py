"""Remedies for forgetting (train/forget.py): self-distilled answers and replay, on the tiny random Llama.

The rewrite and replay passes are journaled; a killed `sift train` rerun carries on with nothing made
twice; replay never draws from an eval set; the options and what they did are in train_config.json
and the manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.io.artifacts import Journal, read_json, read_jsonl, write_jsonl
from pipeline.settings import ForgetSettings, SettingsError
from tests.train.conftest import fine_tune
from train import forget as f
from train.format import to_messages
from train.general_set import GENERAL_PATH, load_general

WORDS = "give three tips for staying healthy what is the capital of france name a primary color".split()
FAST = {"precision": "fp32", "max_steps": 1, "batch_size": 4, "grad_accum": 1, "eval_steps": 10, "save_steps": 10}


def _run(runs: Path, n: int, run: str = "r") -> Path:
    """A run with n training records (distinct conversations) and 3 validation records."""
    d = runs / run
    rows = [{"id": f"t{i}", "messages": to_messages(" ".join(WORDS[(i + k) % len(WORDS)] for k in range(5)) + f" {i}",
                                                   "", "red is a primary color")} for i in range(n)]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "valid.jsonl", [{"id": f"v{i}", "messages": to_messages("translate hello to spanish", "", "hola")}
                                    for i in range(3)])
    return d


# ---------------------------------------------------------------- settings and pure parts


@pytest.mark.parametrize(("fields", "field"), [
    ({"replay": 1.0}, "replay"), ({"replay": -0.1}, "replay"), ({"self_distill_rouge": 1.5}, "self_distill_rouge"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"replay_file": "x.jsonl"}, "replay_file"),
    ({"replay": float("nan")}, "replay")])
def test_bad_forget_settings_name_their_field(fields: dict, field: str) -> None:
    with pytest.raises(SettingsError) as e:
        ForgetSettings(**fields)
    assert e.value.field == field


@pytest.mark.parametrize(("rewrite", "kept"), [
    ({"text": "red is a primary color", "stopped": True}, True),  # a copy agrees
    ({"text": "red is a primary colour indeed", "stopped": True}, True),  # ROUGE-L 0.6
    ({"text": "red is a primary color", "stopped": False}, False),  # cut off: never kept
    ({"text": "   ", "stopped": True}, False),  # empty
    ({"text": "blue sky", "stopped": True}, False),  # drifted
])
def test_a_rewrite_is_kept_only_where_it_agrees_with_the_original(rewrite: dict, kept: bool) -> None:
    messages = to_messages("name a primary color", "", "red is a primary color")
    out, decisions = f.decide([("a", messages)], {f.content_id(messages): rewrite}, 0.5)
    assert decisions[0]["kept"] is kept
    assert out[0][1][-1]["content"] == (rewrite["text"] if kept else "red is a primary color")
    assert out[0][1][:-1] == messages[:-1]


def test_replay_needs_share_r_of_all_examples() -> None:
    assert f.replay_count(80, 0.2) == 20  # 20 of 100
    assert f.replay_count(10, 0.5) == 10
    assert f.replay_count(7, 0.0) == 0
    assert f.replay_count(3, 0.2) == 1  # ceil(0.75)


def test_replay_pairs_overlapping_any_eval_set_are_dropped() -> None:
    general = load_general()
    valid = [("v0", to_messages("Describe the old lighthouse keeper's morning routine in five short steps please",
                                "", "He wakes at dawn."))]
    extra_words = "summarize the quarterly sales figures of the northern region for the board in two lines"
    index = f.eval_index(valid, ForgetSettings(replay=0.2))
    pairs = [{"id": "g", "prompt": general[0]["instruction"], "answer": "ok"},  # a general task's instruction
             {"id": "o", "prompt": "Say hi.", "answer": general[3]["output"]},  # a general answer
             {"id": "v", "prompt": valid[0][1][0]["content"], "answer": "x"},  # the valid split
             {"id": "c", "prompt": "Tell me a joke about cats.", "answer": "Why did the cat sit on the laptop?"},
             {"id": "d", "prompt": "tell me a  joke about CATS.", "answer": "another"},  # a repeat
             {"id": "e", "prompt": extra_words, "answer": "Sales rose."}]
    kept, rejected = f.clean_pairs(pairs, index)
    assert [p["id"] for p in kept] == ["c", "e"]
    reasons = {r["id"]: (r["reason"], r.get("eval_ids")) for r in rejected}
    assert reasons["g"] == ("contaminated", [f"general:{general[0]['id']}"])
    assert reasons["o"][1] == [f"general:{general[3]['id']}"] and reasons["v"][1] == ["valid:v0"]
    assert reasons["d"][0] == "duplicate_prompt"


def test_an_eval_file_named_for_replay_is_decontaminated_against_too(tmp_path: Path) -> None:
    words = "summarize the quarterly sales figures of the northern region for the board in two lines"
    write_jsonl(tmp_path / "mine.jsonl", [{"id": "m1", "instruction": words, "input": "", "output": "Up."}])
    index = f.eval_index([], ForgetSettings(replay=0.2, eval_files=str(tmp_path / "mine.jsonl")))
    _, rejected = f.clean_pairs([{"id": "e", "prompt": words, "answer": "Sales rose."}], index)
    assert rejected[0]["eval_ids"] == ["mine.jsonl:m1"]


def test_the_general_set_or_a_copy_of_it_or_the_valid_split_is_never_a_replay_file(runs: Path, tmp_path: Path) -> None:
    d = _run(runs, 4)
    shutil.copy(GENERAL_PATH, tmp_path / "innocent.jsonl")
    for path in (GENERAL_PATH, tmp_path / "innocent.jsonl", d / "valid.jsonl"):
        with pytest.raises(SiftError, match="replay must never draw from an eval set") as e:
            f.check(ForgetSettings(replay=0.2, replay_file=str(path)), d)
        assert e.value.field == "forget.replay_file"
    with pytest.raises(SiftError, match="no such replay file"):
        f.check(ForgetSettings(replay=0.2, replay_file=str(tmp_path / "absent.jsonl")), d)


def test_replay_prompts_read_from_chat_alpaca_and_self_instruct_records(tmp_path: Path) -> None:
    p = tmp_path / "prompts.jsonl"
    write_jsonl(p, [{"id": "a", "messages": [{"role": "user", "content": "Hi there"},
                                             {"role": "assistant", "content": "ignored"}]},
                    {"id": "b", "instruction": "Add the numbers.", "input": "2 and 3", "output": "ignored"},
                    {"id": "c", "instruction": "Name it.", "instances": [{"input": "x"}, {"input": ""}]}])
    assert f.file_prompts(p) == [{"id": "a", "text": "Hi there"}, {"id": "b", "text": "Add the numbers.\n\n2 and 3"},
                                 {"id": "c#0", "text": "Name it.\n\nx"}, {"id": "c#1", "text": "Name it."}]
    write_jsonl(p, [{"id": "z", "text": "no instruction"}])
    with pytest.raises(SiftError, match=r"prompts.jsonl:1: field 'instruction'"):
        f.file_prompts(p)


# ---------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def stopping_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama with its EOS logit tripled: some answers stop after a few words, some at
    once (empty), some never, so every branch of the remedies has work (the plain tiny model never stops)."""
    import torch

    from tests.train.conftest import save_tiny

    folder = save_tiny(tmp_path_factory.mktemp("tiny") / "stopping")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 3.0
    model.save_pretrained(folder)
    return folder


def test_self_distill_and_replay_are_applied_recorded_and_cached(runs: Path, stopping_model_dir: Path) -> None:
    d = _run(runs, 6)
    forget = {"self_distill": True, "self_distill_rouge": 0.0, "replay": 0.25, "max_new_tokens": 16}
    fine_tune("r", stopping_model_dir, forget=forget, **FAST)
    config = read_json(d / "student" / "train_config.json")
    applied = config["forget"].pop("applied")
    assert config["forget"] == {**ForgetSettings().__dict__, **forget}  # every option, as given
    assert read_json(d / "manifest.json")["stages"]["train"]["settings"]["forget"]["replay"] == 0.25
    decisions = read_jsonl(d / "forget" / "self_distill.jsonl")
    assert [x["id"] for x in decisions] == [f"t{i}" for i in range(6)]
    for x in decisions:  # threshold 0: exactly the rewrites that stopped with some text are kept
        assert x["kept"] is bool(x["stopped"] and x["rewrite"].strip())
    assert applied["self_distill"]["rewrites_kept"] == sum(x["kept"] for x in decisions)
    replay = read_jsonl(d / "forget" / "replay.jsonl")
    assert applied["replay"]["examples"] == len(replay) == 2  # 2 of 8 examples
    assert config["data"]["train"]["examples"] + config["data"]["train"]["dropped_overlong"] == 8
    general = {t["instruction"] for t in load_general()}
    assert not any(r["messages"][0]["content"] in general for r in replay)
    # a rerun makes nothing again: the journals are as they were
    journals = {p.name: p.read_bytes() for p in (d / "forget").glob("*.journal")}
    fine_tune("r", stopping_model_dir, forget=forget, **FAST)
    assert {p.name: p.read_bytes() for p in (d / "forget").glob("*.journal")} == journals


def test_without_remedies_nothing_is_made_and_the_settings_say_so(runs: Path, tiny_model_dir: Path) -> None:
    d = _run(runs, 4)
    fine_tune("r", tiny_model_dir, **FAST)
    assert not (d / "forget").exists()
    config = read_json(d / "student" / "train_config.json")
    assert config["forget"] == ForgetSettings().__dict__


@pytest.mark.parametrize("kill_at", ["self_distill.journal:3:mid", "self_distill.journal:2:after"])
def test_a_self_distill_rewrite_killed_midway_resumes_without_redoing_a_batch(tmp_path: Path, stopping_model_dir: Path,
                                                                               kill_at: str) -> None:
    from tests.pipeline.kill_harness import sift_killed, sift_ok

    n = 2 * f.BATCH + 5  # three batches
    argv = ["train", "--run", "r", "--student.model", str(stopping_model_dir), "--forget.self_distill",
            "--forget.max_new_tokens", "4", "--train.precision", "fp32", "--train.max_steps", "1"]
    ref_runs, runs = tmp_path / "ref", tmp_path / "killed"
    _run(ref_runs, n)
    _run(runs, n)
    sift_ok(argv, runs=ref_runs)
    sift_killed(argv, runs=runs, kill_at=kill_at)
    done_before = Journal(runs / "r" / "forget" / "self_distill.journal").read()[1:]
    sift_ok(argv, runs=runs)
    entries = [json.loads(x) for x in (runs / "r" / "forget" / "self_distill.journal").read_text().splitlines()]
    ids = [k["id"] for e in entries[1:] for k in e["kept"]]
    assert len(ids) == len(set(ids)) == n  # every conversation rewritten once, none twice
    assert entries[1:1 + len(done_before)] == done_before  # what was journaled before the kill was kept, not redone
    assert (runs / "r" / "forget" / "self_distill.jsonl").read_bytes() == \
        (ref_runs / "r" / "forget" / "self_distill.jsonl").read_bytes()


@pytest.mark.parametrize(("flags", "message"), [
    (["--forget.replay", "0.2", "--forget.replay_file", str(GENERAL_PATH)],
     "field 'forget.replay_file': is the general eval set"),
    (["--forget.replay", "1.0"], "field 'forget.replay'"),
    (["--forget.replay_file", "x.jsonl"], "field 'forget.replay_file'"),
])
def test_bad_remedies_on_the_command_line_fail_before_any_work(tmp_path: Path, tiny_model_dir: Path, flags: list,
                                                               message: str) -> None:
    from tests.pipeline.kill_harness import sift

    d = _run(tmp_path / "runs", 4)
    code, _, err = sift(["train", "--run", "r", "--student.model", str(tiny_model_dir), *flags], runs=tmp_path / "runs")
    assert code == 2 and message in err, err[-2000:]
    assert not (d / "student").exists() and not (d / "forget").exists()


def test_replay_from_a_file_never_draws_an_eval_task(runs: Path, tmp_path: Path, stopping_model_dir: Path) -> None:
    """A replay file holding general tasks and valid examples among other prompts: those are dropped
    as contaminated before the base answers, and none of them reaches the training data."""
    d = _run(runs, 4)
    long_valid = to_messages("give three tips for staying healthy what is the capital of france", "", "paris")
    write_jsonl(d / "valid.jsonl", [{"id": "v0", "messages": long_valid}])  # 13-gram checks need 8 words or more
    general = load_general()[:8]
    others = [{"id": f"o{i}", "instruction": f"name a primary color {i}", "input": ""} for i in range(8)]
    valid_copy = [{"id": "vv", "messages": long_valid}]
    write_jsonl(tmp_path / "mixed.jsonl", [*general, *others, *valid_copy])
    fine_tune("r", stopping_model_dir, forget={"replay": 0.5, "replay_file": str(tmp_path / "mixed.jsonl"),
                                               "max_new_tokens": 16}, **FAST)
    replay = read_jsonl(d / "forget" / "replay.jsonl")
    banned = {t["instruction"] for t in general} | {long_valid[0]["content"]}
    assert replay and not {r["messages"][0]["content"] for r in replay} & banned
    assert {r["messages"][0]["content"] for r in replay} <= {o["instruction"] for o in others}
    rejected = {r["id"].split(":", 1)[1]: r for r in read_jsonl(d / "forget" / "replay.rejected.jsonl")}
    assert all(rejected[t["id"]]["reason"] == "contaminated" for t in general)
    assert rejected["vv"]["eval_ids"] == ["valid:v0"]
    journal = (d / "forget" / "replay.journal").read_text()
    assert not any(t["instruction"] in journal for t in general)  # never even answered
