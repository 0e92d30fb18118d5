"""Each model's newest price kept per process (shared/services/pricing.py, ``PriceCache``):
a turn's admission and run find it without a round trip, and a new price reaches every
process at once, on real Postgres, Redis and a live Celery worker. Two app instances stand
for two web processes (each has its own runtime, cache and Redis listener)."""

from __future__ import annotations

import time
from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import event, inspect

from shared.services import listened_cache, pricing
from tests.integration.test_enforced_turns_pg import enforced, grant, new_chat  # noqa: F401 - fixture
from web.app import create_app

MODEL = "offline-small"  # the offline provider answers it; an admin's PUT prices it anew


def wait_listening(app, timeout: float = 5.0) -> pricing.PriceCache:
    cache = app.extensions["tollgate"].price_cache
    deadline = time.monotonic() + timeout
    while cache.generation() is None:
        assert time.monotonic() < deadline, "the price cache never subscribed"
        time.sleep(0.02)
    return cache


def price_reads(app, call) -> tuple[object, int]:
    """``call()``'s result and how many statements it ran on ``model_prices``."""
    engine = app.extensions["tollgate"].db.engine
    seen: list[str] = []

    def on_statement(_conn, _cursor, statement, *_args):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", on_statement)
    try:
        return call(), sum("FROM model_prices" in statement for statement in seen)
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)


def read_price(app, model: str = MODEL, at=None, *, then=lambda session: session.commit()):
    runtime = app.extensions["tollgate"]
    with runtime.db.session() as session:
        price = pricing.price_in_force(session, model, at, cache=runtime.price_cache)
        then(session)
    return price


def put_price(client, admin, input_per_1k: str, output_per_1k: str):
    """PUT a new price through ``client``'s app, and wait until that app's cache heard of it."""
    cache = client.application.extensions["tollgate"].price_cache
    generation = cache.generation()
    response = client.put(
        f"/api/v1/admin/pricing/{MODEL}",
        json={"input_per_1k": input_per_1k, "output_per_1k": output_per_1k},
        headers=admin.headers,
    )
    assert response.status_code == 200, response.get_json()
    deadline = time.monotonic() + 2
    while cache.generation() == generation:
        assert time.monotonic() < deadline, "the price change was never heard"
        time.sleep(0.005)
    return response.get_json()


@pytest.fixture
def two_processes(pg_app, pg_settings):
    other = create_app(pg_settings)
    for app in (pg_app, other):
        wait_listening(app)
    yield pg_app, other
    other.extensions["tollgate"].close()


def test_a_price_read_once_is_kept_outside_any_session(pg_app, pg_admin, pg_client):
    wait_listening(pg_app)
    put_price(pg_client, pg_admin, "0.5", "1.5")
    # Each read's session rolls back (as a refused admission's does): it must not touch the
    # copy other requests share.
    first, first_reads = price_reads(pg_app, lambda: read_price(pg_app, then=lambda s: s.rollback()))
    again, reads = price_reads(pg_app, lambda: read_price(pg_app, then=lambda s: s.expire_all()))
    assert first_reads == 1 and reads == 0
    assert again is first and (again.input_per_1k, again.output_per_1k) == (Decimal("0.5"), Decimal("1.5"))
    # The shared copy belongs to no session: a session's rollback or expiry cannot empty it.
    assert inspect(again).transient


def test_a_moment_before_the_newest_price_is_priced_at_the_version_of_that_moment(
    pg_app, pg_admin, pg_client
):
    wait_listening(pg_app)
    old = put_price(pg_client, pg_admin, "0.25", "0.5")
    time.sleep(0.01)
    new = put_price(pg_client, pg_admin, "4", "8")
    assert read_price(pg_app).id == new["id"]  # the newest, now kept
    kept = pg_app.extensions["tollgate"].price_cache.lookup(MODEL)
    before_new = kept.effective_from - timedelta(microseconds=1)
    earlier, reads = price_reads(pg_app, lambda: read_price(pg_app, at=before_new))
    assert earlier.id == old["id"] and reads == 1


def test_a_new_price_reaches_every_process_at_once(two_processes, pg_admin):
    first, second = two_processes
    put_price(first.test_client(), pg_admin, "1", "2")
    for app in (first, second):
        assert read_price(app).input_per_1k == Decimal("1")  # both keep it now
    put_price(first.test_client(), pg_admin, "3", "6")
    seen_at = None
    started = time.monotonic()
    while time.monotonic() - started < 2:
        if read_price(second).input_per_1k == Decimal("3"):
            seen_at = time.monotonic() - started
            break
    assert seen_at is not None and seen_at < 0.5, seen_at  # not the 60 s safety net
    assert read_price(first).input_per_1k == Decimal("3")


def test_everything_published_empties_every_model(pg_app, pg_admin, pg_client):
    cache = wait_listening(pg_app)
    put_price(pg_client, pg_admin, "1", "2")
    read_price(pg_app)
    generation = cache.generation()
    pricing.publish_price_change(pg_app.extensions["tollgate"].redis, listened_cache.EVERYTHING)
    deadline = time.monotonic() + 2
    while cache.generation() == generation:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert cache.lookup(MODEL) is None


@pytest.mark.usefixtures("live_worker")
def test_the_worker_bills_a_turn_after_a_price_change_at_the_new_price(
    enforced,  # noqa: F811 - fixture
    pg_app,
    pg_client,
    pg_admin,
    pg_user,
):
    """The live worker kept the first price while it ran the first turn; the second turn,
    admitted after the change, is billed at the new one (its tokens times the new rates)."""
    wait_listening(pg_app)
    grant(pg_client, pg_admin, pg_user.id, "100")
    chat = new_chat(pg_client, pg_user)
    costs = []
    for rates in (("0.001", "0.002"), ("2", "5")):
        price = put_price(pg_client, pg_admin, *rates)
        turn = pg_client.post(
            f"/api/v1/sessions/{chat['id']}/turns", json={"content": "What is 2+2?"}, headers=pg_user.headers
        ).get_json()
        assert turn["status"] == "completed", turn
        expected = (
            Decimal(turn["usage"]["input_tokens"]) * Decimal(price["input_per_1k"])
            + Decimal(turn["usage"]["output_tokens"]) * Decimal(price["output_per_1k"])
        ) / 1000
        assert Decimal(turn["cost"]) == expected.quantize(Decimal("0.000001")), (turn, price)
        costs.append(Decimal(turn["cost"]))
    assert costs[1] > costs[0] * 100
