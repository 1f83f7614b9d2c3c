"""Local-only, federated and centralised LoRA on the same data and the same total steps, by NLL.

    .venv/bin/python bench/federate.py --run demo --federate.clients 3 --federate.rounds 2 --federate.local-steps 4
    .venv/bin/python bench/federate.py --run demo --federate.aggregation exact --train.batch-size 2

The table every federated-learning paper shows. It takes `sift federate`'s own sections and flags
(student:, lora:, train:, export:, federate:; `--help` lists them, `--config` reads them).
The run's records (scored.jsonl when present, else filtered.jsonl) are split into federate.clients parts
exactly as `sift federate` splits them (what `sift export` would train on: selected, less the records
overlapping the general held-out set; whole federate.split_by groups, a validation split each), in a
scratch run <run>-fedbench so the run's own federate.json is left alone. Then, from the same initial
adapter and with the same client settings:
- local-only: each client alone trains rounds x local_steps steps on its own data;
- federated: `sift federate` itself (Flower's simulation engine), rounds x local_steps per client;
- centralised: one trainer on all clients' training data pooled, clients x rounds x local_steps steps;
so each line spends clients x rounds x local_steps optimizer steps in all. Every adapter is scored
by NLL per answer token on the general held-out set (evalsets/general.jsonl, federate.eval_limit
rows) and on each client's validation split (mean over clients, token-weighted within each).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import add_command, effective_config, resolve_settings  # noqa: E402
from pipeline.errors import SiftError  # noqa: E402
from pipeline.federated.state import load_adapter_file, read_state  # noqa: E402
from pipeline.io.artifacts import write_jsonl  # noqa: E402
from pipeline.io.runs import run_dir  # noqa: E402
from pipeline.settings import (  # noqa: E402
    ExportSettings,
    FederateSettings,
    LoraSettings,
    StudentSettings,
    TrainSettings,
    to_dict,
)
from pipeline.stages import federate as fed  # noqa: E402
from train.eval_sets import load_heldout, pick  # noqa: E402
from train.fedlocal import LocalSettings, adapter_nll, initial_adapter, local_train, rows_nll  # noqa: E402
from train.lora import read_split  # noqa: E402


def score(adapter: dict, settings: LocalSettings, heldout: list, clients: list[dict]) -> dict:
    total, tokens = rows_nll(adapter, heldout, settings)
    valid = []
    for c in clients:
        t, n = adapter_nll(adapter, Path(c["dir"]) / "valid.jsonl", settings)
        if n:
            valid.append(t / n)
    return {"heldout_nll": total / tokens, "client_valid_nll": sum(valid) / len(valid) if valid else None}


def bench(*, run: str = "demo", student: StudentSettings = StudentSettings(), lora: LoraSettings = LoraSettings(),
          train: TrainSettings = TrainSettings(), export: ExportSettings = ExportSettings(),
          federate: FederateSettings = FederateSettings(), out: Path | None = None) -> None:
    """Local-only, federated and centralised LoRA on the same data and the same total steps, by NLL.

    Args:
        run: Run whose records (scored.jsonl, else filtered.jsonl) are split into clients (in a scratch
            run <run>-fedbench).
        student: the base model and its device, as in sift federate.
        lora: the adapter, as in sift federate.
        train: the clients' training settings, as in sift federate.
        export: each client's validation share, as in sift federate.
        federate: clients, rounds, local steps, split, aggregation, held-out rows.
        out: Also write the results as JSON here.
    """
    a = federate
    source = run_dir(run) / "filtered.jsonl"
    scratch = run_dir(f"{run}-fedbench")
    names = [n for n in ("filtered.jsonl", "scored.jsonl") if (source.parent / n).is_file()]

    def same(name: str) -> bool:
        return (scratch / name).is_file() and (scratch / name).read_bytes() == (source.parent / name).read_bytes()

    # a rerun on the same data continues the federation where it stopped (sift federate resumes; changed
    # settings are refused); other data starts the scratch run afresh
    if not all(same(n) for n in names) or (scratch / "scored.jsonl").is_file() != ("scored.jsonl" in names):
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        for name in names:  # with their times: a scored.jsonl older than filtered.jsonl is stale, and refused
            shutil.copy2(source.parent / name, scratch / name)
    settings = LocalSettings(student=student, lora=lora, train=train, local_steps=a.local_steps)
    heldout = [(r["id"], r["messages"]) for r in pick(load_heldout(fed.GENERAL), a.eval_limit, train.seed)]
    results, steps = {}, a.clients * a.rounds * a.local_steps

    t0 = time.perf_counter()
    fed.federate(run=scratch.name, student=student, lora=lora, train=train, export=export, federate=federate)
    state = read_state(scratch)
    clients = state["clients"]
    results["federated"] = {**score(load_adapter_file(scratch, a.rounds), settings, heldout, clients),
                            "seconds": round(time.perf_counter() - t0)}
    start = initial_adapter(settings)
    results["base (no training)"] = {**score(start, settings, heldout, clients), "seconds": 0}

    per_client = []
    t0 = time.perf_counter()
    for k, c in enumerate(clients):
        alone = dataclasses.replace(settings, local_steps=a.rounds * a.local_steps)
        adapter, _, _ = local_train(start, Path(c["dir"]), alone, round_=1, client=k)
        per_client.append(score(adapter, settings, heldout, clients))
    results["local-only (mean of clients)"] = {
        "heldout_nll": sum(r["heldout_nll"] for r in per_client) / len(per_client),
        "client_valid_nll": sum(r["client_valid_nll"] for r in per_client) / len(per_client),
        "seconds": round(time.perf_counter() - t0), "each": per_client}

    pooled = scratch / "federate" / "pooled"
    rows = [{"id": i, "messages": m} for c in clients for i, m in read_split(Path(c["dir"]) / "train.jsonl")]
    write_jsonl(pooled / "train.jsonl", rows)
    t0 = time.perf_counter()
    central = dataclasses.replace(settings, local_steps=steps)
    adapter, _, _ = local_train(start, pooled, central, round_=1, client=0)
    results["centralised (pooled)"] = {**score(adapter, settings, heldout, clients),
                                       "seconds": round(time.perf_counter() - t0)}

    print(f"\n{a.clients} clients, {a.rounds} rounds x {a.local_steps} local steps ({steps} optimizer steps per line), "
          f"{a.aggregation}; student {student.model}; data {source} split by {a.split_by}: "
          + ", ".join(f"{c['name']} {c['train']}/{c['valid']}" for c in clients) + " train/valid")
    print(f"{'':30} {'general held-out NLL':>20} {'client valid NLL':>17} {'seconds':>8}")
    for name, r in results.items():
        cv = f"{r['client_valid_nll']:.4f}" if r["client_valid_nll"] is not None else "-"
        print(f"{name:30} {r['heldout_nll']:20.4f} {cv:>17} {r['seconds']:8}")
    if out:
        settings_used = to_dict(run=run, student=student, lora=lora, train=train, export=export, federate=federate)
        out.write_text(json.dumps({"settings": settings_used, "results": results}, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """sift's own command line for `bench`: the same flags, config sections and errors as `sift federate`."""
    parser = argparse.ArgumentParser(prog="bench/federate.py", allow_abbrev=False)
    add_command(parser.add_subparsers(), "bench", bench)
    ns = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        _, kwargs = resolve_settings(bench, "bench", ns)
        if ns.print_config:
            print(yaml.safe_dump(effective_config("bench", bench, kwargs), sort_keys=False).rstrip("\n"))
            return 0
        bench(**kwargs)
    except SiftError as e:
        print(f"bench/federate.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
