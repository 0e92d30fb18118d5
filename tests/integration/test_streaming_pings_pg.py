"""A stream with nothing to relay stays alive: on Postgres + Redis, the relay that follows a
turn's Redis Stream sends the ``: ping`` comment each time ``PING_SECONDS`` pass without an
event, on ``/api/v1`` and on ``/v1`` alike, and still ends with the turn.

The turns here are queued and nobody runs them (their tasks go to a broker no worker
reads), so the only thing the stream can send is its keep-alive; cancelling the turn ends
it. Embedded mode's pings: tests/web/test_streaming_refusals_and_pings.py."""

from __future__ import annotations

import threading

import pytest

from shared.services import turn_events
from tests.integration.test_enforced_turns_pg import new_chat
from tests.sse import Event, parse
from web.app import create_app


@pytest.fixture
def quiet_app(pg_app, pg_settings):
    """A web app whose tasks no worker consumes (its broker is the app's own Redis
    database, flushed by every test): a submitted turn stays queued."""
    app = create_app(
        pg_settings.replace(
            celery_broker_url=pg_settings.redis_url, celery_result_backend=pg_settings.redis_url
        )
    )
    yield app
    app.extensions["tollgate"].close()


def open_turn_stream(client, user):
    chat = new_chat(client, user)
    response = client.post(
        f"/api/v1/sessions/{chat['id']}/turns",
        json={"content": "nobody runs me", "stream": True},
        headers=user.headers,
        buffered=False,
    )
    items = parse(response.response)
    first = next(items)
    assert first.event == "turn" and first.data["status"] == "queued"
    return response, items, first.data["id"]


def open_v1_stream(client, user):
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": "offline-small",
            "stream": True,
            "messages": [{"role": "user", "content": "nobody runs me"}],
        },
        headers=user.headers,
        buffered=False,
    )
    items = parse(response.response)
    first = next(items)
    assert first.data["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    return response, items, response.headers["X-Tollgate-Turn-Id"]


@pytest.mark.parametrize("opener", [open_turn_stream, open_v1_stream], ids=["api-v1", "openai-v1"])
def test_a_quiet_stream_sends_ping_comments_and_still_ends_with_its_turn(
    quiet_app, pg_user, monkeypatch, opener
):
    monkeypatch.setattr(turn_events, "PING_SECONDS", 0.05)
    client = quiet_app.test_client()
    response, items, turn_id = opener(client, pg_user)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"

    def cancel():
        return client.post(f"/api/v1/turns/{turn_id}/cancel", headers=pg_user.headers)

    # Were there no pings, the cancel after 5 s ends the stream and the assertion fails.
    backstop = threading.Timer(5, cancel)
    backstop.start()
    try:
        assert [next(items) for _ in range(3)] == [": ping"] * 3
    finally:
        backstop.cancel()
    assert cancel().get_json()["status"] == "cancelled"
    rest = [item for item in items if isinstance(item, Event)]
    if opener is open_turn_stream:
        assert [e.event for e in rest] == ["done"] and rest[0].data["status"] == "cancelled"
    else:
        assert rest[-1].data == "[DONE]"
