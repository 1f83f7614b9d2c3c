"""The `--keep` rules of `sift score`: parsing, reasons and the funnel, table-driven.

    .venv/bin/python -m pytest tests/filters/test_selection.py -q
"""

from __future__ import annotations

import pytest

from filters.selection import KeepRule, parse_keep, select


def recs(*rows: dict) -> list[dict]:
    return [{"id": str(i), "scores": row} for i, row in enumerate(rows)]


DATA = recs({"ifd": 0.5, "judge": 4.5}, {"ifd": 1.2, "judge": 5.0}, {"ifd": 0.9, "judge": 2.0},
            {"ifd": None, "judge": 3.0}, {"ifd": 0.7, "judge": 4.0}, {"ifd": 0.2, "judge": 3.9})


@pytest.mark.parametrize(("spec", "reasons"), [
    (None, [None] * 6),
    ("ifd<1", [None, "ifd_at_least_1", None, "no_ifd", None, None]),
    ("ifd<=0.9", [None, "low_ifd", None, "no_ifd", None, None]),
    ("judge>=4", [None, None, "low_judge", "low_judge", None, "low_judge"]),
    ("judge>4", [None, None, "low_judge", "low_judge", "low_judge", "low_judge"]),
    ("judge==4", ["low_judge", "low_judge", "low_judge", "low_judge", None, "low_judge"]),
    # in order: ifd<1 first drops 1 and 3, then judge>=4 sees only what is left
    ("ifd<1,judge>=4", [None, "ifd_at_least_1", "low_judge", "no_ifd", None, "low_judge"]),
    # top half by judge (higher is better): of 6, the 3 best are 1 (5.0), 0 (4.5), 4 (4.0)
    ("top=0.5:judge", [None, None, "low_judge", "low_judge", None, "low_judge"]),
    # top third by ifd (highest first, as Cherry LLM) of the 5 records that have one: ceil(1.7) = 2, records 1, 2
    ("top=0.34:ifd", ["low_ifd", None, None, "no_ifd", "low_ifd", "low_ifd"]),
    # Superfiltering's order: drop ifd >= 1, then the highest half of the four left (0.9 and 0.7)
    ("ifd<1,top=0.5:ifd", ["low_ifd", "ifd_at_least_1", None, "no_ifd", None, "low_ifd"]),
    # combined: after ifd<1 four remain (0, 2, 4, 5); the top half by judge are 0 (4.5) and 4 (4.0)
    ("ifd<1,top=0.5:judge", [None, "ifd_at_least_1", "low_judge", "no_ifd", None, "low_judge"]),
    ("top=1:judge", [None] * 6),
])
def test_rules_in_order(spec: str | None, reasons: list[str | None]) -> None:
    got, rows = select(DATA, parse_keep(spec))
    assert got == reasons
    assert len(rows) == len(parse_keep(spec))
    if rows:
        assert rows[0]["in"] == len(DATA) and rows[-1]["out"] == reasons.count(None)
        assert all(r["in"] - r["out"] == r["dropped"] for r in rows)
        assert all(a["out"] == b["in"] for a, b in zip(rows, rows[1:], strict=False))


def test_ties_at_the_cut_keep_input_order() -> None:
    data = recs({"judge": 4}, {"judge": 4}, {"judge": 4}, {"judge": 4})
    assert select(data, parse_keep("top=0.5:judge"))[0] == [None, None, "low_judge", "low_judge"]


def test_the_funnel_names_each_rule() -> None:
    _, rows = select(DATA, parse_keep("ifd<1, judge>=4"))
    assert rows == [{"rule": "keep ifd<1", "in": 6, "out": 4, "dropped": 2},
                    {"rule": "keep judge>=4", "in": 4, "out": 2, "dropped": 2}]


@pytest.mark.parametrize(("spec", "rule"), [
    ("ifd<1", KeepRule("ifd<1", "ifd", "<", 1.0)),
    (" judge >= 4 ", KeepRule("judge >= 4", "judge", ">=", 4.0)),
    ("reward>-0.5", KeepRule("reward>-0.5", "reward", ">", -0.5)),
    ("top=0.25:judge", KeepRule("top=0.25:judge", "judge", "top", 0.25)),
    ("length>=1e1", KeepRule("length>=1e1", "length", ">=", 10.0)),
    ("length>=1E1", KeepRule("length>=1E1", "length", ">=", 10.0)),
    ("top=1e-1:judge", KeepRule("top=1e-1:judge", "judge", "top", 0.1)),
])
def test_parse(spec: str, rule: KeepRule) -> None:
    assert parse_keep(spec) == [rule]


@pytest.mark.parametrize(("spec", "message"), [
    ("ifd", "cannot read keep rule 'ifd'"),
    ("ifd=>1", "cannot read keep rule"),
    ("ifd<one", "cannot read keep rule"),
    ("top=0:judge", "fraction of top= must be in (0, 1]"),
    ("top=1.5:judge", "fraction of top= must be in (0, 1]"),
    ("top=0.25", "cannot read keep rule"),
    ("judge>=4", "no scorer computes 'judge'"),
    ("ifd<1,bogus", "cannot read keep rule 'bogus'"),
    ("ifd<1,,bogus", "keep rule 2 of 'ifd<1,,bogus' is empty"),
    ("", "keep rule 1 of '' is empty"),
    (",", "keep rule 1 of ',' is empty"),
    (" ", "keep rule 1 of ' ' is empty"),
    ("ifd<1,", "keep rule 2 of 'ifd<1,' is empty"),
    ("ifd<1e999", "1e999 is not a finite number"),
    ("ifd<-1E400", "-1E400 is not a finite number"),
    ("ifd<inf", "inf is not a finite number"),
    ("length>=-Infinity", "-Infinity is not a finite number"),
    ("ifd<nan", "nan is not a finite number"),
    ("top=NaN:length", "NaN is not a finite number"),
    ("top=inf:length", "inf is not a finite number"),
])
def test_bad_rules(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_keep(spec, known=["ifd", "length"])


def test_no_spec_keeps_everything() -> None:
    assert parse_keep(None) == []


def test_reasons() -> None:
    assert parse_keep("ifd<1")[0].reason == "ifd_at_least_1"
    assert parse_keep("ifd<0.9")[0].reason == "low_ifd"
    assert parse_keep("top=0.1:judge")[0].reason == "low_judge"
