"""One self-contained HTML page about a run: funnel, lengths, similarity, verbs, training, eval, manifest.

    sift report --run demo            # or: make report; writes runs/demo/report.html

Only reads the run's artifacts (each stage writes its own counts; report never recomputes them) and
embeds every figure as a PNG data URI, so the page opens offline and can be mailed as one file. A
section whose stage has not run says so.
"""

from __future__ import annotations

import html
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.io.artifacts import check_output_suffix, iter_jsonl, read_json, read_records, write_text
from pipeline.io.runs import MANIFEST, locked, record_stage, run_dir, scrub
from pipeline.views import plots
from pipeline.views.federated import federate_section
from pipeline.views.refined import refine_section
from pipeline.views.scores import scores_section
from pipeline.views.stats import (
    contamination,
    example_text,
    length_table,
    nearest_similarity,
    reasons,
    record_examples,
    words,
)
from pipeline.views.verbs import parse_verbs, top_verb_objects

STAGE_FILES = (  # funnel order: label, artifact
    ("seeds", "seeds.jsonl"),
    ("instructions", "instructions.jsonl"),
    ("classified", "classified.jsonl"),
    ("instances", "instances.jsonl"),
    ("filtered", "filtered.jsonl"),
    ("scored", "scored.jsonl"),
    ("train split", "train.jsonl"),
    ("valid split", "valid.jsonl"),
)
# what one record of each artifact is: a task holds an instruction and its instances (examples), so
# the chart never sets a count of tasks against a count of examples without saying so
UNITS = {"seeds.jsonl": "tasks", "instructions.jsonl": "instructions", "classified.jsonl": "instructions",
         "instances.jsonl": "tasks", "filtered.jsonl": "examples", "scored.jsonl": "examples",
         "train.jsonl": "examples", "valid.jsonl": "examples"}
FUNNELS = (("filter", "funnel.json"), ("score", "scored.funnel.json"))  # each written by its stage alone
SHOWN_SAMPLES = 5
HTML_SUFFIXES = {".html": "one HTML page", ".htm": "one HTML page"}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0 auto;max-width:1100px;padding:1em 2em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #3465a4}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f2f4f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.good{color:#2e7d32}.bad{color:#c62828}.missing{color:#777;font-style:italic}
img{max-width:100%;height:auto}nav a{margin-right:1em}pre{white-space:pre-wrap;font-size:.85em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _records(path: Path) -> list[dict] | None:
    """Records of an artifact, [] for an empty one, None when it does not exist."""
    if not path.is_file():
        return None
    if path.suffix == ".json":
        return [r for _, r in read_records(path)]
    return [r for _, r in iter_jsonl(path, allow_empty=True)]


def _table(header: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class=num>{_e(c)}</td>" if i in numeric else f"<td>{_e(c)}</td>" for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _missing(what: str) -> str:
    return f"<p class=missing>{_e(what)}</p>"


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


# ---------------------------------------------------------------- sections


def stage_counts(data: dict[str, list[dict] | None]) -> list[tuple[str, int]]:
    """(label with its unit, count) per artifact present, in funnel order. Where tasks turn into
    examples (instances.jsonl, one task per line with its instances) both counts are given, so the
    next stage's examples follow a count of the same unit."""
    out = []
    for label, name in STAGE_FILES:
        records = data.get(name)
        if records is None:
            continue
        out.append((f"{label} ({UNITS[name]})", len(records)))
        if name == "instances.jsonl":
            out.append((f"{label} (examples)", sum(len(record_examples(r)) for r in records)))
    return out


def funnel_section(d: Path, data: dict[str, list[dict] | None]) -> str:
    stages = stage_counts(data)
    if not stages:
        return _missing("No stage has run yet: no seeds.jsonl, instructions.jsonl or later artifacts.")
    by_reason: Counter[str] = Counter()
    for p in sorted(d.glob("*.rejected.jsonl")):
        stage = p.name.removesuffix(".rejected.jsonl")
        for reason, n in reasons(_records(p) or []).items():
            by_reason[f"{stage}: {reason}"] += n
    out = [
        _img(plots.funnel_chart(stages, by_reason.most_common()), "records per stage and rejection reason")
    ]
    out.append(_table(["stage", "records"], [[s, n] for s, n in stages], {1}))
    if by_reason:
        out.append(_table(["stage: reason", "rejected"], [[r, n] for r, n in by_reason.most_common()], {1}))
    else:
        out.append(_missing("No rejected ledger (*.rejected.jsonl) yet."))
    for stage, name in FUNNELS:
        funnel = d / name
        if not funnel.is_file():
            continue
        f = read_json(funnel)
        rules = f.get("rules") if isinstance(f, dict) else None
        if isinstance(rules, list) and rules and all(isinstance(r, dict) for r in rules):
            cols = list(dict.fromkeys(k for r in rules for k in r))
            out.append(f"<h3>{stage} rules, in order ({name}; examples)</h3>")
            out.append(_table(cols, [[_fmt(r.get(c, "")) for c in cols] for r in rules]))
        else:
            out.append(f"<h3>{name}</h3><pre>{_e(json.dumps(f, indent=1)[:4000])}</pre>")
    return "\n".join(out)


def _kept(data: dict[str, list[dict] | None]) -> tuple[str, list[dict]] | None:
    """The most processed records there are, and the artifact they come from."""
    for name in ("filtered.jsonl", "instances.jsonl", "classified.jsonl", "instructions.jsonl"):
        if data.get(name):
            return name, data[name]  # type: ignore[return-value]
    return None


def lengths_section(data: dict[str, list[dict] | None]) -> str:
    kept = _kept(data)
    if kept is None:
        return _missing("No generated records yet (run generate).")
    name, records = kept
    examples = [ex for r in records for ex in record_examples(r)]
    series = {
        f: [words(ex[f]) for ex in examples if ex.get(f) is not None]
        for f in ("instruction", "input", "output")
    }
    series = {k: v for k, v in series.items() if v}
    table = length_table(examples)
    cols = ["n", "empty", "p5", "p25", "p50", "p75", "p95", "max"]
    return (
        f"<p>From <code>{_e(name)}</code> ({len(examples)} examples), in words.</p>"
        + _img(plots.length_histograms(series), "length histograms")
        + _table(
            ["field", *cols],
            [[f, *(f"{row[c]:.0f}" for c in cols)] for f, row in table.items()],
            set(range(1, len(cols) + 1)),
        )
    )


def _distinct_instructions(records: list[dict]) -> list[str]:
    """Each instruction once, in first-seen order (a task's examples share one)."""
    return list(dict.fromkeys(ex["instruction"] for r in records for ex in record_examples(r)
                              if ex.get("instruction")))


def similarity_section(data: dict[str, list[dict] | None]) -> str:
    kept = _kept(data)
    if kept is None:
        return _missing("No generated instructions yet (run generate).")
    name, records = kept
    instructions = _distinct_instructions(records)
    seeds = [
        r.get("instruction", "")
        for r in data.get("seeds.jsonl") or []
        if isinstance(r.get("instruction"), str)
    ]
    series: dict[str, list[float]] = {}
    notes = []
    if seeds:
        series["to the nearest seed"] = nearest_similarity(instructions, seeds)
    else:
        notes.append("no seeds.jsonl, so no similarity to seeds")
    pool = [
        r["max_similarity"]
        for r in data.get("instructions.jsonl") or []
        if isinstance(r.get("max_similarity"), int | float) and not isinstance(r.get("max_similarity"), bool)
    ]
    if pool:
        series["to the nearest pool instruction (at generation)"] = [float(x) for x in pool]
        notes.append(
            "pool similarity is instructions.jsonl's max_similarity, recorded when each was accepted"
        )
    elif len(instructions) > 1:
        series["to the nearest other kept instruction"] = nearest_similarity(
            instructions, instructions, exclude_self=True
        )
        notes.append(
            "instructions.jsonl has no max_similarity; pool similarity computed among kept instructions"
        )
    if not series:
        return _missing("Not enough instructions to compare.")
    rows = [[k, len(v), f"{sum(v) / len(v):.3f}", f"{sum(x > 0.7 for x in v)}"] for k, v in series.items()]
    return (
        f"<p>ROUGE-L F1 of each distinct instruction in <code>{_e(name)}</code> to its closest neighbour "
        "(Self-Instruct's Figure 3). "
        + _e("; ".join(notes))
        + ".</p>"
        + _img(plots.similarity_histograms(series), "ROUGE-L to nearest histograms")
        + _table(["comparison", "instructions", "mean", "above 0.7"], rows, {1, 2, 3})
    )


def verbs_section(data: dict[str, list[dict] | None]) -> str:
    kept = _kept(data)
    if kept is None:
        return _missing("No generated instructions yet (run generate).")
    name, records = kept
    instructions = _distinct_instructions(records)
    pairs, parser = parse_verbs(instructions)
    top = top_verb_objects(pairs, verbs=20, objects=4)
    if not top:
        return _missing(f"No verb-object pair found in {len(instructions)} instructions ({parser} parser).")
    with_pair = sum(bool(v and o) for v, o in pairs)
    return (
        f"<p>Root verb and direct object of {len(instructions)} distinct instructions in "
        f"<code>{_e(name)}</code> (parser: {_e(parser)}); {with_pair} have both. The 20 most common verbs "
        "and their 4 most common objects (Self-Instruct's Figure 2).</p>"
        + _img(plots.verb_object_chart(top), "root verb and direct object chart")
        + _table(
            ["verb", "pairs", "most common objects"],
            [[v, n, ", ".join(f"{o} ({c})" for o, c in objs)] for v, n, objs in top],
            {1},
        )
    )


def training_section(d: Path) -> str:
    metrics = _records(d / "student" / "metrics.jsonl")
    if not metrics:
        return _missing("No student/metrics.jsonl yet (run train).")
    train = [
        (m["step"], m["loss"])
        for m in metrics
        if m.get("kind", "train") == "train" and isinstance(m.get("loss"), int | float) and "step" in m
    ]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if isinstance(m.get("eval_loss"), int | float)]
    acc = [
        (m["step"], m["eval_mean_token_accuracy"])
        for m in metrics
        if isinstance(m.get("eval_mean_token_accuracy"), int | float)
    ]
    out = []
    if train or evals:
        out.append(_img(plots.training_curves(train, evals, acc), "training curves"))
    summary = next((m for m in reversed(metrics) if m.get("kind") == "summary"), None)
    if summary:
        out.append(
            _table(["summary", "value"], [[k, _fmt(v)] for k, v in summary.items() if k != "kind"], {1})
        )
    config = d / "student" / "train_config.json"
    if config.is_file():
        out.append(
            f"<details><summary>train_config.json</summary><pre>{_e(json.dumps(read_json(config), indent=1))}"
            "</pre></details>"
        )
    return "\n".join(out) or _missing("metrics.jsonl has no loss entries.")


def _eval_cell(e: dict, key: str, higher: bool | None) -> str:
    """'base -> student' and the delta with its 95% interval, coloured when the interval excludes zero."""
    from train.eval_stats import significant

    b, s = e.get("base", {}).get(key), e.get("student", {}).get(key)
    if not isinstance(b, int | float) or not isinstance(s, int | float):
        return "<td></td>"
    ci = (e.get("ci95") or {}).get(key)
    sig = significant(ci)
    cls = "" if higher is None or not sig else ("good" if (sig > 0) == higher else "bad")
    band = f" [{ci[0]:+.2g}, {ci[1]:+.2g}]" if ci else ""
    return f"<td class=num>{b:.4g} &rarr; {s:.4g}<br><span class='{cls}'>{s - b:+.3g}{band}</span></td>"


def eval_section(d: Path) -> str:
    path = d / "eval.json"
    if not path.is_file():
        return _missing("No eval.json yet (run eval).")
    from train.eval_sets import read_sets
    from train.eval_stats import METRICS, findings

    sets = read_sets(path)
    if not sets:
        return _missing("eval.json holds no eval set (run eval).")
    head = "".join(f"<th>{_e(n)} ({_e(e.get('examples', '?'))})</th>" for n, e in sets.items())
    rows = [f"<tr><td>{_e(label)}</td>{''.join(_eval_cell(e, key, higher) for e in sets.values())}</tr>"
            for key, label, higher in METRICS]
    if any((e.get("judge") or {}).get("win_rate") is not None for e in sets.values()):
        cells = []
        for e in sets.values():
            j = e.get("judge") or {}
            ci = j.get("ci95") or [float("nan")] * 2
            cells.append(f"<td class=num>{j['win_rate']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]<br>LC "
                         f"{_fmt(j.get('length_controlled_win_rate'))}</td>" if j.get("win_rate") is not None
                         else "<td></td>")
        rows.append(f"<tr><td>judge win rate (both orders; LC: length-controlled)</td>{''.join(cells)}</tr>")
    first = next(iter(sets.values()))
    out = [
        "<p>Base &rarr; student per eval set, then the delta and its 95% paired bootstrap interval "
        "(coloured when the interval excludes zero). Base <code>"
        f"{_e(first.get('base', {}).get('model', '?'))}</code>, student "
        f"<code>{_e(first.get('student', {}).get('model', '?'))}</code>; files: "
        + ", ".join(f"{_e(n)} <code>{_e(e.get('eval_file', '?'))}</code>" for n, e in sets.items()) + ".</p>",
        f"<table><tr><th>metric</th>{head}</tr>" + "".join(rows) + "</table>",
    ]
    said = [line for n, e in sets.items() for line in findings(n, e)]
    if said:
        out.append("<ul>" + "".join(f"<li class='{'bad' if 'forgot' in s else ''}'>{_e(s)}</li>" for s in said)
                   + "</ul>")
    for name, e in sets.items():
        j = e.get("judge")
        if j and j.get("win_rate") is not None:
            out.append(
                _table(
                    [f"judge on {name} (" + str(j.get("teacher", "?")) + ")", "value"],
                    [
                        ["student win rate (ties half)", _fmt(j["win_rate"])],
                        ["length-controlled win rate", _fmt(j.get("length_controlled_win_rate"))],
                        ["wins / ties / losses", f"{j.get('student_wins')} / {j.get('ties')} / {j.get('base_wins')}"],
                        ["the two orders agree", _fmt(j.get("orders_agree"))],
                        ["unreadable verdicts", j.get("unreadable")],
                        ["answer A chosen", _fmt(j.get("position_a_rate"))],
                    ],
                )
            )
        samples = e.get("samples") or []
        if samples:
            out.append(
                f"<details><summary>sample answers: {_e(name)}</summary>"
                + _table(
                    ["instruction", "reference", "base", "student"],
                    [
                        [s.get(k, "")[:400] for k in ("instruction", "reference", "base", "student")]
                        for s in samples[:SHOWN_SAMPLES]
                    ],
                )
                + "</details>"
            )
    return "\n".join(out)


def loop_section(d: Path) -> str:
    """Per-round figures of `sift loop` and a few added records with the failure each came from."""
    path = d / "loop.json"
    if not path.is_file():
        return _missing("No loop.json (run `sift loop` / `make loop` for student-in-the-loop rounds).")
    rounds = read_json(path).get("rounds") or []
    rows = [[r["round"], r["data"]["train"], _fmt(r["train"].get("eval_loss_after")),
             _fmt(r["eval"].get("mean_score")), _fmt(r["eval"].get("pass_rate")), r["eval"]["failures"],
             r["augment"]["failures_used"], r["augment"]["candidates"], r["augment"]["new_records"],
             ", ".join(f"{k} {v}" for k, v in r["augment"].get("rejected_by_reason", {}).items()) or "none"]
            for r in rounds]
    out = [_table(["round", "train records", "eval loss", "score", "pass rate", "failures", "augmented",
                   "candidates", "new", "rejected"], rows, {0, 1, 2, 3, 4, 5, 6, 7, 8})]
    examples = []
    for r in rounds:
        added = _records(d / "loop" / f"round-{r['round']}" / "added.jsonl") or []
        examples += [[r["round"], a["loop"]["parent_instruction"], _fmt(a["loop"]["parent_score"]), a["instruction"]]
                     for a in added[:3]]
    if examples:
        out.append("<h3>Added records and the failure each came from</h3>")
        out.append(_table(["round", "failed example", "its score", "new instruction"], examples, {0, 2}))
    return "\n".join(out)


def contamination_section(d: Path, data: dict[str, list[dict] | None], against: str | None) -> str:
    kept = _kept(data)
    if against is None and (d / "eval.json").is_file():
        from train.eval_sets import read_sets

        files = [e.get("eval_file") for n, e in read_sets(d / "eval.json").items() if n not in ("valid", "general")]
        against = next((f for f in files if f and Path(f).name != "valid.jsonl"), None)
    if against is None:
        return _missing("No evaluation file to check against (pass --against FILE, or run eval --eval-file).")
    if kept is None:
        return _missing("No generated records to check.")
    if not Path(against).is_file():
        return _missing(f"Evaluation file {against} not found.")
    texts = [example_text(ex) for _, r in read_records(against) for ex in record_examples(r)]
    c = contamination(kept[1], texts)
    out = [
        f"<p>{c['contaminated']} of {c['records']} records in <code>{_e(kept[0])}</code> "
        f"({c['rate']:.1%}) share a {c['n']}-gram of words with <code>{_e(against)}</code>.</p>"
    ]
    if c["hits"]:
        out.append(
            _table(
                ["id", "shared n-grams", "example n-gram", "instruction"],
                [[h["id"], h["shared"], h["ngram"], h["instruction"]] for h in c["hits"][:20]],
                {1},
            )
        )
    return "\n".join(out)


def manifest_section(d: Path) -> str:
    path = d / MANIFEST
    if not path.is_file():
        return _missing("No manifest.json yet.")
    m = scrub(read_json(path))  # a manifest written before URLs were scrubbed shows none either
    out = []
    stages = m.get("stages") or {}
    if stages:
        out.append(
            _table(
                ["stage", "finished", "models", "stats"],
                [
                    [
                        name,
                        s.get("finished_at", ""),
                        ", ".join(f"{k}: {v}" for k, v in (s.get("models") or {}).items()),
                        ", ".join(
                            f"{k} {_fmt(v)}"
                            for k, v in (s.get("stats") or {}).items()
                            if not isinstance(v, dict | list)
                        ),
                    ]
                    for name, s in stages.items()
                ],
            )
        )
    if m.get("versions"):
        out.append(_table(["library", "version"], [[k, v] for k, v in m["versions"].items()]))
    if m.get("command"):
        out.append(f"<p>last command: <code>{_e(m['command'])}</code></p>")
    settings = {name: s.get("settings", {}) for name, s in stages.items()}
    out.append(
        f"<details><summary>settings of every stage</summary><pre>{_e(json.dumps(settings, indent=1))}</pre>"
        "</details>"
    )
    arts = m.get("artifacts") or {}
    if arts:
        out.append(
            "<details><summary>artifacts (sha256)</summary>"
            + _table(
                ["artifact", "bytes", "sha256"],
                [[k, f"{v.get('bytes', 0):,}", v.get("sha256", "")[:16]] for k, v in arts.items()],
                {1},
            )
            + "</details>"
        )
    return "\n".join(out)


def teachers_section(d: Path) -> str:
    """Per-teacher figures of a run with several teachers (teacher.pool): what each wrote, what was
    kept or rejected and why, its tokens and time; and in `sift loop`, each round's shares and evidence."""
    out = []
    for stage, file in (("generate", "generate.stats.json"), ("classify", "classify.stats.json"),
                        ("instances", "instances.stats.json"), ("filter", "funnel.json")):
        path = d / file
        doc = read_json(path) if path.is_file() else None
        table = doc.get("by_teacher") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or not isinstance(table, dict) or not table:
            continue
        rows = [[name, r.get("requests", "-"), r.get("kept", "-"), r.get("rejected", 0),
                 ", ".join(f"{k} {v}" for k, v in r.get("rejected_by_reason", {}).items()) or "none",
                 r.get("tokens_in", "-"), r.get("tokens_out", "-"), _fmt(r.get("teacher_seconds", "-")),
                 r.get("errors", "-")] for name, r in table.items()]
        kept = "kept" if stage == "filter" else "accepted"
        out.append(f"<h3>{_e(stage)} ({_e(file)})</h3>")
        out.append(_table(["teacher", "requests", kept, "rejected", "rejected by reason", "tokens in", "tokens out",
                           "seconds", "errors"], rows, {1, 2, 3, 5, 6, 7, 8}))
        down = doc.get("teachers_down") or {}
        out += [f"<p>teacher <code>{_e(n)}</code> failed every request it was sent; its share went to the "
                f"others: {_e(scrub(why))}</p>" for n, why in down.items()]
    loop = d / "loop.json"
    loop_doc = read_json(loop) if loop.is_file() else None
    rounds = [r for r in (loop_doc.get("rounds") or []) if isinstance(r, dict) and r.get("teachers")] \
        if isinstance(loop_doc, dict) else []
    if rounds:
        names = list(rounds[0]["teachers"]["shares"])
        rows = []
        for r in rounds:
            t = r["teachers"]
            for n in names:
                ev = t["evidence"].get(n) or {}
                rows.append([r["round"], t["policy"], n, _fmt(t["shares"].get(n)), t["sent"].get(n, 0),
                             t["new_records"].get(n, 0), ev.get("sent", "-"), ev.get("improved", "-"),
                             _fmt(ev.get("mean_delta", "-")), _fmt(ev.get("valid_loss_delta", "-")),
                             " / ".join(_fmt(x) for x in t["posterior"].get(n, []))])
        out.append("<h3>sift loop: each round's shares and the evidence behind them</h3>")
        out.append("<p>Evidence in round r: the failures each teacher was sent in round r-1, how many it added "
                   "records for and whose score rose, the mean change, and the change in eval loss; the "
                   "posterior is Beta(successes + 1, failures + 1) (docs/teachers.md).</p>")
        out.append(_table(["round", "policy", "teacher", "share", "failures sent", "new records",
                           "evidence: sent before", "improved", "mean score change", "eval loss change",
                           "posterior a / b"], rows, {0, 3, 4, 5, 6, 7, 8, 9}))
    if not out:  # not missing data: a run with one teacher has no per-teacher split
        return "<p>One teacher in this run (several with --teacher.pool; docs/teachers.md).</p>"
    return "\n".join(out)


# ---------------------------------------------------------------- page


def build_page(run: str, d: Path, *, against: str | None = None) -> str:
    """The whole HTML page for run directory `d`."""
    data = {name: _records(d / name) for _, name in STAGE_FILES}
    sections = [
        ("funnel", "Funnel: records per stage and rejection reason", funnel_section(d, data)),
        ("lengths", "Lengths of instructions, inputs and outputs", lengths_section(data)),
        ("similarity", "ROUGE-L to the nearest seed and pool instruction", similarity_section(data)),
        ("verbs", "Root verbs and direct objects", verbs_section(data)),
        ("training", "Training curves", training_section(d)),
        ("scores", "Scores: IFD, judge, length, reward; highest and lowest examples", scores_section(d)),
        ("refine", "Refinement: the teacher's rewrites and the student's choice", refine_section(d)),
        ("eval", "Evaluation: base and student", eval_section(d)),
        ("loop", "Student-in-the-loop rounds (LLM2LLM)", loop_section(d)),
        ("federate", "Federated LoRA: NLL per round", federate_section(d)),
        ("teachers", "Teachers: per-teacher funnel, tokens, time and loop shares", teachers_section(d)),
        (
            "contamination",
            "Contamination: n-gram overlap with the evaluation file",
            contamination_section(d, data, against),
        ),
        ("manifest", "Manifest: models, versions, settings", manifest_section(d)),
    ]
    nav = "".join(f'<a href="#{sid}">{_e(sid)}</a>' for sid, _, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>' for sid, title, content in sections
    )
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>sift report: {_e(run)}</title>"
        f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{CSS}</style></head>"
        f"<body><h1>sift report: run <code>{_e(run)}</code></h1><p>{_e(d)} &middot; written {stamp}</p>"
        f"<nav>{nav}</nav>{body}</body></html>\n"
    )


def report(*, run: str = "demo", output: str | None = None, against: str | None = None) -> None:
    """Write one self-contained HTML page (figures embedded) summarising a run; opens offline.

    Args:
        run: Run name; reads runs/<run>/ and writes runs/<run>/report.html.
        output: Write the page here instead (a .html or .htm file).
        against: Evaluation file for the contamination check (default: eval.json's --eval-file, if any).
    """
    d = run_dir(run)
    target = check_output_suffix(output, HTML_SUFFIXES) if output else d / "report.html"
    if not d.is_dir():
        raise SiftError("no such run directory; run `sift seeds` first", path=d)
    with locked(d):
        page = build_page(run, d, against=against)
        write_text(target, page)
        record_stage(
            d,
            "report",
            {"run": run, "output": str(target), "against": against},
            stats={"bytes": len(page.encode())},
        )
    print(f"wrote {target} ({len(page.encode()) / 1024:.0f} KiB); open it in a browser")
