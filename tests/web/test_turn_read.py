"""``GET /turns/{id}`` reads a ``turns.TurnRead`` with Core (shared/services/turns.py), not a
``Turn``: its JSON is, byte for byte, what ``TurnSchema`` makes of the ORM turn, so the schema
stays the one definition of a TurnRead. Postgres: tests/integration/test_turn_read_pg.py."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal

from sqlalchemy import event, update

from shared.db import utcnow
from shared.models import ToolCallEvent, Turn
from shared.services import rooms
from tests.factories import make_actor
from web.finished_turns import FinishedTurns
from web.schemas.chat import TurnSchema


def seed_turn(db, owner_id: str, *, tool_calls: bool = True) -> str:
    """A finished turn with every TurnRead field set, and tool calls recorded out of order."""
    room = rooms.create_room(db, owner_id, "read")
    chat = rooms.create_session(db, owner_id, room.id, None)
    started = utcnow()
    turn = Turn(
        session_id=chat.id,
        room_id=room.id,
        user_id=owner_id,
        seq=1,
        status="failed",
        content="Look up “naïve” in notes.md",
        reply="Partial answer",
        model="offline-small",
        max_output_tokens=256,
        input_tokens=120,
        output_tokens=7,
        cost=Decimal("0.0123456"),
        balance_after=Decimal("-3.5"),
        low_balance=True,
        summary_used_fallback=True,
        usage_estimated=True,
        error_code="provider_error",
        error_message="upstream 502",
        started_at=started,
        completed_at=started + timedelta(seconds=2),
        updated_at=started,
    )
    db.add(turn)
    db.flush()
    if tool_calls:
        for offset, tool, status, excerpt in [
            (2, "file_read", "error", None),
            (0, "search", "ok", "…three hits"),
            (1, "search", "timeout", ""),
        ]:
            db.add(
                ToolCallEvent(
                    turn_id=turn.id,
                    room_id=room.id,
                    tool=tool,
                    arguments={"query": f"q{offset}", "nested": {"k": [1, "ü"]}},
                    status=status,
                    duration_ms=10 * offset,
                    result_excerpt=excerpt,
                    created_at=started + timedelta(milliseconds=offset),
                )
            )
    db.commit()
    return turn.id


def assert_read_as_the_orm_turn_dumps(app, client, db, actor, turn_id: str) -> dict:
    response = client.get(f"/api/v1/turns/{turn_id}", headers=actor.headers)
    assert response.status_code == 200
    db.expire_all()
    with app.app_context():
        expected = app.json.response(TurnSchema().dump(db.get(Turn, turn_id))).get_data()
    assert response.get_data() == expected
    return response.get_json()


def test_a_turn_reads_as_its_orm_dump_byte_for_byte(app, client, db, user):
    turn_id = seed_turn(db, user.id)
    read = assert_read_as_the_orm_turn_dumps(app, client, db, user, turn_id)
    assert [call["result_excerpt"] for call in read["tool_calls"]] == ["…three hits", "", None]
    assert read["cost"] == "0.012346" and read["balance_after"] == "-3.500000"
    assert read["error"] == {"code": "provider_error", "message": "upstream 502"}


def test_a_turn_without_tool_calls_reads_as_its_orm_dump(app, client, db, user):
    turn_id = seed_turn(db, user.id, tool_calls=False)
    assert assert_read_as_the_orm_turn_dumps(app, client, db, user, turn_id)["tool_calls"] == []


def test_another_users_unknown_or_malformed_turn_is_404(client, db, user):
    turn_id = seed_turn(db, user.id)
    other = make_actor(db)
    for path_id in (turn_id, turn_id.upper().replace("-", ""), "00000000-0000-4000-8000-000000000000", "x"):
        response = client.get(f"/api/v1/turns/{path_id}", headers=other.headers)
        assert response.status_code == 404
        assert response.get_json()["error"] == "not_found"


# -- a finished turn's body, kept per process (web/finished_turns.py) ----------------------


@contextmanager
def turn_reads(app):
    """The statements that read the turns table while the block runs."""
    engine = app.extensions["tollgate"].db.engine
    reads: list[str] = []

    def on_statement(_conn, _cursor, statement, *_args):
        if "FROM turns" in statement:
            reads.append(statement)

    event.listen(engine, "before_cursor_execute", on_statement)
    try:
        yield reads
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)


def test_a_finished_turn_is_read_from_the_database_once_then_answered_the_same(app, client, db, user):
    turn_id = seed_turn(db, user.id)
    first = assert_read_as_the_orm_turn_dumps(app, client, db, user, turn_id)
    with turn_reads(app) as reads:
        again = client.get(f"/api/v1/turns/{turn_id}", headers=user.headers)
    assert reads == []
    assert again.status_code == 200 and again.content_type == "application/json"
    assert again.get_json() == first
    assert again.headers["X-Request-ID"]


def test_a_turn_kept_in_memory_is_still_404_for_another_user(app, client, db, user):
    turn_id = seed_turn(db, user.id)
    assert client.get(f"/api/v1/turns/{turn_id}", headers=user.headers).status_code == 200
    response = client.get(f"/api/v1/turns/{turn_id}", headers=make_actor(db).headers)
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"


def test_a_queued_or_running_turn_is_read_afresh_until_it_finishes(app, client, db, user):
    turn_id = seed_turn(db, user.id, tool_calls=False)
    for status in ("queued", "running"):
        db.execute(update(Turn).where(Turn.id == turn_id).values(status=status, completed_at=None))
        db.commit()
        assert client.get(f"/api/v1/turns/{turn_id}", headers=user.headers).get_json()["status"] == status
    db.execute(update(Turn).where(Turn.id == turn_id).values(status="completed", reply="Paris."))
    db.commit()
    read = client.get(f"/api/v1/turns/{turn_id}", headers=user.headers).get_json()
    assert (read["status"], read["reply"]) == ("completed", "Paris.")
    with turn_reads(app) as reads:
        assert client.get(f"/api/v1/turns/{turn_id}", headers=user.headers).get_json() == read
    assert reads == []


def test_kept_bodies_stay_within_their_byte_budget_least_recently_read_out_first():
    kept = FinishedTurns(max_bytes=10, max_body_bytes=6)
    kept.keep("a", "u1", b"aaaa")
    kept.keep("b", "u1", b"bbbb")
    assert kept.body("a", "u1") == b"aaaa"  # read: now the most recent
    kept.keep("c", "u2", b"cccc")  # 12 bytes > 10: the least recently read goes
    assert kept.body("b", "u1") is None
    assert (kept.body("a", "u1"), kept.body("c", "u2")) == (b"aaaa", b"cccc")
    assert kept.body("c", "u1") is None  # another user's turn
    kept.keep("d", "u1", b"ddddddd")  # larger than one body may be: answered, not kept
    assert kept.body("d", "u1") is None
    assert kept.body("a", "u1") == b"aaaa"
