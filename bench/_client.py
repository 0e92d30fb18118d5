"""A lean asyncio HTTP/1.1 load client: one keep-alive connection per simulated client, raw
streams, Content-Length bodies. httpx's async pool spends more CPU per request than the
servers under test at a few hundred concurrent clients on two cores; this one does not.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from _stack import percentile


@dataclass(frozen=True)
class Request:
    path: str
    body: dict
    headers: dict[str, str]


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: Request, timeout: float) -> tuple[int, dict | None]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(request.body).encode()
        head = "".join(f"{name}: {value}\r\n" for name, value in request.headers.items())
        self.writer.write(
            f"POST {request.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{head}\r\n".encode()
            + data
        )
        await self.writer.drain()
        return await asyncio.wait_for(self._response(), timeout)

    async def _response(self) -> tuple[int, dict | None]:
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await self.reader.read()
        if headers.get("connection", "").lower() == "close":
            self.close()
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, None

    async def post_stream(self, request: Request, timeout: float) -> tuple[int, float | None, bool]:
        """POST and read an SSE answer (chunked) to its end: ``(status, seconds to the first
        piece of text, ended well)``. OpenAI chunks (``choices[0].delta.content``) and
        Tollgate's own events (``event: delta``) both count as text; a ``data: [DONE]`` or an
        ``event: done`` whose turn completed ends it well."""
        started = time.perf_counter()
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(request.body).encode()
        head = "".join(f"{name}: {value}\r\n" for name, value in request.headers.items())
        self.writer.write(
            f"POST {request.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{head}\r\n".encode()
            + data
        )
        await self.writer.drain()
        return await asyncio.wait_for(self._stream(started), timeout)

    async def _stream(self, started: float) -> tuple[int, float | None, bool]:
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() != "chunked":
            if "content-length" in headers:
                await self.reader.readexactly(int(headers["content-length"]))
            else:
                self.close()
            return status, None, False
        first_text: float | None = None
        ok = False
        buffer = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            buffer += chunk[:-2]
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                text = block.decode()
                event = next((line[7:] for line in text.split("\n") if line.startswith("event: ")), None)
                payload = next((line[6:] for line in text.split("\n") if line.startswith("data: ")), None)
                if payload is None:
                    continue
                if payload == "[DONE]":
                    ok = True
                    continue
                try:
                    decoded = json.loads(payload)
                except ValueError:
                    continue
                if event == "done":
                    ok = decoded.get("status") == "completed"
                    continue
                if event == "delta" or (
                    event is None
                    and decoded.get("choices")
                    and (decoded["choices"][0].get("delta") or {}).get("content")
                ):
                    if first_text is None:
                        first_text = time.perf_counter() - started
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, first_text, ok

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = None


async def _drive(
    host: str,
    port: int,
    make_request: Callable[[int], Request],
    accept: Callable[[int, dict | None], bool],
    clients: int,
    seconds: float,
) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def loop(index: int) -> None:
        nonlocal errors
        connection = Connection(host, port)
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    status, body = await connection.post(make_request(index), timeout=120)
                    ok = accept(status, body)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                    connection.close()
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "rate": len(latencies) / elapsed,
        "p50": percentile(latencies, 0.5) if latencies else float("nan"),
        "p99": percentile(latencies, 0.99) if latencies else float("nan"),
        "errors": errors,
    }


def drive(host, port, make_request, accept, clients: int, seconds: float) -> dict:
    """``clients`` loops of back-to-back POSTs for ``seconds``: rate, p50, p99 (seconds), errors."""
    return asyncio.run(_drive(host, port, make_request, accept, clients, seconds))


async def _drive_stream(
    host: str, port: int, make_request: Callable[[int], Request], clients: int, seconds: float
) -> dict:
    latencies: list[float] = []
    first_tokens: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def loop(index: int) -> None:
        nonlocal errors
        connection = Connection(host, port)
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    status, first_text, ok = await connection.post_stream(make_request(index), timeout=120)
                    ok = ok and status == 200 and first_text is not None
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                    connection.close()
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                    first_tokens.append(first_text)
                else:
                    errors += 1
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    nan = float("nan")
    return {
        "rate": len(latencies) / elapsed,
        "p50": percentile(latencies, 0.5) if latencies else nan,
        "p99": percentile(latencies, 0.99) if latencies else nan,
        "ttft_p50": percentile(first_tokens, 0.5) if first_tokens else nan,
        "ttft_p99": percentile(first_tokens, 0.99) if first_tokens else nan,
        "errors": errors,
    }


def drive_stream(host, port, make_request, clients: int, seconds: float) -> dict:
    """``clients`` loops of back-to-back streamed POSTs for ``seconds``: rate, p50/p99 of the
    whole answer and of the time to its first piece of text (``ttft_*``), errors."""
    return asyncio.run(_drive_stream(host, port, make_request, clients, seconds))
