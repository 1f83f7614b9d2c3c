"""`sift federate --federate.engine deployment` for real on loopback: a Flower SuperLink and two SuperNodes
started here on 127.0.0.1, each SuperNode naming its own data folder, then `flwr run` of sift's
Flower app (the same ClientApp and ServerApp the simulation engine runs). Bounded in time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.federated.state import read_state
from pipeline.settings import FederateSettings, LoraSettings, StudentSettings, TrainSettings
from pipeline.stages import federate as fed
from pipeline.stages.export import write_splits
from tests.train.conftest import save_tiny

BIN = Path(sys.executable).parent
PAIRS = [("give three tips for staying healthy", "eat vegetables sleep well"), ("what is the capital of france",
         "paris"), ("translate hello to spanish", "hola"), ("name a primary color", "red")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listening on {port} after {seconds} s: {log.read_text()[-2000:]}")


@pytest.mark.slow
def test_deployment_engine_on_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    monkeypatch.setenv("SIFT_RUNS_DIR", str(runs))
    model = save_tiny(tmp_path / "tiny")
    for k, name in enumerate(("a", "b")):
        recs = [{"id": f"{name}{i}", "instruction": q, "input": "", "output": o} for i, (q, o) in enumerate(PAIRS)]
        write_splits(runs / name, recs[k:k + 3], recs[:1])
    heldout = runs / "a" / "valid.jsonl"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # SuperExec is on the venv's PATH
    link_port = free_port()
    procs: list[subprocess.Popen] = []

    def start(args: list[str], name: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                env={**env, "FLWR_HOME": str(tmp_path / f"home-{name}")})
        procs.append(proc)
        return proc, log

    try:
        link, link_log = start([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                str(link_port), "--disable-runtime-dependency-installation"], "superlink")
        wait_listening(link_port, link, link_log)
        for k, name in enumerate(("a", "b")):
            port = free_port()
            node, log = start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                               "--host", "127.0.0.1", "--port", str(port), "--node-config",
                               f"partition-id={k} data-dir='{runs / name}'"], f"supernode-{name}")
            wait_listening(port, node, log)
        monkeypatch.setenv("PATH", env["PATH"])
        fed.federate(run="fed", student=StudentSettings(model=str(model)), lora=LoraSettings(r=4, alpha=8),
                     train=TrainSettings(batch_size=2, grad_accum=1, max_length=48, precision="fp32"),
                     federate=FederateSettings(client_runs="a,b", rounds=1, local_steps=2, eval_file=str(heldout),
                                               engine="deployment", superlink=f"127.0.0.1:{link_port}",
                                               round_timeout=600))
    finally:
        for proc in procs:  # each started in a session of its own: its group holds its SuperExec children
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    state = read_state(runs / "fed")
    (entry,) = state["rounds"]
    assert sorted(entry["trained"]) == ["client-0", "client-1"] and entry["failed"] == []
    assert entry["trained"]["client-0"]["examples"] == 3 and entry["trained"]["client-1"]["examples"] == 3
    assert sorted(entry["clients_valid"]) == ["client-0", "client-1"]
    assert entry["heldout_nll"] > 0 and (runs / "fed" / "federate" / "round-1.safetensors").is_file()
