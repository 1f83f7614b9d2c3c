"""Pieces of the kill-anywhere harness (tests/pipeline/test_kill_anywhere.py).

    code, out, err = sift(["generate", "--run", "r", ...], runs=tmp, kill_at="generate.journal:3:mid")

`sift` runs the real command line in a child process. With `kill_at` ("FILE:N:before|mid|after"),
the child SIGKILLs itself at its N-th durable write to FILE (the seam in pipeline/io/artifacts.py,
SIFT_TEST_KILL_AT); `sift_killed_when` kills from outside when a path appears. `scripted_reply`
makes the loopback OpenAI-compatible server (tests/pipeline/openai_server.py) answer like a
Self-Instruct teacher: deterministic in the request, varied enough that every ledger reason and
filter rule has work to do.
`check_run` and `same_artifacts` are the checks every killed run must pass.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.io.artifacts import file_sha256, iter_jsonl, read_json

REPO = Path(__file__).resolve().parents[2]

VERBS = ["Write", "Explain", "Summarize", "Describe", "List", "Compare", "Translate", "Classify", "Rewrite",
         "Evaluate", "Suggest", "Outline", "Decide"]
OBJECTS = ["a short poem", "the main idea", "three reasons", "a recipe", "the plot", "an email", "a headline",
           "the pros and cons", "a riddle", "a packing list", "the differences", "a slogan", "the tone"]
TOPICS = ["rainy weather", "ancient Rome", "solar panels", "job interviews", "chess openings", "coral reefs",
          "tax returns", "jazz music", "city parks", "bread baking", "sleep habits", "electric cars",
          "volcanoes", "public speaking", "board games", "honey bees", "night trains", "glaciers"]
AUDIENCES = ["children", "a busy manager", "new students", "my grandmother", "tourists", "engineers",
             "a sports fan", "nurses"]
LABELS = ["Yes", "No", "Positive", "Negative", "Other"]

# Fields that legitimately differ between a killed-and-resumed run and an uninterrupted one: how
# long things took, and how much of the work the teacher cache (rather than the teacher) answered.
# They describe the history of the run, not its output; everything else must match exactly.
TIMING_KEYS = frozenset({
    "wall_time_s", "teacher_seconds", "wall_seconds", "finished_at", "cache_hits",
    # transformers' own timing logs, our tokens/s, and train's summary
    "train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
    "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time", "tokens_per_s",
    "train_seconds",
})


# ---------------------------------------------------------------- the scripted teacher


def scripted_reply(body: dict) -> tuple[str, str]:
    """(text, finish_reason) for one completions request, from its prompt, seed and max_tokens only."""
    prompt = str(body.get("prompt") if "prompt" in body else body["messages"][-1]["content"])
    rng = random.Random(f"{body.get('seed')}|{body.get('max_tokens')}|{prompt}")
    if prompt.rstrip().endswith("Is it classification?"):
        task = prompt.rsplit("Task: ", 1)[1]
        return (" Yes" if task.split()[0] in ("Classify", "Decide") else " No"), "stop"
    if prompt.startswith("Come up with examples"):
        return _instances(rng, output_first=False)
    if prompt.startswith("Given the classification task"):
        return _instances(rng, output_first=True)
    examples = re.findall(r"^\d+\. (.+)$", prompt, flags=re.MULTILINE)
    lines = []
    for _ in range(rng.randint(1, 5)):
        kind = rng.random()
        if kind < 0.06:
            lines.append(f"Draw a picture of {rng.choice(TOPICS)}.")  # blacklisted word
        elif kind < 0.1:
            lines.append("Do it now.")  # too short
        elif kind < 0.16 and examples:
            lines.append(rng.choice(examples))  # a ROUGE-L duplicate of the pool
        else:
            lines.append(f"{rng.choice(VERBS)} {rng.choice(OBJECTS)} about {rng.choice(TOPICS)} "
                         f"for {rng.choice(AUDIENCES)}.")
    text = " " + "\n".join(line if i == 9 else f"{i}. {line}" for i, line in enumerate(lines, start=9))
    if rng.random() < 0.08:
        return text + "\n1", "length"  # cut by the length limit: the reference drops it whole
    return text, "stop"


def _instances(rng: random.Random, *, output_first: bool) -> tuple[str, str]:
    roll = rng.random()
    if roll < 0.06:
        return "\nExample 1\nInput: unfinished\nOutput:", "stop"  # nothing usable: parse_error
    n = rng.randint(1, 4)
    if output_first:
        labels = rng.sample(LABELS, n)
        return "\n" + "\n".join(f"Class label: {lab}\nInput: case {rng.randint(0, 999)}" for lab in labels), "stop"
    items = []
    for i in range(1, n + 1):
        value = f"value {rng.randint(0, 999)}"
        output = value if rng.random() < 0.08 else f"result {rng.randint(0, 999)} for {rng.choice(TOPICS)}"
        items.append(f"Example {i}\nInput: {value}\nOutput: {output}")
    return "\n" + "\n".join(items), "length" if roll > 0.95 else "stop"


# ---------------------------------------------------------------- running the command line


def _env(runs: Path, kill_at: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIFT_TEST_")}
    # one thread: the tiny models gain nothing from more on a shared 2-core machine, and the
    # reference and the killed runs must compute with the same thread count
    env.update(SIFT_RUNS_DIR=str(runs), SIFT_PROGRESS="0", OMP_NUM_THREADS="1")
    if kill_at:
        env["SIFT_TEST_KILL_AT"] = kill_at
    return env


def sift(args: list[str], *, runs: Path, kill_at: str | None = None, timeout: float = 300) -> tuple[int, str, str]:
    """Run `python -m pipeline.cli ARGS` with SIFT_RUNS_DIR=runs; (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=_env(runs, kill_at),
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def sift_ok(args: list[str], *, runs: Path) -> str:
    code, out, err = sift(args, runs=runs)
    assert code == 0, f"sift {' '.join(args)} exited {code}:\n{err[-3000:]}"
    return out


def sift_killed(args: list[str], *, runs: Path, kill_at: str) -> None:
    """Run a command that must die by SIGKILL at `kill_at` (a point past its last write is a test bug)."""
    code, _, err = sift(args, runs=runs, kill_at=kill_at)
    assert code == -signal.SIGKILL, f"sift {' '.join(args)} with kill at {kill_at} exited {code}:\n{err[-3000:]}"


def sift_killed_when(args: list[str], *, runs: Path, appears: Callable[[], bool], timeout: float = 300) -> None:
    """Run a command and SIGKILL it as soon as `appears()` is true (polled every millisecond): for
    writes the seam cannot reach, such as the trainer's checkpoints."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=_env(runs),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not appears() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"sift {' '.join(args)} ended ({proc.returncode}) before " \
        f"the kill point:\n{err.decode(errors='replace')[-3000:]}"


# ---------------------------------------------------------------- checks


def artifact_files(d: Path) -> list[Path]:
    """The files a run's manifest must list (its own rule: no dot files, journals or checkpoints)."""
    return [p for p in sorted(d.rglob("*")) if p.is_file() and p.name != "manifest.json" and p.suffix != ".journal"
            and not any(part.startswith(".") or part == "checkpoints" or part.startswith("checkpoint-")
                        for part in p.relative_to(d).parts)]


def check_run(d: Path) -> None:
    """Every JSONL file parses line by line with unique ids, every JSON file parses, the journals
    have no torn line left, no temporary file is left over, and the manifest's hashes match."""
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        assert not (p.name.startswith(".") and p.name.endswith(".tmp")), f"left-over temporary file {rel}"
        assert not any(part.startswith(".save-") for part in p.relative_to(d).parts), f"left-over {rel}"
        if not p.is_file() or "checkpoint-" in rel:
            continue
        if p.suffix in (".jsonl", ".journal"):
            data = p.read_bytes()
            assert not data or data.endswith(b"\n"), f"{rel}: torn last line"
            ids = [obj["id"] for _, obj in iter_jsonl(p, allow_empty=True) if "id" in obj]
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            assert not dupes, f"{rel}: duplicate ids {dupes[:5]}"
        elif p.suffix == ".json":
            read_json(p)
    manifest = read_json(d / "manifest.json")
    listed = manifest["artifacts"]
    files = {p.relative_to(d).as_posix(): p for p in artifact_files(d)}
    assert sorted(listed) == sorted(files), f"manifest lists {sorted(set(listed) ^ set(files))} wrongly"
    for rel, entry in listed.items():
        assert entry["sha256"] == file_sha256(files[rel]), f"manifest sha256 of {rel} does not match the file"
        assert entry["bytes"] == files[rel].stat().st_size, f"manifest size of {rel} does not match"


def untimed(obj: object) -> object:
    """`obj` without the TIMING_KEYS, at any depth. `train_loss` is rounded to 9 decimals: after a
    resume, train's summary recombines it from the losses logged before the kill and the resumed
    trainer's mean, which agrees with the uninterrupted figure only up to float rounding."""
    if isinstance(obj, dict):
        return {k: round(v, 9) if k == "train_loss" and isinstance(v, float) else untimed(v)
                for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


# Files compared record for record rather than byte for byte (their manifest hashes are left out too).
# adapter_config.json is compared byte for byte: the trainer sorts PEFT's `target_modules` (a set).
RECORD_FILES = re.compile(r"(\.stats\.json|^student/metrics\.jsonl|^student/train_config\.json)$")


def comparable(d: Path, rel: str, runs: tuple[Path, ...]) -> object:
    """What must be equal between two runs for one file: its bytes, or, for the files that carry
    timings, its records without TIMING_KEYS. In train_config.json `resume` says whether this
    process resumed (true only after a kill), so it is left out too. The manifest may name paths
    inside a runs folder (`runs`: the run's own, and the one its starting copy came from)."""
    p = d / rel
    if rel == "manifest.json":
        text = p.read_text(encoding="utf-8")
        for folder in runs:
            text = text.replace(str(folder), "$SIFT_RUNS_DIR")
        manifest = json.loads(text)
        artifacts = {k: {f: x for f, x in v.items() if f != "mtime_ns"}  # when it was written: a timing
                     for k, v in manifest["artifacts"].items() if not RECORD_FILES.search(k)}
        stages = {name: {**untimed(stage), "settings": {k: v for k, v in stage["settings"].items() if k != "resume"}}
                  for name, stage in manifest["stages"].items()}
        return {**manifest, "artifacts": artifacts, "stages": stages}
    if RECORD_FILES.search(rel):
        if p.suffix == ".jsonl":  # metrics.jsonl; its "end" entry is the trainer's figure for its last process
            return [untimed({k: v for k, v in obj.items() if not (obj.get("kind") == "end" and k == "train_loss")})
                    for _, obj in iter_jsonl(p, allow_empty=True)]
        obj = untimed(read_json(p))
        return {k: v for k, v in obj.items() if k != "resume"} if isinstance(obj, dict) else obj
    return p.read_bytes()


def same_artifacts(ref: Path, d: Path, *, ref_runs: Path | None = None) -> list[str]:
    """Compare every artifact and the manifest of two runs; returns the names compared.
    `ref_runs`: the runs folder the reference ran in, when `ref` is a copy made afterwards."""
    names = sorted({p.relative_to(ref).as_posix() for p in artifact_files(ref)} | {"manifest.json"})
    got = sorted({p.relative_to(d).as_posix() for p in artifact_files(d)} | {"manifest.json"})
    assert got == names, f"artifact sets differ: {sorted(set(got) ^ set(names))}"
    for rel in names:
        a = comparable(ref, rel, (ref_runs or ref.parent,))
        b = comparable(d, rel, (d.parent, ref_runs or ref.parent))
        if a != b:
            raise AssertionError(f"{rel} differs from the uninterrupted run's:\n{_first_difference(a, b)}")
    return names


def _first_difference(a: object, b: object, where: str = "") -> str:
    """Where two values first differ, and how."""
    if isinstance(a, bytes) and isinstance(b, bytes):
        la, lb = a.decode(errors="replace").splitlines(), b.decode(errors="replace").splitlines()
        for i, (x, y) in enumerate(zip(la, lb, strict=False), start=1):
            if x != y:
                return f"line {i}:\n  uninterrupted: {x[:600]}\n  killed:        {y[:600]}"
        return f"{len(la)} lines vs {len(lb)} lines"
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                return _first_difference(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{where}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return (f"at {where or 'top'}:\n  uninterrupted: {json.dumps(a, default=str)[:600]}\n"
            f"  killed:        {json.dumps(b, default=str)[:600]}")
