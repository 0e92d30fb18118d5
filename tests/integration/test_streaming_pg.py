"""Streaming turns on Postgres + Redis with a live worker (offline model): SSE, resume
with Last-Event-ID, client disconnects, cancel with partial billing."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from sqlalchemy import select

from shared.models import Hold, LedgerEntry, Turn, Wallet
from shared.services import ledger_check
from tests.integration.test_enforced_turns_pg import assert_no_credit_reserved, grant, new_chat
from tests.sse import Event, events, parse

pytestmark = pytest.mark.usefixtures("live_worker")


def stream_turn(client, actor, chat, content, headers=None, **body):
    return client.post(
        f"/api/v1/sessions/{chat['id']}/turns",
        json={"content": content, "stream": True, **body},
        headers={**actor.headers, **(headers or {})},
        buffered=False,
    )


def attach(client, actor, turn_id, last_event_id=None):
    headers = dict(actor.headers)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return client.get(f"/api/v1/turns/{turn_id}/events", headers=headers, buffered=False)


def wait_for_status(pg_db, turn_id, statuses, timeout=30.0) -> Turn:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pg_db.expire_all()
        turn = pg_db.get(Turn, turn_id)
        pg_db.commit()
        if turn.status in statuses:
            return turn
        time.sleep(0.05)
    raise AssertionError(f"turn {turn_id} is {turn.status}, not {statuses}")


def charges(pg_db, turn_id) -> list[LedgerEntry]:
    pg_db.expire_all()
    return list(
        pg_db.scalars(
            select(LedgerEntry).where(
                LedgerEntry.turn_id == turn_id, LedgerEntry.kind.in_(("capture", "debit"))
            )
        )
    )


def test_a_streamed_turn_sends_turn_then_deltas_that_make_the_reply_then_done(pg_client, pg_user):
    chat = new_chat(pg_client, pg_user)
    response = stream_turn(pg_client, pg_user, chat, "Tell me about ledgers and why they balance")
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    received = events(response)
    names = [e.event for e in received]
    assert names[0] == "turn" and names[-1] == "done"
    assert set(names[1:-1]) == {"delta"} and len(names) > 3  # the answer came in pieces
    assert all(e.id for e in received)
    assert len({e.id for e in received}) == len(received)
    first, final = received[0].data, received[-1].data
    assert first["status"] in {"queued", "running"} and first["id"] == final["id"]
    assert final["status"] == "completed"
    assert "".join(e.data["text"] for e in received if e.event == "delta") == final["reply"]
    assert response.headers["Location"] == f"/api/v1/turns/{final['id']}"
    # The turn is an ordinary turn: readable, billed once.
    assert pg_client.get(f"/api/v1/turns/{final['id']}", headers=pg_user.headers).get_json() == final


def test_a_streamed_tool_call_is_the_entry_turn_read_lists(pg_client, pg_user):
    chat = new_chat(pg_client, pg_user)
    received = events(stream_turn(pg_client, pg_user, chat, "search for double-entry ledgers"))
    calls = [e.data for e in received if e.event == "tool_call"]
    final = received[-1].data
    assert final["status"] == "completed" and final["tool_calls"]
    assert calls == final["tool_calls"]


def test_re_attaching_after_the_kth_event_yields_exactly_the_rest(pg_client, pg_user):
    chat = new_chat(pg_client, pg_user)
    whole = events(
        stream_turn(pg_client, pg_user, chat, "A longer question about holds, captures and releases")
    )
    turn_id = whole[0].data["id"]
    again = events(attach(pg_client, pg_user, turn_id))  # from the start: the same events
    assert again[0].event == "turn" and again[0].data["status"] == "completed"  # the turn as it stands
    assert again[1:] == whole[1:]
    for k in range(len(whole)):
        rest = events(attach(pg_client, pg_user, turn_id, whole[k].id))
        expected = whole[k + 1 :]
        assert [(e.id, e.event) for e in rest] == [(e.id, e.event) for e in expected]
        assert [e.data for e in rest if e.event == "delta"] == [
            e.data for e in expected if e.event == "delta"
        ]


def test_resuming_a_live_stream_loses_and_repeats_nothing(pg_client, pg_user):
    chat = new_chat(pg_client, pg_user)
    response = stream_turn(pg_client, pg_user, chat, "Go slowly please [[offline:slow=0.05]]")
    seen = []
    for item in parse(response.response):
        if isinstance(item, Event):
            seen.append(item)
        if len([e for e in seen if e.event == "delta"]) == 3:
            break
    response.close()  # the connection drops mid-answer
    rest = events(attach(pg_client, pg_user, seen[0].data["id"], seen[-1].id))
    assert rest[-1].event == "done" and rest[-1].data["status"] == "completed"
    text = "".join(e.data["text"] for e in seen + rest if e.event == "delta")
    assert text == rest[-1].data["reply"]
    ids = [e.id for e in seen + rest]
    assert len(ids) == len(set(ids))


def test_a_client_that_disconnects_does_not_stop_the_turn_which_is_billed_once(pg_client, pg_user, pg_db):
    chat = new_chat(pg_client, pg_user)
    response = stream_turn(pg_client, pg_user, chat, "Keep going without me [[offline:slow=0.05]]")
    iterator = parse(response.response)
    first = next(iterator)
    assert first.event == "turn"
    response.close()
    turn = wait_for_status(pg_db, first.data["id"], ("completed",))
    assert turn.reply and turn.cost > 0
    [charge] = charges(pg_db, turn.id)
    assert -charge.amount == turn.cost
    assert ledger_check.find_mismatches(pg_db) == []


def test_cancel_mid_generation_bills_the_consumed_tokens_and_releases_the_rest(
    pg_client, pg_admin, pg_user, pg_db
):
    pg_client.patch("/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers)
    grant(pg_client, pg_admin, pg_user.user.id, "10.00")
    chat = new_chat(pg_client, pg_user)
    response = stream_turn(
        pg_client, pg_user, chat, "A long answer please, slowly [[offline:slow=0.3]]", max_output_tokens=400
    )
    iterator = parse(response.response)
    turn_event = next(iterator)
    turn_id = turn_event.data["id"]
    while True:
        item = next(iterator)
        if isinstance(item, Event) and item.event == "delta":
            break
    hold = pg_db.scalar(select(Hold).where(Hold.turn_id == turn_id))
    cancelled = pg_client.post(f"/api/v1/turns/{turn_id}/cancel", headers=pg_user.headers)
    assert cancelled.status_code == 200, cancelled.get_json()
    body = cancelled.get_json()
    assert body["status"] == "cancelled"
    rest = [e for e in iterator if isinstance(e, Event)]
    assert rest[-1].event == "done" and rest[-1].data["status"] == "cancelled"
    streamed = item.data["text"] + "".join(e.data["text"] for e in rest if e.event == "delta")
    assert streamed == body["reply"]  # the partial answer is what the client saw

    turn = wait_for_status(pg_db, turn_id, ("cancelled",))
    assert 0 < turn.output_tokens < 400 and turn.input_tokens > 0
    [charge] = charges(pg_db, turn_id)
    assert Decimal(0) < -charge.amount == turn.cost < hold.amount
    wallet = assert_no_credit_reserved(pg_db, pg_user.user.id)
    assert wallet.balance == Decimal("10.00") - turn.cost

    # Idempotent; a finished turn cannot be cancelled.
    again = pg_client.post(f"/api/v1/turns/{turn_id}/cancel", headers=pg_user.headers)
    assert again.status_code == 200 and again.get_json()["status"] == "cancelled"
    assert len(charges(pg_db, turn_id)) == 1
    done = pg_client.post(
        f"/api/v1/sessions/{chat['id']}/turns", json={"content": "quick one"}, headers=pg_user.headers
    ).get_json()
    refused = pg_client.post(f"/api/v1/turns/{done['id']}/cancel", headers=pg_user.headers)
    assert refused.status_code == 409 and refused.get_json()["error"] == "turn_finished"


def test_cancel_of_a_queued_turn_ends_it_at_once_and_releases_its_hold(pg_client, pg_admin, pg_user, pg_db):
    pg_client.patch("/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers)
    grant(pg_client, pg_admin, pg_user.user.id, "5.00")
    chat = new_chat(pg_client, pg_user)
    # The worker is busy with nothing: cancel right after submitting, racing the claim.
    turn = pg_client.post(
        f"/api/v1/sessions/{chat['id']}/turns",
        json={"content": "never mind [[offline:slow=0.2]]"},
        headers={**pg_user.headers, "Prefer": "respond-async"},
    ).get_json()
    body = pg_client.post(f"/api/v1/turns/{turn['id']}/cancel", headers=pg_user.headers).get_json()
    assert body["status"] in {"cancelled", "running"}
    final = wait_for_status(pg_db, turn["id"], ("cancelled",))
    assert final.status == "cancelled"
    wallet = assert_no_credit_reserved(pg_db, pg_user.user.id)
    assert wallet.balance == Decimal("5.00") - (final.cost or 0)


def test_402_before_a_stream_is_plain_json(pg_client, pg_admin, pg_user):
    pg_client.patch("/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers)
    chat = new_chat(pg_client, pg_user)
    response = stream_turn(pg_client, pg_user, chat, "no credit")
    assert response.status_code == 402
    assert response.mimetype == "application/json"
    assert response.get_json()["error"] == "insufficient_balance"
    assert stream_turn(pg_client, pg_user, {"id": "nope"}, "x").status_code == 404
    assert stream_turn(pg_client, pg_user, chat, " ").status_code == 422


def test_another_users_turn_stream_is_404_and_an_idempotent_replay_attaches_to_the_same_turn(
    pg_client, pg_user, pg_db
):
    from tests.factories import make_actor

    chat = new_chat(pg_client, pg_user)
    headers = {"Idempotency-Key": "stream-1"}
    first = events(stream_turn(pg_client, pg_user, chat, "once", headers=headers))
    replay = events(stream_turn(pg_client, pg_user, chat, "once", headers=headers))
    assert replay[0].data["id"] == first[0].data["id"]
    assert [e.id for e in replay[1:]] == [e.id for e in first[1:]]
    assert pg_db.scalar(select(Turn.id).where(Turn.session_id == chat["id"]).limit(2)) == first[0].data["id"]
    other = make_actor(pg_db, "user")
    assert attach(pg_client, other, first[0].data["id"]).status_code == 404
    assert (
        pg_client.post(f"/api/v1/turns/{first[0].data['id']}/cancel", headers=other.headers).status_code
        == 404
    )
    assert pg_db.scalar(select(Wallet.balance).where(Wallet.user_id == pg_user.user.id)) < 0
