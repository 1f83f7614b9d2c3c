"""`sift federate`: federated LoRA on Flower; parties train the student locally, only adapters travel.

    sift federate --run demo --federate.clients 3 --federate.rounds 2 --federate.local-steps 8   # or: make federate
    sift federate --run fed --federate.client-runs hospital-a,hospital-b --federate.rounds 3 --train.lr 1e-4

Clients are either a deterministic split of the records `sift export` would train on into federate.clients
parts (runs/<run>/scored.jsonl, the score stage's selection, else filtered.jsonl; less the records
sharing a 13-gram with the general held-out set, in runs/<run>/federate/clients/export.rejected.jsonl;
whole groups of federate.split_by, e.g. all instances of one task, go to one client; each part is split into
train and validation as `sift export` does) written to runs/<run>/federate/clients/client-K/, or
the run directories named by federate.client_runs, each holding its own train.jsonl and valid.jsonl from
`sift export`. Flower's simulation engine runs the ClientApp and ServerApp of
pipeline/federated/apps.py; every round the server sends the global adapter, each client trains it
for federate.local_steps steps with `sift train`'s trainer, and the server aggregates (train/fedlora.py:
fedavg or exact). After every round the global adapter's NLL per answer token is measured on each
client's validation split (by the client) and on a held-out set (by the server):
train/evalsets/general.jsonl when present, else the clients' validation splits pooled. Writes
runs/<run>/federate.json (settings, clients, one entry per round) and runs/<run>/federate/; a killed
federation rerun with the same command continues after its last finished round.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.federated.state import ADAPTERS, check_settings, read_state, write_state
from pipeline.io.artifacts import iter_jsonl, write_jsonl
from pipeline.io.models import resolve_device
from pipeline.io.runs import locked, record_stage, run_dir
from pipeline.settings import ExportSettings, FederateSettings, LoraSettings, StudentSettings, TrainSettings, to_dict
from train.general_set import GENERAL_PATH

GENERAL = GENERAL_PATH


def field_value(obj: dict, field: str) -> Any:
    """obj[field], with dots reaching into nested objects; a list gives its first item."""
    value: Any = obj
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, list):
        value = value[0] if value else None
    return value


def split_groups(path: Path, clients: int, split_by: str, seed: int, only: set[str] | None = None
                 ) -> list[set[str]]:
    """The ids of each client: distinct values of `split_by`, ordered by a seeded hash, dealt out in
    turn, so the split depends on neither file order nor machine and groups stay whole. `only`: the
    ids to split (the others, e.g. contaminated records, are left out)."""
    groups: dict[str, list[str]] = {}
    for line, obj in iter_jsonl(path):
        if only is not None and str(obj.get("id")) not in only:
            continue
        value = field_value(obj, split_by)
        if value is None or isinstance(value, dict):
            raise SiftError(f"no value to split by (federate.split_by {split_by})", path=path, line=line,
                           field=split_by)
        groups.setdefault(str(value), []).append(str(obj.get("id")))
    if len(groups) < clients:
        raise SiftError(f"only {len(groups)} distinct values of {split_by!r}, fewer than {clients} clients; "
                        "use fewer clients or another federate.split_by", path=path, field="federate.split_by")
    order = sorted(groups, key=lambda v: hashlib.sha256(f"{seed}:{v}".encode()).hexdigest())
    parts: list[set[str]] = [set() for _ in range(clients)]
    for i, value in enumerate(order):
        parts[i % clients].update(groups[value])
    return parts


def split_clients(directory: Path, clients: int, split_by: str, valid_fraction: float, seed: int
                  ) -> tuple[list[dict], dict]:
    """Write runs/<run>/federate/clients/client-K/{train,valid}.jsonl from the records `sift export`
    trains on (`pipeline.stages.export.training_records`: selected, decontaminated), and the ledger of the
    contaminated ones; returns the clients and {"source", "contaminated"}."""
    from pipeline.stages.export import split_ids, training_records, write_splits

    source, records, rejected = training_records(directory)
    write_jsonl(directory / ADAPTERS / "clients" / "export.rejected.jsonl", rejected)
    out = []
    for k, ids in enumerate(split_groups(source, clients, split_by, seed, only={r["id"] for r in records})):
        folder = directory / ADAPTERS / "clients" / f"client-{k}"
        mine = [r for r in records if r["id"] in ids]
        valid_ids = split_ids([r["id"] for r in mine], valid_fraction, seed)  # as `sift export`, per client
        train = [r for r in mine if r["id"] not in valid_ids]
        if not train:
            raise SiftError(f"client {k} has no training record; use fewer clients", path=source)
        write_splits(folder, train, [r for r in mine if r["id"] in valid_ids])
        out.append(client_entry(f"client-{k}", folder))
    return out, {"source": source.name, "contaminated": len(rejected)}


def client_entry(name: str, folder: Path) -> dict:
    """name, folder and what is in it (counts and a hash of the ids: changed data is a changed setting)."""
    from train.lora import read_split

    train = read_split(folder / "train.jsonl")
    valid = read_split(folder / "valid.jsonl", allow_empty=True) if (folder / "valid.jsonl").exists() else []
    ids = hashlib.sha256("\n".join(sorted(i for i, _ in train + valid)).encode()).hexdigest()[:16]
    return {"name": name, "dir": str(folder.resolve()), "train": len(train), "valid": len(valid), "ids_sha": ids}


def pooled_heldout(directory: Path, clients: list[dict]) -> Path:
    """The clients' validation splits in one file: the held-out set when there is no general one."""
    from train.lora import read_split

    rows = [{"id": i, "messages": m} for c in clients if c["dir"]
            for i, m in read_split(Path(c["dir"]) / "valid.jsonl", allow_empty=True)]
    if not rows:
        raise SiftError("no held-out set: no train/evalsets/general.jsonl and no client has a validation record; "
                        "pass --federate.eval-file", field="federate.eval_file")
    path = directory / ADAPTERS / "heldout.jsonl"
    write_jsonl(path, rows)
    return path


def client_resources(clients: int, device: str) -> dict[str, float]:
    """What Ray gives each simulated client: one CPU, and a share of the GPU when the student runs on
    one (Ray hides the GPUs from a client that has none)."""
    return {"num_cpus": 1, "num_gpus": 1.0 / clients if device.startswith("cuda") else 0.0}


def run_simulation_engine(directory: Path, clients: list[dict], observe: Any = None, *, device: str) -> None:
    """Flower's simulation engine (Ray): one virtual SuperNode per client, on the student's `device`
    (resolved)."""
    try:
        from flwr.simulation import run_simulation
    except ImportError:
        raise SiftError("sift federate needs Flower: pip install 'sift-instruct[federated]' "
                        "(flwr[simulation])", field="engine") from None
    from pipeline.federated.apps import build_client_app, build_server_app

    errors: list[BaseException] = []
    run_simulation(server_app=build_server_app(directory.resolve(), observe, errors),
                   client_app=build_client_app([c["dir"] for c in clients]), num_supernodes=len(clients),
                   backend_config={"client_resources": client_resources(len(clients), device),
                                   "init_args": {"logging_level": "error", "log_to_driver": True}})
    if errors:
        raise errors[0]


FLOWER_APP = """\
# The Flower app of `sift federate` for Flower's deployment engine, written by sift; run it with
#   flwr run {folder} sift --run-config "federation-dir='/abs/runs/R'"
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "sift-federate"
version = "1.0.0"
description = "Federated LoRA of sift's student: the apps live in the installed sift package"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "sift"

[tool.flwr.app.components]
serverapp = "sift_flower_app:server_app"
clientapp = "sift_flower_app:client_app"

[tool.flwr.app.config]
federation-dir = ""
"""
FLOWER_SHIM = '''"""sift federate's ClientApp and ServerApp (pipeline/federated/apps.py) for `flwr run`."""

from pipeline.federated import apps

client_app = apps.client_app  # assigned here: Flower checks the names statically before loading
server_app = apps.server_app
'''


def write_flower_app(folder: Path) -> Path:
    """The Flower app folder `flwr run` bundles: its pyproject.toml and a module naming sift's apps."""
    from pipeline.io.artifacts import write_text

    write_text(folder / "pyproject.toml", FLOWER_APP.format(folder=folder))
    write_text(folder / "sift_flower_app.py", FLOWER_SHIM)
    return folder


def run_deployment_engine(directory: Path, superlink: str, timeout: float) -> None:
    """`flwr run` of the Flower app on a running SuperLink (its SuperNodes name their data with
    --node-config "partition-id=K data-dir='...'"); the connection lives in a FLWR_HOME of its own."""
    import os
    import shutil
    import subprocess
    import sys

    from pipeline.io.artifacts import write_text

    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or shutil.which("flwr")
    if flwr is None:
        raise SiftError("the deployment engine needs Flower's CLI: pip install 'sift-instruct[federated]'",
                        field="engine")
    app = write_flower_app(directory / ADAPTERS / "flower-app")
    home = directory / ADAPTERS / "flwr-home"
    write_text(home / "config.toml", f'[superlink]\ndefault = "sift"\n\n[superlink.sift]\naddress = "{superlink}"\n'
               "insecure = true\n")
    command = [flwr, "run", str(app), "sift", "--run-config", f"federation-dir='{directory.resolve()}'", "--stream"]
    try:
        subprocess.run(command, env={**os.environ, "FLWR_HOME": str(home.resolve())}, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        raise SiftError(f"the federation on {superlink} did not finish within {timeout:.0f} s; rerun to continue",
                        field="superlink") from None
    except subprocess.CalledProcessError as e:
        raise SiftError(f"`flwr run` failed (exit {e.returncode}); is a SuperLink running on {superlink}?",
                        field="superlink") from None


def federate(*, run: str = "demo", student: StudentSettings = StudentSettings(), lora: LoraSettings = LoraSettings(),
             train: TrainSettings = TrainSettings(), export: ExportSettings = ExportSettings(),
             federate: FederateSettings = FederateSettings()) -> None:
    """Federated LoRA with Flower: clients train locally, the server aggregates adapters; writes federate.json.

    Args:
        run: Run name; the federation's files go in runs/<run>/ (split mode reads its filtered.jsonl).
        student: the base model and the device every client (and the server's evaluation) loads it on.
        lora: the adapter the clients train (rank, alpha, dropout, target modules; qlora is not supported).
        train: the clients' learning rate, batch_size, grad_accum, max_length, precision, template and seed
            (also the seed of the split and the initial adapter); its other fields are not used.
        export: valid_fraction, each client's share held out for validation (split mode).
        federate: clients, rounds, local steps, aggregation, held-out set, engine.
    """
    from train.fedlocal import LocalSettings

    local = LocalSettings(student=student, lora=lora, train=train, local_steps=federate.local_steps)
    seed, valid_fraction = train.seed, export.valid_fraction
    clients, rounds, client_runs, engine = federate.clients, federate.rounds, federate.client_runs, federate.engine
    directory = run_dir(run)
    with locked(directory):
        data: dict = {}  # split mode: where the records came from, how many were contaminated
        if client_runs:
            names = [n.strip() for n in client_runs.split(",") if n.strip()]
            members = [client_entry(n, run_dir(n)) for n in names]
        elif engine == "deployment" and not (directory / "filtered.jsonl").exists():
            # the parties' data is on their own machines: the server knows only how many there are
            members = [{"name": f"client-{k}", "dir": None} for k in range(clients)]
        else:
            members, data = split_clients(directory, clients, federate.split_by, valid_fraction, seed)
            if data["contaminated"]:
                print(f"federate: left out {data['contaminated']} records of {data['source']} that overlap the "
                      f"general eval set (reason contaminated): {directory / ADAPTERS / 'clients'}/"
                      "export.rejected.jsonl")
        if federate.eval_file:
            heldout, kind = Path(federate.eval_file), "given"
        elif GENERAL.is_file():
            heldout, kind = GENERAL, "general"
        else:
            heldout, kind = pooled_heldout(directory, members), "clients-valid-pooled"
        settings = {"local": local.to_config(), "aggregation": federate.aggregation, "split_by": None if client_runs
                    else federate.split_by, "valid_fraction": valid_fraction, "heldout": str(heldout.resolve()),
                    "heldout_kind": kind, "eval_limit": federate.eval_limit, "round_timeout": federate.round_timeout,
                    **({"data": data} if data else {})}
        state = check_settings(directory, settings, members)
        state["target_rounds"] = max(rounds, len(state["rounds"]))
        write_state(directory, state)
        done = len(state["rounds"])
        if done >= rounds:
            print(f"federate: {done} rounds already finished in {directory}/federate.json")
        else:
            if done:
                print(f"federate: continuing after round {done} of {rounds}")
            sizes = ", ".join(f"{c['name']}: {c.get('train', '?')} train" for c in members)
            print(f"federate: {len(members)} clients ({sizes}), held-out set: {kind} ({heldout})")
            if engine == "deployment":
                run_deployment_engine(directory, federate.superlink,
                                      timeout=federate.round_timeout * (rounds - done + 1))
            else:
                run_simulation_engine(directory, members, device=resolve_device(student.device))
        state = read_state(directory) or {}
        if len(state.get("rounds", [])) < rounds:
            raise SiftError(f"the federation stopped after round {len(state.get('rounds', []))} of {rounds}; "
                            "see the log above, then rerun the same command to continue", path=directory)
        record_stage(directory, "federate", to_dict(student=student, lora=lora, train=train, export=export,
                                                     federate=federate)
                     | {"heldout": settings["heldout"], "heldout_kind": kind, "clients": [c["name"] for c in members]},
                     models={"student": student.model}, stats={"rounds": len(state["rounds"]),
                                                         "heldout_nll": state["rounds"][-1]["heldout_nll"]})
    print(table(state))


def table(state: dict) -> str:
    """The per-round table: held-out NLL and each client's validation NLL."""
    names = [c["name"] for c in state["clients"]]
    lines = ["round  held-out NLL  " + "  ".join(f"{n:>10}" for n in names) + "  failed"]
    for entry in [{"round": 0, **(state.get("initial") or {}), "failed": []}, *state["rounds"]]:
        valid = entry.get("clients_valid", {})
        cells = [f"{valid[n]['valid_nll']:10.4f}" if valid.get(n, {}).get("valid_nll") is not None else f"{'-':>10}"
                 for n in names]
        lines.append(f"{entry['round']:>5}  {entry.get('heldout_nll', float('nan')):12.4f}  " + "  ".join(cells)
                     + f"  {len(entry['failed'])}")
    return "\n".join(lines)
