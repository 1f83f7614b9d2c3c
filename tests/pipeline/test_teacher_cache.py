"""The teacher cache keys on each backend's describe(): two servers with one model name do not share entries.

    .venv/bin/python -m pytest -q tests/pipeline/test_teacher_cache.py
"""

from __future__ import annotations

from pathlib import Path

from pipeline.teachers.base import Request, Sampling
from pipeline.teachers.cache import CachedTeacher, cache_identity
from pipeline.teachers.openai_compat import OpenAITeacher
from pipeline.teachers.vllm_engine import VLLMTeacher
from tests.pipeline.openai_server import FakeOpenAI

REQUESTS = [Request(prompt=f"p{i}", sampling=Sampling(max_tokens=8, seed=i)) for i in range(3)]


def _teacher(server: FakeOpenAI, **options: object) -> OpenAITeacher:
    return OpenAITeacher("same-model", base_url=server.url, timeout=5, **options)


def test_two_servers_with_the_same_model_name_do_not_share_cache_entries(tmp_path: Path) -> None:
    journal = tmp_path / "cache" / "teacher.jsonl"
    with FakeOpenAI(reply=lambda body: ("from server one", "stop")) as one, \
            FakeOpenAI(reply=lambda body: ("from server two", "stop")) as two:
        first = CachedTeacher(_teacher(one), journal).generate(REQUESTS)
        second = CachedTeacher(_teacher(two), journal)  # the same journal, as a rerun would open it
        got = second.generate(REQUESTS)
        assert [c.text for c in first] == ["from server one"] * 3
        assert [c.text for c in got] == ["from server two"] * 3 and second.misses == 3
        assert sum(two.successes.values()) == 3
        again = CachedTeacher(_teacher(one, api_key_env="OTHER_KEY"), journal)  # the key's name changes nothing
        assert [c.text for c in again.generate(REQUESTS)] == ["from server one"] * 3 and again.hits == 3
        assert sum(one.successes.values()) == 3


def test_vllm_settings_that_change_outputs_change_the_key(monkeypatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm"
                        else real_find_spec(name, *a))  # vLLM needs a GPU; its engine is never started here
    base = VLLMTeacher("org/model")
    assert cache_identity(base) == cache_identity(VLLMTeacher("org/model"))
    for changed in (VLLMTeacher("org/model", dtype="float16"), VLLMTeacher("org/model", max_model_len=2048)):
        assert cache_identity(changed) != cache_identity(base)
