"""sift report: sections from real artifacts, missing stages said plainly, and the page checked in a
real headless Chromium (Debian's `chromium`) over the DevTools protocol: it renders, every image
loads, the console stays clean; a full-page screenshot lands in the test's tmp dir (and, for a
real run in runs/demo, in runs/demo/report.png)."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.views.report import build_page, report
from pipeline.views.stats import nearest_similarity
from tests.conftest import REFERENCE_SEEDS, REPO, SHARED

USER_ORIENTED = SHARED / "data" / "user_oriented_instructions.jsonl"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run built from the reference seed tasks: 120 act as seeds, the other 55 as generated
    instructions, with ledgers, a funnel, splits, training metrics, an eval and a manifest."""
    from pipeline.io.runs import record_stage

    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path / "runs"))
    d = tmp_path / "runs" / "r"
    tasks = [json.loads(x) for x in REFERENCE_SEEDS.read_text().splitlines()]
    seeds, generated = tasks[:120], tasks[120:]
    _jsonl(d / "seeds.jsonl", seeds)
    sims = nearest_similarity([t["instruction"] for t in generated], [t["instruction"] for t in seeds])
    _jsonl(
        d / "instructions.jsonl",
        [
            {"id": t["id"], "instruction": t["instruction"], "max_similarity": s}
            for t, s in zip(generated, sims, strict=True)
        ],
    )
    _jsonl(
        d / "instructions.rejected.jsonl",
        [
            {"reason": "rouge_similar", "score": 0.8, "instruction": "Write a poem."},
            {"reason": "too_short", "instruction": "Hi"},
            {"reason": "rouge_similar", "score": 0.75},
        ],
    )
    _jsonl(d / "instances.jsonl", generated)
    flat = [
        {"id": f"{t['id']}-{k}", "instruction": t["instruction"], "input": i["input"], "output": i["output"]}
        for t in generated
        for k, i in enumerate(t["instances"])
    ]
    _jsonl(d / "filtered.jsonl", flat[:-3])
    _jsonl(d / "filtered.rejected.jsonl", [{**r, "reason": "output_empty"} for r in flat[-3:]])
    scored = [{**r, "scores": {"ifd": 0.5 + 0.05 * i, "length": len(r.get("output", "").split())}}
              for i, r in enumerate(flat[:-3])]
    _jsonl(d / "scored.jsonl", scored[:-1])
    _jsonl(d / "scored.rejected.jsonl", [{"id": scored[-1].get("id"), "reason": "ifd_at_least_1", "score": 1.2,
                                          "record": {**scored[-1], "scores": {"ifd": 1.2, "length": 3}}}])
    step = {"round": 1, "target": "response", "critique": "Too <short>.", "decision": "rewrite", "reason": "lower_rifd",
            "scores": {"original": {"ifd": 0.9, "rifd": 0.8}, "rewrite": {"ifd": 0.7, "rifd": 0.6}}}
    _jsonl(d / "refined.jsonl", [{**scored[0], "output": "A better answer.", "refinement": {
        "original": {k: scored[0].get(k, "") for k in ("instruction", "input", "output")}, "changed": True,
        "decision": "rewrite", "reason": "lower_rifd", "steps": [step]}}])
    (d / "refine.stats.json").write_text(json.dumps({"read": 1, "source": "scored.jsonl", "select": "student",
                                                     "target": "response", "refined": 1,
                                                     "rewrites": {"proposed": 1, "kept": 1}, "rounds": [
        {"round": 1, "records": 1, "refined": 1, "kept_by_reason": {"response:lower_rifd": 1},
         "rejected_by_reason": {}}]}))
    (d / "funnel.json").write_text(
        json.dumps(
            [
                {"rule": "word_count", "in": 60, "out": 58, "dropped": 2},
                {"rule": "rouge_l", "in": 58, "out": 55, "dropped": 3},
            ]
        )
    )
    msgs = [
        {
            "id": r["id"],
            "messages": [
                {"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["output"]},
            ],
        }
        for r in flat
    ]
    _jsonl(d / "train.jsonl", msgs[:50])
    _jsonl(d / "valid.jsonl", msgs[50:])
    rng = random.Random(0)
    metrics = [
        {"kind": "train", "step": s, "loss": 2.5 - 0.05 * s + rng.random() * 0.1} for s in range(1, 30)
    ]
    metrics += [
        {"kind": "eval", "step": s, "eval_loss": 2.4 - 0.03 * s, "eval_mean_token_accuracy": 0.4 + 0.005 * s}
        for s in (0, 10, 20, 29)
    ]
    metrics.append({"kind": "summary", "step": 29, "train_seconds": 12.0, "tokens_per_s": 210.0})
    _jsonl(d / "student" / "metrics.jsonl", metrics)
    base = {
        "model": "base",
        "nll": 2.1,
        "perplexity": 8.17,
        "rouge_l": 0.21,
        "stop_rate": 0.6,
        "mean_output_tokens": 80.0,
        "distinct_2": 0.7,
    }
    (d / "eval.json").write_text(
        json.dumps(
            {
                "eval_file": str(USER_ORIENTED),
                "examples": 5,
                "base": base,
                "student": {**base, "model": "student", "nll": 1.9, "perplexity": 6.69, "rouge_l": 0.25},
                "judge": {
                    "teacher": "t",
                    "win_rate": 0.6,
                    "ci95": [0.3, 0.9],
                    "length_controlled_win_rate": 0.55,
                    "student_wins": 3,
                    "ties": 0,
                    "base_wins": 2,
                    "unreadable": 0,
                    "position_a_rate": 0.4,
                },
                "samples": [
                    {"instruction": "<b>not bold</b>", "reference": "r", "base": "b", "student": "s"}
                ],
            }
        )
    )
    rounds = [{"round": k, "data": {"train": 10 + k}, "train": {"eval_loss_after": 1.5 - k / 10},
               "eval": {"mean_score": 0.2 * k, "pass_rate": 0.1 * k, "failures": 5 - k},
               "augment": {"failures_used": 3, "candidates": 6, "new_records": 4,
                           "rejected_by_reason": {"rouge_duplicate": 2}}} for k in (1, 2)]
    (d / "loop.json").write_text(json.dumps({"rounds": rounds}))
    (d / "loop" / "round-1").mkdir(parents=True)
    (d / "loop" / "round-1" / "added.jsonl").write_text(json.dumps(
        {"id": "loop_1", "instruction": "Name a <i>new</i> task.", "input": "", "output": "ok",
         "loop": {"round": 1, "parent_id": "ex_1", "parent_score": 0.1, "parent_instruction": "Old task."}}) + "\n")
    valid = {"client-0": {"valid_nll": 2.0, "valid_tokens": 9}}
    (d / "federate.json").write_text(json.dumps({
        "settings": {"aggregation": "fedavg", "heldout_kind": "general", "heldout": "g.jsonl",
                     "local": {"local_steps": 4}}, "clients": [{"name": "a", "dir": "x"}],
        "initial": {"heldout_nll": 3.0, "clients_valid": valid},
        "rounds": [{"round": 1, "heldout_nll": 2.5, "clients_valid": valid, "trained": {"client-0": {}},
                    "failed": [], "seconds": 12.0}]}))
    record_stage(d, "seeds", {"run": "r"}, stats={"seeds": 120})
    return d


def test_every_section_is_filled_from_the_artifacts(run: Path) -> None:
    page = build_page("r", run)
    for section in (
        "funnel",
        "lengths",
        "similarity",
        "verbs",
        "training",
        "eval",
        "contamination",
        "loop",
        "federate",
        "scores",
        "refine",
        "manifest",
    ):
        assert f'<section id="{section}">' in page
    assert "class=missing" not in page  # every stage ran, so no section is empty
    assert page.count('<img src="data:image/png;base64,') == 7
    assert "ifd: the 5 highest" in page and "scored: ifd_at_least_1" in page
    assert "1 of 1 rewrites kept" in page and "response:lower_rifd 1" in page and "Too &lt;short&gt;." in page
    assert "instructions: rouge_similar" in page and "filtered: output_empty" in page
    assert "word_count" in page  # funnel.json's rules
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page and "<b>not bold</b>" not in page  # escaped
    assert "to the nearest pool instruction (at generation)" in page
    assert "user_oriented_instructions.jsonl" in page  # contamination against eval.json's file
    assert "rouge_duplicate 2" in page and "Name a &lt;i&gt;new&lt;/i&gt; task." in page  # the loop's rounds


def test_missing_stages_are_said_not_crashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path))
    d = tmp_path / "empty"
    d.mkdir()
    report(run="empty")
    page = (d / "report.html").read_text()
    assert page.count("class=missing") == 12
    assert "run train" in page and "run eval" in page
    assert "report" in json.loads((d / "manifest.json").read_text())["stages"]


def test_contamination_counts_shared_13_grams(run: Path) -> None:
    tasks = [json.loads(x) for x in USER_ORIENTED.read_text().splitlines()]
    leaked = tasks[3]
    with (run / "filtered.jsonl").open("a") as f:
        f.write(
            json.dumps({"id": "leak", "instruction": leaked["instruction"], "input": "", "output": "x"})
            + "\n"
        )
    page = build_page("r", run, against=str(USER_ORIENTED))
    assert "<td>leak</td>" in page
    assert "<p>1 of " in page.split('<section id="contamination">')[1]


# ---------------------------------------------------------------- headless Chromium over DevTools


class DevTools:
    """A minimal DevTools-protocol client over a websocket (RFC 6455, text frames), stdlib only."""

    def __init__(self, ws_url: str) -> None:
        host_port, path = ws_url.removeprefix("ws://").split("/", 1)
        host, port = host_port.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.next_id, self.events = 0, []

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            buf += chunk
        return buf

    def _recv(self) -> dict:
        data = b""
        while True:
            b0, b1 = self._recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._recv_exact(8))[0]
            data += self._recv_exact(n)
            if b0 & 0x80:
                return json.loads(data)

    def call(self, method: str, session: str | None = None, **params: object) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        payload = json.dumps(msg).encode()
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x81]) + (
            bytes([0x80 | n])
            if n < 126
            else bytes([0x80 | 126]) + struct.pack(">H", n)
            if n < 65536
            else bytes([0x80 | 127]) + struct.pack(">Q", n)
        )
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            reply = self._recv()
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events:
                if e.get("method") == method:
                    return e
            self.events.append(self._recv())
        raise TimeoutError(method)


def open_in_chromium(page: Path, screenshot: Path) -> dict:
    """Load `page` in headless Chromium; return console errors, exceptions, failed loads, image sizes."""
    profile = Path(tempfile.mkdtemp(prefix="sift-chromium-"))
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            assert time.monotonic() < end and proc.poll() is None, "chromium did not start"
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        dt = DevTools(f"ws://127.0.0.1:{port}{path}")
        target = dt.call("Target.createTarget", url="about:blank")["targetId"]
        s = dt.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            dt.call(f"{domain}.enable", s)
        dt.call(
            "Emulation.setDeviceMetricsOverride", s, width=1200, height=900, deviceScaleFactor=1, mobile=False
        )
        dt.call("Page.navigate", s, url=page.resolve().as_uri())
        dt.wait_for("Page.loadEventFired")
        images = dt.call(
            "Runtime.evaluate",
            s,
            returnByValue=True,
            expression=(
                "Array.from(document.images)"
                ".map(i => ({complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))"
            ),
        )["result"]["value"]
        sections = dt.call(
            "Runtime.evaluate",
            s,
            returnByValue=True,
            expression="document.querySelectorAll('section').length",
        )["result"]["value"]
        height = dt.call(
            "Runtime.evaluate", s, returnByValue=True, expression="document.documentElement.scrollHeight"
        )["result"]["value"]
        shot = dt.call(
            "Page.captureScreenshot",
            s,
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": 1200, "height": min(height, 16000), "scale": 1},
        )
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        errors = [
            e
            for e in dt.events
            if e.get("method") == "Runtime.exceptionThrown"
            or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
            or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
            or e.get("method") == "Network.loadingFailed"
        ]
        requests = [
            e["params"]["request"]["url"] for e in dt.events if e.get("method") == "Network.requestWillBeSent"
        ]
        return {
            "images": images,
            "sections": sections,
            "errors": errors,
            "requests": requests,
            "height": height,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _check_in_browser(html_path: Path, screenshot: Path) -> dict:
    result = open_in_chromium(html_path, screenshot)
    # every section the page holds is one the browser parsed: funnel to manifest, one per view (13 with refine)
    written = html_path.read_text().count('<section id="')
    assert written == 13 and result["sections"] == written, (written, result["sections"])
    assert result["errors"] == []
    assert result["images"] and all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in result["images"])
    assert all(u.startswith(("file:", "data:")) for u in result["requests"])  # nothing fetched from a network
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    return result


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run: Path, tmp_path: Path) -> None:
    report(run="r")
    result = _check_in_browser(run / "report.html", tmp_path / "report.png")
    # the browser loaded every plot the page embeds (7 for this run, as the page test above counts)
    assert len(result["images"]) == (run / "report.html").read_text().count('<img src="data:image/png;base64,') == 7


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_real_run_report_renders(tmp_path: Path) -> None:
    """After `make all`: the report of runs/demo, with a screenshot kept beside it."""
    demo = REPO / "runs" / "demo"
    if not (demo / "filtered.jsonl").is_file():
        pytest.skip("no full run in runs/demo (make all)")
    out = tmp_path / "report.html"
    from pipeline.views.report import build_page as build

    out.write_text(build("demo", demo))
    _check_in_browser(out, tmp_path / "report.png")
    shutil.copy(tmp_path / "report.png", demo / "report.png")
