"""Embedded mode (SQLite, no Redis) streams coarsely: the tool calls and the whole reply in
one delta when the turn ends, then done; resume and cancel work the same way."""

from __future__ import annotations

from shared.providers.offline import OfflineProvider
from shared.services import turn_runner
from shared.tools.registry import build_registry
from tests.sse import events


def new_chat(client, user):
    room = client.post("/api/v1/rooms", json={"name": "r"}, headers=user.headers).get_json()
    return client.post(f"/api/v1/rooms/{room['id']}/sessions", json={}, headers=user.headers).get_json()


def run(app, turn_id):
    runtime = app.extensions["tollgate"]
    return turn_runner.run_turn(
        runtime,
        turn_id,
        provider=OfflineProvider(),
        tools=build_registry(runtime.settings),
        takeover=False,
        final_attempt=True,
    )


def queued_turn(client, user, chat, content):
    response = client.post(
        f"/api/v1/sessions/{chat['id']}/turns",
        json={"content": content},
        headers={**user.headers, "Prefer": "respond-async"},
    )
    assert response.status_code == 202
    return response.get_json()


def attach(client, user, turn_id, last_event_id=None):
    headers = dict(user.headers)
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    return client.get(f"/api/v1/turns/{turn_id}/events", headers=headers, buffered=False)


def test_a_finished_turn_replays_its_tool_calls_reply_and_done(app, client, user):
    chat = new_chat(client, user)
    turn = queued_turn(client, user, chat, "search for holiday policy please")
    assert run(app, turn["id"]) == "completed"
    received = events(attach(client, user, turn["id"]))
    assert [e.event for e in received] == ["turn", "tool_call", "delta", "done"]
    assert [e.id for e in received] == ["0", "t1", "r", "done"]
    final = received[-1].data
    assert received[2].data == {"text": final["reply"]}
    assert received[1].data == final["tool_calls"][0]
    resumed = events(attach(client, user, turn["id"], "t1"))
    assert [e.id for e in resumed] == ["r", "done"]
    assert [e.id for e in events(attach(client, user, turn["id"], "r"))] == ["done"]
    finished = attach(client, user, turn["id"], "done")
    assert finished.status_code == 204  # EventSource stops reconnecting


def test_cancel_in_embedded_mode(app, client, user):
    chat = new_chat(client, user)
    turn = queued_turn(client, user, chat, "never mind")
    cancelled = client.post(f"/api/v1/turns/{turn['id']}/cancel", headers=user.headers)
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"
    assert cancelled.get_json()["cost"] is None  # nothing was used, nothing billed
    assert client.post(f"/api/v1/turns/{turn['id']}/cancel", headers=user.headers).status_code == 200
    assert run(app, turn["id"]) == "skipped"  # its task finds it finished
    assert [e.event for e in events(attach(client, user, turn["id"]))] == ["turn", "done"]

    done = queued_turn(client, user, chat, "answer me")
    run(app, done["id"])
    refused = client.post(f"/api/v1/turns/{done['id']}/cancel", headers=user.headers)
    assert refused.status_code == 409 and refused.get_json()["error"] == "turn_finished"
    assert client.post("/api/v1/turns/nope/cancel", headers=user.headers).status_code == 404


def test_streams_resumes_cancels_and_first_tokens_are_counted(app, client, user):
    from tests.web.test_metrics import scrape, value

    before = scrape(client)
    chat = new_chat(client, user)
    streamed = client.post(
        f"/api/v1/sessions/{chat['id']}/turns",
        json={"content": "count me", "stream": True},
        headers=user.headers,
        buffered=False,
    )
    turn_id = next(e for e in events_until_turn(streamed)).data["id"]
    streamed.close()
    # The turn runs in this process here, so its first token is counted in this process too.
    turn = queued_turn(client, user, chat, "then resume me")
    run(app, turn["id"])
    events(attach(client, user, turn["id"], "0"))
    client.post(f"/api/v1/turns/{turn_id}/cancel", headers=user.headers)
    after = scrape(client)
    assert (
        value(after, "tollgate_streamed_turns_total", api="turns")
        - value(before, "tollgate_streamed_turns_total", api="turns")
        == 2
    )
    assert (
        value(after, "tollgate_turn_stream_resumes_total")
        - value(before, "tollgate_turn_stream_resumes_total")
        == 1
    )
    assert (
        value(after, "tollgate_turn_cancels_total", state="queued")
        - value(before, "tollgate_turn_cancels_total", state="queued")
        == 1
    )
    assert value(after, "tollgate_turn_first_token_seconds_count") > value(
        before, "tollgate_turn_first_token_seconds_count"
    )


def events_until_turn(response):
    from tests.sse import Event, parse

    for item in parse(response.response):
        if isinstance(item, Event):
            yield item
            return
