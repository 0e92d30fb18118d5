"""Fault tests on real processes: Redis crashing mid-flight, Postgres connections killed under
the web app and the worker, a worker SIGKILLed mid-turn, a model provider that never answers.

Each one ends with the same checks: every turn reaches a terminal state, a completed turn is
charged exactly once (and a failed one never), no hold stays reserved, ``tollgate
ledger-check`` passes, and the same web app and worker serve again without a restart. While a
dependency is down the API answers JSON (503 where it cannot serve), never a 500 or HTML.

The fault tests get a private ``redis-server`` (so one can crash it) and their own worker
processes (so one can kill them); the database is the session's Postgres database.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError

from shared.runtime import Runtime
from shared.services import turn_runner
from shared.task_names import TaskName
from tests.integration.conftest import WorkerProcess
from tests.integration.faults import (
    BackendKiller,
    RedisServer,
    assert_each_turn_billed_once,
    kill_process_group,
    ledger_check_cli,
    query,
    terminate_backends,
    turn_states,
    wait_until_finished,
)
from web.app import create_app
from worker.celery_app import create_celery_app

pytest_plugins = ["tests.fakes.openai_server"]  # the fake_openai fixture

# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fault_settings(pg_settings, private_redis):
    # App keys in db 1, broker and results in db 0 of the private Redis.
    return pg_settings.replace(
        redis_url=private_redis.url(1),
        celery_broker_url=private_redis.url(0),
        celery_result_backend=private_redis.url(0),
    )


@pytest.fixture
def fault_app(pg_app, fault_settings, private_redis):
    """The web app on the private Redis; ``pg_app`` has emptied the tables."""
    private_redis.client().flushall()  # no worker is running between tests
    app = create_app(fault_settings)
    yield app
    app.extensions["tollgate"].close()


@pytest.fixture
def client(fault_app):
    return fault_app.test_client()


@pytest.fixture
def start_worker(fault_settings, tmp_path):
    """Start a real Celery worker process on the fault settings; all are stopped after the test."""
    started: list[WorkerProcess] = []

    def start(concurrency: int = 2, **env: str) -> WorkerProcess:
        worker = WorkerProcess(
            fault_settings,
            tmp_path / f"worker-{len(started)}.log",
            concurrency,
            TURN_RETRY_BASE_SECONDS="0.2",
            # Short leases: a killed worker's turns are taken over within seconds.
            TURN_LEASE_SECONDS="2",
            **env,
        )
        started.append(worker)
        worker.start()
        return worker

    yield start
    for worker in started:
        worker.stop()
        if worker.process.poll() is None:
            kill_process_group(worker.process)


@pytest.fixture
def funded(client, pg_admin, pg_user):
    """Enforcement on and 100 credits: every turn reserves a hold, so holds are checked too."""
    response = client.patch(
        "/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers
    )
    assert response.status_code == 200, response.get_json()
    response = client.post(
        f"/api/v1/admin/users/{pg_user.id}/grants", json={"amount": "100"}, headers=pg_admin.headers
    )
    assert response.status_code == 201, response.get_json()


# -- helpers ----------------------------------------------------------------------------------


def new_chat(client, actor) -> dict:
    room = client.post("/api/v1/rooms", json={"name": "faults"}, headers=actor.headers).get_json()
    return client.post(f"/api/v1/rooms/{room['id']}/sessions", json={}, headers=actor.headers).get_json()


def post_turn(client, actor, chat, content, *, wait=False, key=None):
    headers = dict(actor.headers)
    if not wait:
        headers["Prefer"] = "respond-async"
    if key:
        headers["Idempotency-Key"] = key
    return client.post(f"/api/v1/sessions/{chat['id']}/turns", json={"content": content}, headers=headers)


def submit(client, actor, chat, content) -> str:
    response = post_turn(client, actor, chat, content)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def assert_json_error(response, status: int, error: str) -> None:
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:500])
    assert response.mimetype == "application/json"
    assert response.get_json()["error"] == error


def wait_for_status(settings, turn_ids, status, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while {state for state, _ in turn_states(settings, turn_ids).values()} != {status}:
        assert time.monotonic() < deadline, turn_states(settings, turn_ids)
        time.sleep(0.05)


def recovery_job(app, settings=None, every: float = 1.0):
    """``recover_stuck_turns`` as beat runs it, but with a 1 s grace instead of 30 s, at most
    once per ``every`` seconds."""
    runtime = app.extensions["tollgate"] if settings is None else Runtime(settings, role="beat")
    last = [0.0]

    def run() -> None:
        if time.monotonic() - last[0] >= every:
            last[0] = time.monotonic()
            turn_runner.recover_stuck_turns(runtime, app.extensions["celery"], queued_grace_seconds=1.0)

    return run


def assert_ledger_check_passes(settings) -> None:
    result = ledger_check_cli(settings)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok:")


def wait_until_ready(client, admin, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/api/v1/health/ready?worker=true", headers=admin.headers)
        if response.status_code == 200:
            return response.get_json()
        assert time.monotonic() < deadline, response.get_json()
        time.sleep(0.5)


# -- Redis ------------------------------------------------------------------------------------


@pytest.mark.parametrize("lose_data", [False, True], ids=["restarted-with-its-data", "restarted-empty"])
def test_a_redis_crash_mid_flight_loses_no_turn_and_bills_none_twice(
    lose_data, fault_app, client, fault_settings, private_redis, start_worker, funded, pg_admin, pg_user
):
    worker = start_worker(concurrency=2)
    chats = [new_chat(client, pg_user) for _ in range(2)]
    in_flight = [submit(client, pg_user, chat, "slow [[offline:sleep=2]]") for chat in chats]
    waiting = [submit(client, pg_user, chats[n % 2], f"queued question {n}") for n in range(4)]
    wait_for_status(fault_settings, in_flight, "running")

    private_redis.crash(lose_data=lose_data)

    # Down: submission still works (the turn is stored; its task is re-sent later) ...
    during = post_turn(client, pg_user, chats[0], "asked while redis is down")
    assert during.status_code == 202, during.get_json()
    assert during.get_json()["status"] == "queued"
    # ... reads need only Postgres ...
    assert client.get(f"/api/v1/turns/{in_flight[0]}", headers=pg_user.headers).status_code == 200
    # ... and what needs Redis says so in JSON.
    toggle = client.patch(
        "/api/v1/admin/settings/enforcement", json={"enabled": False}, headers=pg_admin.headers
    )
    assert_json_error(toggle, 503, "enforcement_store_unavailable")
    ready = client.get("/api/v1/health/ready", headers=pg_admin.headers)
    assert_json_error(ready, 503, "not_ready")
    assert {"redis", "broker"} <= set(ready.get_json()["down"])

    private_redis.start()

    if not lose_data:
        # The broker kept its queue: the worker reconnects and runs it, no recovery job needed.
        states = wait_until_finished(fault_settings, in_flight + waiting, timeout=60)
        assert {status for status, _ in states.values()} == {"completed"}, states
    # A lost queue, and the turn whose task could not be sent, need the recovery job.
    turn_ids = in_flight + waiting + [during.get_json()["id"]]
    states = wait_until_finished(fault_settings, turn_ids, timeout=90, nudge=recovery_job(fault_app))
    assert {status for status, _ in states.values()} == {"completed"}, states
    assert_each_turn_billed_once(fault_settings, turn_ids)
    assert_ledger_check_passes(fault_settings)

    # The same web app and worker process serve again.
    assert worker.process.poll() is None
    wait_until_ready(client, pg_admin)
    after = post_turn(client, pg_user, chats[1], "asked after the restart", wait=True)
    assert after.status_code == 201 and after.get_json()["status"] == "completed", after.get_json()
    toggle = client.patch(
        "/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers
    )
    assert toggle.status_code == 200 and "X-Enforcement-Stale" not in toggle.headers


# -- Postgres ---------------------------------------------------------------------------------


def test_with_postgres_unreachable_the_api_answers_503_json(fault_settings, pg_user):
    app = create_app(fault_settings.replace(database_url="postgresql+psycopg://postgres@127.0.0.1:1/gone"))
    client = app.test_client()
    try:
        assert_json_error(client.get("/api/v1/auth/me", headers=pg_user.headers), 503, "service_unavailable")
        turn = client.post(
            f"/api/v1/sessions/{uuid.uuid4()}/turns", json={"content": "hi"}, headers=pg_user.headers
        )
        assert_json_error(turn, 503, "service_unavailable")
        assert_json_error(client.get("/api/v1/health/ready"), 503, "not_ready")
        assert client.get("/api/v1/health").status_code == 200  # liveness needs nothing
    finally:
        app.extensions["tollgate"].close()


def test_requests_after_every_database_connection_was_killed_succeed(
    client, fault_settings, start_worker, funded, pg_user
):
    start_worker(concurrency=1)
    chat = new_chat(client, pg_user)
    first = post_turn(client, pg_user, chat, "warm up the pools", wait=True)
    assert first.status_code == 201, first.get_json()

    # Web pool, worker pool, everything: as after a Postgres failover.
    assert terminate_backends(fault_settings) >= 2

    assert client.get("/api/v1/auth/me", headers=pg_user.headers).status_code == 200
    second = post_turn(client, pg_user, chat, "after the kill", wait=True)
    assert second.status_code == 201 and second.get_json()["status"] == "completed", second.get_json()
    assert_each_turn_billed_once(fault_settings, [first.get_json()["id"], second.get_json()["id"]])
    assert_ledger_check_passes(fault_settings)


def test_a_server_killing_each_new_connection_at_checkout_gives_503s_then_serves_again(
    client, fault_app, pg_user
):
    # The pool finds its connection dead at checkout and the fresh one it opens in its place
    # dead too (a killer faster than the reconnect, as under test_connections_killed_… below):
    # SQLAlchemy gives up with a bare InvalidRequestError, which must read as "unavailable".
    pool = fault_app.extensions["tollgate"].db.engine.pool
    checks = []

    def dead_on_checkout(*_args):
        checks.append(1)
        raise DisconnectionError("killed before use")

    event.listen(pool, "checkout", dead_on_checkout)
    try:
        for path in ("/api/v1/wallet", "/api/v1/auth/me"):
            assert_json_error(client.get(path, headers=pg_user.headers), 503, "service_unavailable")
        assert len(checks) >= 4  # each request: the pooled connection, then a fresh one
    finally:
        event.remove(pool, "checkout", dead_on_checkout)
    assert pool.checkedout() == 0
    assert client.get("/api/v1/wallet", headers=pg_user.headers).status_code == 200


def test_connections_killed_under_concurrent_requests_and_turns_give_503s_never_500s(
    fault_app, fault_settings, start_worker, funded, pg_admin, pg_user
):
    start_worker(concurrency=2)
    setup = fault_app.test_client()
    chats = [new_chat(setup, pg_user) for _ in range(4)]
    run = uuid.uuid4().hex[:8]

    def turn(n):
        return post_turn(
            fault_app.test_client(), pg_user, chats[n % 4], f"question {n}", key=f"{run}-turn-{n}"
        )

    def grant(n):
        return fault_app.test_client().post(
            f"/api/v1/admin/users/{pg_user.id}/grants",
            json={"amount": "1"},
            headers={**pg_admin.headers, "Idempotency-Key": f"{run}-grant-{n}"},
        )

    def read(n):
        path = ("/api/v1/auth/me", "/api/v1/wallet", f"/api/v1/sessions/{chats[n % 4]['id']}/turns")[n % 3]
        return fault_app.test_client().get(path, headers=pg_user.headers)

    operations = [(kind, n) for n in range(24) for kind in (turn, grant, read)]
    with BackendKiller(fault_settings, interval=0.03, limit=1) as killer, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda op: (op, op[0](op[1])), operations))
    assert killer.killed > 0
    assert fault_app.extensions["tollgate"].db.engine.pool.checkedout() == 0  # none leaked

    for (kind, n), response in responses:
        assert response.mimetype == "application/json", response.get_data(as_text=True)[:300]
        assert response.status_code in (200, 201, 202, 503), (kind.__name__, n, response.get_json())
        if response.status_code == 503:
            assert response.get_json()["error"] == "service_unavailable"

    # A client retries what got a 503 with the same Idempotency-Key; it never gets a second one.
    for (kind, n), response in responses:
        if response.status_code == 503 and kind in (turn, grant):
            retried = kind(n)
            assert retried.status_code in (200, 201, 202), retried.get_json()

    turn_ids = [row[0] for row in query(fault_settings, "SELECT id FROM turns WHERE kind = 'chat'")]
    assert len(turn_ids) == 24
    grants = query(fault_settings, "SELECT count(*) FROM ledger_entries WHERE kind = 'grant'")[0][0]
    assert grants == 1 + 24
    # A turn whose request died after its commit but before its enqueue waits for the
    # recovery job; a turn whose task lost its connection must finish on its own.
    states = wait_until_finished(fault_settings, turn_ids, timeout=60, nudge=recovery_job(fault_app))
    assert {status for status, _ in states.values()} == {"completed"}, states
    assert_each_turn_billed_once(fault_settings, turn_ids)
    assert_ledger_check_passes(fault_settings)


def test_a_worker_that_loses_its_database_connections_mid_turn_finishes_each_turn_once(
    client, fault_settings, start_worker, funded, pg_user
):
    start_worker(concurrency=2)
    chats = [new_chat(client, pg_user) for _ in range(3)]
    turn_ids = [submit(client, pg_user, chats[n % 3], f"busy turn {n}") for n in range(12)]
    # Kill every connection every 20 ms while the worker claims, reads context and settles.
    with BackendKiller(fault_settings, interval=0.02) as killer:
        time.sleep(3)
    assert killer.killed > 0
    # No recovery job here: the worker itself must not leave a turn stuck in "running".
    states = wait_until_finished(fault_settings, turn_ids, timeout=60)
    assert {status for status, _ in states.values()} == {"completed"}, states
    assert_each_turn_billed_once(fault_settings, turn_ids)
    assert_ledger_check_passes(fault_settings)


# -- worker -----------------------------------------------------------------------------------


def test_a_worker_killed_mid_turn_is_taken_over_and_the_turn_billed_once(
    fault_app, client, fault_settings, start_worker, funded, pg_user
):
    first = start_worker(concurrency=1)
    chat = new_chat(client, pg_user)
    turn_id = submit(client, pg_user, chat, "long answer [[offline:sleep=3]]")
    wait_for_status(fault_settings, [turn_id], "running")

    kill_process_group(first.process)  # the main process and its prefork child, no goodbyes
    assert turn_states(fault_settings, [turn_id])[turn_id][0] == "running"

    start_worker(concurrency=1)
    # Beat's recovery job re-sends the turn once its lease (2 s here) lapsed.
    recover = recovery_job(fault_app)
    states = wait_until_finished(fault_settings, [turn_id], timeout=60, nudge=recover)
    assert states[turn_id] == ("completed", None)
    assert query(fault_settings, "SELECT attempts FROM turns WHERE id = %s", turn_id) == [(2,)]

    # A stale copy of the turn's task (an enqueue retried, a beat re-send racing another) changes
    # nothing.
    fault_app.extensions["celery"].send_task(TaskName.RUN_TURN, args=[turn_id], kwargs={"takeover": True})
    after = post_turn(client, pg_user, chat, "the next question", wait=True)
    assert after.status_code == 201 and after.get_json()["status"] == "completed"
    assert query(fault_settings, "SELECT attempts FROM turns WHERE id = %s", turn_id) == [(2,)]
    assert_each_turn_billed_once(fault_settings, [turn_id, after.get_json()["id"]])
    assert_ledger_check_passes(fault_settings)


# -- provider ---------------------------------------------------------------------------------


def test_a_hanging_provider_fails_the_turn_unbilled_and_leaves_the_worker_free(
    fake_openai, client, fault_settings, start_worker, funded, pg_user
):
    from tests.fakes.openai_server import Behaviour  # after pytest registered the plugin

    fake_openai.when("[[hang]]", Behaviour("hang", seconds=120))
    start_worker(
        concurrency=1,
        MODEL_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.base_url,
        OPENAI_TIMEOUT_SECONDS="0.5",
    )
    chat, other_chat = new_chat(client, pg_user), new_chat(client, pg_user)
    hanging = submit(client, pg_user, chat, "this one never gets an answer [[hang]]")
    # One worker slot: the next turn is served while the hanging one waits to retry.
    normal = submit(client, pg_user, other_chat, "an ordinary question")

    states = wait_until_finished(fault_settings, [hanging, normal], timeout=90)
    assert states[normal] == ("completed", None)
    assert states[hanging] == ("failed", "provider_timeout")
    finished = dict(query(fault_settings, "SELECT id, completed_at FROM turns"))
    assert finished[normal] < finished[hanging]  # not stuck behind the hanging turn
    hung = [r for r in fake_openai.requests if "[[hang]]" in str(r.body)]
    # 3 attempts per model call, the task tried 4 times (3 retries): then it gives up.
    assert len(hung) == 12
    # Users read a generic message; the provider's own text stays in the worker's log.
    (message,) = query(fault_settings, "SELECT error_message FROM turns WHERE id = %s", hanging)[0]
    assert message == "The model provider did not answer in time."

    assert_each_turn_billed_once(fault_settings, [hanging, normal])
    assert_ledger_check_passes(fault_settings)
    after = post_turn(client, pg_user, other_chat, "and one more", wait=True)
    assert after.status_code == 201 and after.get_json()["status"] == "completed"


class _OverTimeProvider:
    """Stands in for model rounds that together outlast the task's soft time limit."""

    name = "overtime"
    supports_tools = False

    def complete(self, *_args, **_kwargs):
        raise SoftTimeLimitExceeded()


def test_a_turn_outliving_the_soft_time_limit_fails_unbilled_instead_of_waiting_for_recovery(
    fault_app, client, fault_settings, funded, pg_user
):
    turn_id = submit(client, pg_user, new_chat(client, pg_user), "a question with too many slow rounds")
    celery_app = create_celery_app(fault_settings)
    celery_app.loader.import_default_modules()
    celery_app.tollgate.provider = _OverTimeProvider()

    # The task as the worker runs it, in this process, with the provider above.
    assert celery_app.tasks[TaskName.RUN_TURN].apply(args=[turn_id]).get() == "failed"
    assert turn_states(fault_settings, [turn_id])[turn_id] == ("failed", "turn_timeout")
    assert_each_turn_billed_once(fault_settings, [turn_id])
    assert_ledger_check_passes(fault_settings)
    celery_app.tollgate.close()
