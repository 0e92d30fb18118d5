"""A fake OpenAI-compatible upstream for benchmarks: asyncio, HTTP/1.1 keep-alive, thousands of
requests in flight in one process, so the upstream is never what limits a benchmark.

    python bench/_upstream.py --port 8765 --latency bench-1s=1 --latency bench-instant=0

``POST /v1/chat/completions`` answers a short reply with ``usage`` counted by the same rule
as the offline model, after the latency configured for the request's model. ``GET
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
    def __init__(self, latency_by_model: dict[str, float]) -> None:
        self.latency_by_model = latency_by_model
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


async def serve(port: int, latency_by_model: dict[str, float]) -> None:
    upstream = Upstream(latency_by_model)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", port, backlog=4096)
    print(f"bench upstream on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", action="append", default=[], metavar="MODEL=SECONDS")
    args = parser.parse_args()
    latencies = {model: float(seconds) for model, _, seconds in (x.partition("=") for x in args.latency)}
    asyncio.run(serve(args.port, latencies))


if __name__ == "__main__":
    main()
