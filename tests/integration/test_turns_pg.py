"""Turns end to end on Postgres + Redis with a live Celery worker and the offline model."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from sqlalchemy import func, select

from shared.models import ChatSession, Hold, LedgerEntry, Turn
from shared.services import ledger_check, summaries

pytestmark = pytest.mark.usefixtures("live_worker")


@pytest.fixture
def chat(pg_client, pg_user):
    room = pg_client.post("/api/v1/rooms", json={"name": "r"}, headers=pg_user.headers).get_json()
    session = pg_client.post(f"/api/v1/rooms/{room['id']}/sessions", json={}, headers=pg_user.headers)
    assert session.status_code == 201
    return session.get_json()


def post_turn(client, actor, chat, content, headers=None, **body):
    return client.post(
        f"/api/v1/sessions/{chat['id']}/turns",
        json={"content": content, **body},
        headers={**actor.headers, **(headers or {})},
    )


def wait_for(client, actor, turn_id, statuses=("completed", "failed"), timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/turns/{turn_id}", headers=actor.headers).get_json()
        if body["status"] in statuses:
            return body
        time.sleep(0.1)
    raise AssertionError(f"turn {turn_id} did not reach {statuses}: {body}")


def test_a_sync_turn_returns_201_with_the_completed_turn(pg_client, pg_user, chat):
    response = post_turn(pg_client, pg_user, chat, "Hello there, what is a ledger?")
    assert response.status_code == 201, response.get_json()
    turn = response.get_json()
    assert turn["status"] == "completed"
    assert turn["reply"]
    assert turn["session_id"] == chat["id"] and turn["room_id"] == chat["room_id"] and turn["seq"] == 1
    assert turn["usage"]["input_tokens"] > 0 and turn["usage"]["output_tokens"] > 0
    assert turn["cost"] is not None and "." in turn["cost"] and len(turn["cost"].split(".")[1]) == 6
    # Enforcement is off by default: the empty wallet goes negative and low_balance says so.
    assert turn["balance_after"].startswith("-")
    assert turn["low_balance"] is True
    assert turn["summary_used_fallback"] is False
    assert turn["tool_calls"] == []
    assert turn["error"] is None
    assert turn["completed_at"] >= turn["created_at"]
    assert response.headers["Location"] == f"/api/v1/turns/{turn['id']}"


def test_prefer_respond_async_gives_202_and_the_turn_completes(pg_client, pg_user, chat):
    response = post_turn(pg_client, pg_user, chat, "Async please", headers={"Prefer": "respond-async"})
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] in {"queued", "running"}
    location = response.headers["Location"]
    assert location == f"/api/v1/turns/{body['id']}"
    assert wait_for(pg_client, pg_user, body["id"])["status"] == "completed"
    listed = pg_client.get(f"/api/v1/sessions/{chat['id']}/turns", headers=pg_user.headers)
    assert [t["id"] for t in listed.get_json()] == [body["id"]]


def test_an_idempotency_key_replays_the_same_turn(pg_client, pg_user, chat, pg_db):
    headers = {"Idempotency-Key": "k-1"}
    first = post_turn(pg_client, pg_user, chat, "Once only", headers=headers)
    second = post_turn(pg_client, pg_user, chat, "Once only", headers=headers)
    assert first.status_code == 201 and second.status_code == 201
    assert first.get_json()["id"] == second.get_json()["id"]
    assert second.get_json()["reply"] == first.get_json()["reply"]
    assert pg_db.scalar(select(func.count()).select_from(Turn)) == 1
    debits = pg_db.scalar(select(func.count()).select_from(LedgerEntry).where(LedgerEntry.amount != 0))
    assert debits == 1


def test_the_same_key_with_another_body_is_a_409(pg_client, pg_user, chat):
    post_turn(pg_client, pg_user, chat, "first body", headers={"Idempotency-Key": "k-2"})
    response = post_turn(pg_client, pg_user, chat, "second body", headers={"Idempotency-Key": "k-2"})
    assert response.status_code == 409
    assert response.get_json()["error"] == "idempotency_conflict"


def test_concurrent_duplicates_create_one_turn(pg_app, pg_user, chat, pg_db):
    def submit(_):
        client = pg_app.test_client()
        return post_turn(
            client, pg_user, chat, "race", headers={"Idempotency-Key": "k-race", "Prefer": "respond-async"}
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(submit, range(12)))
    assert {r.status_code for r in responses} <= {201, 202}
    assert len({r.get_json()["id"] for r in responses}) == 1
    assert pg_db.scalar(select(func.count()).select_from(Turn)) == 1


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"content": ""}, "empty_content"),
        ({"content": "   \n\t"}, "empty_content"),
        ({"content": "x" * 40_000}, "content_too_long"),
        ({"content": "hi", "model": "no-such-model"}, "model_not_priced"),
        ({"content": "hi", "max_output_tokens": 0}, "validation_error"),
        ({"content": "hi", "max_output_tokens": "12"}, "validation_error"),
        ({"content": "hi", "max_output_tokens": 10**9}, "validation_error"),
        ({"content": 5}, "validation_error"),
        ({"content": None}, "validation_error"),
        ({}, "validation_error"),
        ({"content": "hi", "extra": 1}, "validation_error"),
    ],
)
def test_invalid_turns_are_422_and_create_nothing(pg_client, pg_user, chat, pg_db, body, error):
    response = pg_client.post(f"/api/v1/sessions/{chat['id']}/turns", json=body, headers=pg_user.headers)
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"] == error
    assert pg_db.scalar(select(func.count()).select_from(Turn)) == 0


def test_other_users_sessions_and_turns_are_404(pg_client, pg_user, pg_admin, chat):
    turn = post_turn(pg_client, pg_user, chat, "mine").get_json()
    from tests.factories import make_actor

    other = make_actor(pg_client.application.extensions["tollgate"].db.sessionmaker(), "user")
    for path in (
        f"/api/v1/sessions/{chat['id']}",
        f"/api/v1/turns/{turn['id']}",
        f"/api/v1/rooms/{chat['room_id']}",
    ):
        response = pg_client.get(path, headers=other.headers)
        assert response.status_code == 404, path
        assert response.get_json()["error"] == "not_found"
    assert post_turn(pg_client, other, chat, "not yours").status_code == 404
    for bad in ("nope", "00000000-0000-0000-0000-000000000000", "x" * 300):
        assert pg_client.get(f"/api/v1/turns/{bad}", headers=pg_user.headers).status_code == 404


def test_a_provider_failure_fails_the_turn_and_bills_nothing(pg_client, pg_user, chat, pg_db):
    response = post_turn(pg_client, pg_user, chat, "please [[offline:fail]]")
    assert response.status_code == 201
    turn = response.get_json()
    assert turn["status"] == "failed"
    assert turn["error"]["code"] == "provider_rejected"
    assert turn["cost"] is None and turn["reply"] is None
    assert pg_db.scalar(select(func.count()).select_from(LedgerEntry).where(LedgerEntry.amount != 0)) == 0


def test_a_transient_provider_failure_is_retried_then_fails(pg_client, pg_user, chat, pg_db):
    response = post_turn(
        pg_client, pg_user, chat, "flaky [[offline:transient]]", headers={"Prefer": "respond-async"}
    )
    turn = wait_for(pg_client, pg_user, response.get_json()["id"], timeout=60)
    assert turn["status"] == "failed"
    assert turn["error"]["code"] == "provider_unavailable"
    attempts = pg_db.scalar(select(Turn.attempts).where(Turn.id == turn["id"]))
    assert attempts == 4  # the first run and three retries
    assert pg_db.scalar(select(func.count()).select_from(LedgerEntry).where(LedgerEntry.amount != 0)) == 0


def test_a_summary_is_generated_once_turns_leave_the_window(pg_client, pg_user, chat, pg_db):
    """Turn 10 completes a batch past the window: the refresh it sends folds turns 1-4 in the
    background; turn 11 goes on with them verbatim meanwhile."""
    for n in range(1, summaries.WINDOW_TURNS + summaries.SUMMARY_BATCH_TURNS + 2):
        turn = post_turn(pg_client, pg_user, chat, f"Message number {n}. It mentions topic {n}.").get_json()
        assert turn["status"] == "completed"
        assert turn["summary_used_fallback"] is False
    deadline = time.monotonic() + 30
    while True:
        session = pg_client.get(f"/api/v1/sessions/{chat['id']}", headers=pg_user.headers).get_json()
        if session["summary"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert session["summary"]
    assert session["summary_updated_at"]
    through = pg_db.scalar(select(ChatSession.summary_through_seq).where(ChatSession.id == chat["id"]))
    assert through >= summaries.SUMMARY_BATCH_TURNS


def test_the_fallback_flag_is_set_when_the_summary_generator_fails(pg_client, pg_user, chat):
    first = post_turn(pg_client, pg_user, chat, "Remember this. [[offline:fail-summary]]").get_json()
    assert first["summary_used_fallback"] is False
    first_due = summaries.WINDOW_TURNS + summaries.FOLD_IN_TURN_TURNS + 1
    turns = [
        post_turn(pg_client, pg_user, chat, f"Filler turn {n}.").get_json() for n in range(2, first_due + 1)
    ]
    assert all(t["status"] == "completed" for t in turns)
    flags = [t["summary_used_fallback"] for t in turns]
    # The refresh sent after turn 10 fails on turn 1's marker (nothing stored), so turns 11
    # to 14 keep the uncovered turns verbatim; turn 15 is the first whose context holds two
    # batches (turns 1-8) uncovered: it folds them itself, and falls back.
    assert flags[:-1] == [False] * (len(turns) - 1)
    assert flags[-1] is True
    session = pg_client.get(f"/api/v1/sessions/{chat['id']}", headers=pg_user.headers).get_json()
    assert "Remember this." in session["summary"]


def assert_completed_once_after_a_second_attempt(client, actor, pg_db, turn_id):
    turn = wait_for(client, actor, turn_id, timeout=60)
    assert turn["status"] == "completed"
    pg_db.expire_all()
    assert pg_db.scalar(select(Turn.attempts).where(Turn.id == turn_id)) == 2
    entries = pg_db.scalars(
        select(LedgerEntry).where(LedgerEntry.turn_id == turn_id, LedgerEntry.amount != 0)
    ).all()
    assert len(entries) == 1
    assert ledger_check.find_mismatches(pg_db) == []
    assert pg_db.scalar(select(func.count()).select_from(Hold).where(Hold.status == "active")) == 0


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_worker_child_killed_mid_turn_still_ends_the_turn_exactly_once(
    pg_client, pg_user, chat, pg_db, live_worker
):
    response = post_turn(
        pg_client, pg_user, chat, "slow one [[offline:sleep=3]]", headers={"Prefer": "respond-async"}
    )
    turn_id = response.get_json()["id"]
    wait_for(pg_client, pg_user, turn_id, statuses=("running",), timeout=15)
    for child in _children(live_worker.process.pid):
        os.kill(child, signal.SIGKILL)
    assert_completed_once_after_a_second_attempt(pg_client, pg_user, pg_db, turn_id)


def test_a_turn_whose_whole_worker_died_is_recovered_by_the_beat_job(
    pg_app, pg_client, pg_user, chat, pg_db, live_worker
):
    from shared.runtime import Runtime
    from shared.services import turn_runner

    response = post_turn(
        pg_client, pg_user, chat, "slow [[offline:sleep=4]]", headers={"Prefer": "respond-async"}
    )
    turn_id = response.get_json()["id"]
    wait_for(pg_client, pg_user, turn_id, statuses=("running",), timeout=15)
    # The whole worker (parent and children) dies: its message stays unacknowledged.
    os.killpg(live_worker.process.pid, signal.SIGKILL)
    live_worker.process.wait()
    live_worker.start()
    time.sleep(1.5)
    assert (
        pg_client.get(f"/api/v1/turns/{turn_id}", headers=pg_user.headers).get_json()["status"] == "running"
    )

    # Nobody renews the turn's lease (3 s for the live worker): the recovery job re-sends it
    # once it lapses, and only once per lease.
    runtime = Runtime(pg_app.extensions["tollgate"].settings, role="test")
    deadline = time.monotonic() + 15
    counts = turn_runner.recover_stuck_turns(runtime, pg_app.extensions["celery"])
    while counts["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
        counts = turn_runner.recover_stuck_turns(runtime, pg_app.extensions["celery"])
    assert counts["running"] == 1
    assert turn_runner.recover_stuck_turns(runtime, pg_app.extensions["celery"])["running"] == 0
    runtime.close()
    assert_completed_once_after_a_second_attempt(pg_client, pg_user, pg_db, turn_id)


def test_a_queued_turn_whose_task_was_lost_is_re_sent(pg_app, pg_client, pg_user, chat, pg_db):
    from datetime import timedelta

    from shared.db import utcnow
    from shared.runtime import Runtime
    from shared.services import turn_runner

    # A turn committed but never enqueued (the process died between the two steps).
    turn = Turn(
        session_id=chat["id"],
        room_id=chat["room_id"],
        user_id=pg_user.id,
        seq=1,
        content="lost task",
        model="offline-small",
        max_output_tokens=64,
        updated_at=utcnow() - timedelta(minutes=5),
    )
    pg_db.add(turn)
    pg_db.commit()
    runtime = Runtime(pg_app.extensions["tollgate"].settings, role="test")
    assert turn_runner.recover_stuck_turns(runtime, pg_app.extensions["celery"])["queued"] == 1
    runtime.close()
    done = wait_for(pg_client, pg_user, turn.id)
    assert done["status"] == "completed", (done["error_code"], done["error_message"])


def test_an_idempotency_key_holding_a_nul_is_a_422_not_a_database_error(pg_client, pg_user, chat):
    # Postgres text cannot hold a NUL; the key is refused before it reaches the database.
    response = post_turn(pg_client, pg_user, chat, "hi", headers={"Idempotency-Key": "a\x00b"})
    assert response.status_code == 422 and response.get_json()["error"] == "invalid_idempotency_key"


def add_a_batch_past_the_window(pg_db, chat, user_id: str) -> None:
    """Completed turns up to a batch past the window: a summary refresh has turns to fold."""
    from shared.db import utcnow

    for seq in range(1, summaries.WINDOW_TURNS + summaries.SUMMARY_BATCH_TURNS + 1):
        pg_db.add(
            Turn(
                session_id=chat["id"],
                room_id=chat["room_id"],
                user_id=user_id,
                seq=seq,
                content=f"question {seq}. More words.",
                reply=f"answer {seq}. More words.",
                status="completed",
                model="offline-small",
                max_output_tokens=64,
                completed_at=utcnow(),
            )
        )
    pg_db.commit()


def test_a_summary_refresh_does_not_hold_the_wallet_while_it_waits_for_the_chat_session(
    pg_app, pg_admin, pg_user, chat, pg_db
):
    """Admissions lock the chat session, then the wallet. A refresh that billed (wallet
    locked) and then stored (session row) in one transaction deadlocked with one."""
    import threading
    from decimal import Decimal

    from shared.providers import OfflineProvider
    from shared.runtime import Runtime
    from shared.services import billing, turn_runner, turns

    grant = dict(actor_id=pg_admin.id, user_id=pg_user.id, reason=None, idempotency_key=None)
    billing.grant_credit(pg_db, amount=Decimal("5"), **grant)
    add_a_batch_past_the_window(pg_db, chat, pg_user.id)
    runtime = Runtime(pg_app.extensions["tollgate"].settings, role="test")
    outcome = {}
    try:
        # An admission's order: the chat session's row, then (after a pause) the wallet.
        with runtime.db.session() as admission:
            turns._lock_session(admission, pg_user.id, chat["id"], runtime.settings.default_model, None)
            refresh = threading.Thread(
                target=lambda: outcome.update(
                    stored=turn_runner.refresh_summary(runtime, chat["id"], provider=OfflineProvider())
                )
            )
            refresh.start()
            time.sleep(1.5)  # the refresh bills, then waits for the session row to store
            billing.grant_credit(admission, amount=Decimal("1"), **grant)  # the wallet, or a deadlock
        refresh.join(10)
        assert outcome == {"stored": True}
    finally:
        runtime.close()


def test_a_sync_turn_is_answered_from_its_push_as_a_read_would(pg_client, pg_user, chat, monkeypatch):
    """The worker's push carries a completed turn without tool calls whole: the sync POST
    answers from it without reading the turn again, and the JSON is the GET's, byte for
    byte. A turn with a tool call is read again (its push carries only the id)."""
    from shared.services import turns

    reads = []
    real_reread = turns._reread
    monkeypatch.setattr(turns, "_reread", lambda *args: reads.append(args[1].id) or real_reread(*args))

    def posted_and_read(content):
        response = post_turn(pg_client, pg_user, chat, content)
        assert response.status_code == 201
        posted = response.get_json()
        read = pg_client.get(f"/api/v1/turns/{posted['id']}", headers=pg_user.headers).get_json()
        return posted, read

    posted, read = posted_and_read("What is the capital of France?")
    assert posted["status"] == "completed" and posted["cost"] is not None
    assert posted == read
    assert reads == []  # answered from the push
    posted, read = posted_and_read("Please search for capital cities.")
    assert posted["status"] == "completed" and len(posted["tool_calls"]) == 1
    assert posted == read
    assert reads == [posted["id"]]  # no whole turn in the push: read once it came


def test_a_summary_refresh_bills_on_the_model_its_message_names_and_stores_in_autocommit(
    pg_app, pg_admin, pg_user, pg_client, pg_db, monkeypatch
):
    """The refresh a completed turn sends names the turn's model (no query for it), and its
    store is one autocommit UPDATE (no BEGIN/COMMIT around it): two round trips fewer than a
    refresh told nothing, for the same summary and the same charge."""
    from decimal import Decimal

    from shared.providers import OfflineProvider
    from shared.services import billing, turn_runner
    from tests.integration.test_hot_path_pg import counting

    billing.grant_credit(
        pg_db,
        actor_id=pg_admin.id,
        user_id=pg_user.id,
        amount=Decimal("5"),
        reason=None,
        idempotency_key=None,
    )
    runtime = pg_app.extensions["tollgate"]
    # Transaction commands (BEGIN, COMMIT) go through psycopg's _exec_command, not a cursor.
    commands: list[bytes] = []
    exec_command = psycopg.Connection._exec_command
    monkeypatch.setattr(
        psycopg.Connection,
        "_exec_command",
        lambda self, command, *args, **kwargs: (
            commands.append(bytes(command)) if isinstance(command, bytes) else None,
            exec_command(self, command, *args, **kwargs),
        )[1],
    )
    outcomes = []
    # The first refresh seeds the price and reads the enforcement state into Redis: not counted.
    for model in ("offline-small", None, "offline-small"):
        room = pg_client.post("/api/v1/rooms", json={"name": "r"}, headers=pg_user.headers).get_json()
        chat = pg_client.post(
            f"/api/v1/rooms/{room['id']}/sessions", json={}, headers=pg_user.headers
        ).get_json()
        add_a_batch_past_the_window(pg_db, chat, pg_user.id)
        commands.clear()
        with counting(runtime.db.engine) as counts:
            stored = turn_runner.refresh_summary(runtime, chat["id"], provider=OfflineProvider(), model=model)
        transactions = list(commands)
        pg_db.expire_all()
        summary = pg_db.get(ChatSession, chat["id"])
        charge = pg_db.scalar(
            select(LedgerEntry.amount).where(
                LedgerEntry.reason == billing.SUMMARY_REASON,
                LedgerEntry.idempotency_key.like(f"summary:{chat['id']}:%"),
            )
        )
        outcomes.append(
            (stored, summary.summary_through_seq, summary.summary, charge, counts.statements, transactions)
        )
    _, told_nothing, told_model = outcomes
    assert told_nothing[0] is told_model[0] is True
    assert told_nothing[1] == told_model[1] == summaries.SUMMARY_BATCH_TURNS
    assert told_nothing[2] == told_model[2] and told_nothing[3] == told_model[3] < 0
    assert told_model[4] == told_nothing[4] - 1  # no query for the model
    # No transaction: the reads, the charge (one guarded statement) and the store each run
    # in autocommit.
    assert told_model[5] == told_nothing[5] == []
