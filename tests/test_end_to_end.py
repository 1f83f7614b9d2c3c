"""The whole pipeline on the embedded model, through the CLI, with small budgets (slow; CI runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.io.artifacts import read_json, read_jsonl
from tests.conftest import REPO

STAGES = ["seeds", "generate", "classify", "instances", "filter", "export", "train", "eval", "loop", "report"]


@pytest.mark.slow
def test_every_stage_on_the_embedded_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.io.models import embedded_dir

    if not embedded_dir().exists():
        pytest.fail("the embedded model is missing: run `sift model fetch` (make setup)")
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path))
    run = ["--run", "e2e"]
    d = tmp_path / "e2e"
    assert main(["seeds", str(REPO / "seeds" / "default.jsonl"), *run]) == 0
    assert main(["generate", *run, "--n", "10", "--batch-size", "8", "--max-tokens", "160",
                 "--max-requests", "64"]) == 0
    assert main(["classify", *run, "--batch-size", "16"]) == 0
    assert main(["instances", *run, "--batch-size", "16", "--max-tokens", "120"]) == 0
    assert main(["filter", *run]) == 0
    assert main(["export", *run]) == 0
    assert main(["train", *run, "--max-steps", "3", "--batch-size", "4", "--grad-accum", "1",
                 "--eval-steps", "100", "--save-steps", "2", "--resume"]) == 0
    assert main(["eval", *run, "--limit", "3", "--max-new-tokens", "24"]) == 0
    assert main(["loop", *run, "--rounds", "2", "--no-train-on-seeds", "--max-steps", "1", "--batch-size", "4",
                 "--eval-limit", "4", "--max-failures", "2", "--max-new-tokens", "24",
                 "--augment-max-tokens", "200"]) == 0
    assert main(["report", *run]) == 0

    generated = read_json(d / "generate.stats.json")
    assert generated["accepted"] == 10
    assert generated["candidates"] == generated["accepted"] + sum(generated["rejected_by_reason"].values())
    instances = read_jsonl(d / "instances.jsonl", allow_empty=True)
    assert len(instances) + len(read_jsonl(d / "instances.rejected.jsonl", allow_empty=True)) == 10
    funnel = read_json(d / "funnel.json")
    kept = read_jsonl(d / "filtered.jsonl")
    rejected = read_jsonl(d / "filtered.rejected.jsonl", allow_empty=True)
    assert funnel["kept"] == len(kept) and funnel["input"] == len(kept) + len(rejected)
    assert all(r["provenance"]["teacher"]["name"] == "smollm2-135m-instruct" for r in kept)
    assert (d / "student" / "adapter_model.safetensors").stat().st_size > 10_000
    assert read_json(d / "eval.json")
    html = (d / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html
    from tests.pipeline.test_report import CHROMIUM, _check_in_browser

    if CHROMIUM:  # the page of a real run renders, every image loads, no console errors
        shot = d / "report.png"
        result = _check_in_browser(d / "report.html", shot)
        assert result["images"] and shot.stat().st_size > 10_000
    loop = read_json(d / "loop.json")
    assert [r["round"] for r in loop["rounds"]] == [1, 2]
    assert all(r["eval"]["examples"] == 4 for r in loop["rounds"])
    added = read_jsonl(d / "loop" / "data.jsonl")[len(kept):]
    assert len(added) == loop["data"]["added"]
    assert all(a["metadata"]["loop"]["round"] in (1, 2) and a["metadata"]["loop"]["parent_id"] for a in added)
    assert 'id="loop"' in html
    manifest = read_json(d / "manifest.json")
    assert set(STAGES) <= set(manifest["stages"])
    assert "filtered.jsonl" in manifest["artifacts"]
