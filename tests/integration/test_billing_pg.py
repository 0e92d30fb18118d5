"""The ledger under real concurrency on Postgres: grants, holds, settlement, expiry, ledger-check."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, select

from shared.db import new_id
from shared.errors import InsufficientBalance
from shared.models import Hold, LedgerEntry, UsageHour, Wallet
from shared.services import billing, ledger_check
from shared.task_names import TaskName
from tests.integration.conftest import ROOT, service_env

D = Decimal


def run_threads(count: int, target) -> list:
    """Run ``target(i)`` in ``count`` threads released together by a barrier; returns results."""
    barrier = threading.Barrier(count)

    def go(i: int):
        barrier.wait(timeout=30)
        return target(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(go, range(count)))


def ledger_check_cli(settings) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "ledger-check"],
        cwd=ROOT,
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


def wallet_of(session, user_id) -> Wallet:
    session.expire_all()
    return session.scalar(select(Wallet).where(Wallet.user_id == user_id))


def fund(session, admin, user, amount: str) -> None:
    billing.grant_credit(
        session, actor_id=admin.id, user_id=user.id, amount=D(amount), reason=None, idempotency_key=None
    )


def test_fifty_concurrent_grants_with_ten_keys_credit_exactly_ten_times(
    pg_app, pg_admin, pg_user, pg_settings
):
    runtime = pg_app.extensions["tollgate"]

    def grant(i: int) -> str:
        with runtime.db.session() as session:
            entry = billing.grant_credit(
                session,
                actor_id=pg_admin.id,
                user_id=pg_user.id,
                amount=D("1.5"),
                reason="promo",
                idempotency_key=f"promo-{i % 10}",
            )
            return entry.id

    entry_ids = run_threads(50, grant)
    assert len(set(entry_ids)) == 10  # every duplicate got the first entry back
    with runtime.db.session() as session:
        grants = session.scalar(
            select(func.count()).select_from(LedgerEntry).where(LedgerEntry.kind == "grant")
        )
        assert grants == 10
        assert wallet_of(session, pg_user.id).balance == D("15")
        assert ledger_check.find_mismatches(session) == []
    result = ledger_check_cli(pg_settings)
    assert result.returncode == 0, result.stdout + result.stderr


def test_concurrent_duplicate_grant_requests_over_http_credit_once(pg_app, pg_admin, pg_user):
    def post(_i: int):
        client = pg_app.test_client()
        response = client.post(
            f"/api/v1/admin/users/{pg_user.id}/grants",
            json={"amount": "2"},
            headers={**pg_admin.headers, "Idempotency-Key": "http-dup"},
        )
        return response.status_code, response.get_json()["id"]

    results = run_threads(12, post)
    assert {status for status, _ in results} == {201}
    assert len({entry_id for _, entry_id in results}) == 1
    balance = pg_app.test_client().get("/api/v1/wallet", headers=pg_user.headers).get_json()["balance"]
    assert balance == "2.000000"


def test_sixty_four_concurrent_turns_on_a_small_wallet_never_overdraw(pg_app, pg_admin, pg_user, pg_settings):
    runtime = pg_app.extensions["tollgate"]
    with runtime.db.session() as session:
        fund(session, pg_admin, pg_user, "1")
    hold_amount, cost = D("0.25"), D("0.2")
    seen_balances: list[Decimal] = []

    def turn(_i: int) -> str:
        turn_id = new_id()
        with runtime.db.session() as session:
            try:
                billing.place_hold(
                    session, user_id=pg_user.id, turn_id=turn_id, amount=hold_amount, ttl_seconds=300
                )
                session.commit()
            except InsufficientBalance:
                session.rollback()
                return "refused"
            balance_after = billing.settle_turn(
                session,
                user_id=pg_user.id,
                turn_id=turn_id,
                model="offline-small",
                cost=cost,
                input_tokens=100,
                output_tokens=100,
                at=datetime.now(UTC),
                enforced=True,
            )
            session.commit()
            seen_balances.append(balance_after.balance_after)
            return "ran"

    outcomes = run_threads(64, turn)
    ran = outcomes.count("ran")
    # A 5th hold would need 1 - 0.2k - 0.25(4-k) >= 0.25, i.e. k >= 5 settled turns: exactly 4 fit.
    assert ran == 4
    assert outcomes.count("refused") == 64 - ran
    assert min(seen_balances) >= 0
    with runtime.db.session() as session:
        wallet = wallet_of(session, pg_user.id)
        assert wallet.balance == D("1") - cost * ran
        assert wallet.balance >= 0 and wallet.held == 0
        assert ledger_check.find_mismatches(session) == []
        rollup = session.scalar(select(UsageHour).where(UsageHour.scope == pg_user.id))
        assert (rollup.turns, rollup.cost) == (ran, cost * ran)
    assert ledger_check_cli(pg_settings).returncode == 0


def test_a_hold_raced_by_capture_release_and_expiry_resolves_exactly_once(pg_app, pg_admin, pg_user):
    runtime = pg_app.extensions["tollgate"]
    with runtime.db.session() as session:
        fund(session, pg_admin, pg_user, "100")
        turn_ids = []
        for _ in range(8):
            turn_id = new_id()
            billing.place_hold(session, user_id=pg_user.id, turn_id=turn_id, amount=D("2"), ttl_seconds=0)
            turn_ids.append(turn_id)
        session.commit()

    def contender(i: int):
        turn_id = turn_ids[i // 3]
        with runtime.db.session() as session:
            if i % 3 == 0:
                billing.settle_turn(
                    session,
                    user_id=pg_user.id,
                    turn_id=turn_id,
                    model="offline-small",
                    cost=D("1"),
                    input_tokens=1,
                    output_tokens=1,
                    at=datetime.now(UTC),
                    enforced=True,
                )
            elif i % 3 == 1:
                billing.release_hold(session, turn_id=turn_id, reason="cancelled")
            else:
                billing.expire_stale_holds(session, now=datetime.now(UTC) + timedelta(seconds=1))
            session.commit()

    run_threads(24, contender)
    with runtime.db.session() as session:
        holds = session.scalars(select(Hold)).all()
        assert {h.status for h in holds} <= {"captured", "released", "expired"}
        for turn_id in turn_ids:
            resolutions = session.scalars(
                select(LedgerEntry.kind).where(
                    LedgerEntry.turn_id == turn_id, LedgerEntry.kind.in_(["capture", "expiry"])
                )
            ).all()
            releases = session.scalars(
                select(LedgerEntry.reason).where(
                    LedgerEntry.turn_id == turn_id, LedgerEntry.kind == "release"
                )
            ).all()
            # Exactly one way out: a capture (plus its remainder release), a release, or an expiry.
            assert len(resolutions) + len([r for r in releases if r == "cancelled"]) == 1
        wallet = wallet_of(session, pg_user.id)
        assert wallet.held == 0
        assert ledger_check.find_mismatches(session) == []


def test_stale_holds_expire_on_postgres_and_free_the_credit(pg_app, pg_admin, pg_user):
    runtime = pg_app.extensions["tollgate"]
    with runtime.db.session() as session:
        fund(session, pg_admin, pg_user, "5")
        for ttl in (0, 0, 3600):
            billing.place_hold(session, user_id=pg_user.id, turn_id=new_id(), amount=D("1"), ttl_seconds=ttl)
        session.commit()
        assert billing.expire_stale_holds(session, now=datetime.now(UTC) + timedelta(seconds=1)) == 2
        wallet = wallet_of(session, pg_user.id)
        assert (wallet.balance, wallet.held, wallet.available) == (D("5"), D("1"), D("4"))
        assert ledger_check.find_mismatches(session) == []


def test_the_beat_task_expires_holds_in_a_live_worker(pg_app, pg_admin, pg_user, live_worker):
    from worker.celery_app import create_celery_app

    runtime = pg_app.extensions["tollgate"]
    with runtime.db.session() as session:
        fund(session, pg_admin, pg_user, "5")
        stale = billing.place_hold(
            session, user_id=pg_user.id, turn_id=new_id(), amount=D("2"), ttl_seconds=0
        )
        session.commit()
    celery_app = create_celery_app(live_worker.settings, role="test")
    celery_app.send_task(TaskName.EXPIRE_HOLDS)  # fire and forget, as beat sends it
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with runtime.db.session() as session:
            if session.get(Hold, stale.id).status == "expired":
                break
        time.sleep(0.1)
    with runtime.db.session() as session:
        assert session.get(Hold, stale.id).status == "expired"
        assert wallet_of(session, pg_user.id).available == D("5")


def test_summary_usage_on_postgres_bills_what_is_available_and_rolls_up_once(pg_app, pg_admin, pg_user):
    # The covered case is one statement (wallet, entry, usage); the uncovered one is refused
    # by that statement's condition and must then write the usage once, at the capped charge.
    db = pg_app.extensions["tollgate"].db
    kwargs = dict(user_id=pg_user.id, model="offline-small", input_tokens=1000, output_tokens=500)
    with db.session() as session:
        fund(session, pg_admin, pg_user, "0.003")
        session.commit()
        covered = billing.record_summary_usage(
            session, chat_session_id="s1", through_seq=4, enforce=True, **kwargs
        )
        session.commit()
        capped = billing.record_summary_usage(
            session, chat_session_id="s2", through_seq=4, enforce=True, **kwargs
        )
        session.commit()
        again = billing.record_summary_usage(
            session, chat_session_id="s2", through_seq=4, enforce=True, **kwargs
        )
        session.commit()
        assert (covered, capped, again) == (D("0.002"), D("0.001"), D("0"))
        assert wallet_of(session, pg_user.id).balance == D("0")
        mine = session.scalar(select(UsageHour).where(UsageHour.scope == pg_user.id))
        assert (mine.turns, mine.input_tokens, mine.output_tokens, mine.cost) == (0, 2000, 1000, D("0.003"))
        entries = session.scalars(
            select(LedgerEntry.amount)
            .where(LedgerEntry.user_id == pg_user.id)
            .order_by(LedgerEntry.created_at)
        ).all()
        assert entries == [D("0.003"), D("-0.002"), D("-0.001")]
        assert ledger_check.find_mismatches(session) == []
