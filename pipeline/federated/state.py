"""The state of a federation on disk, so a killed `sift federate` continues from its last round.

    sift federate --run demo --federate.clients 3 --federate.rounds 2     # writes runs/demo/federate.json

runs/<run>/federate.json: `settings` (what shapes the rounds; a rerun must keep them, only
federate.rounds may grow), `clients` (name, data folder, example counts), `initial` (the untrained adapter's NLL)
and `rounds`, one entry per finished round. Each round's global adapter is saved first, as
runs/<run>/federate/round-<k>.safetensors, then the round is appended to federate.json; both writes
are atomic, so a kill at any moment leaves the last finished round and nothing half-written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.io.artifacts import atomic_write, read_json, write_json

STATE = "federate.json"
ADAPTERS = "federate"


def state_path(directory: Path) -> Path:
    return directory / STATE


def read_state(directory: Path) -> dict | None:
    path = state_path(directory)
    return read_json(path) if path.exists() else None


def write_state(directory: Path, state: dict) -> None:
    write_json(state_path(directory), state)


def check_settings(directory: Path, settings: dict, clients: list[dict]) -> dict:
    """The state to continue: the one on disk when its settings and clients match, else a new one.
    Changed settings are refused, naming them, like `sift loop` does."""
    old = read_state(directory)
    if old is None:
        return {"settings": settings, "clients": clients, "initial": None, "rounds": []}
    changed = sorted(k for k in set(settings) | set(old.get("settings", {}))
                     if old.get("settings", {}).get(k) != settings.get(k))
    old_clients = [(c.get("name"), c.get("dir")) for c in old.get("clients", [])]
    if old_clients != [(c["name"], c["dir"]) for c in clients]:
        changed.append("clients")
    if changed:
        raise SiftError(f"this federation was started with other settings (changed: {', '.join(changed)}); rerun "
                        "with the same options (only federate.rounds may change), or use another --run",
                        path=state_path(directory))
    return old


def adapter_path(directory: Path, round_: int) -> Path:
    return directory / ADAPTERS / f"round-{round_}.safetensors"


def save_adapter(directory: Path, round_: int, tensors: dict[str, Any]) -> Path:
    """The round's global adapter, written atomically (safetensors bytes through a temporary file)."""
    from safetensors.torch import save

    path = adapter_path(directory, round_)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"round": str(round_)})
    atomic_write(path, lambda f: f.buffer.write(data))  # binary through the text file's buffer
    return path


def load_adapter_file(directory: Path, round_: int) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = adapter_path(directory, round_)
    if not path.is_file():
        raise SiftError(f"the adapter of finished round {round_} is missing; delete {STATE} to start over",
                        path=path)
    return load_file(str(path))
