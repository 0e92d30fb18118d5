"""A turn without a hold admitted by one autocommit statement (``turns._admit_at_once``), on
Postgres: no BEGIN, no lock, no COMMIT; whatever that statement does not cover (a turn of
the same session admitted at the same instant, another user's session, an unpriced model, a
limit, a replayed key) goes the locked transaction's way, with its usual answer."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from shared.errors import InvalidInput, NotFound, TooManyRequests
from shared.models import Turn
from shared.services import enforcement, pricing, rooms, turns
from tests.factories import make_actor, make_completed_turn
from tests.integration import test_money_pg as money
from tests.integration.test_guarded_settle_pg import transaction_commands  # noqa: F401 - fixture
from tests.integration.test_limits_pg import put_limits

# The money tests' fixtures, by the same names.
runtime, chat = money.runtime, money.chat


def admit(runtime, session, user, chat_id: str, content: str, key: str | None = None, **extra):
    return turns.submit(runtime, session, user.user, chat_id, {"content": content, **extra}, key)


def seqs(pg_db, chat_id: str) -> list[int]:
    seqs = sorted(pg_db.scalars(select(Turn.seq).where(Turn.session_id == chat_id)))
    pg_db.commit()
    return seqs


def test_a_turn_without_a_hold_is_admitted_by_one_statement(
    runtime,
    pg_db,
    pg_user,
    chat,
    transaction_commands,  # noqa: F811 - fixture
    monkeypatch,
):
    # A built-in model's price is seeded by the first turn that asks for it (the locked way).
    pricing.price_in_force(pg_db, runtime.settings.default_model)
    pg_db.commit()
    assert not enforcement.is_enforced(runtime)  # and the toggle read once from the database
    transaction_commands.clear()
    locked = []
    monkeypatch.setattr(turns, "_lock_session", lambda *args: locked.append(args) or pytest.fail("locked"))
    first, created = admit(runtime, pg_db, pg_user, chat.id, "first")
    second, _ = admit(runtime, pg_db, pg_user, chat.id, "second")
    assert created and (first.seq, second.seq) == (1, 2)
    assert (first.status, first.enforced, first.room_id) == ("queued", False, chat.room_id)
    assert first.tool_calls == []
    assert transaction_commands == [] and locked == []
    assert seqs(pg_db, chat.id) == [1, 2]


@pytest.mark.parametrize("locked_admission_wrote_a_turn", [False, True])
def test_the_statement_waits_for_a_locked_admission_of_the_session(
    locked_admission_wrote_a_turn, runtime, pg_db, pg_user, chat
):
    """A locked admission holds the chat session: the statement waits for the lock, so a
    turn that admission writes is committed before the statement's own row is. Without
    one, the statement then admits seq 1 itself. With one (seq 1, not committed while the
    statement waits), the statement's seq 1 (its snapshot is older than that commit) trips
    on the unique seq, never the locked way's, and the locked way admits seq 2."""
    pricing.price_in_force(pg_db, runtime.settings.default_model)  # seeded: the statement runs
    pg_db.commit()
    real = turns._lock_session
    fallbacks = []

    def counted(*args):
        fallbacks.append(args)
        return real(*args)

    outcome = {}
    with runtime.db.session() as other:
        real(other, pg_user.id, chat.id, runtime.settings.default_model, None)
        if locked_admission_wrote_a_turn:
            make_completed_turn(other, chat, 1, "earlier", commit=False)
        thread = threading.Thread(
            target=lambda: outcome.update(turn=admitted_in_own_session(runtime, pg_user, chat.id, counted))
        )
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive() and seqs(pg_db, chat.id) == []  # waiting for the session's lock
        other.commit()
    thread.join(10)
    if locked_admission_wrote_a_turn:
        assert outcome["turn"].seq == 2 and len(fallbacks) == 1
        assert seqs(pg_db, chat.id) == [1, 2]
    else:
        assert outcome["turn"].seq == 1 and fallbacks == []


def admitted_in_own_session(runtime, user, chat_id: str, lock_session):
    original = turns._lock_session
    turns._lock_session = lock_session
    try:
        with runtime.db.session() as session:
            turn, created = admit(runtime, session, user, chat_id, "at the same instant")
            assert created
            return turn
    finally:
        turns._lock_session = original


def test_concurrent_turns_of_one_session_each_take_their_own_seq(runtime, pg_user, chat, pg_db):
    """Eight threads, ten turns each, one session: every turn admitted, seqs 1..80 without a
    gap or a duplicate (the statements that collide go the locked way)."""

    def ten(index: int) -> list[int]:
        with runtime.db.session() as session:
            return [admit(runtime, session, pg_user, chat.id, f"turn {index}.{n}")[0].seq for n in range(10)]

    with ThreadPoolExecutor(8) as pool:
        admitted = [seq for chunk in pool.map(ten, range(8)) for seq in chunk]
    assert sorted(admitted) == list(range(1, 81))
    assert seqs(pg_db, chat.id) == list(range(1, 81))


def test_what_the_statement_does_not_cover_is_answered_the_locked_way(
    runtime, pg_db, pg_client, pg_admin, pg_user, chat
):
    stranger = make_actor(pg_db, "user")
    room = rooms.create_room(pg_db, stranger.id, "theirs")
    theirs = rooms.create_session(pg_db, stranger.id, room.id, None)
    # Another user's session, and one that does not exist: 404, nothing written.
    for chat_id in (theirs.id, "00000000-0000-0000-0000-000000000000", "not-a-uuid"):
        with pytest.raises(NotFound):
            admit(runtime, pg_db, pg_user, chat_id, "hello")
    # Blank content: its 400, nothing written.
    with pytest.raises(InvalidInput) as blank:
        admit(runtime, pg_db, pg_user, chat.id, "   ")
    assert blank.value.error == "empty_content"
    # A model without a price: model_not_priced.
    with pytest.raises(InvalidInput) as unpriced:
        admit(runtime, pg_db, pg_user, chat.id, "hello", model="gpt-nowhere")
    assert unpriced.value.error == "model_not_priced"
    assert seqs(pg_db, chat.id) == []

    # A replayed Idempotency-Key: the first turn, not a second one.
    first, created = admit(runtime, pg_db, pg_user, chat.id, "keyed", key="k-1")
    again, created_again = admit(runtime, pg_db, pg_user, chat.id, "keyed", key="k-1")
    assert created and not created_again and again.id == first.id

    # A limit that applies: checked (one turn in flight at most; the keyed one is queued).
    put_limits(pg_client, pg_admin, f"users/{pg_user.id}", {"max_concurrent_turns": 1})
    with pytest.raises(TooManyRequests) as limited:
        admit(runtime, pg_db, pg_user, chat.id, "one too many")
    assert limited.value.error == "too_many_concurrent_turns"
    assert seqs(pg_db, chat.id) == [1]
