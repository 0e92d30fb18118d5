"""A real HTTP server on 127.0.0.1 speaking OpenAI's ``/v1/chat/completions``.

Scriptable from the test that owns it, callable by anything that speaks HTTP —
the provider in the same process or a Celery worker in another one::

    server.reply("Hello", usage={"prompt_tokens": 12, "completion_tokens": 3})
    server.status(500, times=2)
    server.status(429, retry_after=1)
    server.hang(5)                      # answer nothing for 5 s
    server.malformed()                  # 200 with a body that is not JSON
    server.tool_calls([{"name": "search", "arguments": {"query": "x"}}])
    server.when("[[hang]]", Behaviour("hang", seconds=60))  # by content, every time

A request whose last user message contains a ``when`` marker gets that
behaviour (so one conversation can hang while others are answered); any other
request pops the next behaviour, and with the queue empty it gets
``server.default`` (a plain reply unless replaced). Every request is recorded
in ``server.requests``.

Run on its own (e.g. for a manual ``MODEL_PROVIDER=openai`` demo)::

    python -m tests.fakes.openai_server --port 8765
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from shared.providers.tokens import content_text, count_message_tokens, count_tokens

CHAT_PATH = "/v1/chat/completions"


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # decoded JSON, or None when the body was not JSON
    raw_body: bytes


@dataclass
class Behaviour:
    """What the server does for one request."""

    kind: str  # "reply" | "status" | "hang" | "malformed" | "echo"
    status: int = 200
    payload: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    then: Behaviour | None = None  # for "hang": what to send after the wait, if the client is still there
    # Streamed answers (``"stream": true``): seconds between chunks, and for "drop" how many
    # content chunks go out before the connection is cut.
    chunk_delay: float | None = None
    chunks: int = 0


def _completion(
    request: Any,
    content: str | None,
    *,
    tool_calls: list[dict] | None = None,
    usage: dict | None | bool = True,
    model: str | None = None,
    finish_reason: str | None = None,
) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    body: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model or (request.get("model") if isinstance(request, dict) else None) or "fake-model",
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop"),
            }
        ],
    }
    if usage is True:
        messages = request.get("messages", []) if isinstance(request, dict) else []
        emitted = (content or "") + "".join(
            call["function"]["name"] + call["function"]["arguments"] for call in tool_calls or []
        )
        prompt_tokens = count_message_tokens(messages)
        completion_tokens = count_tokens(emitted)
        body["usage"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
    elif isinstance(usage, dict):
        body["usage"] = usage
    return body


class FakeOpenAIServer:
    """An OpenAI-compatible chat server in a background thread. Use as a context manager
    or call ``start()`` / ``stop()``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._queue: deque[Behaviour] = deque()
        self._rules: list[tuple[str, Behaviour]] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._requests: list[RecordedRequest] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.default = Behaviour("echo")
        # Model name -> seconds to wait before answering by default (benchmarks' upstream latency).
        self.latency_by_model: dict[str, float] = {}
        self.record = True  # a long benchmark turns recording off
        self._in_flight = 0
        self.peak_in_flight = 0  # the most requests being answered at once, ever
        # Streamed answers: seconds between chunks; and whether every chunk carries the
        # running usage (as vLLM's continuous_usage_stats does) besides the final usage chunk.
        self.stream_delay = 0.0
        self.stream_running_usage = False
        # Streams over HTTP/1.1 chunked encoding on a keep-alive connection (as OpenAI's API
        # answers) instead of HTTP/1.0 until the connection closes; and the TCP connections
        # accepted so far, to tell whether a client reuses them.
        self.stream_keep_alive = False
        self.connections = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = _QuietServer((self._host, self._port), handler)
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes requests that are hanging
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """What ``OPENAI_BASE_URL`` should be set to."""
        return f"http://{self._host}:{self.port}/v1"

    # -- recorded traffic --------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """Block until at least ``count`` requests arrived (for callers in other processes)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self._requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"expected {count} requests, got {len(self._requests)}")
                self._arrived.wait(remaining)
            return list(self._requests)

    # -- scripting ---------------------------------------------------------------------

    def push(self, behaviour: Behaviour, times: int = 1) -> FakeOpenAIServer:
        with self._lock:
            self._queue.extend([behaviour] * times)
        return self

    def clear(self) -> None:
        """Forget queued behaviours, ``when`` rules and recorded requests."""
        with self._lock:
            self._queue.clear()
            self._rules.clear()
            self._requests.clear()

    def when(self, marker: str, behaviour: Behaviour) -> FakeOpenAIServer:
        """Every request whose last user message contains ``marker`` gets ``behaviour``,
        ahead of the queue and for as long as the server runs."""
        with self._lock:
            self._rules.append((marker, behaviour))
        return self

    def reply(
        self,
        content: str | None = "Hello from the fake model.",
        *,
        usage: dict | None | bool = True,
        model: str | None = None,
        finish_reason: str | None = None,
        times: int = 1,
    ) -> FakeOpenAIServer:
        """A normal completion. ``usage=True`` computes it; a dict is sent as is; ``None`` omits it."""
        return self.push(
            Behaviour(
                "reply",
                payload={"content": content, "usage": usage, "model": model, "finish_reason": finish_reason},
            ),
            times,
        )

    def tool_calls(
        self,
        calls: list[dict],
        *,
        content: str | None = None,
        usage: dict | None | bool = True,
        times: int = 1,
    ) -> FakeOpenAIServer:
        """A completion asking for tools. Each call is ``{"name", "arguments", "id"?}``;
        ``arguments`` is sent verbatim when a string (so it can be malformed), else JSON-encoded."""
        wire = []
        for index, call in enumerate(calls):
            arguments = call.get("arguments", {})
            wire.append(
                {
                    "id": call.get("id", f"call_fake_{index}"),
                    "type": "function",
                    "function": {
                        "name": call["name"],
                        "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                    },
                }
            )
        return self.push(
            Behaviour("reply", payload={"content": content, "tool_calls": wire, "usage": usage}),
            times,
        )

    def status(
        self,
        code: int,
        *,
        retry_after: float | str | None = None,
        body: Any = None,
        times: int = 1,
    ) -> FakeOpenAIServer:
        """An error status with an OpenAI-style error body and an optional ``Retry-After``."""
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        payload = body if body is not None else {"error": {"message": f"fake error {code}", "type": "fake"}}
        return self.push(Behaviour("status", status=code, payload=payload, headers=headers), times)

    def hang(self, seconds: float, *, times: int = 1) -> FakeOpenAIServer:
        """Send nothing for ``seconds``, then a plain reply (if the client still listens)."""
        return self.push(Behaviour("hang", seconds=seconds, then=Behaviour("echo")), times)

    def drop_stream(self, after_chunks: int = 2, *, times: int = 1) -> FakeOpenAIServer:
        """A streamed answer cut off (connection closed) after ``after_chunks`` content chunks."""
        return self.push(Behaviour("drop", chunks=after_chunks), times)

    def malformed(self, body: str = '{"choices": [ this is not json', *, times: int = 1) -> FakeOpenAIServer:
        """A 200 whose body is not valid JSON."""
        return self.push(Behaviour("malformed", payload=body), times)

    def json_body(self, payload: Any, *, status: int = 200, times: int = 1) -> FakeOpenAIServer:
        """Any JSON body, e.g. a 200 without ``choices``."""
        return self.push(Behaviour("status", status=status, payload=payload), times)

    # -- serving -----------------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> Behaviour:
        with self._arrived:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
            if self.record:
                self._requests.append(request)
            self._arrived.notify_all()
            text = _last_user_text(request.body)
            for marker, behaviour in self._rules:
                if marker in text:
                    return behaviour
            if self._queue:
                return self._queue.popleft()
            model = request.body.get("model") if isinstance(request.body, dict) else None
            latency = self.latency_by_model.get(model or "")
            if latency:
                return Behaviour("hang", seconds=latency, then=self.default)
            return self.default

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _respond(self, handler: _Handler, behaviour: Behaviour, request: Any) -> None:
        if behaviour.kind == "hang":
            if self._stopping.wait(behaviour.seconds):
                return
            self._respond(handler, behaviour.then or self.default, request)
        elif behaviour.kind == "echo":
            text = _last_user_text(request)
            body = _completion(request, f"Fake reply to: {text}"[:500])
            if request.get("stream"):
                self._stream(handler, request, body, behaviour)
            else:
                handler.send_json(200, body)
        elif behaviour.kind == "reply":
            body = _completion(request, **behaviour.payload)
            if request.get("stream"):
                self._stream(handler, request, body, behaviour)
            else:
                handler.send_json(200, body)
        elif behaviour.kind == "drop":
            text = _last_user_text(request)
            self._stream(handler, request, _completion(request, f"Fake reply to: {text}"[:500]), behaviour)
        elif behaviour.kind == "status":
            handler.send_json(behaviour.status, behaviour.payload, behaviour.headers)
        elif behaviour.kind == "malformed":
            handler.send_raw(200, behaviour.payload.encode("utf-8"), "application/json")
        else:
            raise ValueError(f"unknown behaviour {behaviour.kind!r}")

    def _stream(self, handler: _Handler, request: dict, body: dict, behaviour: Behaviour) -> None:
        """``body`` (a chat.completion) as OpenAI streams it: a role chunk, content in pieces of
        a few characters, tool calls in fragments, a finish chunk, then (with
        ``stream_options.include_usage``) a usage chunk with no choices, and ``[DONE]``."""
        delay = self.stream_delay if behaviour.chunk_delay is None else behaviour.chunk_delay
        message = body["choices"][0]["message"]
        usage = body.get("usage")
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        messages = request.get("messages", [])

        def chunk(delta: dict, finish_reason: str | None = None, usage_now: dict | None = None) -> dict:
            out = {
                "id": body["id"],
                "object": "chat.completion.chunk",
                "created": body["created"],
                "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            if usage_now is not None:
                out["usage"] = usage_now
            return out

        def running(emitted: str) -> dict | None:
            if not self.stream_running_usage:
                return None
            prompt = count_message_tokens(messages)
            return {
                "prompt_tokens": prompt,
                "completion_tokens": count_tokens(emitted),
                "total_tokens": prompt + count_tokens(emitted),
            }

        content = message.get("content") or ""
        pieces = [content[i : i + 8] for i in range(0, len(content), 8)]
        if not handler.start_stream():
            return
        events = [chunk({"role": "assistant", "content": ""})]
        emitted = ""
        for piece in pieces:
            emitted += piece
            events.append(chunk({"content": piece}, usage_now=running(emitted)))
        for index, call in enumerate(message.get("tool_calls") or []):
            arguments = call["function"]["arguments"]
            events.append(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": call["function"]["name"], "arguments": ""},
                            }
                        ]
                    }
                )
            )
            for i in range(0, len(arguments), 10):
                events.append(
                    chunk(
                        {"tool_calls": [{"index": index, "function": {"arguments": arguments[i : i + 10]}}]}
                    )
                )
        events.append(chunk({}, body["choices"][0]["finish_reason"]))
        sent_content = 0
        for event in events:
            if behaviour.kind == "drop" and event["choices"][0]["delta"].get("content"):
                if sent_content >= behaviour.chunks:
                    handler.abort_stream()
                    return
                sent_content += 1
            if delay and event is not events[0] and self._stopping.wait(delay):
                return
            if not handler.send_event(json.dumps(event)):
                return
        if include_usage and usage is not None:
            final = chunk({})
            final["choices"] = []
            final["usage"] = usage
            if not handler.send_event(json.dumps(final)):
                return
        handler.send_event("[DONE]")
        handler.end_stream()


def _last_user_text(request: Any) -> str:
    messages = request.get("messages", []) if isinstance(request, dict) else []
    last_user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {})
    return content_text(last_user.get("content"))


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # hundreds of clients connect at once in the benchmarks

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out hang up mid-response; that is the point of some tests.
        pass


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAIServer
    server_version = "FakeOpenAI/1.0"
    # Headers and body go out as separate writes: without TCP_NODELAY, Nagle's algorithm
    # and the client's delayed ACK add ~40 ms to every keep-alive answer.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake.connections += 1
        self.chunked = False

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        recorded = RecordedRequest(
            method="POST",
            path=self.path,
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
            raw_body=raw,
        )
        if self.path.rstrip("/") != CHAT_PATH:
            self.send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        if not isinstance(body, dict):
            self.send_json(
                400, {"error": {"message": "body must be a JSON object", "type": "invalid_request"}}
            )
            return
        behaviour = self.fake._record(recorded)
        try:
            self.fake._respond(self, behaviour, body)
        finally:
            self.fake._done()

    def do_GET(self) -> None:
        self.send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def start_stream(self) -> bool:
        self.chunked = self.fake.stream_keep_alive
        try:
            if self.chunked:
                self.protocol_version = "HTTP/1.1"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            if self.chunked:
                self.send_header("Transfer-Encoding", "chunked")
                self.close_connection = False  # parse_request decided as HTTP/1.0 would
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def send_event(self, data: str) -> bool:
        return self._write(f"data: {data}\n\n".encode())

    def end_stream(self) -> None:
        """The chunked body's last chunk; the connection stays open for the next request."""
        if self.chunked:
            self._write(b"")

    def _write(self, data: bytes) -> bool:
        try:
            if self.chunked:
                data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False  # the client stopped reading (a cancel closes the stream)

    def abort_stream(self) -> None:
        """Cut the connection mid-stream, as a crashed upstream or a broken proxy would."""
        import socket

        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close_connection = True

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self.send_raw(status, json.dumps(payload).encode("utf-8"), "application/json", headers)

    def send_raw(
        self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) before the answer


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAIServer]:
    """A started ``FakeOpenAIServer``, stopped after the test."""
    with FakeOpenAIServer() as server:
        yield server


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a fake OpenAI chat completions API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--latency",
        action="append",
        default=[],
        metavar="MODEL=SECONDS",
        help="answer requests for MODEL after SECONDS (repeatable); others at once",
    )
    parser.add_argument("--keepalive", action="store_true", help="HTTP/1.1 keep-alive (benchmarks)")
    args = parser.parse_args()
    server = FakeOpenAIServer(args.host, args.port)
    for item in args.latency:
        model, _, seconds = item.partition("=")
        server.latency_by_model[model] = float(seconds)
    server.record = False
    if args.keepalive:
        _Handler.protocol_version = "HTTP/1.1"
    server.start()
    print(f"fake OpenAI server at {server.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
