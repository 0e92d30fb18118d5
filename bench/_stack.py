"""Start a real stack for benchmarks: a fresh Postgres database, gunicorn and a Celery worker.

Uses TEST_DATABASE_URL / TEST_REDIS_URL (``make bench`` finds or starts the servers).
"""

from __future__ import annotations

import json
import os
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

from shared.cli import migrate  # noqa: E402
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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "CELERY_"))}
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url or "",
        CELERY_BROKER_URL=settings.broker_url,
        CELERY_RESULT_BACKEND=settings.result_backend,
        TOLLGATE_VAR_DIR=str(settings.var_dir),
        LOG_LEVEL="WARNING",
        PATH=f"{BIN}:{os.environ.get('PATH', '')}",
    )
    env.update(extra)
    return env


@contextmanager
def running_stack(settings: Settings, *, web_workers: int = 2, worker_concurrency: int = 2, **extra_env: str):
    """Yield the base URL of gunicorn + a worker on ``settings`` (already migrated here)."""
    migrate(settings)
    port = free_port()
    env = env_for(settings, **extra_env)
    log = open(settings.var_dir / "stack.log", "wb")  # noqa: SIM115
    processes = [
        subprocess.Popen(
            [
                str(BIN / "gunicorn"),
                "web.wsgi:app",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                str(web_workers),
                "--threads",
                "4",
                "--timeout",
                "120",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ),
        subprocess.Popen(
            [
                str(BIN / "celery"),
                "-A",
                "worker.main",
                "worker",
                "-Q",
                "turns,summaries,files",
                "--concurrency",
                str(worker_concurrency),
                "--loglevel",
                "WARNING",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ),
    ]
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health/ready?worker=true", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise RuntimeError(f"stack did not become ready; see {settings.var_dir / 'stack.log'}")
        yield base
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        log.close()
