"""A Hub model that cannot load says why: offline, no such model, gated (not one message for all).

    .venv/bin/python -m pytest -q tests/pipeline/test_hub_errors.py

A loopback server stands in for the Hub (HF_ENDPOINT), answering as huggingface.co does for a
missing or a gated repository; each case runs `sift model`-free: the real load_tokenizer in a
subprocess, since huggingface_hub reads HF_ENDPOINT when it is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CODES = {"missing": (404, "RepoNotFound"), "gated": (403, "GatedRepo"), "revision": (404, "RevisionNotFound")}


class _Hub(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        kind = self.path.strip("/").split("/")[1] if self.path.count("/") > 1 else "missing"
        status, code = CODES.get(kind, CODES["missing"])
        body = b'{"error": "no"}'
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", f"{code} (loopback hub)")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_each_failure_says_what_happened(hub: str, tmp_path: Path) -> None:
    """One subprocess (importing transformers is slow): a missing repo, a gated one, then the same
    missing repo with the Hub unreachable (HF_HUB_OFFLINE, read by sift at each load)."""
    code = ("import os\nfrom pipeline.io.models import load_tokenizer\nfrom pipeline.errors import SiftError\n"
            "for spec, offline in (('someone/missing', ''), ('someone/gated', ''), ('someone/missing', '1')):\n"
            "    os.environ['HF_HUB_OFFLINE'] = offline\n"
            "    try:\n        load_tokenizer(spec)\n    except SiftError as e:\n        print(e)\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                       env={**clean, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub})
    assert r.returncode == 0, r.stderr
    missing, gated, offline = r.stdout.strip().splitlines()
    assert "'someone/missing'" in missing and "the Hub has no such model" in missing, missing
    assert "'someone/gated'" in gated and "the model is gated" in gated and "no such model" not in gated, gated
    assert "not reachable" in offline and "not in the local Hugging Face cache" in offline, offline
    assert "no such model" not in offline and "not reachable" not in missing + gated
