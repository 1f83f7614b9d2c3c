"""The openai teacher against a real HTTP server on loopback, with injected faults.

    .venv/bin/python -m pytest tests/pipeline/test_teacher_openai.py
"""

from __future__ import annotations

import logging
import math
import random
import re
import socket
import subprocess
import sys
import time
from email.utils import formatdate
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.teachers.base import Request, Sampling
from pipeline.teachers.openai_compat import (
    BadResponse,
    OpenAITeacher,
    backoff_delay,
    logprobs_body,
    map_finish_reason,
    parse_first_token_probs,
    parse_response,
    request_body,
    retry_after_seconds,
)
from pipeline.teachers.registry import backend_options, make_teacher
from tests.pipeline.openai_server import FakeOpenAI, reply_text

FAST = {"timeout": 0.3, "backoff_base": 0.01, "backoff_max": 0.05}


def teacher(server: FakeOpenAI, **options: object) -> OpenAITeacher:
    return OpenAITeacher("fake-model", base_url=server.url, **{**FAST, **options})


def prompts(n: int) -> list[Request]:
    return [Request(prompt=f"p{i}", sampling=Sampling(max_tokens=16)) for i in range(n)]


# ---------------------------------------------------------------- against the server


def test_every_fault_is_retried_and_results_keep_input_order() -> None:
    faults = {"p1": ["429", "429"], "p2": ["500", "503"], "p3": ["drop"], "p4": ["reset"],
              "p5": ["slow"], "p6": ["truncated"], "p7": ["schema"], "p8": ["short_body"],
              "p9": ["408", "500", "500"]}
    with FakeOpenAI(faults, slow_seconds=1.0) as server:
        t = teacher(server, concurrency=4, max_retries=4)
        out = t.generate(prompts(16))
    assert [c.text for c in out] == [reply_text(f"p{i}") for i in range(16)]
    assert all(c.finish_reason == "stop" and c.error is None for c in out)
    assert all(c.prompt_tokens == 1 and c.completion_tokens == 2 for c in out)
    assert server.successes == {f"p{i}": 1 for i in range(16)}  # nothing asked twice after success
    for i in range(16):
        assert server.attempts[f"p{i}"] == len(faults.get(f"p{i}", [])) + 1
    assert t.stats["retries"] == sum(len(f) for f in faults.values())
    assert t.stats["errors"] == 0


def test_chat_messages_go_to_chat_completions_and_mix_with_prompts() -> None:
    reqs = [Request(messages=({"role": "system", "content": "be brief"}, {"role": "user", "content": "c0"})),
            Request(prompt="p1"),
            Request(messages=({"role": "user", "content": "c2"},))]
    with FakeOpenAI({"c2": ["500"]}) as server:
        out = teacher(server).generate(reqs)
    assert [c.text for c in out] == [reply_text("c0"), reply_text("p1"), reply_text("c2")]
    chat_bodies = [b for b, p in zip(server.bodies, server.paths, strict=True) if p == "/v1/chat/completions"]
    assert sorted(b["messages"][-1]["content"] for b in chat_bodies) == ["c0", "c2", "c2"]
    assert chat_bodies[0]["messages"][0] in ({"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "c2"})
    assert server.paths.count("/v1/completions") == 1


def test_chat_true_sends_prompts_as_a_user_message_and_false_refuses_messages() -> None:
    with FakeOpenAI() as server:
        out = teacher(server, chat=True).generate([Request(prompt="hello")])
        assert out[0].text == reply_text("hello")
        assert server.paths == ["/v1/chat/completions"]
        assert server.bodies[0]["messages"] == [{"role": "user", "content": "hello"}]
        with pytest.raises(SiftError, match="chat=False"):
            teacher(server, chat=False).generate([Request(messages=({"role": "user", "content": "x"},))])


def test_a_400_is_not_retried_and_the_others_succeed() -> None:
    with FakeOpenAI({"p2": ["400"]}) as server:
        out = teacher(server, max_retries=5).generate(prompts(5))
    assert server.attempts["p2"] == 1
    assert out[2].finish_reason == "error" and "HTTP 400" in out[2].error
    assert "fault 400 for p2" in out[2].error  # the server's own message is kept
    assert [c.text for i, c in enumerate(out) if i != 2] == [reply_text(f"p{i}") for i in (0, 1, 3, 4)]


def test_a_request_failing_past_max_retries_comes_back_as_error() -> None:
    with FakeOpenAI({"p1": ["500"] * 10, "p3": ["drop"] * 10}) as server:
        t = teacher(server, max_retries=3)
        out = t.generate(prompts(5))
    for i in (1, 3):
        assert out[i].finish_reason == "error" and out[i].text == ""
        assert server.attempts[f"p{i}"] == 4
        assert "4 attempt(s)" in out[i].error
    assert "HTTP 500" in out[1].error and "connection problem" in out[3].error
    assert [out[i].text for i in (0, 2, 4)] == [reply_text(f"p{i}") for i in (0, 2, 4)]
    assert t.stats["errors"] == 2


def test_api_key_is_sent_but_never_kept_or_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-" + "".join(random.choices("abcdef0123456789", k=24))
    monkeypatch.setenv("SIFT_TEST_KEY", secret)
    with FakeOpenAI({"p1": ["401"]}) as server:
        t = teacher(server, api_key_env="SIFT_TEST_KEY")
        out = t.generate(prompts(3))
    assert server.auth_headers == [f"Bearer {secret}"] * 3
    assert out[1].finish_reason == "error" and "***" in out[1].error  # the server echoed it; redacted
    visible = repr(out) + repr(t.describe()) + repr(t) + repr(vars(t)) + repr(t.stats)
    assert secret not in visible
    assert t.describe() == {"model": "fake-model", "base_url": server.url, "api_key_env": "SIFT_TEST_KEY"}


def test_key_is_read_at_call_time_and_absent_key_sends_no_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIFT_TEST_KEY", raising=False)
    with FakeOpenAI() as server:
        t = teacher(server, api_key_env="SIFT_TEST_KEY")
        t.generate(prompts(1))
        monkeypatch.setenv("SIFT_TEST_KEY", "later-key")
        t.generate(prompts(1))
    assert server.auth_headers == [None, "Bearer later-key"]


class SleepLog:
    """Stands in for the `time` module inside openai_compat: every sleep happens, and is noted."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        time.sleep(seconds)


def test_retry_after_is_honoured_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.teachers import openai_compat

    log = SleepLog()
    monkeypatch.setattr(openai_compat, "time", log)
    with FakeOpenAI({"p0": ["429"]}, retry_after="0.4") as server:
        out = teacher(server, backoff_base=0.0, backoff_max=5.0).generate(prompts(1))
    assert out[0].finish_reason == "stop" and log.waits == [0.4]  # the server's wait, not the backoff's 0
    log.waits.clear()
    with FakeOpenAI({"p0": ["429", "503"]}, retry_after="20") as server:
        out = teacher(server, backoff_max=0.1).generate(prompts(1))
    assert out[0].finish_reason == "stop" and log.waits == [0.1, 0.1]  # 20 s asked, backoff_max waited
    log.waits.clear()
    when = formatdate(time.time() + 0.6, usegmt=True)  # whole seconds: waits between 0 and 1.6 s
    with FakeOpenAI({"p0": ["429"]}, retry_after=when) as server:
        out = teacher(server, backoff_max=2.0).generate(prompts(1))
        assert out[0].finish_reason == "stop" and server.attempts["p0"] == 2
    assert len(log.waits) == 1 and 0 <= log.waits[0] <= 2.0


def test_concurrency_bound_is_respected() -> None:
    """The first 3 requests meet at a barrier in the server before any is answered, so 3 are in
    flight at once whatever the load (a client sending fewer at a time never gets past it); the
    client's bound keeps it at 3. The socket timeout is long so that a slow start is not a retry."""
    with FakeOpenAI(rendezvous=3) as server:
        out = teacher(server, concurrency=3, timeout=60.0).generate(prompts(24))
    assert len(out) == 24 and all(c.finish_reason == "stop" for c in out)
    assert server.max_in_flight == 3  # reached at the barrier, never exceeded
    assert not server.rendezvous_broken


def test_total_timeout_bounds_the_whole_call() -> None:
    """Every attempt fails; with 10,000 retries allowed, only the deadline can end the call."""
    with FakeOpenAI(lambda key, attempt: "500", retry_after=None) as server:
        t = teacher(server, max_retries=10_000, backoff_base=0.05, concurrency=2, total_timeout=0.5)
        out = t.generate(prompts(6))
    assert all(c.finish_reason == "error" and "total_timeout" in c.error for c in out)
    assert t.stats["attempts"] < 6 * 10_001


def test_slow_server_within_total_timeout_gets_cut_at_the_deadline() -> None:
    """A reply 3 s late with a 10 s socket timeout: the wait is cut to the 0.4 s left of the call."""
    with FakeOpenAI(lambda key, attempt: "slow", slow_seconds=3.0) as server:
        out = teacher(server, timeout=10.0, total_timeout=0.4).generate(prompts(2))
    assert [c.finish_reason for c in out] == ["error", "error"]
    for c in out:
        waited = re.search(r"within ([0-9.]+)s", c.error)
        assert waited and float(waited.group(1)) <= 0.4, c.error


def test_an_endless_reply_is_cut_at_max_reply_bytes_and_retried() -> None:
    """A 200 whose body never ends (it used to fill memory until MemoryError) is read up to
    max_reply_bytes, then the attempt is retried; endless at every attempt, it is an error row."""
    with FakeOpenAI({"p0": ["endless"], "p1": ["endless"] * 3}) as server:
        t = teacher(server, timeout=60.0, max_reply_bytes=50_000, max_retries=2)
        out = t.generate(prompts(3))
    assert out[0].text == reply_text("p0") and server.attempts["p0"] == 2
    assert out[1].finish_reason == "error" and server.attempts["p1"] == 3
    assert "longer than max_reply_bytes=50000" in out[1].error and "3 attempt(s)" in out[1].error
    assert out[2].text == reply_text("p2") and t.stats["errors"] == 1


def test_a_reply_that_trickles_forever_is_cut_at_attempt_timeout() -> None:
    """One byte every 20 ms never lets the 60 s socket timeout fire; attempt_timeout ends the attempt."""
    with FakeOpenAI({"p0": ["drip"], "p1": ["drip"] * 2}) as server:
        t = teacher(server, timeout=60.0, attempt_timeout=0.5, max_retries=1)
        out = t.generate(prompts(3))
    assert out[0].text == reply_text("p0") and server.attempts["p0"] == 2
    assert out[1].finish_reason == "error" and server.attempts["p1"] == 2
    assert "no complete reply within 0.5s (attempt_timeout)" in out[1].error
    assert out[2].text == reply_text("p2")
    with pytest.raises(SiftError, match="attempt_timeout"):
        teacher(server, attempt_timeout=0)
    with pytest.raises(SiftError, match="max_reply_bytes"):
        teacher(server, max_reply_bytes=0)


def test_connection_refused_is_retried_then_reported() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = OpenAITeacher("m", base_url=f"http://127.0.0.1:{port}", max_retries=2, **FAST)
    out = t.generate(prompts(2))
    assert all(c.finish_reason == "error" and "connection problem" in c.error for c in out)
    assert t.stats["attempts"] == 6


def test_missing_usage_counts_zero_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with FakeOpenAI({"p1": ["no_usage"]}) as server, caplog.at_level(logging.WARNING):
        t = teacher(server)
        out = t.generate(prompts(2))
    assert (out[1].prompt_tokens, out[1].completion_tokens) == (0, 0)
    assert out[1].text == reply_text("p1") and out[0].completion_tokens == 2
    assert t.stats["missing_usage"] == 1
    assert "carried no usage" in caplog.text


def test_length_limit_and_sampling_reach_the_server() -> None:
    sampling = Sampling(temperature=0.0, top_p=0.5, top_k=40, max_tokens=1, presence_penalty=2.0,
                        frequency_penalty=0.5, stop=("\n\n", "16", "a", "b", "c"), seed=7)
    with FakeOpenAI() as server:
        out = teacher(server).generate([Request(prompt="p0", sampling=sampling), Request(prompt="p1")])
    assert out[0].finish_reason == "length" and out[0].text == "echo:"
    by_prompt = {b["prompt"]: b for b in server.bodies}
    assert by_prompt["p0"] == {"model": "fake-model", "prompt": "p0", "n": 1, "max_tokens": 1,
                               "temperature": 0.0, "top_p": 0.5, "top_k": 40, "presence_penalty": 2.0,
                               "frequency_penalty": 0.5, "stop": ["\n\n", "16", "a", "b", "c"], "seed": 7}
    assert "top_k" not in by_prompt["p1"] and "seed" not in by_prompt["p1"] and "stop" not in by_prompt["p1"]


# ---------------------------------------------------------------- pure parts


def test_base_url_forms() -> None:
    assert OpenAITeacher("m", base_url="http://h:1")._prefix == "/v1"
    assert OpenAITeacher("m", base_url="http://h:1/v1/")._prefix == "/v1"
    assert OpenAITeacher("m", base_url="https://h/v1beta/openai")._prefix == "/v1beta/openai"
    with pytest.raises(SiftError, match="http"):
        OpenAITeacher("m", base_url="localhost:8000")


def test_finish_reason_mapping() -> None:
    assert map_finish_reason("stop") == ("stop", None)
    assert map_finish_reason("eos") == ("stop", None)
    assert map_finish_reason(None) == ("stop", None)
    assert map_finish_reason("length")[0] == "length"
    assert map_finish_reason("content_filter")[0] == "error"


def test_parse_response_rejects_wrong_shapes() -> None:
    for bad in ([], {}, {"choices": []}, {"choices": [{"text": 3}]}, {"error": {"message": "x"}}):
        with pytest.raises(BadResponse):
            parse_response(bad, chat=False)
    with pytest.raises(BadResponse):
        parse_response({"choices": [{"text": "x"}]}, chat=True)
    done, has_usage = parse_response({"choices": [{"message": {"content": None}, "finish_reason": "stop"}]},
                                     chat=True)
    assert done.text == "" and not has_usage


def test_retry_after_parsing() -> None:
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds(" 1.5 ") == 1.5
    assert retry_after_seconds("-3") == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = 1_700_000_000.0
    assert retry_after_seconds(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert retry_after_seconds(formatdate(now - 30, usegmt=True), now=now) == 0.0


def test_backoff_is_full_jitter_under_the_cap() -> None:
    rng = random.Random(0)
    delays = [backoff_delay(a, base=0.5, cap=4.0, rng=rng) for a in range(10) for _ in range(50)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert max(backoff_delay(0, base=0.5, cap=4.0, rng=rng) for _ in range(100)) <= 0.5
    assert max(delays) > 3.0  # the cap is reached for late attempts


def test_request_body_chat_shape() -> None:
    body = request_body("m", Request(messages=({"role": "user", "content": "hi"},)), chat=True)
    assert body["messages"] == [{"role": "user", "content": "hi"}] and "prompt" not in body


# ---------------------------------------------------------------- the registry (backend name -> teacher)


def test_registry_builds_the_openai_teacher_without_importing_torch() -> None:
    with FakeOpenAI() as server:
        code = ("import sys\nfrom pipeline.teachers.registry import make_teacher\n"
                f"t = make_teacher('openai', 'm', base_url={server.url!r}, batch_size=None, timeout=2.0)\n"
                "from pipeline.teachers.base import Request\n"
                "print(t.generate([Request(prompt='r0')])[0].text)\n"
                "print('torch' in sys.modules)\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [reply_text("r0"), "False"]


def test_registry_errors_name_the_problem() -> None:
    with pytest.raises(SiftError, match="unknown teacher backend 'gpt'; valid: transformers, openai, vllm"):
        make_teacher("gpt", "m")
    with pytest.raises(SiftError, match="'openai' needs base_url"):
        make_teacher("openai", "m")
    with pytest.raises(SiftError, match="takes no option batch_size"):
        make_teacher("openai", "m", base_url="http://127.0.0.1:9/v1", batch_size=4)
    assert isinstance(make_teacher("openai", "m", base_url="http://127.0.0.1:9/v1", chat=None), OpenAITeacher)
    assert {"batch_size", "dtype", "device"} <= set(backend_options("transformers"))
    assert backend_options("openai")["concurrency"] == 8


# ---------------------------------------------------------------- first-token log-probabilities (the judge)

PROBS = {"4": 0.36, " 4": 0.12, "5": 0.24, "2": 0.08, "The": 0.2}


def _chat(key: str) -> Request:
    return Request(messages=({"role": "user", "content": key},), sampling=Sampling(temperature=0.7, max_tokens=8))


def test_first_token_probs_from_chat_and_completions_endpoints() -> None:
    with FakeOpenAI(logprobs=lambda body: PROBS) as server:
        t = teacher(server)
        got = t.first_token_probs([_chat("c0"), Request(prompt="p0", sampling=Sampling(max_tokens=8))])
    for dist in got:  # " 4" and "4" summed, probabilities back from the log-probabilities
        assert dist == pytest.approx({"4": 0.48, "5": 0.24, "2": 0.08, "The": 0.2})
    chat_body, plain_body = sorted(server.bodies, key=lambda b: "prompt" in b)
    assert (chat_body["logprobs"], chat_body["top_logprobs"]) == (True, 20)
    assert plain_body["logprobs"] == 20 and "top_logprobs" not in plain_body
    for body in server.bodies:  # greedy, one token
        assert (body["temperature"], body["max_tokens"]) == (0.0, 1)
    assert t.logprob_stats["given"] == 2


def test_first_token_probs_are_retried_like_any_request() -> None:
    with FakeOpenAI({"c0": ["500", "429"]}, logprobs=lambda body: PROBS) as server:
        t = teacher(server)
        got = t.first_token_probs([_chat("c0")])
    assert got[0] == pytest.approx({"4": 0.48, "5": 0.24, "2": 0.08, "The": 0.2})
    assert server.attempts["c0"] == 3 and t.logprob_stats["retries"] == 2
    with FakeOpenAI(lambda key, attempt: "500") as server:  # retries exhausted: None, not "refused"
        t = teacher(server, max_retries=1)
        assert t.first_token_probs([_chat("c0")]) == [None]
    assert t.logprob_stats["failed"] == 1 and t._no_logprobs is None


@pytest.mark.parametrize("reject", [False, True])
def test_a_server_without_logprobs_gives_none_and_says_so_once(reject: bool,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with FakeOpenAI(reject_logprobs=reject) as server, caplog.at_level(logging.WARNING):
        t = teacher(server)
        assert t.first_token_probs([_chat("c0"), _chat("c1")]) == [None, None]
        asked = len(server.bodies)
        assert t.first_token_probs([_chat("c2")]) == [None]  # learnt: not asked again
        assert len(server.bodies) == asked == 2
    assert caplog.text.count("gives no log-probabilities") == 1
    assert ("not supported" in caplog.text) == reject


def test_parse_first_token_probs_shapes() -> None:
    chat = {"choices": [{"logprobs": {"content": [{"token": "4", "logprob": -0.5, "top_logprobs": [
        {"token": "4", "logprob": -0.5, "bytes": [52]}, {"token": " 4", "logprob": -2.0, "bytes": [32, 52]},
        {"token": "x", "logprob": -9999.0, "bytes": None}]}]}}]}
    assert parse_first_token_probs(chat) == pytest.approx({"4": math.exp(-0.5) + math.exp(-2.0),
                                                           "x": math.exp(-9999.0)})
    legacy = {"choices": [{"text": "3", "logprobs": {"tokens": ["3"], "token_logprobs": [-0.1],
                                                     "top_logprobs": [{"3": -0.1, "2": -3.0}]}}]}
    assert parse_first_token_probs(legacy) == pytest.approx({"3": math.exp(-0.1), "2": math.exp(-3.0)})
    alone = {"choices": [{"logprobs": {"content": [{"token": "5", "logprob": 0.0, "top_logprobs": []}]}}]}
    assert parse_first_token_probs(alone) == {"5": 1.0}
    for none in ({"choices": [{"text": "4"}]}, {"choices": [{"logprobs": None}]},
                 {"choices": [{"logprobs": {"content": []}}]}):
        assert parse_first_token_probs(none) is None
    with pytest.raises(BadResponse):
        parse_first_token_probs({"result": "4"})


def test_logprobs_body_is_greedy_and_one_token() -> None:
    body = logprobs_body("m", _chat("hi"), chat=True, top=20)
    assert (body["max_tokens"], body["temperature"], body["logprobs"], body["top_logprobs"]) == (1, 0.0, True, 20)
    body = logprobs_body("m", Request(prompt="hi"), chat=False, top=5)
    assert (body["max_tokens"], body["logprobs"]) == (1, 5) and "top_logprobs" not in body
