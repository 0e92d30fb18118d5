"""Limits on Postgres + Redis + a live worker, two rules of issue 15 through the real paths:

- a turn cancelled with ``POST /api/v1/turns/{id}/cancel`` (queued, or running on the
  worker) frees its concurrency slot, and its spend reserve leaves ``held`` as what it
  consumed enters ``spent``;
- a turn's actual charge counts against the period it completed in, not the one it was
  admitted in (clock injected for the admission; the turn's row says it was created
  the day before).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import update

from shared.db import utcnow
from shared.models import Turn
from tests.integration.test_enforced_turns_pg import grant, new_chat
from tests.integration.test_limits_pg import (  # noqa: F401
    get_limits,
    put_limits,
    quiet_apps,
    quiet_settings,
    run_on_live_worker,
)
from tests.integration.test_streaming_pg import wait_for_status
from tests.integration.test_turns_pg import post_turn, wait_for

pytestmark = pytest.mark.usefixtures("live_worker")

ASYNC = {"Prefer": "respond-async"}


def admitted(client, user, chat, content, **body) -> str:
    response = post_turn(client, user, chat, content, headers=ASYNC, **body)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def refused(client, user, chat) -> str:
    response = post_turn(client, user, chat, "one too many", headers=ASYNC)
    assert response.status_code == 429, response.get_json()
    return response.get_json()["error"]


def cancel(client, user, turn_id) -> dict:
    response = client.post(f"/api/v1/turns/{turn_id}/cancel", headers=user.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_cancelling_through_the_api_frees_the_slot_of_a_queued_or_running_turn(
    pg_client,
    pg_admin,
    pg_user,
    pg_db,
    quiet_apps,  # noqa: F811
):
    grant(pg_client, pg_admin, pg_user.id, "100")
    path = f"users/{pg_user.id}"
    put_limits(
        pg_client, pg_admin, path, {"max_concurrent_turns": 1, "spend": {"amount": "50", "period": "day"}}
    )
    chat = new_chat(pg_client, pg_user)

    # Queued: its task goes to a broker nobody reads; the cancel ends it at once.
    quiet = quiet_apps[0].test_client()
    turn_id = admitted(quiet, pg_user, chat, "never mind")
    assert refused(quiet, pg_user, chat) == "too_many_concurrent_turns"
    assert Decimal(get_limits(pg_client, pg_admin, path)["spend"]["held"]) > 0
    assert cancel(quiet, pg_user, turn_id)["status"] == "cancelled"
    state = get_limits(pg_client, pg_admin, path)
    assert state["in_flight_turns"] == 0
    assert state["spend"]["held"] == "0.000000" and state["spend"]["spent"] == "0.000000"

    # Running on the live worker, slowly: the cancel stops it mid-answer and bills what it used.
    turn_id = admitted(
        pg_client, pg_user, chat, "A long answer, slowly [[offline:slow=0.2]]", max_output_tokens=400
    )
    wait_for_status(pg_db, turn_id, ("running",))
    assert refused(pg_client, pg_user, chat) == "too_many_concurrent_turns"
    body = cancel(pg_client, pg_user, turn_id)
    assert body["status"] == "cancelled" and Decimal(body["cost"]) > 0
    state = get_limits(pg_client, pg_admin, path)
    assert state["in_flight_turns"] == 0
    assert state["spend"]["held"] == "0.000000"
    assert Decimal(state["spend"]["spent"]) == Decimal(body["cost"])

    # The slot is free: the next turn is admitted and runs.
    assert wait_for(pg_client, pg_user, admitted(pg_client, pg_user, chat, "after"))["status"] == "completed"


def test_a_charge_counts_against_the_period_its_turn_completed_in(
    pg_app,
    pg_client,
    pg_admin,
    pg_user,
    pg_db,
    quiet_apps,  # noqa: F811
):
    grant(pg_client, pg_admin, pg_user.id, "100")
    daily = {"spend": {"amount": "50", "period": "day", "tz": "America/New_York"}}
    key_id = pg_client.get(f"/api/v1/admin/users/{pg_user.id}/api-keys", headers=pg_admin.headers).get_json()[
        0
    ]["id"]
    subjects = (f"users/{pg_user.id}", f"api-keys/{key_id}")
    for path in subjects:
        put_limits(pg_client, pg_admin, path, daily)
    today = datetime.fromisoformat(get_limits(pg_client, pg_admin, subjects[0])["spend"]["period_start"])
    last_second_of_yesterday = today - timedelta(seconds=1)

    # Admitted in the last second of yesterday (New York time), not run yet.
    quiet_runtime = quiet_apps[0].extensions["tollgate"]
    quiet_runtime.clock = lambda: last_second_of_yesterday
    turn_id = admitted(quiet_apps[0].test_client(), pg_user, new_chat(pg_client, pg_user), "question")
    pg_db.execute(update(Turn).where(Turn.id == turn_id).values(created_at=last_second_of_yesterday))
    pg_db.commit()
    runtime = pg_app.extensions["tollgate"]
    runtime.clock = lambda: last_second_of_yesterday
    for path in subjects:
        spend = get_limits(pg_client, pg_admin, path)["spend"]
        assert Decimal(spend["held"]) > 0 and spend["spent"] == "0.000000"

    # It completes today: its charge is today's spend, and yesterday's stays empty.
    runtime.clock = utcnow
    run_on_live_worker(pg_app, [turn_id])
    cost = Decimal(wait_for(pg_client, pg_user, turn_id)["cost"])
    assert cost > 0
    for path in subjects:
        spend = get_limits(pg_client, pg_admin, path)["spend"]
        assert Decimal(spend["spent"]) == cost and spend["held"] == "0.000000"
        assert datetime.fromisoformat(spend["period_start"]) == today
    runtime.clock = lambda: last_second_of_yesterday
    for path in subjects:
        spend = get_limits(pg_client, pg_admin, path)["spend"]
        assert spend["spent"] == "0.000000" and spend["held"] == "0.000000"
