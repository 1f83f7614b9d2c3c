"""A fake OpenAI-compatible server on loopback, with a fault schedule, for teacher and stage tests.

    with FakeOpenAI(faults={"p3": ["429", "500"]}) as server:
        teacher = OpenAITeacher("fake", base_url=server.url)

It answers /v1/completions and /v1/chat/completions with text derived from the prompt
("echo: <prompt>", cut to max_tokens words with finish_reason "length"), so tests can check
ordering. Faults are looked up by prompt key (the prompt, or the last message's content) and
attempt number: `faults` is a dict of key -> list of faults for successive attempts, or a
function (key, attempt) -> fault or None. Faults: "429" (with Retry-After `retry_after`), "500",
"503", "408", "400", "401", "drop" (close without a response), "reset" (TCP RST), "slow" (answer
after `slow_seconds`, uncounted), "truncated" (200 with half the JSON), "short_body" (promises more
bytes than it sends), "schema" (200 without choices), "no_usage" (a success without usage),
"endless" (a 200 whose body never ends, sent as fast as the client reads), "drip" (a 200 whose body
never ends, one byte every 20 ms, so no socket wait ever times out). Both stop when the client hangs up.
Only clean successes are counted in `successes`, so a retried request shows up exactly once.
`stop()` and `restart()` take the server down (connections refused) and up again on the same port.
`rendezvous=k`: the first k requests are held until all k are in flight (a barrier), so a test of
concurrency sees k at once however loaded the machine is.
`reply(body) -> (text, finish_reason)` replaces the echo, for stage tests that need real-looking answers.
`logprobs(body) -> {token: probability} or None`: a request for one token with log-probabilities
(chat `logprobs: true, top_logprobs: k`; completions `logprobs: k`) gets the k most likely of these
in OpenAI's shape (chat: choices[0].logprobs.content[0].top_logprobs; completions:
choices[0].logprobs.top_logprobs[0]), the likeliest as the text. Without it such requests get no
logprobs (a server that ignores the parameter); `reject_logprobs=True` answers them 400 instead.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FaultSchedule = dict[str, list[str]] | Callable[[str, int], str | None]
Reply = Callable[[dict], tuple[str, str]]  # request body -> (text, finish_reason)
Logprobs = Callable[[dict], dict[str, float] | None]  # request body -> {token: probability} of the first token


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 drops SYNs under a burst, adding 1 s TCP retransmits
    daemon_threads = True


def reply_text(key: str) -> str:
    return f"echo: {key}"


class FakeOpenAI:
    """Start with `with FakeOpenAI(...) as server:`; `server.url` is the base_url to use."""

    def __init__(self, faults: FaultSchedule | None = None, *, delay: float = 0.0,
                 slow_seconds: float = 1.0, retry_after: str | None = "0", reply: Reply | None = None,
                 logprobs: Logprobs | None = None, reject_logprobs: bool = False, rendezvous: int = 0) -> None:
        self.faults = faults or {}
        self.reply = reply
        self.logprobs, self.reject_logprobs = logprobs, reject_logprobs
        self.delay, self.slow_seconds, self.retry_after = delay, slow_seconds, retry_after
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()  # every request per key, faults included
        self.successes: Counter[str] = Counter()  # clean 200 answers per key
        self.bodies: list[dict] = []  # every decoded request body, in arrival order
        self.paths: list[str] = []
        self.auth_headers: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        # the first `rendezvous` requests wait for each other before any is answered (60 s at most)
        self._barrier = threading.Barrier(rendezvous, timeout=60) if rendezvous > 1 else None
        self._arrivals = 0
        self.rendezvous_broken = False  # the barrier timed out: fewer than `rendezvous` were ever in flight
        self._httpd = _Server(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._up = False

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeOpenAI:
        self._start()
        return self

    def _start(self) -> None:
        self._thread.start()
        self._up = True

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Go down: stop serving and close the listening socket, so connections are refused."""
        if self._up:
            self._up = False
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)

    def restart(self) -> None:
        """Come back up on the same address after `stop`."""
        if not self._up:
            self._httpd = _Server(self._httpd.server_address[:2], _handler_for(self))
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            daemon=True)
            self._start()

    def fault_for(self, key: str, attempt: int) -> str | None:
        if callable(self.faults):
            return self.faults(key, attempt)
        schedule = self.faults.get(key, [])
        return schedule[attempt] if attempt < len(schedule) else None


def _prompt_key(body: dict) -> str:
    if "messages" in body:
        return str(body["messages"][-1]["content"])
    return str(body.get("prompt"))


def wants_logprobs(body: dict) -> int:
    """How many top log-probabilities a request asks for (0: none)."""
    if "messages" in body:
        return int(body.get("top_logprobs") or 0) if body.get("logprobs") is True else 0
    value = body.get("logprobs")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def _logprobs_reply(probs: dict[str, float], top: int, *, chat: bool) -> tuple[str, dict]:
    """(the likeliest token, the choice's `logprobs` object in OpenAI's shape)."""
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])[:top]
    best, best_p = ranked[0]
    if chat:
        entries = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in ranked]
        return best, {"content": [{"token": best, "logprob": math.log(best_p), "bytes": list(best.encode()),
                                   "top_logprobs": entries}]}
    return best, {"tokens": [best], "token_logprobs": [math.log(best_p)], "text_offset": [0],
                  "top_logprobs": [{t: math.log(p) for t, p in ranked}]}


def _success(body: dict, key: str, *, chat: bool, usage: bool, reply: Reply | None = None,
             logprobs: Logprobs | None = None) -> dict:
    words = reply_text(key).split()
    max_tokens = int(body.get("max_tokens") or 16)
    finish = "length" if len(words) > max_tokens else "stop"
    text = " ".join(words[:max_tokens])
    top = wants_logprobs(body)
    probs = logprobs(body) if logprobs is not None and top else None
    extra: dict = {}
    if probs:
        text, extra["logprobs"] = _logprobs_reply(probs, top, chat=chat)
        words, finish = [text], "length"
    elif reply is not None:
        text, finish = reply(body)
        words = text.split()
    choice: dict = {"index": 0, "finish_reason": finish, **extra}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    out: dict = {"id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
                 "model": body.get("model"), "choices": [choice]}
    if usage:
        prompt_tokens = len(key.split())
        out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words[:max_tokens]),
                        "total_tokens": prompt_tokens + len(words[:max_tokens])}
    return out


def _handler_for(server: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def do_POST(self) -> None:  # noqa: N802 - the http.server naming
            with server.lock:
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            self._counted = True
            try:
                self._meet()
                self._serve()
            except OSError:  # the client gave up (timeout) before the answer: what a real server sees
                self.close_connection = True
            finally:
                self._leave()

        def _meet(self) -> None:
            """Hold one of the first `rendezvous` requests until all of them are in flight."""
            if server._barrier is None:
                return
            with server.lock:
                server._arrivals += 1
                first = server._arrivals <= server._barrier.parties
            if first:
                try:
                    server._barrier.wait()
                except threading.BrokenBarrierError:
                    server.rendezvous_broken = True

        def _leave(self) -> None:
            """Out of flight, once: before the answer is written, since the client may send its next
            request as soon as it has read this one (counting after the write let 4 of 3 overlap)."""
            if self._counted:
                self._counted = False
                with server.lock:
                    server.in_flight -= 1

        def _serve(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.loads(raw)
            key = _prompt_key(body)
            chat = self.path.endswith("/chat/completions")
            with server.lock:
                attempt = server.attempts[key]
                server.attempts[key] += 1
                server.bodies.append(body)
                server.paths.append(self.path)
                server.auth_headers.append(self.headers.get("Authorization"))
            if not (self.path.endswith("/completions")):
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            if server.reject_logprobs and wants_logprobs(body):
                return self._send(400, {"error": {"message": "logprobs are not supported by this model"}})
            fault = server.fault_for(key, attempt)
            if server.delay:
                time.sleep(server.delay)
            if fault in ("429", "503"):
                headers = {"Retry-After": server.retry_after} if server.retry_after is not None else {}
                return self._send(int(fault), {"error": {"message": "slow down"}}, headers)
            if fault in ("500", "408", "400", "401"):  # 401 echoes the key, as OpenAI's own message does
                auth = (self.headers.get("Authorization") or "") if fault == "401" else ""
                return self._send(int(fault), {"error": {"message": f"fault {fault} for {key} {auth}"}})
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            if fault == "reset":
                self.close_connection = True
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return None
            if fault == "slow":
                time.sleep(server.slow_seconds)
                return self._send(200, _success(body, key, chat=chat, usage=True, reply=server.reply,
                                                logprobs=server.logprobs))
            if fault == "truncated":
                data = json.dumps(_success(body, key, chat=chat, usage=True, reply=server.reply)).encode()
                return self._send_raw(200, data[: len(data) // 2])
            if fault == "short_body":
                data = json.dumps(_success(body, key, chat=chat, usage=True, reply=server.reply)).encode()
                self._leave()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data) + 100))
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True
                return None
            if fault in ("endless", "drip"):
                self._leave()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()  # no Content-Length: the body ends when the connection does
                self.close_connection = True
                piece = b" " * (1 if fault == "drip" else 65536)
                while True:  # until the client hangs up (BrokenPipe / ConnectionReset: an OSError)
                    self.wfile.write(piece)
                    self.wfile.flush()
                    if fault == "drip":
                        time.sleep(0.02)
            if fault == "schema":
                return self._send(200, {"object": "text_completion", "result": reply_text(key)})
            if fault not in (None, "no_usage"):
                raise ValueError(f"unknown fault {fault!r}")
            with server.lock:
                server.successes[key] += 1
            return self._send(200, _success(body, key, chat=chat, usage=fault != "no_usage", reply=server.reply,
                                            logprobs=server.logprobs))

        def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
            self._send_raw(status, json.dumps(obj).encode(), headers)

        def _send_raw(self, status: int, data: bytes, headers: dict | None = None) -> None:
            self._leave()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler
