"""Streaming through the ``openai`` provider: a live worker (MODEL_PROVIDER=openai) against
a fake upstream that streams SSE chunks with a final usage chunk — and one that drops the
connection mid-stream, one that sends no usage, one slow enough to cancel."""

from __future__ import annotations

from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis as redis_lib
from sqlalchemy import select

from shared.models import Hold, LedgerEntry, Turn
from shared.providers.tokens import count_tokens
from shared.services import ledger_check, pricing
from tests.fakes.openai_server import Behaviour, FakeOpenAIServer
from tests.integration.conftest import WorkerProcess
from tests.integration.test_enforced_turns_pg import assert_no_credit_reserved, grant, new_chat
from tests.integration.test_streaming_pg import wait_for_status
from tests.sse import Event, events, parse
from web.app import create_app

MODEL = "gpt-stream"
LONG = "please tell me everything you know about ledgers, holds, captures and releases " * 3


@pytest.fixture(scope="module")
def upstream():
    with FakeOpenAIServer() as server:
        server.when("[[drop]]", Behaviour("drop", chunks=3))
        server.when(
            "[[nousage]]", Behaviour("reply", payload={"content": "An answer without usage.", "usage": None})
        )
        server.when("[[slow]]", Behaviour("echo", chunk_delay=0.3))
        yield server


@pytest.fixture(scope="module")
def upstream_settings(pg_settings):
    """The session's database and app Redis with a broker of their own, so the session's
    offline worker does not take these turns."""
    app_db = int(urlsplit(pg_settings.redis_url).path.strip("/") or 15)
    broker = urlunsplit(urlsplit(pg_settings.redis_url)._replace(path=f"/{app_db - 2}"))
    redis_lib.Redis.from_url(broker).flushdb()
    return pg_settings.replace(
        celery_broker_url=broker, celery_result_backend=broker, model_provider="openai", default_model=MODEL
    )


@pytest.fixture(scope="module")
def openai_worker(upstream_settings, upstream, tmp_path_factory):
    worker = WorkerProcess(
        upstream_settings,
        tmp_path_factory.mktemp("openai-worker") / "worker.log",
        concurrency=20,
        pool="gevent",
        queues="turns,summaries",
        MODEL_PROVIDER="openai",
        OPENAI_BASE_URL=upstream.base_url,
        OPENAI_API_KEY="k",
        TURN_LEASE_SECONDS="3",
        TURN_RETRY_BASE_SECONDS="0.2",
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def client(pg_app, upstream_settings, openai_worker, pg_admin, upstream):
    app = create_app(upstream_settings)
    client = app.test_client()
    with app.extensions["tollgate"].db.session() as session:
        pricing.set_price(session, pg_admin.user.id, MODEL, Decimal("0.010000"), Decimal("0.030000"))
    yield client
    app.extensions["tollgate"].close()


@pytest.fixture
def funded(client, pg_admin, pg_user):
    client.patch("/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers)
    grant(client, pg_admin, pg_user.user.id, "20.00")


def stream_turn(client, actor, chat, content, **body):
    return client.post(
        f"/api/v1/sessions/{chat['id']}/turns",
        json={"content": content, "stream": True, **body},
        headers=actor.headers,
        buffered=False,
    )


def final_turn(pg_db, turn_id, statuses=("completed", "failed", "cancelled"), timeout=30.0) -> Turn:
    return wait_for_status(pg_db, turn_id, statuses, timeout)


def charged(pg_db, turn_id) -> Decimal:
    pg_db.expire_all()
    entries = pg_db.scalars(
        select(LedgerEntry).where(LedgerEntry.turn_id == turn_id, LedgerEntry.kind.in_(("capture", "debit")))
    ).all()
    assert len(entries) == 1  # billed once
    return -entries[0].amount


def test_a_turn_streams_through_the_openai_provider(client, funded, pg_user, pg_db, upstream):
    chat = new_chat(client, pg_user)
    received = events(stream_turn(client, pg_user, chat, "Stream this through the provider please"))
    final = received[-1].data
    assert final["status"] == "completed", final
    deltas = [e.data["text"] for e in received if e.event == "delta"]
    assert len(deltas) > 1 and "".join(deltas) == final["reply"]
    assert final["usage_estimated"] is False
    sent = [r.body for r in upstream.requests if "Stream this through" in str(r.body)][-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert Decimal(final["cost"]) == charged(pg_db, final["id"])
    assert_no_credit_reserved(pg_db, pg_user.user.id)


def test_an_upstream_without_a_usage_chunk_is_billed_on_an_estimate_marked_as_such(
    client, funded, pg_user, pg_db
):
    chat = new_chat(client, pg_user)
    final = events(stream_turn(client, pg_user, chat, "answer me [[nousage]]"))[-1].data
    assert final["status"] == "completed" and final["reply"] == "An answer without usage."
    assert final["usage_estimated"] is True
    assert final["usage"]["output_tokens"] == count_tokens("An answer without usage.")
    assert Decimal(final["cost"]) == charged(pg_db, final["id"]) > 0


def test_an_upstream_that_drops_mid_stream_fails_the_turn_billing_the_estimated_usage(
    client, funded, pg_user, pg_db
):
    chat = new_chat(client, pg_user)
    received = events(stream_turn(client, pg_user, chat, "start then vanish [[drop]]"))
    final = received[-1].data
    assert final["status"] == "failed"
    assert final["error"]["code"] == "provider_stream_interrupted"
    assert final["usage_estimated"] is True
    streamed = "".join(e.data["text"] for e in received if e.event == "delta")
    assert streamed and final["usage"]["output_tokens"] >= count_tokens(streamed)
    assert Decimal(final["cost"]) == charged(pg_db, final["id"]) > 0
    assert_no_credit_reserved(pg_db, pg_user.user.id)  # the rest of the hold released


def test_cancel_mid_generation_bills_the_provider_reported_tokens_and_releases_the_rest(
    client, funded, pg_user, pg_db, upstream
):
    upstream.stream_running_usage = True  # every chunk carries the running usage
    try:
        chat = new_chat(client, pg_user)
        response = stream_turn(client, pg_user, chat, f"{LONG} [[slow]]", max_output_tokens=1000)
        iterator = parse(response.response)
        turn_id = next(iterator).data["id"]
        seen = []
        for item in iterator:
            if isinstance(item, Event) and item.event == "delta":
                seen.append(item.data["text"])
                if len(seen) == 2:
                    break
        hold = pg_db.scalar(select(Hold).where(Hold.turn_id == turn_id))
        answer = client.post(f"/api/v1/turns/{turn_id}/cancel", headers=pg_user.headers)
        assert answer.status_code == 200
        rest = [e for e in iterator if isinstance(e, Event)]
    finally:
        upstream.stream_running_usage = False
    assert rest[-1].event == "done" and rest[-1].data["status"] == "cancelled"
    turn = final_turn(pg_db, turn_id)
    assert turn.status == "cancelled"
    streamed = "".join(seen) + "".join(e.data["text"] for e in rest if e.event == "delta")
    assert streamed == turn.reply and len(turn.reply) < len("Fake reply to: " + LONG)
    # The provider's own running count of what it generated, not an estimate.
    assert turn.usage_estimated is False
    assert turn.output_tokens == count_tokens(turn.reply)
    price = pricing.price_in_force(pg_db, MODEL)
    assert (
        charged(pg_db, turn_id) == turn.cost == pricing.cost_of(price, turn.input_tokens, turn.output_tokens)
    )
    assert turn.cost < hold.amount
    assert_no_credit_reserved(pg_db, pg_user.user.id)
    assert ledger_check.find_mismatches(pg_db) == []
