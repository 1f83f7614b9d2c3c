"""sift view in a real headless Chromium (Debian's `chromium`, over the DevTools protocol as in
test_report.py): a run made by the real commands (seeds, filter, export) on synthetic instances
with planted near-duplicates; the test searches, filters the rejections by reason, opens a
duplicate beside its kept record, rejects one record with a note and edits another in the page,
stops the server with Ctrl-C, runs `sift export` and finds both decisions applied."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.synthetic import make_synthetic_instructions
from pipeline.cli import main
from tests.conftest import REPO
from tests.pipeline.test_report import CHROMIUM, DevTools

EDITED = "An answer a person rewrote in the viewer."
NOTE = "made-up facts <b>here</b>"


def build_run(runs: Path, run: str = "v") -> Path:
    """seeds -> (synthetic instances, ~15% near-duplicates) -> filter -> export, through the CLI."""
    d = runs / run
    assert main(["seeds", str(REPO / "seeds" / "default.jsonl"), "--run", run]) == 0
    tasks = []
    for k, text in enumerate(make_synthetic_instructions(60, seed=7)):
        tasks.append({"id": f"ins_{k:03d}", "instruction": text, "is_classification": False,
                      "instances": [{"input": "", "output": f"A careful answer number {k}, written for this task."}],
                      "provenance": {"recipe": "self-instruct", "stage": "generate",
                                     "teacher": {"name": "synthetic"}, "raw_response": f"9. {text}"}})
    (d / "instances.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    assert main(["filter", "--run", run]) == 0
    assert main(["export", "--run", run]) == 0
    return d


class Browser:
    """One headless Chromium tab driven over DevTools."""

    def __init__(self) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="sift-view-chromium-"))
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            assert self.proc.poll() is None, "chromium did not start"
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        self.dt = DevTools(f"ws://127.0.0.1:{port}{path}")
        target = self.dt.call("Target.createTarget", url="about:blank")["targetId"]
        self.s = self.dt.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.dt.call(f"{domain}.enable", self.s)
        self.dt.call("Emulation.setDeviceMetricsOverride", self.s, width=1280, height=900, deviceScaleFactor=1,
                     mobile=False)

    def js(self, expression: str) -> object:
        reply = self.dt.call("Runtime.evaluate", self.s, expression=expression, returnByValue=True,
                             awaitPromise=True)
        assert "exceptionDetails" not in reply, reply
        return reply["result"].get("value")

    def loads(self, action: str) -> None:
        """Run `action` (JavaScript that navigates) and wait for the next page to finish loading."""
        self.dt.events.clear()
        self.js(action)
        self.dt.wait_for("Page.loadEventFired")

    def go(self, url: str) -> None:
        self.dt.events.clear()
        self.dt.call("Page.navigate", self.s, url=url)
        self.dt.wait_for("Page.loadEventFired")

    def errors(self) -> list[dict]:
        return [e for e in self.dt.events if e.get("method") == "Runtime.exceptionThrown"]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def start_view(runs: Path, run: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "SIFT_RUNS_DIR": str(runs), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "view", "--run", run], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
    assert match, line + proc.stderr.read()
    return proc, match.group(1)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_view_search_filter_duplicate_review_then_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    monkeypatch.setenv("SIFT_RUNS_DIR", str(runs))
    d = build_run(runs)
    rejected = [json.loads(x) for x in (d / "filtered.rejected.jsonl").read_text().splitlines()]
    assert any(r["reason"] == "rouge_duplicate" for r in rejected), "the planted near-duplicates were kept"
    proc, base = start_view(runs, "v")
    browser = Browser()
    try:
        browser.go(base + "/")
        assert "Stage by stage" in browser.js("document.body.innerText")
        # search for a word: every row shown holds it
        browser.go(base + "/t?a=filtered.jsonl")
        word = "Lagos"
        browser.loads(f"document.querySelector('input[name=q]').value = '{word}';"
                      "document.querySelector('form.filters').submit()")
        shown = browser.js("Array.from(document.querySelectorAll('table.records td.t:nth-child(3)'))"
                           ".map(td => td.innerText)")
        assert shown and all(word.lower() in s.lower() for s in shown), shown
        # filter the rejections by reason: rouge_duplicate only
        browser.go(base + "/t?a=filtered.rejected.jsonl")
        browser.loads("document.querySelector('select[name=\"w.reason\"]').value = 'rouge_duplicate';"
                      "document.querySelector('form.filters').submit()")
        reasons = browser.js("Array.from(document.querySelectorAll('table.records tr'))"
                             ".slice(1).map(tr => tr.children[4].innerText)")
        assert reasons and set(reasons) == {"rouge_duplicate"}, reasons
        # a duplicate's page: the kept record beside it, with the ROUGE-L
        browser.loads("document.querySelector('table.records td.id a').click()")
        dup = browser.js("(() => { const s = document.getElementById('duplicate');"
                         " return s && {head: s.querySelector('h2').innerText,"
                         " kept: s.querySelector('.kept [data-field=instruction]').innerText,"
                         " mine: s.querySelector('.side > div [data-field=instruction]').innerText}; })()")
        assert dup and "ROUGE-L" in dup["head"] and dup["kept"].strip() and dup["kept"] != dup["mine"], dup
        kept_id = dup["head"].split("Duplicate of ", 1)[1].split()[0]
        assert kept_id in (d / "filtered.jsonl").read_text() or kept_id in (d / "seeds.jsonl").read_text()
        # reject one kept record with a note
        browser.go(base + "/r?a=filtered.jsonl&n=1")
        first = browser.js("document.getElementById('record-id').innerText")
        browser.loads(f"document.querySelector('form.review input[name=note]').value = {json.dumps(NOTE)};"
                      "document.querySelector('button[data-review=reject]').click()")
        assert browser.js("document.getElementById('decision').innerText") == "reject"
        # edit another's output
        browser.go(base + "/r?a=filtered.jsonl&n=2")
        second = browser.js("document.getElementById('record-id').innerText")
        browser.loads("document.querySelector('form.review details').open = true;"
                      f"document.querySelector('textarea[name=output]').value = {json.dumps(EDITED)};"
                      "document.querySelector('button[data-review=edit]').click()")
        assert browser.js("document.getElementById('decision').innerText") == "edit"
        assert browser.errors() == []
        shot = browser.dt.call("Page.captureScreenshot", browser.s, format="png")
        assert len(shot["data"]) > 1000
    finally:
        browser.close()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped" in out, err
    assert main(["export", "--run", "v"]) == 0
    ledger = [json.loads(x) for x in (d / "export.rejected.jsonl").read_text().splitlines()]
    assert [(x["id"], x["reason"], x["note"]) for x in ledger if x["reason"] == "human_review"] == [
        (first, "human_review", NOTE)]
    exported = {r["id"]: r for name in ("train.jsonl", "valid.jsonl")
                for r in map(json.loads, (d / name).read_text().splitlines())}
    assert first not in exported
    assert exported[second]["messages"][-1]["content"] == EDITED
