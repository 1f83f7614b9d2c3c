"""Local-only, federated and centralised LoRA on the same data and the same total steps, by NLL.

    .venv/bin/python bench/federate.py --run demo --clients 3 --rounds 2 --local-steps 4
    .venv/bin/python bench/federate.py --run demo --aggregation exact

The table every federated-learning paper shows. runs/<run>/filtered.jsonl is split into --clients
parts exactly as `sift federate` splits it (whole --split-by groups, a validation split each), in a
scratch run <run>-fedbench so the run's own federate.json is left alone. Then, from the same
initial adapter and with the same client settings:
- local-only: each client alone trains rounds x local-steps steps on its own data;
- federated: `sift federate` itself (Flower's simulation engine), rounds x local-steps per client;
- centralised: one trainer on all clients' training data pooled, clients x rounds x local-steps steps;
so each line spends clients x rounds x local-steps optimizer steps in all. Every adapter is scored
by NLL per answer token on the general held-out set (evalsets/general.jsonl, --eval-limit rows) and
on each client's validation split (mean over clients, token-weighted within each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.io.artifacts import write_jsonl  # noqa: E402
from pipeline.io.runs import run_dir  # noqa: E402
from pipeline.stages import federate as fed  # noqa: E402
from pipeline.stages.fedstate import load_adapter_file, read_state  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="demo", help="run whose filtered.jsonl is split into clients")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--split-by", default="task_id")
    ap.add_argument("--aggregation", default="fedavg", choices=["fedavg", "exact"])
    ap.add_argument("--student", default="smollm2-135m-instruct")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-limit", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    a = ap.parse_args()

    source = run_dir(a.run) / "filtered.jsonl"
    scratch = run_dir(f"{a.run}-fedbench")
    # a rerun on the same data continues the federation where it stopped (sift federate resumes; changed
    # settings are refused); other data starts the scratch run afresh
    if not (scratch / "filtered.jsonl").is_file() or \
            (scratch / "filtered.jsonl").read_bytes() != source.read_bytes():
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        shutil.copy(source, scratch / "filtered.jsonl")
    settings = LocalSettings(student=a.student, local_steps=a.local_steps, lr=a.lr, batch_size=a.batch_size,
                             grad_accum=a.grad_accum, max_length=a.max_length, seed=a.seed)
    heldout = [(r["id"], r["messages"]) for r in pick(load_heldout(fed.GENERAL), a.eval_limit, a.seed)]
    results, steps = {}, a.clients * a.rounds * a.local_steps

    t0 = time.perf_counter()
    fed.federate(run=scratch.name, clients=a.clients, rounds=a.rounds, local_steps=a.local_steps,
                 split_by=a.split_by, aggregation=a.aggregation, student=a.student, lr=a.lr,
                 batch_size=a.batch_size, grad_accum=a.grad_accum, max_length=a.max_length,
                 eval_limit=a.eval_limit, seed=a.seed)
    state = read_state(scratch)
    clients = state["clients"]
    results["federated"] = {**score(load_adapter_file(scratch, a.rounds), settings, heldout, clients),
                            "seconds": round(time.perf_counter() - t0)}
    start = initial_adapter(settings)
    results["base (no training)"] = {**score(start, settings, heldout, clients), "seconds": 0}

    per_client = []
    t0 = time.perf_counter()
    for k, c in enumerate(clients):
        alone = LocalSettings(**{**settings.to_config(), "local_steps": a.rounds * a.local_steps})
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
    central = LocalSettings(**{**settings.to_config(), "local_steps": steps})
    adapter, _, _ = local_train(start, pooled, central, round_=1, client=0)
    results["centralised (pooled)"] = {**score(adapter, settings, heldout, clients),
                                       "seconds": round(time.perf_counter() - t0)}

    print(f"\n{a.clients} clients, {a.rounds} rounds x {a.local_steps} local steps ({steps} optimizer steps per line), "
          f"{a.aggregation}; student {a.student}; data {source} split by {a.split_by}: "
          + ", ".join(f"{c['name']} {c['train']}/{c['valid']}" for c in clients) + " train/valid")
    print(f"{'':30} {'general held-out NLL':>20} {'client valid NLL':>17} {'seconds':>8}")
    for name, r in results.items():
        cv = f"{r['client_valid_nll']:.4f}" if r["client_valid_nll"] is not None else "-"
        print(f"{name:30} {r['heldout_nll']:20.4f} {cv:>17} {r['seconds']:8}")
    if a.out:
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": results},
                                    indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
