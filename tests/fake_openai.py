"""A local stand-in for an OpenAI-compatible API, for tests: 127.0.0.1 only, bounded, stops by itself.

It answers ``POST /v1/chat/completions`` and ``POST /v1/completions`` with a fixed text derived from the prompt
(so a test knows what every sample must be), checks the bearer key, and injects faults chosen by the test: a
status code (429 with ``Retry-After``, 500, ...), a slow answer, or an error body that echoes the request's
headers (a hostile server leaking the key back). Every request is logged with its time and outcome.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def answer_for(content: str) -> str:
    """The fixed answer to a prompt."""
    return f"Answer to [{content}]."


@dataclass
class Fault:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    sleep: float = 0.0
    echo_headers: bool = False
    text: str | None = None  # overrides the answer


@dataclass
class Logged:
    time: float
    content: str
    status: int
    body: dict


class FakeOpenAI:
    """``with FakeOpenAI(key, fault=...) as server: server.base_url`` -- a bounded local server.

    ``fault(content, attempt)`` returns a :class:`Fault` (or None) for the ``attempt``-th request (1-based) with
    that prompt. The serving loop ends after ``max_requests`` requests or ``max_seconds``, whichever comes first.
    """

    def __init__(
        self,
        key: str,
        fault: Callable[[str, int], Fault | None] | None = None,
        delay: float = 0.0,
        max_requests: int = 2000,
        max_seconds: float = 300.0,
    ):
        self.key = key
        self.fault = fault or (lambda content, attempt: None)
        self.delay = delay
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.log: list[Logged] = []
        self.attempts: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.timeout = 0.05
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._server.server_close()

    def _serve(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline and len(self.log) < self.max_requests:
            self._server.handle_request()

    def ok_contents(self) -> list[str]:
        return [entry.content for entry in self.log if entry.status == 200]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.endswith("/chat/completions"):
                    content = body["messages"][-1]["content"]
                    chat = True
                elif self.path.endswith("/completions"):
                    content, chat = body["prompt"], False
                else:
                    self._send(404, {"error": {"message": "no such endpoint"}}, "", body)
                    return
                with server._lock:
                    server.attempts[content] += 1
                    attempt = server.attempts[content]
                self._answer(content, attempt, chat, body)

            def _answer(self, content: str, attempt: int, chat: bool, body: dict) -> None:
                if self.headers.get("Authorization") != f"Bearer {server.key}":
                    self._send(401, {"error": {"message": "Incorrect API key provided."}}, content, body)
                    return
                fault = server.fault(content, attempt) or Fault()
                time.sleep(fault.sleep)  # a slow answer: the client may time out (it is not counted in flight)
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                time.sleep(server.delay)
                with server._lock:
                    server.in_flight -= 1
                if fault.status != 200:
                    message = "injected fault"
                    if fault.echo_headers:
                        message += f"; your headers were {dict(self.headers)}"
                    self._send(fault.status, {"error": {"message": message}}, content, body, fault.headers)
                    return
                text = fault.text if fault.text is not None else answer_for(content)
                prompt_tokens = len(content.split()) + 4
                completion_tokens = min(len(text.split()), int(body.get("max_tokens") or 10**6))
                choice = {"index": 0, "finish_reason": "stop"}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                response = {
                    "id": f"fake-{len(server.log)}",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": body.get("model"),
                    "choices": [choice],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                }
                self._send(200, response, content, body)

            def _send(self, status, payload, content, body, headers=None) -> None:
                with server._lock:
                    server.log.append(Logged(time.monotonic(), content, status, body))
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

        return Handler
