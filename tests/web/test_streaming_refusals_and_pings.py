"""``stream: true`` on SQLite (embedded mode): a refusal found before the turn exists
(409 ``idempotency_conflict``, 429 ``rate_limited`` / ``too_many_concurrent_turns``) is the
plain JSON error with its status, never a stream; a stream that has nothing to say sends
the ``: ping`` comment every ``PING_SECONDS`` until the turn ends.

The 402/404/422 refusals: tests/integration/test_streaming_pg.py; the Redis relay's pings:
tests/integration/test_streaming_pings_and_expiry_pg.py."""

from __future__ import annotations

import threading

import pytest

from shared.services import turn_events
from tests.sse import Event, parse
from tests.web.test_streaming_embedded import new_chat, run


def stream_turn(client, user, chat, content, headers=None):
    return client.post(
        f"/api/v1/sessions/{chat['id']}/turns",
        json={"content": content, "stream": True},
        headers={**user.headers, **(headers or {})},
        buffered=False,
    )


def put_limits(client, admin, user, body):
    response = client.put(f"/api/v1/admin/users/{user.id}/limits", json=body, headers=admin.headers)
    assert response.status_code == 200, response.get_json()


def assert_plain_json_error(response, status, error):
    assert response.status_code == status
    assert response.mimetype == "application/json"
    assert response.get_json()["error"] == error


def test_an_idempotency_conflict_before_a_stream_is_plain_json_409(client, user):
    chat = new_chat(client, user)
    key = {"Idempotency-Key": "stream-conflict"}
    first = stream_turn(client, user, chat, "the first body", key)
    assert first.status_code == 200 and first.mimetype == "text/event-stream"
    first.close()
    refused = stream_turn(client, user, chat, "another body under the same key", key)
    assert_plain_json_error(refused, 409, "idempotency_conflict")
    turns = client.get(f"/api/v1/sessions/{chat['id']}/turns", headers=user.headers).get_json()
    assert [t["content"] for t in turns] == ["the first body"]


@pytest.mark.parametrize(
    ("limits", "error"),
    [
        ({"requests_per_minute": 1}, "rate_limited"),
        ({"max_concurrent_turns": 1}, "too_many_concurrent_turns"),
    ],
)
def test_a_rate_or_concurrency_refusal_before_a_stream_is_plain_json_429(client, admin, user, limits, error):
    put_limits(client, admin, user, limits)
    chat = new_chat(client, user)
    admitted = stream_turn(client, user, chat, "the one allowed")
    assert admitted.status_code == 200 and admitted.mimetype == "text/event-stream"
    admitted.close()  # the turn stays queued: it holds the minute's request and the one slot
    refused = stream_turn(client, user, chat, "one too many")
    assert_plain_json_error(refused, 429, error)
    assert int(refused.headers["Retry-After"]) >= 1
    assert len(client.get(f"/api/v1/sessions/{chat['id']}/turns", headers=user.headers).get_json()) == 1


def test_a_quiet_stream_sends_ping_comments_until_the_turn_ends(app, client, user, monkeypatch):
    monkeypatch.setattr(turn_events, "PING_SECONDS", 0.05)
    chat = new_chat(client, user)
    response = stream_turn(client, user, chat, "nobody runs me yet")
    items = parse(response.response)
    first = next(items)
    assert isinstance(first, Event) and first.event == "turn" and first.data["status"] == "queued"
    # Nothing runs the turn: the stream has nothing to send but its keep-alive comments. (Were
    # there none, the turn run after 5 s ends the stream and the assertion fails, not hangs.)
    backstop = threading.Timer(5, run, args=(app, first.data["id"]))
    backstop.start()
    try:
        assert [next(items) for _ in range(3)] == [": ping"] * 3
    finally:
        backstop.cancel()
    assert run(app, first.data["id"]) == "completed"
    rest = [item for item in items if isinstance(item, Event)]
    assert [e.event for e in rest] == ["delta", "done"]
    assert rest[-1].data["status"] == "completed" and rest[0].data["text"] == rest[-1].data["reply"]
