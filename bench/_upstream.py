"""A fake OpenAI-compatible upstream for benchmarks: asyncio, HTTP/1.1 keep-alive, thousands of
requests in flight in one process, so the upstream is never what limits a benchmark.

    python bench/_upstream.py --port 8765 --latency bench-1s=1 --latency bench-instant=0

``POST /v1/chat/completions`` answers a short reply with ``usage`` counted by the same rule
as the offline model. The latency configured for the request's model is when its answer is
complete, streamed or not: a model takes as long to write an answer whether it hands it out
in pieces or in one. Without ``"stream"`` the reply goes out after that latency; with
``"stream": true`` as OpenAI's SSE chunks (HTTP/1.1 chunked) leading up to it,
``--chunk-delay`` seconds apart (default 0.02; closer when the latency is shorter than the
chunks need, so the instant model streams at once), then the usage chunk and ``[DONE]``.
(Until 2026-12-02 the stream *started* after the latency, so a streamed answer took 0.14 s
longer than the same answer unstreamed; Tollgate streams every model call, LiteLLM's clients
here do not, which charged Tollgate alone with 0.14 s of fake generation a call.) ``GET
/stats`` returns ``{"requests": n, "in_flight": n, "peak_in_flight": n}``.
(tests/fakes/openai_server.py is the scriptable one the tests use; it is thread-per-connection.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.providers.tokens import count_message_tokens, count_tokens  # noqa: E402


class Upstream:
    def __init__(self, latency_by_model: dict[str, float], chunk_delay: float = 0.02) -> None:
        self.latency_by_model = latency_by_model
        self.chunk_delay = chunk_delay
        self.requests = 0
        self.in_flight = 0
        self.peak_in_flight = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                if method == "POST" and (b'"stream": true' in body or b'"stream":true' in body):
                    await self.stream(body, writer)
                    continue
                status, payload = await self.answer(method, path, body)
                data = json.dumps(payload).encode()
                writer.write(
                    f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method == "GET" and path.startswith("/stats"):
            return 200, {
                "requests": self.requests,
                "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight,
            }
        if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
            return 404, {"error": {"message": "no route", "type": "not_found"}}
        request = json.loads(body or b"{}")
        self.requests += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            latency = self.latency_by_model.get(request.get("model", ""), 0.0)
            if latency:
                await asyncio.sleep(latency)
        finally:
            self.in_flight -= 1
        messages = request.get("messages") or []
        content = "Paris is the capital of France."
        prompt_tokens = count_message_tokens(messages)
        completion_tokens = count_tokens(content)
        return 200, {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model"),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def stream(self, body: bytes, writer: asyncio.StreamWriter) -> None:
        """The answer of ``answer`` as SSE chunks over chunked transfer encoding."""
        request = json.loads(body or b"{}")
        self.requests += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            content = "Paris is the capital of France."
            base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time())}
            base["model"] = request.get("model")
            words = [word + " " for word in content.split(" ")]
            words[-1] = words[-1].rstrip()
            events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
            events += [{**base, "choices": [{"index": 0, "delta": {"content": word}}]} for word in words]
            events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            if (request.get("stream_options") or {}).get("include_usage"):
                prompt_tokens = count_message_tokens(request.get("messages") or [])
                completion_tokens = count_tokens(content)
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                events.append({**base, "choices": [], "usage": usage})
            # The last text chunk lands at the model's latency, the first `gaps` chunk delays before.
            latency = self.latency_by_model.get(request.get("model", ""), 0.0)
            gaps = len(words) - 1
            gap = min(self.chunk_delay, latency / gaps) if gaps else 0.0
            if latency - gap * gaps > 0:
                await asyncio.sleep(latency - gap * gaps)
            for index, event in enumerate(events):
                if 1 < index <= len(words) and gap:
                    await asyncio.sleep(gap)
                data = f"data: {json.dumps(event)}\n\n".encode()
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                await writer.drain()
            done = b"data: [DONE]\n\n"
            writer.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
            await writer.drain()
        finally:
            self.in_flight -= 1


async def serve(port: int, latency_by_model: dict[str, float], chunk_delay: float = 0.02) -> None:
    upstream = Upstream(latency_by_model, chunk_delay)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", port, backlog=4096)
    print(f"bench upstream on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", action="append", default=[], metavar="MODEL=SECONDS")
    parser.add_argument("--chunk-delay", type=float, default=0.02, help="seconds between streamed chunks")
    args = parser.parse_args()
    latencies = {model: float(seconds) for model, _, seconds in (x.partition("=") for x in args.latency)}
    asyncio.run(serve(args.port, latencies, args.chunk_delay))


if __name__ == "__main__":
    main()
