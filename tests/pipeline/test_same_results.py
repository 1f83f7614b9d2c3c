"""Same data, same results: the settings tree changed how options are spelled, not what a run makes.

tests/data/filtered_before_settings_tree.json was written by the flat-argument CLI (commit 9c23f98)
running seeds, generate, classify, instances and filter against the scripted loopback teacher; the
same stages with the same settings in the new spelling must keep and reject exactly the same
records. The scripted teacher answers from the prompt alone, so nothing here depends on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.cli import main
from tests.conftest import REPO
from tests.pipeline.kill_harness import scripted_reply
from tests.pipeline.openai_server import FakeOpenAI

GOLDEN = REPO / "tests" / "data" / "filtered_before_settings_tree.json"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_filtered_records_match_the_flat_cli(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path))
    monkeypatch.chdir(REPO)
    with FakeOpenAI(reply=scripted_reply) as server:
        teacher = ["--teacher.backend", "openai", "--teacher.model", "scripted", "--teacher.base_url", server.url]
        assert main(["seeds", "seeds/default.jsonl", "--run", "g"]) == 0
        assert main(["generate", "--run", "g", "--generate.n", "40", "--generate.batch_size", "4",
                     "--generate.max_tokens", "256", *teacher]) == 0
        assert main(["classify", "--run", "g", "--classify.batch_size", "8", *teacher]) == 0
        assert main(["instances", "--run", "g", "--instances.batch_size", "8", "--instances.max_tokens", "200",
                     *teacher]) == 0
        assert main(["filter", "--run", "g"]) == 0
    golden = json.loads(GOLDEN.read_text())
    kept = [[r["id"], r["instruction"], r.get("input", ""), r.get("output", "")]
            for r in _rows(tmp_path / "g" / "filtered.jsonl")]
    rejected = sorted([r["id"], r["reason"]] for r in _rows(tmp_path / "g" / "filtered.rejected.jsonl"))
    assert kept == golden["kept"]
    assert rejected == golden["rejected"]
