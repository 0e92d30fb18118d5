"""Fault injection for the integration tests: a private Redis that can crash and come back,
Postgres backends killed under the app, worker processes killed with SIGKILL, and the
checks a fault test ends with (every turn ended once, billed once, ledger consistent)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg
import redis as redis_lib

from shared.settings import Settings
from tests.integration.conftest import ROOT, service_env, stop_process

FINISHED = ("completed", "failed")
CHARGE_KINDS = ("capture", "debit")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _test_services():
    """scripts/test_services.py, which knows how to install a missing server with apt-get."""
    spec = importlib.util.spec_from_file_location("test_services", ROOT / "scripts" / "test_services.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    _test_services().apt_install("redis-server")
    return shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """A private ``redis-server`` process on a fixed port that a test may crash and restart.

    It keeps an append-only file written on every command, so a restart after a crash
    comes back with everything, unless the crash also ``lose_data`` (a Redis without
    persistence, or one whose disk was lost): then it comes back empty, broker queues included.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.url(db), socket_timeout=2, socket_connect_timeout=2)

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                *("--appendonly", "yes", "--appendfsync", "always", "--save", ""),
            ],
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis_lib.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not come up; see {self.directory}")

    def crash(self, *, lose_data: bool) -> None:
        """SIGKILL: clients see their connections reset. ``lose_data``: the restart comes back empty."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if lose_data:
            shutil.rmtree(self.directory / "appendonlydir", ignore_errors=True)
            (self.directory / "dump.rdb").unlink(missing_ok=True)

    def stop(self) -> None:
        stop_process(self.process, timeout=10)


def kill_process_group(process: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session=True`` and all its children
    (a Celery prefork pool): nothing gets to clean up, acknowledge or roll back."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _plain_url(settings: Settings) -> str:
    return settings.database_url.replace("+psycopg", "")


def terminate_backends(settings: Settings, limit: int | None = None, *, wait: bool = True) -> int:
    """``pg_terminate_backend`` every other connection to the test database (web, worker,
    the test's own pools), or ``limit`` of them picked at random: what a Postgres failover,
    a proxy dropping connections or an operator's kill looks like.

    ``pg_terminate_backend`` only signals; with ``wait`` this returns once the victims have
    exited (their last words sent, their sockets closed), so "after every connection was
    killed" means after, not while the backends are still finishing their statement."""
    with psycopg.connect(_plain_url(settings), autocommit=True) as conn:
        victims = [
            pid
            for pid, killed in conn.execute(
                "SELECT pid, pg_terminate_backend(pid) FROM ("
                "  SELECT pid FROM pg_stat_activity"
                "  WHERE datname = current_database() AND pid <> pg_backend_pid()"
                "  ORDER BY random() LIMIT %s) AS victims",
                (limit,),
            ).fetchall()
            if killed
        ]
        deadline = time.monotonic() + 10
        while wait and victims and time.monotonic() < deadline:
            (alive,) = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (victims,)
            ).fetchone()
            if not alive:
                break
            time.sleep(0.01)
    return len(victims)


class BackendKiller:
    """A thread that terminates connections to the test database over and over:
    ``limit`` random ones (or all) every ``interval`` seconds."""

    def __init__(self, settings: Settings, interval: float = 0.05, limit: int | None = None) -> None:
        self.settings = settings
        self.interval = interval
        self.limit = limit
        self.killed = 0
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backend-killer", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.killed += terminate_backends(self.settings, self.limit, wait=False)
            self.rounds += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> BackendKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def query(settings: Settings, sql: str, *params) -> list[tuple]:
    """Read the database on a connection of its own (the app's pools may have been killed)."""
    with psycopg.connect(_plain_url(settings), autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def turn_states(settings: Settings, turn_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    rows = query(settings, "SELECT id, status, error_code FROM turns WHERE id = ANY(%s)", list(turn_ids))
    return {turn_id: (status, error_code) for turn_id, status, error_code in rows}


def wait_until_finished(
    settings: Settings, turn_ids: list[str], timeout: float = 60.0, *, nudge=None
) -> dict[str, tuple[str, str | None]]:
    """Poll until every turn is completed or failed. ``nudge()`` runs between polls
    (e.g. the stuck-turn recovery job, as beat would run it)."""
    deadline = time.monotonic() + timeout
    while True:
        states = turn_states(settings, turn_ids)
        if len(states) == len(turn_ids) and all(status in FINISHED for status, _ in states.values()):
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"turns did not finish: {states}")
        if nudge is not None:
            nudge()
        time.sleep(0.2)


def charges_per_turn(settings: Settings) -> Counter:
    """How many balance-changing ledger entries (capture or debit) each turn has."""
    rows = query(
        settings,
        "SELECT turn_id, count(*) FROM ledger_entries WHERE turn_id IS NOT NULL AND kind = ANY(%s) "
        "GROUP BY turn_id",
        list(CHARGE_KINDS),
    )
    return Counter(dict(rows))


def assert_each_turn_billed_once(settings: Settings, turn_ids: list[str]) -> dict:
    """Completed turns: exactly one charge, equal to the turn's cost. Failed turns: at most
    one, for the tokens they used (equal to their cost), none if they used nothing. No
    hold of a finished turn is still active."""
    states = turn_states(settings, turn_ids)
    charges = charges_per_turn(settings)
    for turn_id, (status, error_code) in states.items():
        assert status in ("completed", "failed"), f"turn {turn_id} is {status}"
        ((cost, used, charged),) = query(
            settings,
            "SELECT t.cost, t.input_tokens + t.output_tokens, "
            "(SELECT -sum(l.amount) FROM ledger_entries l WHERE l.turn_id = t.id AND l.kind = ANY(%s)) "
            "FROM turns t WHERE t.id = %s",
            list(CHARGE_KINDS),
            turn_id,
        )
        if status == "completed" or used:
            assert charges[turn_id] == 1, f"{status} turn {turn_id} charged {charges[turn_id]} times"
            assert cost == charged, f"turn {turn_id}: cost {cost} but charged {charged}"
        else:
            assert charges[turn_id] == 0, f"failed turn {turn_id} ({error_code}) used nothing but was charged"
    active = query(
        settings, "SELECT turn_id FROM holds WHERE status = 'active' AND turn_id = ANY(%s)", turn_ids
    )
    assert active == [], f"holds still active for finished turns: {active}"
    return states


def ledger_check_cli(settings: Settings) -> subprocess.CompletedProcess:
    """``tollgate ledger-check`` as an operator runs it, in its own process."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "tollgate"), "ledger-check"],
        cwd=ROOT,
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
