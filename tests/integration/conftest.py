"""Real parts: a fresh Postgres database per test session, Redis, a Celery worker process.

``make test`` exports TEST_DATABASE_URL / TEST_REDIS_URL after finding or
starting the servers (scripts/test_services.py). These fixtures never skip:
a missing server is an error, not a silent pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis as redis_lib
from sqlalchemy import text

from shared.migrations import migrate
from shared.settings import Settings, normalize_database_url
from shared.task_names import TaskName
from tests.factories import Actor, make_actor
from web.app import create_app
from worker.celery_app import create_celery_app

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _redis_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    return os.environ.get("TEST_DATABASE_URL") or DEFAULT_PG


@pytest.fixture(scope="session")
def new_pg_database(pg_server_url):
    """A factory of fresh, empty databases, dropped at the end of the session."""
    created: list[str] = []

    def make() -> str:
        name = f"tollgate_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return normalize_database_url(_with_db(pg_server_url, name))

    yield make
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        for name in created:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(scope="session")
def pg_url(new_pg_database) -> str:
    """The session's Postgres database, migrated to head with Alembic."""
    url = new_pg_database()
    migrate(Settings(database_url=url))
    return url


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    return os.environ.get("TEST_REDIS_URL") or DEFAULT_REDIS


@pytest.fixture(scope="session")
def pg_settings(pg_url, redis_server_url, tmp_path_factory) -> Settings:
    # App keys and the Celery broker live in different Redis databases, so a
    # test may flush the app's keys without wiping a running worker's queues.
    app_db = int(urlsplit(redis_server_url).path.strip("/") or 15)
    broker = _redis_db(redis_server_url, app_db - 1)
    return Settings(
        database_url=pg_url,
        redis_url=redis_server_url,
        celery_broker_url=broker,
        celery_result_backend=broker,
        var_dir=tmp_path_factory.mktemp("var"),
        turn_wait_seconds=10.0,
    )


def _truncate_all(pg_url: str) -> None:
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename <> 'alembic_version'"
            )
        ]
        if not tables:
            return
        # The live worker may still be finishing the previous test's task (e.g. a summary
        # refresh); TRUNCATE waits for it, and retries if the two deadlock.
        conn.execute("SET lock_timeout = '5s'")
        for attempt in range(5):
            try:
                conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
                return
            except (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable):
                if attempt == 4:
                    raise
                time.sleep(0.5)


def empty_stores(settings: Settings) -> None:
    """Empty the tables and the Redis database."""
    _truncate_all(settings.database_url)
    redis_lib.Redis.from_url(settings.redis_url).flushdb()


@pytest.fixture
def pg_app(pg_settings):
    """The web app on Postgres + Redis, with empty tables and an empty Redis database."""
    empty_stores(pg_settings)
    app = create_app(pg_settings)
    yield app
    app.extensions["tollgate"].close()


@pytest.fixture
def pg_client(pg_app):
    return pg_app.test_client()


@pytest.fixture
def pg_db(pg_app):
    with pg_app.extensions["tollgate"].db.session() as session:
        yield session


@pytest.fixture
def pg_admin(pg_db) -> Actor:
    return make_actor(pg_db, "admin")


@pytest.fixture
def pg_user(pg_db) -> Actor:
    return make_actor(pg_db, "user")


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a Procfile process gets for these settings, with this venv on PATH."""
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    return settings.process_env(**{"PATH": path, **extra})


def stop_process(process: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if process and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class WorkerProcess:
    """A real ``celery worker`` subprocess, started as the Procfile does."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        concurrency: int = 2,
        *,
        pool: str = "prefork",
        queues: str = "turns,summaries,files",
        **env: str,
    ):
        self.settings = settings
        self.log_path = log_path
        self.env = service_env(settings, **env)
        self.concurrency = concurrency
        self.pool = pool
        self.queues = queues
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "celery"),
                "-A",
                "worker.main",
                "worker",
                "-Q",
                self.queues,
                "--pool",
                self.pool,
                "--concurrency",
                str(self.concurrency),
                "--loglevel",
                "INFO",
                "-n",
                f"test-{uuid.uuid4().hex[:6]}@%h",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        celery_app = create_celery_app(self.settings, role="test")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early; see {self.log_path}")
            try:
                if celery_app.send_task(TaskName.PING, ignore_result=False).get(timeout=2) == "pong":
                    return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(f"worker did not answer ping in {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        stop_process(self.process, timeout=20)
        if getattr(self, "log", None):
            self.log.close()


@pytest.fixture(scope="session")
def live_worker(pg_settings, tmp_path_factory):
    """One Celery worker process for the session, on the session's Postgres and Redis."""
    worker = WorkerProcess(
        pg_settings,
        tmp_path_factory.mktemp("worker") / "worker.log",
        TURN_RETRY_BASE_SECONDS="0.2",
        TURN_LEASE_SECONDS="3",
        # Streamed offline answers at full speed; [[offline:slow=S]] slows one turn down.
        OFFLINE_STREAM_DELAY_SECONDS="0",
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def pg_engine_exec(pg_app):
    def run(sql: str, **params):
        with pg_app.extensions["tollgate"].db.engine.begin() as conn:
            return conn.execute(text(sql), params)

    return run
