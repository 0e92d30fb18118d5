"""Turns at I/O speed (issue 12), with the Procfile's own pools: one gunicorn gevent web
process and one Celery gevent turn worker keep many model calls in flight at once, and a
SIGKILLed turn worker strands nothing for long. Not timed: the fake upstream counts the
requests it is answering at once."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis as redis_lib

from shared.services import pricing, turn_runner
from tests.integration.conftest import ROOT, WorkerProcess, service_env, stop_process
from tests.integration.faults import assert_each_turn_billed_once, query, wait_until_finished
from tests.integration.test_enforced_turns_pg import enforced, grant  # noqa: F401 - fixture
from tests.integration.test_faults_pg import assert_ledger_check_passes
from tests.integration.test_procfile import free_port, procfile
from worker.celery_app import create_celery_app

pytest_plugins = ["tests.fakes.openai_server"]

SLOW_MODEL = "slow-model"


def expand(command: str, env: dict[str, str]) -> list[str]:
    command = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), command)
    return shlex.split(command)


@pytest.fixture
def upstream(fake_openai):
    # Long enough that every turn of a test is admitted before the first one's answer.
    fake_openai.latency_by_model[SLOW_MODEL] = 8.0
    return fake_openai


@pytest.fixture
def io_settings(pg_settings):
    """The session's database and app Redis, with a broker of their own: the session's live
    (prefork, offline-model) worker must not take these turns."""
    app_db = int(urlsplit(pg_settings.redis_url).path.strip("/") or 15)
    broker = urlunsplit(urlsplit(pg_settings.redis_url)._replace(path=f"/{app_db - 2}"))
    redis_lib.Redis.from_url(broker).flushdb()
    return pg_settings.replace(celery_broker_url=broker, celery_result_backend=broker)


@pytest.fixture
def io_env(pg_settings, upstream):
    return dict(
        MODEL_PROVIDER="openai",
        OPENAI_BASE_URL=upstream.base_url,
        OPENAI_API_KEY="k",
        TURN_LEASE_SECONDS="3",
        TURN_RETRY_BASE_SECONDS="0.2",
    )


@pytest.fixture
def turn_worker(io_settings, tmp_path, io_env):
    """The Procfile's ``worker`` line: a gevent pool on turns and summaries."""
    started: list[WorkerProcess] = []

    def start(**env: str) -> WorkerProcess:
        worker = WorkerProcess(
            io_settings,
            tmp_path / f"turn-worker-{len(started)}.log",
            concurrency=200,
            pool="gevent",
            queues="turns,summaries",
            **{**io_env, **env},
        )
        started.append(worker)
        worker.start()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def web(io_settings, tmp_path, io_env):
    """The Procfile's ``web`` line with one gevent worker process."""
    port = free_port()
    env = service_env(io_settings, PORT=str(port), WEB_CONCURRENCY="1", **io_env)
    log = open(tmp_path / "web.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        expand(procfile()["web"], env),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/api/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield base
    stop_process(process, timeout=20)
    log.close()


@pytest.fixture
def funded_slow_model(pg_client, pg_admin, pg_user, pg_db, enforced):  # noqa: F811
    pricing.set_price(pg_db, pg_admin.id, SLOW_MODEL, Decimal("0.001000"), Decimal("0.002000"))
    grant(pg_client, pg_admin, pg_user.id, "100")


def new_sessions(base: str, actor, count: int) -> list[str]:
    with httpx.Client(base_url=base, headers=actor.headers, timeout=30) as client:
        room = client.post("/rooms", json={"name": "io"}).json()
        return [client.post(f"/rooms/{room['id']}/sessions", json={}).json()["id"] for _ in range(count)]


def test_one_web_and_one_worker_process_keep_every_sync_turn_s_model_call_in_flight(
    web, turn_worker, upstream, funded_slow_model, pg_user
):
    """40 clients each wait on a sync POST turn; the upstream answers after 8 s. With the
    gevent pools all 40 model calls are in flight at once (a thread or process per turn
    would cap it at the pool size), and all 40 turns complete, billed."""
    turn_worker()
    clients = 40
    sessions = new_sessions(web, pg_user, clients)

    def sync_turn(index: int) -> httpx.Response:
        with httpx.Client(base_url=web, headers=pg_user.headers, timeout=60) as client:
            return client.post(
                f"/sessions/{sessions[index]}/turns",
                json={"content": f"question {index}", "model": SLOW_MODEL, "max_output_tokens": 32},
            )

    with ThreadPoolExecutor(clients) as pool:
        responses = list(pool.map(sync_turn, range(clients)))
    assert [r.status_code for r in responses] == [201] * clients
    assert {r.json()["status"] for r in responses} == {"completed"}
    assert upstream.peak_in_flight == clients


def test_sigkill_of_the_turn_worker_with_50_turns_in_flight_strands_none(
    pg_settings, io_settings, web, turn_worker, upstream, funded_slow_model, pg_user
):
    """50 turns are waiting on the upstream when the worker's main process is SIGKILLed.
    Leases lapse (3 s here), the recovery job re-sends the turns, a new worker takes them
    over: every turn ends within 60 s of the new worker starting, billed at most once, no
    hold left active, ledger-check clean."""
    first = turn_worker()
    sessions = new_sessions(web, pg_user, 50)
    upstream.latency_by_model[SLOW_MODEL] = 5.0
    with httpx.Client(base_url=web, headers={**pg_user.headers, "Prefer": "respond-async"}, timeout=30) as c:
        turn_ids = [
            c.post(
                f"/sessions/{session}/turns",
                json={"content": f"slow question {n}", "model": SLOW_MODEL, "max_output_tokens": 32},
            ).json()["id"]
            for n, session in enumerate(sessions)
        ]
    upstream.wait_for_requests(50, timeout=30)
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait()
    assert {row[0] for row in query(pg_settings, "SELECT status FROM turns")} == {"running"}

    upstream.latency_by_model[SLOW_MODEL] = 0.5
    turn_worker()
    started = time.monotonic()
    # Beat's recovery job, on this test's broker.
    celery_app = create_celery_app(io_settings, role="beat")
    last = [0.0]

    def recover() -> None:
        if time.monotonic() - last[0] >= 1.0:
            last[0] = time.monotonic()
            turn_runner.recover_stuck_turns(celery_app.tollgate, celery_app, queued_grace_seconds=1.0)

    states = wait_until_finished(pg_settings, turn_ids, timeout=60, nudge=recover)
    celery_app.tollgate.close()
    assert time.monotonic() - started < 60
    assert {state for state, _ in states.values()} <= {"completed", "failed"}
    assert_each_turn_billed_once(pg_settings, turn_ids)
    assert query(pg_settings, "SELECT count(*) FROM holds WHERE status = 'active'") == [(0,)]
    assert_ledger_check_passes(pg_settings)


def test_a_turn_past_the_soft_time_limit_fails_under_the_gevent_pool_too(
    pg_settings, io_settings, web, turn_worker, upstream, funded_slow_model, pg_user
):
    """Celery's gevent pool only enforces hard limits; the task raises the soft one itself,
    so the turn ends ``turn_timeout`` (not left ``running`` for a takeover)."""
    turn_worker(TASK_SOFT_TIME_LIMIT_SECONDS="3")
    (session,) = new_sessions(web, pg_user, 1)
    with httpx.Client(base_url=web, headers={**pg_user.headers, "Prefer": "respond-async"}, timeout=30) as c:
        turn_id = c.post(
            f"/sessions/{session}/turns", json={"content": "a slow one", "model": SLOW_MODEL}
        ).json()["id"]
    states = wait_until_finished(pg_settings, [turn_id], timeout=30)
    assert states[turn_id] == ("failed", "turn_timeout")
    assert_each_turn_billed_once(pg_settings, [turn_id])
    assert query(pg_settings, "SELECT count(*) FROM holds WHERE status = 'active'") == [(0,)]
