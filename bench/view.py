"""How `sift view` scales: index build time, first-page time and memory at 10K, 100K and 1M records.

    .venv/bin/python bench/view.py                 # 10000 100000 1000000
    .venv/bin/python bench/view.py 10000 100000    # a subset

For each size it writes a synthetic scored artifact (bench/synthetic.py's instructions, with an
answer, an IFD score, a teacher and a provenance of the size the real stages write), then, in a
fresh process, serves it with the viewer's app on a real loopback server and times over HTTP:
- first page: the table page of an artifact never opened before (an artifact above 4 MiB shows
  its first records straight from the file while the index builds in the background);
- index: until the background build is done;
- search, filter + sort: a word search; a teacher filter sorted by IFD, descending;
- deep page: page 1000 of the file order (or the last page when there are fewer);
- peak RSS of the serving process, and the index's size beside the artifact's.
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.synthetic import make_synthetic_instructions  # noqa: E402

SIZES = (10_000, 100_000, 1_000_000)
CHUNK = 50_000


def write_artifact(path: Path, n: int) -> None:
    """n scored records, written chunk by chunk so the writer's memory stays flat."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for lo in range(0, n, CHUNK):
            for k, text in enumerate(make_synthetic_instructions(min(CHUNK, n - lo), seed=lo), start=lo):
                teacher = f"teacher-{k % 3}"
                rec = {"id": f"ex_{k:08d}", "task_id": f"ins_{k:08d}", "instruction": text,
                       "input": "" if rng.random() < 0.6 else f"Example input number {k}.",
                       "output": f"A worked answer to task {k}: " + " ".join(text.split()[::-1]),
                       "is_classification": k % 7 == 0,
                       "scores": {"ifd": round(rng.random() * 1.2, 4), "length": rng.randint(3, 300)},
                       "provenance": {"recipe": "self-instruct", "stage": "generate",
                                      "teacher": {"name": teacher, "backend": "transformers"},
                                      "seed_ids": [f"seed_task_{rng.randrange(175)}" for _ in range(6)],
                                      "raw_response": text + "\n10. " + text[::-1]}}
                f.write(json.dumps(rec) + "\n")


def _get(url: str) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=3600) as r:
        body = r.read()
    assert r.status == 200 and b"<table" in body, url
    return time.perf_counter() - t0


def serve_and_time(artifact: Path) -> dict:
    """In this (fresh) process: the viewer on loopback, timed over HTTP."""
    import uvicorn

    from pipeline.views.viewer.app import create_app
    from pipeline.views.viewer.catalog import Catalog
    from pipeline.views.viewer.command import bind

    catalog = Catalog.for_file(artifact)
    app = create_app(catalog)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}/t?a={artifact.name}"
    out: dict = {}
    t0 = time.perf_counter()
    out["first_page_s"] = _get(base)
    indexes = app.state.viewer.indexes
    indexes.wait(artifact.name)
    while indexes.status(artifact.name).state == "building":
        time.sleep(0.05)
    out["index_s"] = time.perf_counter() - t0
    out["indexed_first_page_s"] = _get(base)
    out["search_s"] = _get(base + "&q=castles")
    out["filter_sort_s"] = _get(base + "&w.teacher=teacher-1&sort=scores.ifd&desc=1")
    with indexes.open(artifact.name) as idx:
        pages = -(-idx.count // 50)
    out["deep_page_s"] = _get(base + f"&page={min(1000, pages)}")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["index_mb"] = catalog.index_file(artifact.name).stat().st_size / 2**20
    server.should_exit = True
    thread.join()
    return out


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        print(json.dumps(serve_and_time(Path(argv[1]))))
        return
    sizes = [int(a) for a in argv] or list(SIZES)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sift-bench-view-") as tmp:
        for n in sizes:
            path = Path(tmp) / f"scored-{n}.jsonl"
            write_artifact(path, n)
            child = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True,
                                   text=True, check=True)
            r = json.loads(child.stdout.strip().splitlines()[-1])
            r.update(records=n, artifact_mb=path.stat().st_size / 2**20)
            rows.append(r)
            print(json.dumps(r), flush=True)
            path.unlink()
    print("\n| records | artifact | first page | index built | first page, indexed | search | filter + sort "
          "| page 1000 | index size | peak RSS |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['records']:,} | {r['artifact_mb']:.0f} MB | {r['first_page_s']:.2f} s | {r['index_s']:.1f} s "
              f"| {r['indexed_first_page_s']:.2f} s | {r['search_s']:.2f} s | {r['filter_sort_s']:.2f} s "
              f"| {r['deep_page_s']:.2f} s | {r['index_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main(sys.argv[1:])
