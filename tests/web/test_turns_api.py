"""Turn submission on SQLite, without a worker: validation, ownership, idempotency, 202."""

import pytest
from sqlalchemy import func, select

from shared.models import Turn
from tests.factories import make_actor


@pytest.fixture
def chat(client, user):
    room = client.post("/api/v1/rooms", json={"name": "Research"}, headers=user.headers)
    assert room.status_code == 201
    session = client.post(
        f"/api/v1/rooms/{room.get_json()['id']}/sessions", json={"title": "t"}, headers=user.headers
    )
    assert session.status_code == 201
    return session.get_json()


def submit(client, actor, chat, body, **headers):
    return client.post(
        f"/api/v1/sessions/{chat['id']}/turns", json=body, headers={**actor.headers, **headers}
    )


def test_rooms_and_sessions_belong_to_their_owner(client, user, db):
    room = client.post("/api/v1/rooms", json={"name": "Mine"}, headers=user.headers).get_json()
    assert len(room["id"]) == 36
    other = make_actor(db)
    assert client.get(f"/api/v1/rooms/{room['id']}", headers=other.headers).status_code == 404
    assert client.get("/api/v1/rooms", headers=other.headers).get_json() == []
    assert (
        client.post(f"/api/v1/rooms/{room['id']}/sessions", json={}, headers=other.headers).status_code == 404
    )
    assert client.get(f"/api/v1/rooms/{room['id']}/sessions", headers=other.headers).status_code == 404
    assert [r["id"] for r in client.get("/api/v1/rooms", headers=user.headers).get_json()] == [room["id"]]


@pytest.mark.parametrize("body", [{}, {"name": ""}, {"name": "x" * 201}, {"name": 3}, {"name": "a", "x": 1}])
def test_bad_room_bodies_are_422(client, user, body):
    assert client.post("/api/v1/rooms", json=body, headers=user.headers).status_code == 422


def test_without_a_worker_the_turn_is_accepted_as_202_queued(client, user, chat):
    response = submit(client, user, chat, {"content": "hello"})
    assert response.status_code == 202
    turn = response.get_json()
    assert turn["status"] == "queued"
    assert turn["seq"] == 1
    assert turn["model"] == "offline-small"
    assert turn["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert turn["cost"] is None and turn["balance_after"] is None
    assert turn["summary_used_fallback"] is False and turn["tool_calls"] == [] and turn["error"] is None
    assert response.headers["Location"] == f"/api/v1/turns/{turn['id']}"
    assert client.get(response.headers["Location"], headers=user.headers).get_json()["id"] == turn["id"]


def test_turns_get_consecutive_seq_numbers(client, user, chat):
    seqs = [submit(client, user, chat, {"content": f"m{n}"}).get_json()["seq"] for n in range(3)]
    assert seqs == [1, 2, 3]
    listed = client.get(f"/api/v1/sessions/{chat['id']}/turns?page_size=2", headers=user.headers)
    assert [t["seq"] for t in listed.get_json()] == [1, 2]
    assert '"total": 3' in listed.headers["X-Pagination"]


def test_idempotent_replay_and_conflict(client, user, chat, db):
    first = submit(client, user, chat, {"content": "same"}, **{"Idempotency-Key": "abc"})
    again = submit(client, user, chat, {"content": "same"}, **{"Idempotency-Key": "abc"})
    assert first.get_json()["id"] == again.get_json()["id"]
    conflict = submit(client, user, chat, {"content": "different"}, **{"Idempotency-Key": "abc"})
    assert conflict.status_code == 409 and conflict.get_json()["error"] == "idempotency_conflict"
    assert db.scalar(select(func.count()).select_from(Turn)) == 1
    too_long = submit(client, user, chat, {"content": "x"}, **{"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 422 and too_long.get_json()["error"] == "invalid_idempotency_key"


def test_keys_are_scoped_per_user(client, user, chat, db):
    other = make_actor(db)
    room = client.post("/api/v1/rooms", json={"name": "o"}, headers=other.headers).get_json()
    other_chat = client.post(
        f"/api/v1/rooms/{room['id']}/sessions", json={}, headers=other.headers
    ).get_json()
    mine = submit(client, user, chat, {"content": "a"}, **{"Idempotency-Key": "shared"})
    theirs = submit(client, other, other_chat, {"content": "b"}, **{"Idempotency-Key": "shared"})
    assert mine.status_code == theirs.status_code == 202
    assert mine.get_json()["id"] != theirs.get_json()["id"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"content": ""}, "empty_content"),
        ({"content": " \n"}, "empty_content"),
        ({"content": "x" * 32_001}, "content_too_long"),
        ({"content": "hi", "model": "gpt-unknown"}, "model_not_priced"),
        ({"content": "hi", "max_output_tokens": -1}, "validation_error"),
        ({"content": "hi", "max_output_tokens": 1.5}, "validation_error"),
        ({"content": "hi", "max_output_tokens": True}, "validation_error"),
        ({"content": ["hi"]}, "validation_error"),
    ],
)
def test_invalid_turns_are_422(client, user, chat, db, body, error):
    response = submit(client, user, chat, body)
    assert response.status_code == 422
    assert response.get_json()["error"] == error
    assert db.scalar(select(func.count()).select_from(Turn)) == 0


def test_unknown_and_foreign_sessions_are_404(client, user, chat, db):
    other = make_actor(db)
    assert submit(client, other, chat, {"content": "hi"}).status_code == 404
    missing = {"id": "00000000-0000-0000-0000-000000000000"}
    assert submit(client, user, missing, {"content": "hi"}).status_code == 404
    assert submit(client, user, {"id": "garbage"}, {"content": "hi"}).status_code == 404
