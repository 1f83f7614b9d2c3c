"""Do the remedies for forgetting help? Students trained on the same data and the same token budget,
vanilla, self-distilled (SDFT) and with replay 0.2, against the base on `valid` and `general`.

    .venv/bin/python bench/forgetting.py --quick     # 320 narrow records, 12K tokens per arm, 64 new tokens
    .venv/bin/python bench/forgetting.py             # 640 narrow records, 48K tokens per arm, 128 new tokens
    .venv/bin/python bench/forgetting.py --run demo  # a run's filtered.jsonl instead of the narrow set

1. data: a narrow task set where forgetting is expected: only classification tasks (sentiment,
   spam, topic, question or statement; the label alone as the answer), made here from word lists
   and seeded (`narrow_records`); or, with --run, a sift run's filtered.jsonl. Records sharing a
   13-gram with the general set are dropped (export's `decontaminate`), a tenth is held out (`valid`).
2. arms, every one from the same records with the settings of `sift train` (LoRA r 16 on all linear
   layers, lr 2e-4, cosine, packed rows of 512; bench/selection.py `train_arm`):
   - vanilla: the records as they are;
   - self_distill: `--forget.self_distill` (the base's rewrites kept where ROUGE-L >= 0.5);
   - replay: `--forget.replay 0.2` (a fifth of the examples: the base's answers to prompts it wrote);
   - refine_student and refine_teacher: the train records through `sift refine` (the embedded teacher
     critiques and rewrites instruction and response; `--refine.select student`, the paper's IFD / r-IFD
     rule, or `teacher`, every rewrite that passes the filters), then trained on like vanilla.
3. the same budget: every arm trains on about --tokens tokens (prompt and answer, its own examples
   after the remedy: steps = tokens / (effective batch x the arm's mean example length));
4. eval: the base and every student on `valid` (what the task data teaches) and `general` (175
   tasks written for sift, never trained on: what training may cost), NLL per reference token and
   ROUGE-L of greedy answers through `sift eval`'s fast passes (bench/selection.py `eval_model`);
   95% paired bootstrap intervals of each arm minus vanilla and minus the base.

Everything is cached under runs/<run>/forgetting/ (adapters by their settings, eval columns, the
remedies' journals), so a killed benchmark run again continues. The table ends the output and is
written to forgetting.json and forgetting.md there.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.selection import ACCUM, BATCH, STUDENT, eval_model, fmt_ci, interval, mean, train_arm  # noqa: E402
from pipeline.io.artifacts import write_json, write_jsonl  # noqa: E402
from pipeline.io.runs import run_dir  # noqa: E402
from pipeline.settings import ForgetSettings  # noqa: E402
from pipeline.stages.export import chat_record, decontaminate, read_filtered, split_ids  # noqa: E402
from train.general_set import load_general  # noqa: E402

ARMS = {"vanilla": ForgetSettings(), "refine_student": ForgetSettings(), "refine_teacher": ForgetSettings(),
        "self_distill": ForgetSettings(self_distill=True), "replay": ForgetSettings(replay=0.2)}
REFINE_SELECT = {"refine_student": "student", "refine_teacher": "teacher"}  # arms trained on `sift refine`'s output
REFINE_TOKENS = 256  # longest critique or rewrite from the teacher in the bench (the stage's default is 512)
# The bench's tasks are fixed labelling instructions: it rewrites responses only (the stage's default is both,
# which also doubles the teacher's work on 2 cores)
REFINE_TARGET = "response"
FORGET_TOKENS = 128  # longest rewrite and replay answer in the bench (the remedies' default is 256)

# ---------------------------------------------------------------- the narrow task set

_REVIEW = {"Positive": ["I loved the {x}", "the {x} was wonderful", "great {x} and friendly staff", "the {x} exceeded "
                        "my hopes", "a superb {x}, would buy again", "the {x} works perfectly"],
           "Negative": ["I hated the {x}", "the {x} was awful", "the {x} broke after a day", "a terrible {x}, "
                        "never again", "the {x} was a waste of money", "the {x} arrived damaged"]}
_THINGS = [f"{a} {t}".strip() for a in ("", "new", "old", "red", "small", "big", "cheap", "second")
           for t in ("blender", "hotel room", "pizza", "laptop", "concert", "haircut", "novel", "bicycle",
                     "phone case", "museum tour", "coffee", "rain jacket", "sofa", "movie", "train ride",
                     "garden hose", "keyboard")]  # 136 things: about 4,600 distinct inputs
_SPAM = {"Yes": ["you have won a free {x}, click here now", "claim your {x} prize before midnight",
                 "cheap {x} deals, reply with your bank details", "act now: a {x} for only one dollar"],
         "No": ["can we move our meeting about the {x} to Thursday", "thanks for lending me the {x}",
                "the {x} report is attached for review", "are you bringing the {x} to dinner tonight"]}
_TOPIC = {"Sports": ["the team won the {x} final in extra time", "a record crowd watched the {x} match"],
          "Politics": ["the senate debated the {x} bill late into the night", "voters rejected the {x} tax"],
          "Technology": ["a new chip makes the {x} twice as fast", "the {x} app update fixes a security flaw"],
          "Food": ["the chef's {x} soup won the fair", "a recipe for {x} pie with fresh apples"]}
_KIND = {"Question": ["where did you leave the {x}", "is the {x} ready yet", "who fixed the {x}"],
         "Statement": ["the {x} is in the hall", "the {x} is ready now", "my brother fixed the {x}"]}
TASKS = [("Classify the sentiment of the review as Positive or Negative.", _REVIEW),
         ("Is the following message spam? Answer Yes or No.", _SPAM),
         ("Which section does this headline belong to: Sports, Politics, Technology or Food?", _TOPIC),
         ("Label the sentence as a Question or a Statement.", _KIND)]


def narrow_records(n: int, seed: int) -> list[dict]:
    """n distinct classification records {id, instruction, input, output, metadata}: four tasks, the
    label alone as the answer, inputs from the word lists above; the same (n, seed), the same list."""
    rng = random.Random(seed)
    out, seen = [], set()
    for _ in range(50 * n):
        if len(out) == n:
            break
        instruction, labels = rng.choice(TASKS)
        label = rng.choice(sorted(labels))
        text = rng.choice(labels[label]).format(x=rng.choice(_THINGS))
        text = text[0].upper() + text[1:] + ("?" if label == "Question" else ".")
        if (instruction, text) in seen:
            continue
        seen.add((instruction, text))
        out.append({"id": f"narrow-{len(out):05d}", "instruction": instruction, "input": text, "output": label,
                    "metadata": {"source": "bench/forgetting.py", "is_classification": True}})
    if len(out) < n:
        raise ValueError(f"cannot make {n} distinct records from the word lists")
    return out


# ---------------------------------------------------------------- one arm


def arm_records(folder: Path, records: list[dict], valid: list[dict], forget: ForgetSettings, seed: int) -> list:
    """The arm's training examples (id, messages) after its remedy, made (and cached) as `sift train`
    makes them, so the arm's steps can be sized to the budget before it trains."""
    from pipeline.io.models import load_tokenizer
    from pipeline.settings import StudentSettings
    from train import forget as remedies
    from train.format import setup_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "valid.jsonl", (chat_record(r) for r in valid))
    pairs = [(r["id"], chat_record(r)["messages"]) for r in records]
    if not forget.active:
        return pairs
    tok = load_tokenizer(STUDENT)
    kind = setup_tokenizer(tok, "auto")["template"]
    valid_pairs = [(r["id"], chat_record(r)["messages"]) for r in valid]
    done, _ = remedies.prepare(folder, (pairs, valid_pairs), tok, student=StudentSettings(model=STUDENT),
                               forget=forget, template_kind=kind, seed=seed)
    return done


def refined_records(name: str, records: list[dict], select: str, seed: int) -> tuple[list[dict], dict]:
    """The records after `sift refine --refine.select <select>` in runs/<name>-refine-<select>/ (the
    embedded teacher, cached there: a second select reuses the first one's teacher replies), and its stats."""
    import shutil

    from pipeline.settings import RefineSettings
    from pipeline.stages.refine import refine

    directory = run_dir(f"{name}-refine-{select}")
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "filtered.jsonl"
    ids = [r["id"] for r in records]
    if not source.is_file() or [json.loads(x)["id"] for x in source.read_text().splitlines()] != ids:
        write_jsonl(source, records)
        (directory / "refined.jsonl").unlink(missing_ok=True)
    for other in REFINE_SELECT.values():  # the teacher's replies do not depend on the select rule
        cache = run_dir(f"{name}-refine-{other}") / "cache"
        if other != select and cache.is_dir() and not (directory / "cache").exists():
            shutil.copytree(cache, directory / "cache")
    if not (directory / "refined.jsonl").is_file():
        refine(run=directory.name, refine=RefineSettings(select=select, target=REFINE_TARGET, max_tokens=REFINE_TOKENS,
                                                              batch_size=16, seed=seed))
    out = [json.loads(x) for x in (directory / "refined.jsonl").read_text().splitlines()]
    return out, json.loads((directory / "refine.stats.json").read_text())


def mean_tokens(pairs: list) -> float:
    from pipeline.io.models import load_tokenizer
    from train.format import setup_tokenizer, tokenize_example

    tok = load_tokenizer(STUDENT)
    setup_tokenizer(tok, "auto")
    return sum(len(tokenize_example(tok, m).input_ids) for _, m in pairs) / len(pairs)


# ---------------------------------------------------------------- the whole bench


def load_records(args: argparse.Namespace) -> tuple[str, list[dict]]:
    if args.run:
        return f"run {args.run}", read_filtered(run_dir(args.run) / "filtered.jsonl")
    n = args.records or (320 if args.quick else 640)
    return f"narrow classification set ({n} records)", narrow_records(n, args.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="forgetting", help="runs/<name>/forgetting/ holds the bench's files")
    ap.add_argument("--run", default=None, help="train on this run's filtered.jsonl instead of the narrow set")
    ap.add_argument("--quick", action="store_true", help="320 records, 12K training tokens per arm, 64 new tokens")
    ap.add_argument("--records", type=int, default=None, help="narrow records (default 640, quick 320)")
    ap.add_argument("--tokens", type=int, default=None, help="training tokens per arm (default 48000, quick 12000)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="greedy answer budget (default 128, quick 64)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run (each is cached: "
                    "run some in another process, then all for the table)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := [a for a in arms if a not in ARMS]:
        sys.exit(f"unknown arm {unknown[0]!r}; arms: {', '.join(ARMS)}")
    budget = args.tokens or (12_000 if args.quick else 48_000)
    max_new = args.max_new_tokens or (64 if args.quick else 128)
    t_start = time.perf_counter()

    work = run_dir(args.name) / "forgetting"
    work.mkdir(parents=True, exist_ok=True)
    label, records = load_records(args)
    tasks = load_general()
    clean, dropped = decontaminate(records, tasks)
    valid_ids = split_ids([r["id"] for r in clean], 0.1, args.seed)
    train_recs = [r for r in clean if r["id"] not in valid_ids]
    valid_recs = [r for r in clean if r["id"] in valid_ids]
    print(f"{label}: {len(train_recs)} train, {len(valid_recs)} valid ({len(dropped)} dropped as contaminated); "
          f"{budget} training tokens per arm; eval on valid and general ({len(tasks)} tasks) x {max_new} new tokens",
          flush=True)
    sets = {"valid": [{"id": r["id"], "messages": chat_record(r)["messages"]} for r in valid_recs],
            "general": [{"id": t["id"], "messages": chat_record(t | {"metadata": {}})["messages"]} for t in tasks]}
    keys = {name: {"tasks": [r["id"] for r in rows], "max_new_tokens": max_new} for name, rows in sets.items()}
    base = {name: eval_model(work / f"eval-base-{name}.json", None, rows, max_new, keys[name])
            for name, rows in sets.items()}
    table, columns = [], {}
    for arm in arms:
        arm_train, refined = train_recs, None
        if arm in REFINE_SELECT:
            t0 = time.perf_counter()
            arm_train, stats = refined_records(args.name, train_recs, REFINE_SELECT[arm], args.seed)
            refined = {"records_changed": sum(r["refinement"]["changed"] for r in arm_train),
                       "records": len(arm_train), "refine_s": round(time.perf_counter() - t0, 1),
                       "rewrites": stats.get("rewrites", {})}
        forget = ARMS[arm]
        forget = ForgetSettings(**{**forget.__dict__, "max_new_tokens": FORGET_TOKENS}) if forget.active else forget
        folder = work / arm
        t0 = time.perf_counter()
        pairs = arm_records(folder, arm_train, valid_recs, forget, args.seed)
        prep_s = time.perf_counter() - t0
        steps = max(1, round(budget / (BATCH * ACCUM * mean_tokens(pairs))))
        t0 = time.perf_counter()
        summary = train_arm(folder, arm_train, steps, args.seed, forget=forget)
        train_s = time.perf_counter() - t0
        arm_key = json.loads((folder / "arm.json").read_text())["settings"]
        columns[arm] = {name: eval_model(work / f"eval-{arm}-{name}.json", folder / "student", rows, max_new,
                                         keys[name] | {"arm": arm_key}) for name, rows in sets.items()}
        applied = json.loads((folder / "student" / "train_config.json").read_text())["forget"].get("applied", {})
        table.append({"arm": arm, "examples": len(pairs), "steps": summary["step"],
                      "train_tokens": summary["train_tokens"], "prep_s": round(prep_s, 1), "train_s": round(train_s, 1),
                      "applied": applied, **({"refine": refined} if refined else {})})
    for row in table:
        for name in sets:
            col = columns[row["arm"]][name]
            for metric in ("nll", "rouge_l"):
                row[f"{name}_{metric}"] = mean(col, metric)
                row[f"{name}_{metric}_vs_base"] = interval(base[name], col, metric)
                row[f"{name}_{metric}_vs_vanilla"] = (None if row["arm"] == "vanilla" or "vanilla" not in columns
                                                      else interval(columns["vanilla"][name], col, metric))
    result = {"data": label, "train": len(train_recs), "valid": len(valid_recs), "contaminated": len(dropped),
              "budget_tokens": budget, "max_new_tokens": max_new, "general_tasks": len(tasks),
              "base": {name: {"nll": mean(base[name], "nll"), "rouge_l": mean(base[name], "rouge_l")} for name in sets},
              "arms": table,
              "seconds": round(time.perf_counter() - t_start, 1)}
    write_json(work / "forgetting.json", result)
    md = render(result)
    (work / "forgetting.md").write_text(md)
    print(md)


def render(result: dict) -> str:
    b = result["base"]
    lines = [f"{result['data']}: {result['train']} train and {result['valid']} valid records, "
             f"{result['budget_tokens']} training tokens per arm; general: {result['general_tasks']} tasks; "
             f"{result['max_new_tokens']} new tokens. Base: valid NLL {b['valid']['nll']:.3f}, ROUGE-L "
             f"{b['valid']['rouge_l']:.3f}; general NLL {b['general']['nll']:.3f}, "
             f"ROUGE-L {b['general']['rouge_l']:.3f}",
             "", "| arm | examples | steps | set | NLL | vs base (95% CI) | vs vanilla | ROUGE-L | vs base (95% CI) | "
             "vs vanilla |", "| --- | ---: | ---: | --- | ---: | --- | --- | ---: | --- | --- |"]
    for r in result["arms"]:
        for name in ("valid", "general"):
            lines.append(f"| {r['arm']} | {r['examples']} | {r['steps']} | {name} | {r[f'{name}_nll']:.3f} | "
                         f"{fmt_ci(r[f'{name}_nll_vs_base'])} | {fmt_ci(r[f'{name}_nll_vs_vanilla'])} | "
                         f"{r[f'{name}_rouge_l']:.3f} | {fmt_ci(r[f'{name}_rouge_l_vs_base'])} | "
                         f"{fmt_ci(r[f'{name}_rouge_l_vs_vanilla'])} |")
    lines.append(f"\nwall {result['seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
