"""Requests/second of cheap authenticated reads through gunicorn, beside a bare Flask JSON
endpoint under the same gunicorn settings in the same run; and how long an enforcement
toggle takes to reach another process.

Throughput: ``GET /api/v1/admin/settings`` (admin key: the key cache, one Redis GET for the
enforcement state), ``GET /api/v1/turns/{id}`` of a completed turn (user key: the key cache,
then the body each web process kept at its first read: web/finished_turns.py) and of a
running turn (``turn_get_running``: one turn lookup in Postgres on every request) against
``GET /bare`` of ``bench/_bare_app.py`` (a static body of the same shape).
Both apps run under ``_stack.start_gunicorn`` (the Procfile's web line: gevent workers). A
small keep-alive HTTP/1.1 client (one raw socket per thread, ``--concurrency`` of them,
default 8) loads each target for ``--seconds``; the
targets are interleaved over ``--rounds`` rounds: the median round's rate is reported and
each ratio is the median of the per-round ratios (app over the same round's bare rate). The
client's own ceiling is measured against a canned-response asyncio server in another
process: if it is far above the bare rate, the client is not what limits the figures.

Propagation: ``--toggles`` real ``PATCH /api/v1/admin/settings/enforcement`` calls through
gunicorn, alternating on/off. A separate process builds its runtime the way a Celery worker
does (``create_celery_app(...).tollgate``) and calls ``enforcement.current_state`` in a
loop, printing the CLOCK_MONOTONIC time it first sees each new version. Propagation is that
time minus the time the PATCH response reached the client, floored at 0: 0 means the other
process already saw the new value when the admin got the answer.

    python bench/overhead.py [--seconds 3] [--rounds 5] [--concurrency 8] [--toggles 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from _stack import (
    bench_settings,
    env_for,
    free_port,
    fresh_database,
    percentile,
    report,
    start_gunicorn,
    stop,
    wait_ready,
)

from shared.db import utcnow
from shared.migrations import migrate
from shared.models import Turn
from shared.runtime import Runtime
from shared.services import auth, enforcement, rooms

HERE = Path(__file__).resolve().parent


# -- the load client -------------------------------------------------------------------------


class KeepAliveConnection:
    """One HTTP/1.1 keep-alive connection sending one prepared GET; just enough parsing to
    find the status and Content-Length, so the client costs little next to the server."""

    def __init__(self, port: int, request: bytes) -> None:
        self.port = port
        self.request = request
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.reconnects = 0

    def connect(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.reconnects += 1
        self.sock = socket.create_connection(("127.0.0.1", self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buffer += chunk

    def fetch(self) -> int:
        """Send the request, read the whole response; the status code."""
        try:
            self.sock.sendall(self.request)
            while (head_end := self.buffer.find(b"\r\n\r\n")) < 0:
                self._receive()
        except ConnectionError:
            # The server closed an idle keep-alive connection: reconnect once and resend.
            self.connect()
            return self.fetch()
        head = self.buffer[:head_end].lower()
        status = int(head[9:12])
        marker = head.find(b"\r\ncontent-length:")
        if marker < 0:
            raise RuntimeError(f"no Content-Length in {head[:300]!r}")
        line_end = head.find(b"\r\n", marker + 2)
        length = int(head[marker + 17 : line_end if line_end >= 0 else len(head)])
        body_end = head_end + 4 + length
        while len(self.buffer) < body_end:
            self._receive()
        self.buffer = self.buffer[body_end:]
        if b"\r\nconnection: close" in head:
            self.connect()
        return status

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def get_request(path: str, key: str | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Accept: application/json"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def load(port: int, request: bytes, concurrency: int, seconds: float) -> dict:
    """Keep ``concurrency`` connections busy for ``seconds``; rate, latency and the client's CPU."""
    connections = [KeepAliveConnection(port, request) for _ in range(concurrency)]
    for connection in connections:
        connection.connect()
    counts = [0] * concurrency
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    failures: list[str] = []
    barrier = threading.Barrier(concurrency + 1)
    deadline = 0.0

    def drive(index: int) -> None:
        connection, recorded = connections[index], latencies[index]
        barrier.wait()
        try:
            while (started := time.perf_counter()) < deadline:
                status = connection.fetch()
                recorded.append(time.perf_counter() - started)
                if status != 200:
                    failures.append(f"HTTP {status}")
                    return
                counts[index] += 1
        except Exception as exc:  # reported below: a failed run must not pass as a slow one
            failures.append(repr(exc))

    threads = [threading.Thread(target=drive, args=(index,)) for index in range(concurrency)]
    for thread in threads:
        thread.start()
    cpu_started = time.process_time()
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    for connection in connections:
        connection.close()
    if failures:
        raise RuntimeError(f"load on port {port} failed: {failures[:3]}")
    every = [value for chunk in latencies for value in chunk]
    return {
        "rate": sum(counts) / elapsed,
        "p50_ms": percentile(every, 0.5) * 1000,
        "p99_ms": percentile(every, 0.99) * 1000,
        "client_cores": cpu / elapsed,
        "reconnects": sum(connection.reconnects for connection in connections),
    }


# -- the client's ceiling: a canned answer from another process ------------------------------

CANNED_BODY = b'{"status":"ok"}'
CANNED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(CANNED_BODY)).encode()
    + b"\r\n\r\n"
    + CANNED_BODY
)


class _Canned(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        self.pending += data
        requests = self.pending.count(b"\r\n\r\n")
        if requests:
            self.pending = self.pending[self.pending.rfind(b"\r\n\r\n") + 4 :]
            self.transport.write(CANNED_RESPONSE * requests)


def serve_canned(port: int) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Canned, "127.0.0.1", port)
        print("ready", flush=True)
        await server.serve_forever()

    asyncio.run(main())


def client_ceiling(concurrency: int, seconds: float) -> float:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--canned-server", str(port)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        server.stdout.readline()
        load(port, get_request("/"), concurrency, 1)  # warm-up
        return load(port, get_request("/"), concurrency, seconds)["rate"]
    finally:
        stop([server])


# -- toggle propagation ----------------------------------------------------------------------


def run_reader() -> None:
    """Another process, built as a Celery worker builds its runtime, checking enforcement in a
    loop; one line per new version seen: ``seen <version> <enabled> <monotonic_ns> <checks>``."""
    from shared.settings import Settings
    from worker.celery_app import create_celery_app

    runtime = create_celery_app(Settings.from_env(), role="worker").tollgate
    state = enforcement.current_state(runtime)
    print(f"ready {state.version} {int(state.enabled)} {time.monotonic_ns()}", flush=True)
    last_version, checks = state.version, 0
    last_change = time.monotonic()
    while time.monotonic() - last_change < 60:  # the bench stops this process; 60 s is a guard
        state = enforcement.current_state(runtime)
        checks += 1
        if state.version != last_version:
            print(f"seen {state.version} {int(state.enabled)} {time.monotonic_ns()} {checks}", flush=True)
            last_version, last_change = state.version, time.monotonic()
    sys.exit("reader: no change for 60 s")


def measure_propagation(base: str, admin_key: str, env: dict[str, str], toggles: int) -> dict:
    reader = subprocess.Popen(
        [sys.executable, __file__, "--reader"],
        cwd=HERE,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    delays, round_trips = [], []
    try:
        ready = reader.stdout.readline().split()
        if not ready or ready[0] != "ready":
            raise RuntimeError(f"reader did not start: {ready}")
        enabled = ready[2] == "1"
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}) as client:
            for _ in range(toggles):
                enabled = not enabled
                sent = time.monotonic_ns()
                response = client.patch("/admin/settings/enforcement", json={"enabled": enabled})
                answered = time.monotonic_ns()
                if response.status_code != 200 or response.json()["enabled"] != enabled:
                    raise RuntimeError(f"PATCH failed: {response.status_code} {response.text[:300]}")
                line = reader.stdout.readline().split()
                if not line or line[0] != "seen" or (line[2] == "1") != enabled:
                    raise RuntimeError(f"reader saw {line}, expected enabled={enabled}")
                delays.append((int(line[3]) - answered) / 1e6)
                round_trips.append((answered - sent) / 1e6)
        # The reader's resolution: how long one of its checks takes, on average.
        check_interval_ms = (int(line[3]) - int(ready[3])) / 1e6 / int(line[4])
    finally:
        stop([reader])
    floored = [max(delay, 0.0) for delay in delays]
    return {
        "p50_ms": percentile(floored, 0.5),
        "p99_ms": percentile(floored, 0.99),
        "max_ms": max(floored),
        "seen_by_response": sum(delay <= 0 for delay in delays) / len(delays),
        "patch_p50_ms": percentile(round_trips, 0.5),
        "reader_check_ms": check_interval_ms,
    }


def reset_shared_override(runtime: Runtime) -> None:
    # The Redis key outlives the bench database. A stale, newer version left by an earlier
    # run would win every compare-and-set of this one, and the one this run leaves would
    # leak an override into the next bench's fresh database: drop it both ways.
    runtime.redis.delete(enforcement.REDIS_KEY)


# -- the run ---------------------------------------------------------------------------------


def seed(runtime: Runtime) -> tuple[str, str, str, str]:
    """An admin, a user with a completed turn and a running one; (admin key, user key,
    completed turn id, running turn id)."""
    with runtime.db.session() as session:
        _, admin_key = auth.create_user(session, "bench-admin@example.com", "admin")
        user, user_key = auth.create_user(session, "bench-user@example.com", "user")
        room = rooms.create_room(session, user.id, "bench")
        chat = rooms.create_session(session, user.id, room.id, None)
        now = utcnow()

        def turn_of(seq: int, status: str, content: str, **values) -> Turn:
            return Turn(
                session_id=chat.id,
                room_id=room.id,
                user_id=user.id,
                seq=seq,
                status=status,
                content=content,
                model="offline-small",
                max_output_tokens=256,
                started_at=now,
                updated_at=now,
                **values,
            )

        turn = turn_of(
            1,
            "completed",
            "What is the capital of France?",
            reply="Paris is the capital of France.",
            input_tokens=12,
            output_tokens=8,
            completed_at=now,
        )
        running = turn_of(2, "running", "And of Italy?")
        session.add_all([turn, running])
        session.commit()
        return admin_key.secret, user_key.secret, turn.id, running.id


def measure_throughput(targets: dict[str, tuple[int, bytes]], args) -> tuple[dict, dict]:
    """The median round of each target, and for each app target the median over rounds of its
    rate over the bare rate of the same round: a round's targets run seconds apart, so a load
    change on the machine moves both sides of a ratio together."""
    for port, request in targets.values():
        load(port, request, args.concurrency, 1)  # warm-up: pools, imports, first queries
    rounds: dict[str, list[dict]] = {name: [] for name in targets}
    for round_number in range(args.rounds):
        for name, (port, request) in targets.items():
            result = load(port, request, args.concurrency, args.seconds)
            rounds[name].append(result)
            print(f"  round {round_number + 1} {name}: {result['rate']:.0f} req/s", flush=True)
    # Latency and client CPU come from the same (median) round as the rate.
    medians = {
        name: sorted(results, key=lambda r: r["rate"])[len(results) // 2] for name, results in rounds.items()
    }
    ratios = {
        name: statistics.median(
            result["rate"] / bare["rate"] for result, bare in zip(results, rounds["bare"], strict=True)
        )
        for name, results in rounds.items()
        if name != "bare"
    }
    return medians, ratios


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--toggles", type=int, default=200)
    parser.add_argument("--reader", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--canned-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader:
        return run_reader()
    if args.canned_server:
        return serve_canned(args.canned_server)

    with fresh_database() as url:
        redis_url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
        # No Celery here: the broker may share the app's Redis database.
        settings = bench_settings(url, celery_broker_url=redis_url, celery_result_backend=redis_url)
        migrate(settings)
        runtime = Runtime(settings, role="bench")
        reset_shared_override(runtime)
        admin_key, user_key, turn_id, running_id = seed(runtime)
        env = env_for(settings)
        log_path = settings.var_dir / "gunicorn.log"
        with open(log_path, "wb") as log:
            web, web_port = start_gunicorn("web.wsgi:app", env, log)
            bare, bare_port = start_gunicorn("_bare_app:create_app()", env, log, pythonpath=HERE)
            try:
                wait_ready(f"http://127.0.0.1:{web_port}/api/v1/health/ready", log_path)
                wait_ready(f"http://127.0.0.1:{bare_port}/bare", log_path)
                ceiling = client_ceiling(args.concurrency, args.seconds)
                print(f"  client ceiling: {ceiling:.0f} req/s", flush=True)
                figures, ratios = measure_throughput(
                    {
                        "bare": (bare_port, get_request("/bare")),
                        "admin_settings": (web_port, get_request("/api/v1/admin/settings", admin_key)),
                        "turn_get": (web_port, get_request(f"/api/v1/turns/{turn_id}", user_key)),
                        "turn_get_running": (web_port, get_request(f"/api/v1/turns/{running_id}", user_key)),
                    },
                    args,
                )
                propagation = measure_propagation(
                    f"http://127.0.0.1:{web_port}/api/v1", admin_key, env, args.toggles
                )
            finally:
                stop([web, bare])
                reset_shared_override(runtime)
                runtime.close()
    report(
        "overhead",
        {
            "admin_settings_req_per_s": figures["admin_settings"]["rate"],
            "turn_get_req_per_s": figures["turn_get"]["rate"],
            "bare_flask_req_per_s": figures["bare"]["rate"],
            "ratio_admin_settings_to_bare": ratios["admin_settings"],
            "ratio_turn_get_to_bare": ratios["turn_get"],
            "turn_get_running_req_per_s": figures["turn_get_running"]["rate"],
            "ratio_turn_get_running_to_bare": ratios["turn_get_running"],
            "admin_settings_p50_ms": figures["admin_settings"]["p50_ms"],
            "turn_get_p50_ms": figures["turn_get"]["p50_ms"],
            "turn_get_running_p50_ms": figures["turn_get_running"]["p50_ms"],
            "bare_flask_p50_ms": figures["bare"]["p50_ms"],
            "client_ceiling_req_per_s": ceiling,
            "client_cores_used_on_bare": figures["bare"]["client_cores"],
            "toggle_propagation_p50_ms": propagation["p50_ms"],
            "toggle_propagation_p99_ms": propagation["p99_ms"],
            "toggle_propagation_max_ms": propagation["max_ms"],
            "toggle_seen_by_response_fraction": propagation["seen_by_response"],
            "toggle_patch_p50_ms": propagation["patch_p50_ms"],
            "reader_check_interval_ms": propagation["reader_check_ms"],
            "toggles": args.toggles,
            "concurrency": args.concurrency,
            "gunicorn": "the Procfile's web line",
            "cores": os.cpu_count(),
        },
    )


if __name__ == "__main__":
    main()
