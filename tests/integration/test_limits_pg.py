"""Limits on Postgres + Redis + a live worker: spend atomic with admission under real
concurrency, calendar resets in a non-UTC zone (clock injected), rate and concurrency
limits across two web processes, and every way a turn ends freeing its slot."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import update

from shared.models import Turn
from shared.services import billing, turn_runner
from shared.task_names import TaskName
from tests.integration.test_enforced_turns_pg import grant, new_chat
from tests.integration.test_turns_pg import post_turn, wait_for
from web.app import create_app

ASYNC = {"Prefer": "respond-async"}


@pytest.fixture
def quiet_settings(pg_settings):
    """Settings whose tasks no worker consumes (the broker is the app's own Redis database,
    flushed by every test): admitted turns stay queued, in flight, until a test sends them
    to the live worker's broker."""
    return pg_settings.replace(
        celery_broker_url=pg_settings.redis_url, celery_result_backend=pg_settings.redis_url
    )


@pytest.fixture
def quiet_apps(pg_app, quiet_settings):
    """Two web app instances (two processes' worth of engines, pools and runtimes)."""
    apps = [create_app(quiet_settings), create_app(quiet_settings)]
    yield apps
    for app in apps:
        app.extensions["tollgate"].close()


def put_limits(client, admin, path, body):
    response = client.put(f"/api/v1/admin/{path}/limits", json=body, headers=admin.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def get_limits(client, admin, path):
    return client.get(f"/api/v1/admin/{path}/limits", headers=admin.headers).get_json()


def run_on_live_worker(pg_app, turn_ids):
    for turn_id in turn_ids:
        pg_app.extensions["celery"].send_task(TaskName.RUN_TURN, args=[turn_id])


def worst_case(client, admin, user, chat) -> Decimal:
    """This turn's worst case, as a spend limit of 0 reports it (``required``)."""
    put_limits(client, admin, f"users/{user.id}", {"spend": {"amount": "0", "period": "day"}})
    refused = post_turn(client, user, chat, "question", headers=ASYNC)
    assert refused.status_code == 402
    return Decimal(refused.get_json()["required"])


@pytest.mark.parametrize("enforcement", [False, True])
def test_32_concurrent_turns_against_a_spend_limit_covering_3_admit_at_most_3(
    enforcement, pg_app, pg_client, pg_admin, pg_user, quiet_apps, live_worker
):
    grant(pg_client, pg_admin, pg_user.id, "100")
    if enforcement:
        pg_client.patch(
            "/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers
        )
    # One chat per request: every turn's context, so its worst case, is the same.
    chats = [new_chat(pg_client, pg_user) for _ in range(33)]
    worst = worst_case(pg_client, pg_admin, pg_user, chats[32])
    limit = worst * 3 + worst / 2
    put_limits(
        pg_client, pg_admin, f"users/{pg_user.id}", {"spend": {"amount": f"{limit:.6f}", "period": "day"}}
    )

    def submit(n):
        return post_turn(quiet_apps[n % 2].test_client(), pg_user, chats[n], "question", headers=ASYNC)

    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(submit, range(32)))
    admitted = [r.get_json()["id"] for r in responses if r.status_code == 202]
    refused = [r.get_json() for r in responses if r.status_code == 402]
    assert len(admitted) == 3 and len(refused) == 29, [r.status_code for r in responses]
    assert {body["error"] for body in refused} == {"spend_limit_reached"}
    assert {body["limit_source"] for body in refused} == {"user"}
    state = get_limits(pg_client, pg_admin, f"users/{pg_user.id}")["spend"]
    assert Decimal(state["held"]) == worst * 3 and state["spent"] == "0.000000"

    # Run them: each charge (≤ its worst case) moves from held to spent in one commit.
    run_on_live_worker(pg_app, admitted)
    for turn_id in admitted:
        assert wait_for(pg_client, pg_user, turn_id)["status"] == "completed"
    state = get_limits(pg_client, pg_admin, f"users/{pg_user.id}")["spend"]
    assert state["held"] == "0.000000"
    assert Decimal("0") < Decimal(state["spent"]) <= limit
    # What they did not use is admissible again, never beyond the limit.
    while True:
        response = post_turn(pg_client, pg_user, new_chat(pg_client, pg_user), "question")
        if response.status_code == 402:
            break
        assert response.status_code == 201
        spent = Decimal(get_limits(pg_client, pg_admin, f"users/{pg_user.id}")["spend"]["spent"])
        assert spent <= limit
    assert Decimal(response.get_json()["spent"]) + worst > limit


def test_a_daily_limit_resets_at_local_midnight_in_a_non_utc_zone(
    pg_app, pg_client, pg_admin, pg_user, live_worker
):
    grant(pg_client, pg_admin, pg_user.id, "100")
    chats = [new_chat(pg_client, pg_user) for _ in range(3)]
    worst = worst_case(pg_client, pg_admin, pg_user, chats[0])
    path = f"users/{pg_user.id}"
    put_limits(
        pg_client,
        pg_admin,
        path,
        {"spend": {"amount": f"{worst:.6f}", "period": "day", "tz": "America/New_York"}},
    )
    first = post_turn(pg_client, pg_user, chats[1], "question")
    assert first.status_code == 201
    cost = Decimal(first.get_json()["cost"])
    state = get_limits(pg_client, pg_admin, path)["spend"]
    assert Decimal(state["spent"]) == cost > 0
    refused = post_turn(pg_client, pg_user, chats[2], "question", headers=ASYNC)
    assert refused.status_code == 402
    resets_at = refused.get_json()["resets_at"]
    assert resets_at == state["resets_at"].replace("+00:00", "Z")
    # Local midnight in New York: 04:00 or 05:00 UTC depending on DST.
    assert resets_at[11:] in ("04:00:00Z", "05:00:00Z")

    runtime = pg_app.extensions["tollgate"]
    from datetime import datetime

    midnight = datetime.fromisoformat(resets_at.replace("Z", "+00:00"))
    runtime.clock = lambda: midnight - timedelta(seconds=1)
    assert post_turn(pg_client, pg_user, chats[2], "question", headers=ASYNC).status_code == 402
    runtime.clock = lambda: midnight + timedelta(seconds=1)
    state = get_limits(pg_client, pg_admin, path)["spend"]
    assert state["spent"] == "0.000000"
    assert state["period_start"].replace("+00:00", "Z") == resets_at
    assert post_turn(pg_client, pg_user, chats[2], "question").status_code == 201


def test_requests_per_minute_holds_across_two_web_processes(pg_client, pg_admin, pg_user, quiet_apps):
    put_limits(pg_client, pg_admin, f"users/{pg_user.id}", {"requests_per_minute": 4})
    chat = new_chat(pg_client, pg_user)

    def submit(n):
        return post_turn(quiet_apps[n % 2].test_client(), pg_user, chat, f"q{n}", headers=ASYNC)

    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(submit, range(10)))
    assert sorted(r.status_code for r in responses) == [202] * 4 + [429] * 6
    refused = [r for r in responses if r.status_code == 429]
    assert {r.get_json()["error"] for r in refused} == {"rate_limited"}
    assert all(1 <= int(r.headers["Retry-After"]) <= 60 for r in refused)
    # A minute later (clock injected) the window is empty again.
    for app in quiet_apps:
        runtime = app.extensions["tollgate"]
        runtime.clock = lambda: billing.utcnow() + timedelta(seconds=61)
    assert post_turn(quiet_apps[0].test_client(), pg_user, chat, "later", headers=ASYNC).status_code == 202


def test_max_concurrent_turns_holds_across_two_web_processes(pg_client, pg_admin, pg_user, quiet_apps):
    put_limits(pg_client, pg_admin, f"users/{pg_user.id}", {"max_concurrent_turns": 3})
    chats = [new_chat(pg_client, pg_user) for _ in range(12)]

    def submit(n):
        return post_turn(quiet_apps[n % 2].test_client(), pg_user, chats[n], "q", headers=ASYNC)

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(submit, range(12)))
    assert sorted(r.status_code for r in responses) == [202] * 3 + [429] * 9
    refused = [r for r in responses if r.status_code == 429]
    assert {r.get_json()["error"] for r in refused} == {"too_many_concurrent_turns"}
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert get_limits(pg_client, pg_admin, f"users/{pg_user.id}")["in_flight_turns"] == 3


def test_every_way_a_turn_ends_frees_its_concurrency_slot(
    pg_app, pg_client, pg_admin, pg_user, pg_db, quiet_apps, live_worker
):
    grant(pg_client, pg_admin, pg_user.id, "100")
    put_limits(pg_client, pg_admin, f"users/{pg_user.id}", {"max_concurrent_turns": 1})
    quiet = quiet_apps[0].test_client()
    runtime = quiet_apps[0].extensions["tollgate"]
    chat = new_chat(pg_client, pg_user)

    def occupy(content="question"):
        response = post_turn(quiet, pg_user, chat, content, headers=ASYNC)
        assert response.status_code == 202, response.get_json()
        assert post_turn(quiet, pg_user, chat, "one too many", headers=ASYNC).status_code == 429
        return response.get_json()["id"]

    # completed (the live worker runs it)
    turn_id = occupy()
    run_on_live_worker(pg_app, [turn_id])
    assert wait_for(pg_client, pg_user, turn_id)["status"] == "completed"
    # failed (the provider refuses)
    turn_id = occupy("[[offline:fail]]")
    run_on_live_worker(pg_app, [turn_id])
    assert wait_for(pg_client, pg_user, turn_id)["status"] == "failed"
    # failed by the turn runner's own ending (the path an exception or a timeout takes)
    turn_id = occupy()
    assert turn_runner.fail(runtime, turn_id, "turn_timeout")
    # worker lost: running, its lease lapsed, out of attempts → the takeover ends it failed
    turn_id = occupy()
    assert turn_runner.claim(runtime, turn_id, takeover=False) is not None
    assert post_turn(quiet, pg_user, chat, "while running", headers=ASYNC).status_code == 429
    pg_db.execute(
        update(Turn)
        .where(Turn.id == turn_id)
        .values(attempts=turn_runner.MAX_ATTEMPTS, lease_expires_at=billing.utcnow() - timedelta(seconds=5))
    )
    pg_db.commit()
    assert turn_runner.claim(runtime, turn_id, takeover=True) is None
    assert wait_for(pg_client, pg_user, turn_id)["error"]["code"] == "worker_lost"
    # cancelled (whatever path cancels a turn ends it with this status)
    turn_id = occupy()
    pg_db.execute(update(Turn).where(Turn.id == turn_id).values(status="cancelled"))
    pg_db.commit()
    # hold expiry: the turn is still queued, but it can only end failed; its slot is free now
    pg_client.patch("/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers)
    turn_id = occupy()
    assert billing.expire_stale_holds(pg_db, now=billing.utcnow() + timedelta(hours=2)) == 1
    last = post_turn(quiet, pg_user, chat, "after all that", headers=ASYNC)
    assert last.status_code == 202, last.get_json()
    assert get_limits(pg_client, pg_admin, f"users/{pg_user.id}")["in_flight_turns"] == 1
