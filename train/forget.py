"""Remedies for catastrophic forgetting, prepared before `sift train` trains (pipeline/stages/train.py).

    sift train --run demo --forget.self_distill            # SDFT rewrites
    sift train --run demo --forget.replay 0.2              # a fifth of the examples are replay

- Self-distillation (SDFT, Yang et al., ACL 2024): the student's base model rewrites each training
  answer in its own words, shown the original as its reference (prompts/self_distill.txt, sent
  through the student's chat template). A rewrite is kept only where it stopped within
  forget.max_new_tokens and its ROUGE-L F1 against the original reaches forget.self_distill_rouge
  (0.5: on the embedded model's rewrites of 12 seed answers, the verbatim copies and one faithful
  rewording scored 0.68-1.0, the rewrites that drifted off the task 0.03-0.20); otherwise the
  original stays. The rewrites are cached by the conversation's content, so a record's rewrite is
  made once, whatever split or run it is in.
- Replay: the base model's own answers to general prompts, mixed in so that a share forget.replay of
  the training examples (so of each batch, in expectation: batches are drawn at random) is replay.
  The prompts are written by the base model itself from its chat template's user header alone (as
  Magpie, Xu et al. 2024, does), or read from forget.replay_file; the base answers them greedily.
  A pair (prompt, answer) that shares a word 13-gram with any eval set (the general set, the run's
  valid split, forget.eval_files; filters/contamination.py) is dropped, and a replay file that is an
  eval set is refused: replay never draws from one. Too few clean pairs are cycled to the share.

Both passes run the student's base on `student.device` through the fast engine that `sift eval` uses
(train/eval_passes.py; `model.generate` where the engine does not run the model) and journal each
batch (pipeline/io/batched.py): a killed `sift train` rerun carries on, and nothing is made twice.
Files in runs/<run>/forget/: self_distill.journal and replay.journal (the cache), self_distill.jsonl
(each training record's decision), replay.jsonl (the replay examples) and replay.rejected.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.io.artifacts import file_sha256, read_records, write_jsonl
from pipeline.io.batched import run_batches
from pipeline.settings import ForgetSettings, StudentSettings
from pipeline.teachers.prompts import PromptTemplate, load
from train.general_set import GENERAL_PATH, EvalIndex, build_eval_index, load_general, overlapping_tasks

FOLDER = "forget"
SELF_DISTILL_PROMPT = "self_distill"
PROMPT_FIELDS = frozenset({"instruction", "reference"})
BATCH = 32  # rows per journal entry: a kill loses at most one batch of rewrites
PROMPT_TOKENS = 128  # longest generated replay prompt; one that does not stop by then is dropped
PROMPT_SAMPLING = {"temperature": 1.0, "top_p": 0.95}  # Magpie samples the user turn; greedy would repeat one
SENTINEL = "\x00sift-user-turn\x00"

Pair = tuple[str, list[dict]]  # (id, messages), as train/lora.py read_split gives them


@dataclass
class Base:
    """The student's base model, loaded once on first use (a fully cached rerun never loads it)."""

    spec: str
    tokenizer: Any
    student: StudentSettings
    model: Any = field(default=None, repr=False)

    def get(self) -> Any:
        if self.model is None:
            from train.eval_passes import load_side

            self.model = load_side(self.spec, self.tokenizer, None, student=self.student)
        return self.model


def content_id(messages: list[dict]) -> str:
    """A conversation's cache key: the same conversation is rewritten once, wherever it appears."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


def model_key(spec: str) -> dict:
    """What identifies the base model's weights in a journal's fingerprint."""
    from pipeline.io.models import resolve_model
    from train.distill import model_fingerprint

    ref = resolve_model(spec)
    return json.loads(json.dumps({"name": ref.name, **model_fingerprint(ref.path_or_id)}))  # as read back


# ---------------------------------------------------------------- self-distillation


def rewrite_template(forget: ForgetSettings) -> PromptTemplate:
    template = load(forget.self_distill_prompt or SELF_DISTILL_PROMPT)
    template.check(PROMPT_FIELDS, required=PROMPT_FIELDS)
    return template


def rewrite_request(template: PromptTemplate, messages: list[dict]) -> list[dict]:
    """The rewrite prompt as chat messages (a placeholder answer last, as the eval passes expect): the
    instruction is the last user turn, the reference the training answer."""
    instruction = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    text = template.render(instruction=instruction, reference=messages[-1]["content"])
    system = [{"role": "system", "content": template.system}] if template.system else []
    return [*system, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]


def agreement(rewrite: dict, original: str) -> float | None:
    """ROUGE-L F1 of a rewrite against the original; None for one that never stopped or is empty."""
    from train.eval_stats import rouge_l

    if not rewrite.get("stopped") or not rewrite.get("text", "").strip():
        return None
    return rouge_l(rewrite["text"], original)


def decide(records: list[Pair], rewrites: dict[str, dict], threshold: float) -> tuple[list[Pair], list[dict]]:
    """The training records with each answer replaced by its rewrite where they agree, and the decisions."""
    out, decisions = [], []
    for rec_id, messages in records:
        rewrite = rewrites[content_id(messages)]
        original = messages[-1]["content"]
        score = agreement(rewrite, original)
        kept = score is not None and score >= threshold
        if kept:
            messages = [*messages[:-1], {"role": "assistant", "content": rewrite["text"]}]
        out.append((rec_id, messages))
        decisions.append({"id": rec_id, "kept": kept, "rouge_l": score, "stopped": rewrite.get("stopped"),
                          "rewrite": rewrite.get("text", ""), "original": original})
    return out, decisions


def self_distill(folder: Path, records: list[Pair], base: Base, *, forget: ForgetSettings,
                 template_kind: str) -> tuple[list[Pair], dict]:
    """Rewrite every training answer (journaled, cached by content), then keep the rewrites that agree."""
    template = rewrite_template(forget)
    rows = list({(cid := content_id(m)): {"id": cid, "messages": rewrite_request(template, m)}
                 for _, m in records}.values())

    def work(batch: list[dict]) -> tuple[list[dict], list[dict], dict]:
        from train.eval_passes import student_answers

        answers = student_answers(base.get(), base.tokenizer, batch, max_new_tokens=forget.max_new_tokens,
                                  batch_size=8, label="rewrites")
        kept = [{"id": r["id"], **a} for r, a in zip(batch, answers, strict=True)]
        return kept, [], {"tokens_out": sum(a["tokens"] for a in answers)}

    fingerprint = {"model": model_key(base.spec), "prompt": template.provenance(), "template": template_kind,
                   "max_new_tokens": forget.max_new_tokens, "dtype": base.student.dtype}
    done, _, _ = run_batches(rows, work, stage="self-distill", journal_path=folder / "self_distill.journal",
                             fingerprint=fingerprint, batch_size=BATCH)
    out, decisions = decide(records, {d["id"]: d for d in done}, forget.self_distill_rouge)
    write_jsonl(folder / "self_distill.jsonl", decisions)
    kept = sum(d["kept"] for d in decisions)
    scores = [d["rouge_l"] for d in decisions if d["rouge_l"] is not None]
    print(f"self-distill: {kept} of {len(decisions)} answers rewritten by the base (ROUGE-L >= "
          f"{forget.self_distill_rouge} against the original), the rest kept as they were; "
          f"{folder / 'self_distill.jsonl'}")
    return out, {"records": len(decisions), "rewrites_kept": kept,
                 "not_stopped": sum(not d["stopped"] for d in decisions),
                 "mean_rouge_l": round(sum(scores) / len(scores), 4) if scores else None}


# ---------------------------------------------------------------- replay: the eval sets it must stay clear of


def eval_files(forget: ForgetSettings) -> list[Path]:
    """forget.eval_files as paths, each an existing file."""
    out = []
    for name in (forget.eval_files or "").split(","):
        if name.strip():
            path = Path(name.strip())
            if not path.is_file():
                raise SiftError("no such eval file", path=path, field="forget.eval_files")
            out.append(path)
    return out


def check_replay_file(forget: ForgetSettings, valid_path: Path) -> None:
    """A replay file that is an eval set (the general set, the valid split, a named eval file, or a
    copy of one) is refused before any work: replay must never draw from an eval set."""
    if not forget.replay_file:
        return
    path = Path(forget.replay_file)
    if not path.is_file():
        raise SiftError("no such replay file", path=path, field="forget.replay_file")
    for name, other in (("the general eval set", GENERAL_PATH), ("the run's valid split", valid_path),
                        *(("an eval file", p) for p in eval_files(forget))):
        if other.is_file() and (path.resolve() == other.resolve() or file_sha256(path) == file_sha256(other)):
            raise SiftError(f"is {name} ({other}); replay must never draw from an eval set: give other prompts, "
                            "or leave forget.replay_file out to let the base model write its own",
                            path=path, field="forget.replay_file")


def eval_index(valid: list[Pair], forget: ForgetSettings) -> EvalIndex:
    """The 13-gram index of every eval set: the general set, the valid split and forget.eval_files."""
    from train.eval_sets import load_heldout

    tasks = [{**t, "id": f"general:{t['id']}"} for t in load_general()]
    rows = [(f"valid:{i}", m) for i, m in valid]
    for path in eval_files(forget):
        rows += [(f"{path.name}:{r['id']}", r["messages"]) for r in load_heldout(path)]
    for rid, messages in rows:
        tasks.append({"id": rid, "instruction": "\n".join(m["content"] for m in messages[:-1]),
                      "input": "", "output": messages[-1]["content"]})
    return build_eval_index(tasks)


def clean_pairs(pairs: list[dict], index: EvalIndex) -> tuple[list[dict], list[dict]]:
    """Replay candidates {id, prompt, answer} split into those clear of every eval set and the ledger of
    the others (reason `contaminated`, with the eval ids they overlap), and exact repeats dropped."""
    kept, rejected, seen = [], [], set()
    for p in pairs:
        ids, shared = overlapping_tasks((p["prompt"], p["answer"]), index)
        key = " ".join(p["prompt"].lower().split())
        if ids:
            rejected.append({"id": p["id"], "reason": "contaminated", "score": shared, "eval_ids": ids, "record": p})
        elif key in seen:
            rejected.append({"id": p["id"], "reason": "duplicate_prompt", "score": None, "record": p})
        else:
            seen.add(key)
            kept.append(p)
    return kept, rejected


# ---------------------------------------------------------------- replay: prompts and answers


def file_prompts(path: Path) -> list[dict]:
    """Prompts {id, text} from chat records (the conversation before the last answer), Alpaca records
    (instruction and input) or Self-Instruct tasks (one per instance input); answers are ignored."""
    from train.format import to_messages

    out = []
    for pos, rec in read_records(path):
        rid = str(rec.get("id", f"row{pos}"))
        if isinstance(rec.get("messages"), list) and rec["messages"]:
            users = [m.get("content") for m in rec["messages"] if isinstance(m, dict) and m.get("role") == "user"]
            texts = [users[-1]] if users and isinstance(users[-1], str) else []
        elif isinstance(rec.get("instruction"), str) and isinstance(rec.get("instances"), list):
            texts = [to_messages(rec["instruction"], str((i or {}).get("input") or ""), "")[0]["content"]
                     for i in rec["instances"] if isinstance(i, dict)] or [rec["instruction"]]
        elif isinstance(rec.get("instruction"), str):
            texts = [to_messages(rec["instruction"], str(rec.get("input") or ""), "")[0]["content"]]
        else:
            raise SiftError("expected messages, or an instruction", path=path, line=pos, field="instruction")
        out += [{"id": f"{rid}#{k}" if len(texts) > 1 else rid, "text": t} for k, t in enumerate(texts) if t.strip()]
    if not out:
        raise SiftError("no prompt to replay", path=path, field="forget.replay_file")
    return out


def user_header(tokenizer: Any) -> list[int]:
    """The token ids the chat template puts before a user's words (its system turn, if it adds one,
    included): from there the model writes a user turn of its own."""
    full = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    return tokenizer(full[:full.index(SENTINEL)], add_special_tokens=False)["input_ids"]


def sample_prompts(model: Any, tokenizer: Any, seeds: list[int], max_tokens: int) -> list[dict]:
    """One sampled user turn per seed, {text, stopped}: the fast engine's sampler where it runs the
    model, else `model.generate` seeded per row. A row's text depends on its seed only."""
    from pipeline.teachers.base import Sampling
    from train.eval_passes import fast_supported

    header, eos = user_header(tokenizer), tokenizer.eos_token_id
    if fast_supported(model):
        from pipeline.teachers.fast_decode import FastDecoder, Job

        sampling = Sampling(max_tokens=max_tokens, **PROMPT_SAMPLING)
        ids = FastDecoder(model, eos_ids=[eos]).run([Job(header, sampling, s) for s in seeds])
    else:
        import torch

        ids = []
        for s in seeds:
            torch.manual_seed(s)
            with torch.no_grad():
                gen = model.generate(input_ids=torch.tensor([header], device=model.device), do_sample=True,
                                     max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                     **PROMPT_SAMPLING)
            ids.append(gen[0, len(header):].tolist())
    out = []
    for row in ids:
        stopped = eos in row
        row = row[:row.index(eos)] if stopped else row
        out.append({"text": tokenizer.decode(row, skip_special_tokens=True).strip(), "stopped": stopped})
    return out


def answer_work(base: Base, forget: ForgetSettings, *, generated: bool) -> Callable:
    """A batch of replay attempts -> (pairs kept, attempts rejected, counters): the prompt (sampled by
    the base for a generated attempt), then the base's greedy answer to it."""
    from train.eval_passes import student_answers

    def work(batch: list[dict]) -> tuple[list[dict], list[dict], dict]:
        model = base.get()
        prompts = (sample_prompts(model, base.tokenizer, [a["seed"] for a in batch],
                                  min(PROMPT_TOKENS, forget.max_new_tokens)) if generated
                   else [{"text": a["text"], "stopped": True} for a in batch])
        asked = [(a, p) for a, p in zip(batch, prompts, strict=True) if p["stopped"] and p["text"]]
        rows = [{"id": a["id"], "messages": [{"role": "user", "content": p["text"]},
                                             {"role": "assistant", "content": ""}]} for a, p in asked]
        answers = student_answers(model, base.tokenizer, rows, max_new_tokens=forget.max_new_tokens,
                                  batch_size=8, label="replay answers") if rows else []
        kept, rejected = [], []
        for a, p in zip(batch, prompts, strict=True):
            if not (p["stopped"] and p["text"]):
                rejected.append({"id": a["id"], "reason": "prompt_not_stopped", "prompt": p["text"]})
        for (a, p), ans in zip(asked, answers, strict=True):
            if ans["stopped"] and ans["text"]:
                kept.append({"id": a["id"], "prompt": p["text"], "answer": ans["text"]})
            else:
                rejected.append({"id": a["id"], "reason": "answer_not_stopped", "prompt": p["text"]})
        return kept, rejected, {"tokens_out": sum(x["tokens"] for x in answers)}

    return work


def replay_count(n_task: int, share: float) -> int:
    """Replay examples so that they are `share` of all training examples."""
    return math.ceil(n_task * share / (1 - share) - 1e-9) if share > 0 else 0


def replay(folder: Path, n_task: int, valid: list[Pair], base: Base, *, forget: ForgetSettings,
           template_kind: str, seed: int) -> tuple[list[Pair], dict]:
    """The replay examples (id, messages) for `n_task` task examples, and what was done. Attempts are
    made in growing rounds until enough clean pairs exist (generated prompts: at most 4x the need + 32;
    a file: its prompts in order), all journaled."""
    need = replay_count(n_task, forget.replay)
    index = eval_index(valid, forget)
    generated = not forget.replay_file
    banned: list[dict] = []  # file prompts overlapping an eval set
    if generated:
        limit = 4 * need + 32
        attempts = [{"id": f"gen-{i:06d}", "seed": seed * 1_000_003 + i} for i in range(limit)]
        source: dict = {"generated": True, "sampling": PROMPT_SAMPLING, "prompt_tokens": PROMPT_TOKENS}
    else:
        prompts = [{**p, "id": f"{i:06d}:{p['id']}"}  # unique, in file order
                   for i, p in enumerate(file_prompts(Path(forget.replay_file)))]  # type: ignore[arg-type]
        attempts, banned = [], []
        for p in prompts:  # a prompt from an eval set is never even answered
            ids, shared = overlapping_tasks((p["text"],), index)
            (banned if ids else attempts).append(
                {"id": p["id"], "reason": "contaminated", "score": shared, "eval_ids": ids,
                 "record": {"id": p["id"], "prompt": p["text"]}} if ids else p)
        source = {"file": str(forget.replay_file), "sha256": file_sha256(Path(forget.replay_file))}  # type: ignore[arg-type]
    fingerprint = {"model": model_key(base.spec), "source": source, "template": template_kind,
                   "max_new_tokens": forget.max_new_tokens, "dtype": base.student.dtype,
                   **({"seed": seed} if generated else {})}
    work = answer_work(base, forget, generated=generated)
    tried = min(len(attempts), math.ceil(need * 1.5) + 8)
    while True:
        done, failed, _ = run_batches(attempts[:tried], work, stage="replay", journal_path=folder / "replay.journal",
                                      fingerprint=fingerprint, batch_size=BATCH)
        clean, dropped = clean_pairs(done, index)
        if len(clean) >= need or tried >= len(attempts):
            break
        tried = min(len(attempts), tried + 2 * (need - len(clean)) + 8)
    dropped = banned + dropped
    if not clean:
        raise SiftError(f"no replay example is left after {tried} attempts ({len(dropped)} overlap an eval set or "
                        f"repeat, {len(failed)} did not stop); give other prompts (forget.replay_file) or a larger "
                        "forget.max_new_tokens", path=folder, field="forget.replay")
    chosen = [clean[i % len(clean)] for i in range(need)]  # too few: cycled
    examples = [(f"replay-{k}:{p['id']}", [{"role": "user", "content": p["prompt"]},
                                          {"role": "assistant", "content": p["answer"]}]) for k, p in enumerate(chosen)]
    write_jsonl(folder / "replay.jsonl", ({"id": i, "messages": m} for i, m in examples))
    write_jsonl(folder / "replay.rejected.jsonl", [*dropped, *failed])
    print(f"replay: {need} examples ({len({p['id'] for p in chosen})} distinct) beside {n_task} task examples; "
          f"{len(dropped)} overlapping an eval set or repeated and {len(failed)} unfinished dropped; "
          f"{folder / 'replay.jsonl'}")
    return examples, {"examples": need, "distinct": len({p["id"] for p in chosen}), "attempts": tried,
                      "dropped_contaminated": sum(d["reason"] == "contaminated" for d in dropped),
                      "dropped_repeated": sum(d["reason"] == "duplicate_prompt" for d in dropped),
                      "dropped_unfinished": len(failed), "source": "file" if not generated else "generated"}


# ---------------------------------------------------------------- both, in order


def check(forget: ForgetSettings, directory: Path) -> None:
    """Everything that can fail before a model loads: the prompt template, the replay and eval files."""
    if forget.self_distill:
        rewrite_template(forget)
    if forget.replay:
        eval_files(forget)
        check_replay_file(forget, directory / "valid.jsonl")


def prepare(directory: Path, splits: tuple[list[Pair], list[Pair]], tokenizer: Any, *, student: StudentSettings,
            forget: ForgetSettings, template_kind: str, seed: int) -> tuple[list[Pair], dict]:
    """The training records after the remedies (self-distilled answers, then replay examples appended)
    and what they did, for train_config.json; the training records unchanged when none is on."""
    train_records, valid = splits
    if not forget.active:
        return train_records, {}
    folder = directory / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    base = Base(student.model, tokenizer, student)
    info: dict = {}
    if forget.self_distill:
        train_records, info["self_distill"] = self_distill(folder, train_records, base, forget=forget,
                                                           template_kind=template_kind)
    if forget.replay:
        examples, info["replay"] = replay(folder, len(train_records), valid, base, forget=forget,
                                          template_kind=template_kind, seed=seed)
        train_records = [*train_records, *examples]
    return train_records, info
