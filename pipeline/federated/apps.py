"""The Flower ClientApp and ServerApp of `sift federate`: the same two apps under Flower's simulation
engine (the default, all clients on this machine) and its deployment engine (a SuperLink and one
SuperNode per party, see docs/federated.md).

    sift federate --run demo --federate.clients 3 --federate.rounds 2    # simulation engine
    flwr run runs/demo/federate/flower-app local --run-config "federation-dir='/abs/runs/demo'"

What travels: server -> client, the global LoRA adapter (an ArrayRecord) and the training settings
(a ConfigRecord); client -> server, only the client's adapter tensors, its example count, its
partition number and loss/NLL numbers (MetricRecords). A client that fails answers with an error
carrying its partition number and the exception's type, never its message (which may quote data);
the full traceback stays in the client's own log. The server aggregates with train/fedlora.py and
keeps its state in federate.json (pipeline/federated/state.py), one atomic write per finished round.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.federated.state import load_adapter_file, read_state, save_adapter, write_state

ERROR_CODE = 1  # a client's own failure (Flower reserves other codes for transport errors)
NODE_WAIT_S = 120.0  # how long the server waits for every SuperNode to connect (deployment)


# ---------------------------------------------------------------- client side


def _data_dir(context: Any, data_dirs: list[str] | None) -> tuple[int, Path]:
    """(partition, data folder): the SuperNode's node config names both (deployment); under
    simulation the partition number indexes the folders the command gave."""
    partition = int(context.node_config["partition-id"])
    given = context.node_config.get("data-dir")
    if given:
        return partition, Path(str(given))
    if data_dirs is None or partition >= len(data_dirs):
        raise SiftError(f"no data folder for partition {partition}: start the SuperNode with "
                        "--node-config \"partition-id=N data-dir='...'\"", field="data-dir")
    return partition, Path(data_dirs[partition])


def _reply(message: Any, context: Any, data_dirs: list[str] | None,
           work: Callable[[Any, int, Path], tuple[dict | None, dict]]) -> Any:
    """Run one client task; answer with its tensors and metrics, or with an error that names the
    exception type only."""
    from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

    partition = -1
    try:
        partition, data_dir = _data_dir(context, data_dirs)
        arrays, metrics = work(message, partition, data_dir)
        content = RecordDict({"metrics": MetricRecord({"partition": partition, **metrics})})
        if arrays is not None:
            content["arrays"] = ArrayRecord(arrays)
        return Message(content, reply_to=message)
    except Exception as e:  # reported to the server by type; details stay on this party's console
        print(f"sift federate: client {partition} failed:\n{traceback.format_exc()}", file=sys.stderr)
        return Message(Error(code=ERROR_CODE, reason=f"client {partition}: {type(e).__name__}"), reply_to=message)


def _tensors(record: Any) -> dict:
    """An ArrayRecord as {name: torch tensor} (Flower converts only once torch is imported)."""
    import torch  # noqa: F401

    return dict(record.to_torch_state_dict())


def _train(message: Any, partition: int, data_dir: Path) -> tuple[dict, dict]:
    from train.fedlocal import LocalSettings, local_train

    config = message.content["config"]
    settings = LocalSettings.from_config(config)
    state = _tensors(message.content["arrays"])
    new, n, metrics = local_train(state, data_dir, settings, round_=int(config["round"]), client=partition)
    return new, {"num-examples": n, **metrics}


def _evaluate(message: Any, partition: int, data_dir: Path) -> tuple[None, dict]:
    from train.fedlocal import LocalSettings, adapter_nll

    settings = LocalSettings.from_config(message.content["config"])
    total, tokens = adapter_nll(_tensors(message.content["arrays"]), data_dir / "valid.jsonl", settings)
    return None, {"nll-sum": total, "tokens": tokens, "num-examples": tokens}


def build_client_app(data_dirs: list[str] | None = None) -> Any:
    """The ClientApp; `data_dirs[partition]` is each simulated client's folder (train.jsonl, valid.jsonl)."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(message: Any, context: Any) -> Any:
        return _reply(message, context, data_dirs, _train)

    @app.evaluate()
    def evaluate(message: Any, context: Any) -> Any:
        return _reply(message, context, data_dirs, _evaluate)

    return app


# ---------------------------------------------------------------- server side


class Rounds:
    """The server's loop over rounds on a Flower Grid: send the global adapter, gather replies,
    aggregate, evaluate, persist. `observe` sees every reply that reaches the server (tests)."""

    def __init__(self, grid: Any, directory: Path, observe: Callable[[Any], None] | None = None) -> None:
        from train.eval_sets import load_heldout, pick
        from train.fedlocal import LocalSettings

        self.grid, self.directory, self.observe = grid, directory, observe
        state = read_state(directory)
        if state is None:
            raise SiftError("no federation set up here; run `sift federate` first", path=directory)
        self.state = state
        plan = state["settings"]
        self.local = LocalSettings.from_config(plan["local"])
        self.method = plan["aggregation"]
        self.timeout = float(plan["round_timeout"])
        rows = pick(load_heldout(Path(plan["heldout"])), int(plan["eval_limit"]), self.local.train.seed)
        self.heldout = [(r["id"], r["messages"]) for r in rows]
        self.nodes = self._wait_for_nodes(len(state["clients"]))

    def _wait_for_nodes(self, expected: int) -> list[int]:
        deadline = time.monotonic() + NODE_WAIT_S
        while len(nodes := sorted(self.grid.get_node_ids())) < expected and time.monotonic() < deadline:
            time.sleep(0.5)
        if not nodes:
            raise SiftError(f"no client connected within {NODE_WAIT_S:.0f} s")
        if len(nodes) < expected:
            print(f"federate: {len(nodes)} of {expected} clients connected; going on with them")
        return nodes

    def send(self, kind: str, adapter: dict, round_: int) -> tuple[list[Any], list[dict]]:
        """Send the adapter to every node; (good replies, failures as {partition or node, error})."""
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

        config = ConfigRecord({**self.local.to_config(), "round": round_})
        messages = [Message(RecordDict({"arrays": ArrayRecord(adapter), "config": config}), message_type=kind,
                            dst_node_id=node) for node in self.nodes]
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        good, failed, answered = [], [], set()
        for reply in replies:
            if self.observe is not None:
                self.observe(reply)
            answered.add(reply.metadata.src_node_id)
            if reply.has_error():
                failed.append({"node": reply.metadata.src_node_id, "error": reply.error.reason})
            else:
                good.append(reply)
        failed += [{"node": n, "error": f"no reply within {self.timeout:.0f} s"} for n in self.nodes
                   if n not in answered]
        return good, failed

    def evaluate(self, adapter: dict, round_: int) -> dict:
        """The adapter's NLL per answer token on every client's validation split and on the held-out set."""
        from flwr.app import MessageType

        from train.fedlocal import rows_nll

        good, failed = self.send(MessageType.EVALUATE, adapter, round_)
        clients = {}
        for r in good:
            m = r.content["metrics"]
            clients[f"client-{int(m['partition'])}"] = {
                "valid_nll": m["nll-sum"] / m["tokens"] if m["tokens"] else None, "valid_tokens": int(m["tokens"])}
        total, tokens = rows_nll(adapter, self.heldout, self.local)
        return {"heldout_nll": total / tokens if tokens else math.nan, "heldout_tokens": tokens,
                "clients_valid": dict(sorted(clients.items())), "eval_failed": failed}

    def run(self) -> None:
        from flwr.app import MessageType

        from train.fedlocal import initial_adapter
        from train.fedlora import aggregate

        state, target = self.state, int(self.state["target_rounds"])
        done = len(state["rounds"])
        adapter = load_adapter_file(self.directory, done) if done else initial_adapter(self.local)
        if state.get("initial") is None:
            state["initial"] = self.evaluate(adapter, 0)
            write_state(self.directory, state)
            print(f"federate: round 0 (no training): held-out NLL {state['initial']['heldout_nll']:.4f}")
        for round_ in range(done + 1, target + 1):
            t0 = time.perf_counter()
            good, failed = self.send(MessageType.TRAIN, adapter, round_)
            if not good:
                raise SiftError(f"round {round_}: every client failed ({failed}); nothing to aggregate")
            metrics = [r.content["metrics"] for r in good]
            adapter, residuals = aggregate([_tensors(r.content["arrays"]) for r in good],
                                           [int(m["num-examples"]) for m in metrics], self.method)
            entry = {"round": round_, "aggregation": self.method,
                     "trained": {f"client-{int(m['partition'])}": {"examples": int(m["num-examples"]),
                                                                   "train_loss": float(m["train_loss"])}
                                 for m in sorted(metrics, key=lambda m: int(m["partition"]))},
                     "failed": failed}
            if residuals:
                entry["exact_residual_max"] = max(residuals.values())
            entry |= self.evaluate(adapter, round_)
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            save_adapter(self.directory, round_, adapter)  # first the adapter, then the round that names it
            state["rounds"].append(entry)
            write_state(self.directory, state)
            print(round_line(entry))


def round_line(entry: dict) -> str:
    valid = ", ".join(f"{k} {v['valid_nll']:.3f}" for k, v in entry["clients_valid"].items()
                      if v["valid_nll"] is not None)
    fail = f"; {len(entry['failed'])} failed: {entry['failed']}" if entry["failed"] else ""
    return (f"federate: round {entry['round']}: {len(entry['trained'])} clients trained{fail}; held-out NLL "
            f"{entry['heldout_nll']:.4f}; client valid NLL {valid or '-'} ({entry['seconds']:.0f} s)")


def build_server_app(directory: Path | None = None, observe: Callable[[Any], None] | None = None,
                     errors: list[BaseException] | None = None) -> Any:
    """The ServerApp over the federation in `directory` (deployment: the run config's
    `federation-dir`). An exception is also put in `errors`, for the caller of the simulation."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        try:
            folder = directory or Path(str(context.run_config["federation-dir"]))
            Rounds(grid, folder, observe).run()
        except BaseException as e:
            if errors is not None:
                errors.append(e)
            raise

    return app


# the apps `flwr run` loads in deployment (pyproject.toml of the Flower app: module:attribute)
client_app = build_client_app()
server_app = build_server_app()
