"""The `openai` teacher: any OpenAI-compatible HTTP server (`vllm serve`, llama.cpp, Ollama, hosted APIs).

    sift generate --teacher.backend openai --teacher.model Qwen2.5-7B --teacher.base_url http://localhost:8000/v1

`Request.prompt` goes to `/v1/completions`, `Request.messages` to `/v1/chat/completions`. Requests
run concurrently (a bounded thread pool), each with a timeout, and are retried with exponential
backoff and full jitter on 429, 408, 409, 5xx, dropped or refused connections, timeouts and
malformed 200 responses (Retry-After is honoured, capped at `backoff_max`). One attempt may take
`attempt_timeout` seconds and read `max_reply_bytes` at most, so a server that streams without end
is cut off and retried rather than filling memory. A request that still
fails comes back as a Completion with finish_reason "error", so one bad prompt never loses the
others. The API key is read from the environment at call time and kept in no attribute.
`first_token_probs` asks for one greedy token with its top log-probabilities (chat: `logprobs: true,
top_logprobs: 20`, read from `choices[0].logprobs.content[0].top_logprobs`; completions: `logprobs:
20`, read from `choices[0].logprobs.top_logprobs[0]`), with the same concurrency, timeouts and
retries; a server that refuses or omits them gives None for that request (said once per teacher).
Standard library only (http.client), so nothing to install.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import SiftError
from pipeline.redact import redact_urls
from pipeline.settings import API_KEY_ENV
from pipeline.teachers.base import Completion, FinishReason, Request, Sampling

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx
STOP_REASONS = frozenset({"stop", "eos", "eos_token", "stop_sequence", "end_turn", "tool_calls",
                          "function_call"})
LENGTH_REASONS = frozenset({"length", "max_tokens", "model_length"})
ERROR_SNIPPET = 300  # characters of a server's error body kept in Completion.error
MAX_REPLY_BYTES = 8 * 2**20  # a long completion is tens of KiB; 8 concurrent endless streams hold 64 MiB at most
READ_CHUNK = 2**16


# ---------------------------------------------------------------- pure parts


def request_body(model: str, request: Request, *, chat: bool) -> dict:
    """The JSON body for one request; `chat` picks the chat-completions shape."""
    s: Sampling = request.sampling
    body: dict = {"model": model, "n": 1, "max_tokens": s.max_tokens, "temperature": s.temperature,
                  "top_p": s.top_p, "presence_penalty": s.presence_penalty,
                  "frequency_penalty": s.frequency_penalty}
    if s.stop:
        body["stop"] = list(s.stop)  # OpenAI itself takes at most 4; servers differ, so pass all
    if s.seed is not None:
        body["seed"] = s.seed
    if s.top_k:
        body["top_k"] = s.top_k  # not OpenAI's, but vLLM, llama.cpp and Ollama accept it
    if chat:
        messages = request.messages if request.messages is not None else (
            {"role": "user", "content": request.prompt},)
        body["messages"] = [dict(m) for m in messages]
    else:
        body["prompt"] = request.prompt
    return body


def map_finish_reason(reason: object) -> tuple[FinishReason, str | None]:
    """Map a server's finish_reason onto ours; a content filter counts as an error."""
    if reason in LENGTH_REASONS:
        return "length", None
    if reason == "content_filter":
        return "error", "the server's content filter stopped the completion"
    return "stop", None  # "stop" and its synonyms; null or unknown values mean it ended on its own


def logprobs_body(model: str, request: Request, *, chat: bool, top: int) -> dict:
    """The body asking for one greedy token and the `top` most likely first tokens' log-probabilities."""
    sampling = replace(request.sampling, temperature=0.0, max_tokens=1)
    body = request_body(model, replace(request, sampling=sampling), chat=chat)
    if chat:
        body.update(logprobs=True, top_logprobs=top)
    else:
        body["logprobs"] = top  # the legacy completions shape: an integer
    return body


def _add(dist: dict[str, float], token: object, logprob: object) -> None:
    if not isinstance(token, str) or isinstance(logprob, bool) or not isinstance(logprob, (int, float)):
        return
    if not math.isfinite(logprob):
        return
    text = token.strip()
    dist[text] = dist.get(text, 0.0) + math.exp(logprob)


def parse_first_token_probs(data: object) -> dict[str, float] | None:
    """{stripped token text: probability} of the first generated token in a decoded 200 body, tokens
    with the same stripped text summed; None when the body carries no log-probabilities.

    Chat completions (OpenAI, vLLM, llama.cpp): choices[0].logprobs.content[0].top_logprobs, a list
    of {token, logprob, bytes}. Completions: choices[0].logprobs.top_logprobs[0], a {token: logprob}
    dict (a list of {token, logprob} or the chat shape is read too, as some servers send them).
    """
    if not isinstance(data, dict):
        raise BadResponse(f"expected a JSON object, got {type(data).__name__}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadResponse("no 'choices' in the response")
    logprobs = choices[0].get("logprobs")
    if not isinstance(logprobs, dict):
        return None
    dist: dict[str, float] = {}
    content = logprobs.get("content")
    top = logprobs.get("top_logprobs")
    if isinstance(content, list) and content and isinstance(content[0], dict):
        entries = content[0].get("top_logprobs")
        if isinstance(entries, list):
            for e in entries:
                if isinstance(e, dict):
                    _add(dist, e.get("token"), e.get("logprob"))
        if not dist:  # no alternatives given: the chosen token alone
            _add(dist, content[0].get("token"), content[0].get("logprob"))
    elif isinstance(top, list) and top:
        first = top[0]
        if isinstance(first, dict):
            for token, logprob in first.items():
                _add(dist, token, logprob)
        elif isinstance(first, list):
            for e in first:
                if isinstance(e, dict):
                    _add(dist, e.get("token"), e.get("logprob"))
    return dist or None


class BadResponse(ValueError):
    """A 200 response that is not the completion we asked for (retried)."""


def parse_response(data: object, *, chat: bool) -> tuple[Completion, bool]:
    """Turn a decoded 200 body into a Completion; the flag says whether usage was present."""
    if not isinstance(data, dict):
        raise BadResponse(f"expected a JSON object, got {type(data).__name__}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadResponse("no 'choices' in the response")
    choice = choices[0]
    if chat:
        message = choice.get("message")
        if not isinstance(message, dict):
            raise BadResponse("choices[0] has no 'message'")
        text = message.get("content")
        text = "" if text is None else text  # null content: a refusal or a tool call, no text
    else:
        text = choice.get("text")
    if not isinstance(text, str):
        raise BadResponse(f"choices[0] text is {type(text).__name__}, expected a string")
    finish, error = map_finish_reason(choice.get("finish_reason"))
    usage = data.get("usage")
    has_usage = isinstance(usage, dict)
    usage = usage if has_usage else {}
    prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return Completion(text=text,
                      prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else 0,
                      completion_tokens=completion_tokens if isinstance(completion_tokens, int) else 0,
                      finish_reason=finish, error=error), has_usage


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """Parse a Retry-After header: delay seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter (AWS architecture blog): uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(cap, base * (2 ** attempt)))


# ---------------------------------------------------------------- the client


@dataclass
class _Retry:
    reason: str
    retry_after: float | None = None


@dataclass(frozen=True)
class OpenAIOptions:
    """The openai backend's own settings (`--teacher.options key=value,...`), checked before any request.

    Args:
        chat: None routes prompts to /completions and messages to /chat/completions; True sends
            plain prompts as one user message to /chat/completions (chat-only APIs); False
            refuses chat messages.
        concurrency: requests in flight at most.
        timeout: seconds one attempt may wait on the socket (connect, send, each read).
        max_retries: retries after the first attempt before a request is given up as "error".
        backoff_base: first backoff ceiling in seconds; doubles each retry (full jitter).
        backoff_max: ceiling of any single wait, Retry-After included.
        total_timeout: seconds the whole generate call may take (each socket wait is cut to
            the time left, and no attempt starts after it); None for no bound.
        attempt_timeout: seconds one attempt may take from sending the request to the last byte
            of the reply, however steadily bytes arrive (the socket timeout alone never fires
            while they do); None for 2 x `timeout`. A cut attempt is retried.
        max_reply_bytes: the largest reply body read; a longer one (an endless stream) is cut
            there and the attempt retried.
    """

    chat: bool | None = None
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    total_timeout: float | None = None
    attempt_timeout: float | None = None
    max_reply_bytes: int = MAX_REPLY_BYTES

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout <= 0 or self.backoff_base < 0 \
                or self.backoff_max < 0:
            raise SiftError("concurrency >= 1, max_retries >= 0, timeout > 0 and backoffs >= 0 required")
        if self.total_timeout is not None and self.total_timeout <= 0:
            raise SiftError(f"total_timeout must be > 0, got {self.total_timeout}")
        if self.attempt_timeout is not None and not self.attempt_timeout > 0:
            raise SiftError(f"attempt_timeout must be > 0, got {self.attempt_timeout}")
        if self.max_reply_bytes < 1:
            raise SiftError(f"max_reply_bytes must be >= 1, got {self.max_reply_bytes}")


class OpenAITeacher:
    """A Teacher over the OpenAI HTTP protocol, with bounded concurrency, retries and timeouts."""

    OPTIONS = OpenAIOptions  # the backend's own settings, for the registry and --teacher.options

    def __init__(self, model: str, *, base_url: str, api_key_env: str = API_KEY_ENV, **options: Any) -> None:
        """Args:
            model: model name the server knows, sent as "model" and recorded as the teacher name.
            base_url: API root as the OpenAI SDK takes it, e.g. http://localhost:8000/v1 (a bare
                host gets /v1).
            api_key_env: environment variable holding the key, read at each call; unset sends none.
            options: the fields of OpenAIOptions (concurrency, timeout, retries, ...).
        """
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SiftError(f"base_url must be an http(s) URL, got {redact_urls(base_url)!r}")
        try:
            o = OpenAIOptions(**options)
        except TypeError as e:  # an unknown keyword
            raise SiftError(f"the openai backend: {e}") from None
        self.name = model
        self.model, self.base_url, self.api_key_env, self.chat = model, base_url.rstrip("/"), api_key_env, o.chat
        self.shown_url = redact_urls(self.base_url)  # what messages, logs and provenance show
        self.concurrency, self.timeout, self.max_retries = o.concurrency, o.timeout, o.max_retries
        self.backoff_base, self.backoff_max, self.total_timeout = o.backoff_base, o.backoff_max, o.total_timeout
        self.attempt_timeout = 2 * o.timeout if o.attempt_timeout is None else o.attempt_timeout
        self.max_reply_bytes = o.max_reply_bytes
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/") or "/v1"  # like the OpenAI SDK: the path includes the version
        self._rng = random.Random()
        self._lock = threading.Lock()
        self.stats: dict[str, int] = {}  # counters of the last generate call, for the stage's stats
        self.logprob_stats: dict[str, int] = {}  # the last first_token_probs call's: given, refused, failed
        self._no_logprobs: str | None = None  # why the server gives none, once a whole call got none
        self._logprobs_noted = False

    def describe(self) -> dict:
        """Provenance: what produced the data, never the key."""
        return {"model": self.model, "base_url": self.shown_url, "api_key_env": self.api_key_env}

    def __repr__(self) -> str:
        return f"OpenAITeacher(model={self.model!r}, base_url={self.shown_url!r})"

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Complete every request, in input order; failures come back as finish_reason "error"."""
        if self.chat is False and any(r.messages is not None for r in requests):
            raise SiftError("chat=False, but a request has chat messages; use chat=None or True")
        self.stats = {"requests": len(requests), "attempts": 0, "retries": 0, "errors": 0,
                      "missing_usage": 0}
        if not requests:
            return []
        key = os.environ.get(self.api_key_env) or None
        deadline = None if self.total_timeout is None else time.monotonic() + self.total_timeout
        workers = min(self.concurrency, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sift-openai") as pool:
            results = list(pool.map(lambda r: self._complete(r, key, deadline), requests))
        if self.stats["missing_usage"]:
            log.warning("%d of %d responses from %s carried no usage: their token counts are 0",
                        self.stats["missing_usage"], len(requests), self.shown_url)
        return results

    def first_token_probs(self, requests: Sequence[Request], *, top: int = 20,
                          include: Sequence[str] = ()) -> list[dict[str, float] | None]:
        """The first token's distribution of each request's greedy reply, {stripped text: probability}
        over the `top` most likely tokens (at most 20 on OpenAI), or None where the server refused
        log-probabilities, sent none, or failed. `include` is not asked for (the API cannot name
        tokens); the rating digits are among the top 20 whenever they matter."""
        del include
        if self.chat is False and any(r.messages is not None for r in requests):
            raise SiftError("chat=False, but a request has chat messages; use chat=None or True")
        self.logprob_stats = {"requests": len(requests), "given": 0, "refused": 0, "failed": 0, "attempts": 0,
                              "retries": 0}
        if not requests:
            return []
        if self._no_logprobs:  # learnt from an earlier call: the server gives none
            self.logprob_stats["refused"] = len(requests)
            return [None] * len(requests)
        key = os.environ.get(self.api_key_env) or None
        deadline = None if self.total_timeout is None else time.monotonic() + self.total_timeout
        workers = min(self.concurrency, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sift-openai") as pool:
            answers = list(pool.map(lambda r: self._first_token(r, key, deadline, top), requests))
        dists = [d for d, _ in answers]
        refusals = [why for d, why in answers if d is None and why is not None]
        for d, why in answers:
            self.logprob_stats["given" if d is not None else "refused" if why is not None else "failed"] += 1
        if refusals and not any(d is not None for d in dists):
            self._no_logprobs = refusals[0]
        if refusals and not self._logprobs_noted:
            self._logprobs_noted = True
            log.warning("%s gives no log-probabilities for %s (%s): its ratings are parsed from a sampled "
                        "reply instead", self.shown_url, self.model, refusals[0])
        return dists

    def _first_token(self, request: Request, key: str | None, deadline: float | None,
                     top: int) -> tuple[dict[str, float] | None, str | None]:
        """(the distribution, None); (None, why) when the server refused or omitted log-probabilities;
        (None, None) when the request failed (retries exhausted): a sampled reply may still work."""
        chat = self.chat is True or request.messages is not None
        path = self._prefix + ("/chat/completions" if chat else "/completions")
        payload = json.dumps(logprobs_body(self.model, request, chat=chat, top=top)).encode("utf-8")
        value, error, final = self._exchange(path, payload, key, deadline, parse_first_token_probs,
                                             counters=self.logprob_stats)
        if value is not None:
            return value, None
        if final:  # a 4xx the server will repeat: it does not take these parameters
            return None, error
        if error is None:  # a clean 200 without log-probabilities
            return None, "the response carried no logprobs"
        return None, None

    # -- one request, all its attempts

    def _complete(self, request: Request, key: str | None, deadline: float | None) -> Completion:
        chat = self.chat is True or request.messages is not None
        path = self._prefix + ("/chat/completions" if chat else "/completions")
        payload = json.dumps(request_body(self.model, request, chat=chat)).encode("utf-8")
        value, error, _ = self._exchange(path, payload, key, deadline, lambda data: parse_response(data, chat=chat),
                                         counters=self.stats)
        if value is None:
            self._count("errors")
            return Completion("", 0, 0, "error", error=error)
        completion, has_usage = value
        if not has_usage:
            self._count("missing_usage")
        if completion.finish_reason == "error":
            self._count("errors")
        return completion

    def _exchange(self, path: str, payload: bytes, key: str | None, deadline: float | None,
                  parse: Callable[[object], Any], *, counters: dict[str, int]) -> tuple[Any, str | None, bool]:
        """POST with retries: (parse(decoded 200 body), None, False); or (None, why, final) when it
        failed for good, `final` saying the server refused it (a 4xx that is not retried)."""
        failure, attempts = "not attempted", 0
        for attempt in range(self.max_retries + 1):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                failure = f"total_timeout of {self.total_timeout}s reached; last problem: {failure}"
                break
            attempts += 1
            self._count("attempts", counters)
            if attempt:
                self._count("retries", counters)
            outcome = self._attempt(
                path, payload, key, parse, timeout=self.timeout if remaining is None else min(self.timeout, remaining),
                limit=self.attempt_timeout if remaining is None else min(self.attempt_timeout, remaining))
            if not isinstance(outcome, _Retry):
                return outcome
            failure = outcome.reason
            if attempt == self.max_retries:
                break
            wait = backoff_delay(attempt, base=self.backoff_base, cap=self.backoff_max, rng=self._rng)
            if outcome.retry_after is not None:
                wait = min(outcome.retry_after, self.backoff_max)
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            time.sleep(wait)
        return None, self._redact(f"{failure} ({attempts} attempt(s))", key), False

    def _attempt(self, path: str, payload: bytes, key: str | None, parse: Callable[[object], Any], *,
                 timeout: float, limit: float) -> tuple[Any, str | None, bool] | _Retry:
        """One HTTP exchange: (parsed value, None, False), a final (None, error, True), or a reason to
        retry. `timeout` bounds each socket wait, `limit` the whole exchange after connecting: a
        timer shuts the socket down at `limit`, which ends any read in progress."""
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=timeout)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        expired = threading.Event()
        timer: threading.Timer | None = None
        try:
            conn.connect()  # bounded by the socket timeout; the timer needs the socket
            # the socket itself, not conn.sock: a reply that ends with the connection detaches it
            timer = threading.Timer(limit, _cut, args=(conn.sock, expired))
            timer.daemon = True
            timer.start()
            conn.request("POST", path, body=payload, headers=headers)
            resp = conn.getresponse()
            status, retry_after = resp.status, resp.getheader("Retry-After")
            raw = read_capped(resp, self.max_reply_bytes, expired)
        except ReplyTooLarge as e:
            return _Retry(str(e))
        except (OSError, http.client.HTTPException) as e:  # refused, reset, dropped, truncated body, timeouts
            if expired.is_set():
                which = "attempt_timeout" if limit >= self.attempt_timeout else "total_timeout"
                return _Retry(f"no complete reply within {limit:.3g}s ({which})")
            if isinstance(e, TimeoutError):
                return _Retry(f"no answer within {timeout:.3g}s")
            return _Retry(f"connection problem: {type(e).__name__}: {e}".rstrip(": "))
        finally:
            if timer is not None:
                timer.cancel()
            conn.close()
        if status == 200:
            try:
                return parse(json.loads(raw)), None, False
            except (ValueError, RecursionError) as e:  # JSONDecodeError and BadResponse are ValueErrors
                return _Retry(f"malformed 200 response: {e}")
        detail = f"HTTP {status}: {_error_text(raw)}"
        if status in RETRY_STATUS or status >= 500:
            return _Retry(detail, retry_after_seconds(retry_after))
        return None, self._redact(detail, key), True

    def _count(self, name: str, counters: dict[str, int] | None = None) -> None:
        with self._lock:
            table = self.stats if counters is None else counters
            table[name] = table.get(name, 0) + 1

    @staticmethod
    def _redact(text: str, key: str | None) -> str:
        """An error for the ledger: without the key (a server may echo it) or a URL's credentials."""
        return redact_urls(text.replace(key, "***") if key else text)


class ReplyTooLarge(Exception):
    """A reply body past max_reply_bytes (retried)."""


def read_capped(resp: http.client.HTTPResponse, cap: int, expired: threading.Event | None = None) -> bytes:
    """The whole body of `resp`, refusing to hold more than `cap` bytes: a server streaming without
    end (or announcing more) raises ReplyTooLarge after at most cap + 1 bytes were read."""
    announced = resp.length
    if announced is not None and announced > cap:
        raise ReplyTooLarge(f"the reply announces {announced} bytes, more than max_reply_bytes={cap}")
    chunks, size = [], 0
    while True:
        if expired is not None and expired.is_set():
            raise TimeoutError("attempt_timeout")
        chunk = resp.read(min(READ_CHUNK, cap + 1 - size))
        if not chunk:
            if announced is not None and size < announced:  # read(amt), unlike read(), does not say so
                raise http.client.IncompleteRead(b"".join(chunks), announced - size)
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            raise ReplyTooLarge(f"the reply is longer than max_reply_bytes={cap}")


def _cut(sock: socket.socket, expired: threading.Event) -> None:
    """The attempt timer's action: shut the socket down, so a read in progress returns."""
    expired.set()
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _error_text(raw: bytes) -> str:
    """The server's own error message when it sent the OpenAI error shape, else the body's start."""
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("error")
        if isinstance(message, str) and message:
            text = message
    except (ValueError, AttributeError, KeyError, TypeError):
        pass
    text = " ".join(text.split())
    return text[:ERROR_SNIPPET] or "(empty body)"
