"""Why loading a Hub model failed, in words: offline, no such model, gated, no such revision, or what
transformers said. Used by pipeline/io/models.py; tested in tests/pipeline/test_hub_errors.py:

    .venv/bin/python -m pytest -q tests/pipeline/test_hub_errors.py

transformers wraps huggingface_hub's errors in an OSError; the original is on the exception chain.
"""

from __future__ import annotations

from collections.abc import Iterator


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def explain(e: BaseException, *, offline: bool) -> str:
    """One clause saying what went wrong; `offline`: the Hub was not reachable, so only the local
    Hugging Face cache was tried."""
    names = {type(x).__name__ for x in _chain(e)}
    if offline:
        return ("the Hub is not reachable from this machine (or HF_HUB_OFFLINE is set) and the model is not "
                "in the local Hugging Face cache")
    if "GatedRepoError" in names:
        return "the model is gated: accept its terms on the Hub and log in (`hf auth login`)"
    if "RepositoryNotFoundError" in names:
        return "the Hub has no such model (or it is private and you are not logged in)"
    if "RevisionNotFoundError" in names:
        return "the Hub has this model but not the revision asked for"
    if {"EntryNotFoundError", "RemoteEntryNotFoundError"} & names:
        return "the Hub repository lacks the files this needs (is it a causal language model?)"
    if {"ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "TimeoutError"} & names:
        return "the connection to the Hub failed while downloading"
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
