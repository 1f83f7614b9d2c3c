"""Word n-gram contamination against an evaluation set."""

from __future__ import annotations

from filters.contamination import build_ngram_index, contaminated, ngram_overlap

LONG_EVAL = (
    "The sentence you are given might be too wordy, complicated, or unclear. Rewrite the sentence and make "
    "your writing clearer by keeping it concise."
)


def test_a_shared_13_gram_is_contamination() -> None:
    index = build_ngram_index([LONG_EVAL])
    copied = "Please do this: the sentence you are given might be too wordy complicated or unclear rewrite it"
    assert ngram_overlap(copied, index) >= 1
    assert contaminated(copied, index) == "contaminated"
    assert contaminated("Rewrite the sentence to be clearer and shorter.", index) is None


def test_case_and_punctuation_do_not_hide_an_overlap() -> None:
    index = build_ngram_index([LONG_EVAL])
    shouted = LONG_EVAL.upper().replace(",", " ;; ")
    assert ngram_overlap(shouted, index) == ngram_overlap(LONG_EVAL, index) > 0


def test_short_evaluation_texts_count_whole() -> None:
    index = build_ngram_index(["Give me three tips for staying healthy today", "Say hi"])
    assert contaminated("Task: give me three tips for staying healthy today, please.", index) == "contaminated"
    assert contaminated("Say hi to your mother", index) is None  # under min_len words: not indexed
    assert contaminated("Give me three tips for staying", index) is None


def test_thresholds() -> None:
    index = build_ngram_index([LONG_EVAL], n=5, min_len=3)
    text = "the sentence you are given"
    assert ngram_overlap(text, index) == 1
    assert contaminated(text, index, min_overlap=2) is None
