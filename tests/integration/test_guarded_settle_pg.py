"""A claimed turn's settlement as one autocommit statement (``billing.SettleGuard``), on
Postgres: the statement locks the turn, then its hold, and moves the wallet only while
they are as the claim left them and the move fires no wallet webhook event; anything
else goes the locked transaction's way, billed once all the same."""

from __future__ import annotations

import threading
import time
from decimal import Decimal as D

import psycopg
import pytest
from sqlalchemy import func, select, update

from shared.models import Hold, LedgerEntry, Turn, Wallet, WebhookEvent
from shared.providers import OfflineProvider
from shared.services import billing, pricing, turn_runner
from shared.tools.registry import build_registry
from tests.integration import test_money_pg as money
from tests.integration.test_hot_path_pg import counting
from tests.integration.test_money_pg import assert_books_clean, charged_for, fresh, grant, submit

# The money tests' fixtures, by the same names.
runtime, enforced, chat = money.runtime, money.enforced, money.chat


@pytest.fixture
def transaction_commands(monkeypatch) -> list[bytes]:
    """psycopg's transaction commands (BEGIN, COMMIT, ROLLBACK) as they are sent."""
    commands: list[bytes] = []
    exec_command = psycopg.Connection._exec_command

    def recording(self, command, *args, **kwargs):
        if isinstance(command, bytes):
            commands.append(command.split()[0])
        return exec_command(self, command, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "_exec_command", recording)
    return commands


def claimed_and_answered(runtime, turn_id: str) -> tuple[turn_runner.Claimed, turn_runner.Execution]:
    """The turn claimed by the one statement, and an answer as its model call left it."""
    claimed = turn_runner.claim(runtime, turn_id, takeover=False, held=claimed_turn_is_held(runtime, turn_id))
    assert claimed is not None and claimed.guard is not None
    result = turn_runner.Execution()
    result.add(120, 30)
    result.reply = "Paris."
    with runtime.db.session() as session:
        result.price = pricing.price_in_force(session, claimed.turn.model)
        session.commit()
    return claimed, result


def claimed_turn_is_held(runtime, turn_id: str) -> bool:
    with runtime.db.session() as session:
        return bool(session.scalar(select(Turn.enforced).where(Turn.id == turn_id)))


def subscribe(client, admin, event: str) -> None:
    """A webhook endpoint for ``event``: its events are written (the outbox), whatever the
    deliveries then do."""
    response = client.post(
        "/api/v1/admin/webhooks",
        json={"url": "https://hooks.example.com/tollgate", "events": [event]},
        headers=admin.headers,
    )
    assert response.status_code == 201, response.get_json()


@pytest.mark.parametrize("enforcement", ["on", "off"])
def test_a_claimed_turn_runs_and_settles_without_a_transaction(
    enforcement,
    request,
    runtime,
    pg_db,
    pg_admin,
    pg_user,
    chat,
    transaction_commands,
):
    if enforcement == "on":
        request.getfixturevalue("enforced")
    grant(pg_db, pg_admin, pg_user, "10")
    turn_id = submit(runtime, pg_db, pg_user, chat, "a question").id
    held = fresh(pg_db, Turn, id=turn_id).enforced
    transaction_commands.clear()
    with counting(runtime.db.engine) as counts:
        outcome = turn_runner.run_turn(
            runtime,
            turn_id,
            provider=OfflineProvider(),
            tools=build_registry(),
            takeover=False,
            final_attempt=True,
            held=held,
        )
    assert outcome == "completed"
    # The claim, the context, the settlement: each a statement of its own, no BEGIN.
    assert counts.statements == 3 and transaction_commands == [], (counts.sql, transaction_commands)
    done = fresh(pg_db, Turn, id=turn_id)
    assert done.cost == charged_for(pg_db, turn_id) > 0
    assert done.balance_after == fresh(pg_db, Wallet, user_id=pg_user.id).balance
    if held:
        assert fresh(pg_db, Hold, turn_id=turn_id).status == "captured"
    assert_books_clean(pg_db)


@pytest.mark.parametrize("changed", ["lease taken over", "hold released"])
def test_a_turn_no_longer_as_claimed_is_settled_the_usual_way_once(
    changed,
    enforced,
    runtime,
    pg_db,
    pg_admin,
    pg_user,
    chat,
):
    """Between the claim and the settlement another worker took the turn's lease, or its
    hold was released: the guarded statement writes nothing, and the locked transaction
    settles the turn (a capture; a debit of what is available once the hold is gone)."""
    grant(pg_db, pg_admin, pg_user, "10")
    turn_id = submit(runtime, pg_db, pg_user, chat, "a question").id
    claimed, result = claimed_and_answered(runtime, turn_id)
    if changed == "lease taken over":
        pg_db.execute(update(Turn).where(Turn.id == turn_id).values(lease_owner="another-worker"))
        pg_db.commit()
    else:
        assert billing.release_hold(pg_db, turn_id=turn_id, reason="test")
        pg_db.commit()
    with counting(runtime.db.engine) as counts:
        assert turn_runner.complete(runtime, turn_id, result, claimed)
    assert counts.sql[0].startswith("WITH guarded_turn")  # tried first, moved nothing
    assert any(sql.startswith("WITH locked_turn") for sql in counts.sql[1:])  # then the lock
    done = fresh(pg_db, Turn, id=turn_id)
    entries = pg_db.scalar(
        select(func.count())
        .select_from(LedgerEntry)
        .where(LedgerEntry.turn_id == turn_id, LedgerEntry.kind.in_(("capture", "debit")))
    )
    assert done.status == "completed" and entries == 1
    assert done.cost == charged_for(pg_db, turn_id) == pricing.cost_of(result.price, 120, 30)
    assert fresh(pg_db, Hold, turn_id=turn_id).status == (
        "captured" if changed == "lease taken over" else "released"
    )
    assert_books_clean(pg_db)


@pytest.mark.parametrize("event", ["wallet.low_balance", "wallet.depleted"])
def test_a_charge_that_fires_a_wallet_event_is_settled_the_way_that_writes_it(
    event,
    runtime,
    pg_db,
    pg_client,
    pg_admin,
    pg_user,
    chat,
):
    """Wallet events are written with the move by the outbox's commit hook, which a
    statement on its own does not run: a charge that crosses the low-balance line or empties
    the available credit leaves the guarded statement for the locked transaction, and the
    event is there. (Enforcement off: a debit may take the balance to zero or under.)"""
    subscribe(pg_client, pg_admin, event)
    turn_id = submit(runtime, pg_db, pg_user, chat, "a question").id
    claimed, result = claimed_and_answered(runtime, turn_id)
    cost = pricing.cost_of(result.price, 120, 30)
    threshold = runtime.settings.low_balance_threshold
    # Just above the line the charge then crosses.
    grant(pg_db, pg_admin, pg_user, str(threshold + cost / 2 if event == "wallet.low_balance" else cost / 2))
    with counting(runtime.db.engine) as counts:
        assert turn_runner.complete(runtime, turn_id, result, claimed)
    assert counts.sql[0].startswith("WITH guarded_turn")
    assert any(sql.startswith("WITH locked_turn") for sql in counts.sql[1:])
    assert pg_db.scalar(select(func.count()).select_from(WebhookEvent).where(WebhookEvent.type == event)) == 1
    assert fresh(pg_db, Turn, id=turn_id).cost == charged_for(pg_db, turn_id) == cost
    assert_books_clean(pg_db)


def test_the_guarded_settlement_locks_the_turn_before_its_hold(
    enforced,
    runtime,
    pg_app,
    pg_admin,
    pg_user,
    chat,
):
    """While a cancel holds the turn's lock, the guarded statement waits on it holding
    nothing: the cancel gets the hold at once (NOWAIT). Once the cancel lets go without
    changing anything, the statement settles the turn as claimed."""
    db = pg_app.extensions["tollgate"].db
    with db.session() as setup:
        grant(setup, pg_admin, pg_user, "10")
        turn_id = submit(runtime, setup, pg_user, chat, "a question").id
    claimed, result = claimed_and_answered(runtime, turn_id)
    outcome: list = []
    with db.engine.connect() as cancel:
        cancel.execute(select(Turn.id).where(Turn.id == turn_id).with_for_update(key_share=True))
        settling = threading.Thread(
            target=lambda: outcome.append(turn_runner.complete(runtime, turn_id, result, claimed))
        )
        with counting(runtime.db.engine) as counts:
            settling.start()
            time.sleep(0.5)
            assert settling.is_alive()  # waiting for the turn
            cancel.execute(
                select(Hold.id).where(Hold.turn_id == turn_id).with_for_update(key_share=True, nowait=True)
            )
            cancel.rollback()
            settling.join(timeout=10)
    # The guarded statement alone: no locked transaction after it.
    assert outcome == [True] and not any(sql.startswith("WITH locked_turn") for sql in counts.sql)
    assert sum(sql.startswith("WITH guarded_turn") for sql in counts.sql) == 1
    with db.session() as check:
        assert check.scalar(select(Hold.status).where(Hold.turn_id == turn_id)) == "captured"
        assert (
            charged_for(check, turn_id)
            == check.get(Turn, turn_id).cost
            == pricing.cost_of(result.price, 120, 30)
        )
        assert_books_clean(check)


def test_a_summary_charge_is_one_statement_and_anything_else_goes_the_usual_way(
    runtime, pg_db, pg_client, pg_admin, pg_user, chat
):
    """A summary refresh's charge in autocommit (``events_at``): one statement moves the
    wallet unless the summary was charged already or the charge fires a wallet event; then
    it writes nothing (None) and the usual charge decides (nothing again, or the charge
    with its event)."""
    subscribe(pg_client, pg_admin, "wallet.low_balance")
    threshold = runtime.settings.low_balance_threshold
    grant(pg_db, pg_admin, pg_user, str(threshold + D("1")))
    price = pricing.price_in_force(pg_db, "offline-small")
    pg_db.commit()

    def charge(through_seq: int, tokens: int, *, guarded: bool):
        with runtime.db.session() as session:
            if guarded:
                runtime.db.reads_without_transaction(session)
            with counting(runtime.db.engine) as counts:
                charged = billing.record_summary_usage(
                    session,
                    user_id=pg_user.id,
                    chat_session_id=chat.id,
                    through_seq=through_seq,
                    model="offline-small",
                    input_tokens=tokens,
                    output_tokens=tokens,
                    price=price,
                    events_at=threshold if guarded else None,
                )
            session.commit()
        return charged, counts

    first, counts = charge(4, 100, guarded=True)
    assert first == pricing.cost_of(price, 100, 100) > 0 and counts.statements == 1
    assert charge(4, 100, guarded=True)[0] is None  # charged already: nothing written
    assert charge(4, 100, guarded=False)[0] == 0  # and the usual way charges nothing again
    # A charge that takes the balance under the threshold: not in one statement.
    costly = int(1_000_000 * (fresh(pg_db, Wallet, user_id=pg_user.id).balance - threshold) / 3) + 1
    assert charge(8, costly, guarded=True)[0] is None
    assert pg_db.scalar(select(func.count()).select_from(WebhookEvent)) == 0
    assert charge(8, costly, guarded=False)[0] == pricing.cost_of(price, costly, costly)
    assert pg_db.scalar(select(func.count()).select_from(WebhookEvent)) == 1
    entries = pg_db.scalars(
        select(LedgerEntry.idempotency_key).where(LedgerEntry.reason == billing.SUMMARY_REASON)
    )
    assert sorted(entries) == [f"summary:{chat.id}:4", f"summary:{chat.id}:8"]
    assert_books_clean(pg_db)
