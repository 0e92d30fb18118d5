"""Start a real stack for benchmarks: a fresh Postgres database, gunicorn and a Celery worker.

Uses TEST_DATABASE_URL / TEST_REDIS_URL (``make bench`` finds or starts the servers).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.migrations import migrate  # noqa: E402
from shared.settings import Settings, normalize_database_url  # noqa: E402

BIN = Path(sys.executable).parent


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(int(round(fraction * (len(ordered) - 1))), len(ordered) - 1)
    return ordered[index]


def report(name: str, figures: dict) -> None:
    """Human-readable lines plus one JSON line that ``bench/run_all.py`` collects."""
    for key, value in figures.items():
        print(f"{name}.{key}: {value:.4g}" if isinstance(value, float) else f"{name}.{key}: {value}")
    print("BENCH-JSON " + json.dumps({"bench": name, **figures}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def fresh_database():
    server = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"tollgate_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield normalize_database_url(urlunsplit(urlsplit(server)._replace(path=f"/{name}")))
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def bench_settings(database_url: str, **overrides) -> Settings:
    redis = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    app_db = int(urlsplit(redis).path.strip("/") or 15)
    broker = urlunsplit(urlsplit(redis)._replace(path=f"/{app_db - 1}"))
    settings = Settings(
        database_url=database_url,
        redis_url=redis,
        celery_broker_url=broker,
        celery_result_backend=broker,
        var_dir=Path(tempfile.mkdtemp(prefix="tollgate-bench-")),
    )
    return settings.replace(**overrides)


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    path = f"{BIN}:{os.environ.get('PATH', '')}"
    return settings.process_env(**{"LOG_LEVEL": "WARNING", "PATH": path, **extra})


def procfile_argv(name: str, env: dict[str, str]) -> list[str]:
    """The Procfile's ``name`` line as an argv, ``${VAR:-default}`` expanded from ``env``:
    benchmarks run the processes exactly as ops do (pools, sizes, worker classes)."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    commands = dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))
    command = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), commands[name])
    argv = shlex.split(command)
    argv[0] = str(BIN / argv[0])
    return argv


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process group, then SIGKILL what has not left after 20 s."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_ready(url: str, log_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer 200; see {log_path}")


def start_gunicorn(
    app_spec: str, env: dict[str, str], log, *, pythonpath: Path | None = None
) -> tuple[subprocess.Popen, int]:
    """Start the Procfile's ``web`` line on a free port, serving ``app_spec`` (so every app
    benchmarked runs under the same server settings); (process, port)."""
    port = free_port()
    env = {**env, "PORT": str(port)}
    argv = procfile_argv("web", env)
    argv[argv.index("web.wsgi:app")] = app_spec
    if pythonpath is not None:
        argv += ["--pythonpath", str(pythonpath)]
    process = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return process, port


@contextmanager
def running_stack(settings: Settings, *, celery_worker: bool = True, **extra_env: str):
    """Yield the base URL of the Procfile's ``web`` (+ its turn ``worker`` unless
    ``celery_worker=False``) on ``settings``, migrated here."""
    migrate(settings)
    env = env_for(settings, **extra_env)
    log_path = settings.var_dir / "stack.log"
    log = open(log_path, "wb")  # noqa: SIM115
    web, port = start_gunicorn("web.wsgi:app", env, log)
    processes = [web]
    if celery_worker:
        argv = procfile_argv("worker", env)
        argv[argv.index("INFO")] = "WARNING"
        processes.append(
            subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        wait_ready(f"{base}/health/ready", log_path)
        yield base
    finally:
        stop(processes)
        log.close()
