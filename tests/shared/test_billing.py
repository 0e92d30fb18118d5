"""The ledger's one writer, on SQLite: grants, holds, settlement, expiry, rollups, pricing, enforcement."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select

from shared.db import new_id
from shared.errors import IdempotencyConflict, InsufficientBalance, InvalidInput, NotFound
from shared.models import (
    ALL_USERS,
    ALL_USERS_AT_30,
    AdminAuditEvent,
    Hold,
    LedgerEntry,
    ModelPrice,
    SettingEntry,
    UsageHour,
    Wallet,
)
from shared.runtime import Runtime
from shared.services import billing, enforcement, ledger_check, pricing

D = Decimal


def wallet_of(db, user_id) -> Wallet:
    db.expire_all()
    return db.scalar(select(Wallet).where(Wallet.user_id == user_id))


def entries(db, user_id) -> list[LedgerEntry]:
    db.expire_all()
    return list(
        db.scalars(select(LedgerEntry).where(LedgerEntry.user_id == user_id).order_by(LedgerEntry.created_at))
    )


def fund(db, admin, user, amount="10") -> None:
    billing.grant_credit(
        db, actor_id=admin.id, user_id=user.id, amount=D(amount), reason="test", idempotency_key=None
    )


def hold(db, user, amount, ttl=900, turn_id=None) -> Hold:
    turn_id = turn_id or new_id()
    placed = billing.place_hold(db, user_id=user.id, turn_id=turn_id, amount=D(amount), ttl_seconds=ttl)
    db.commit()
    return placed


def settle(db, user, turn_id, cost, at=None, enforced=False) -> Decimal:
    settled = billing.settle_turn(
        db,
        user_id=user.id,
        turn_id=turn_id,
        model="offline-small",
        cost=D(cost),
        input_tokens=100,
        output_tokens=50,
        at=at or datetime.now(UTC),
        enforced=enforced,
    )
    db.commit()
    return settled.balance_after


def assert_ledger_clean(db) -> None:
    db.expire_all()
    assert ledger_check.find_mismatches(db) == []


# -- grants -----------------------------------------------------------------------------------


def test_a_grant_credits_the_wallet_with_an_attributed_entry_and_an_audit_event(db, admin, user):
    entry = billing.grant_credit(
        db,
        actor_id=admin.id,
        user_id=user.id,
        amount=D("12.5"),
        reason=" welcome ",
        idempotency_key="k1",
    )
    assert (entry.kind, entry.amount, entry.balance_after) == ("grant", D("12.5"), D("12.5"))
    assert entry.initiated_by == admin.id and entry.reason == "welcome"
    assert wallet_of(db, user.id).balance == D("12.5")
    event = db.scalar(select(AdminAuditEvent).where(AdminAuditEvent.action == "wallet.grant"))
    assert event.actor_id == admin.id and event.target == user.id
    assert event.details["amount"] == "12.500000"
    assert_ledger_clean(db)


def test_replaying_a_grant_key_returns_the_first_entry_and_credits_once(db, admin, user):
    first = billing.grant_credit(
        db, actor_id=admin.id, user_id=user.id, amount=D("5"), reason=None, idempotency_key="same"
    )
    again = billing.grant_credit(
        db, actor_id=admin.id, user_id=user.id, amount=D("5.000000"), reason=None, idempotency_key="same"
    )
    assert again.id == first.id
    assert wallet_of(db, user.id).balance == D("5")


def test_a_grant_key_reused_for_another_amount_or_user_is_a_conflict(db, admin, user):
    billing.grant_credit(
        db, actor_id=admin.id, user_id=user.id, amount=D("5"), reason=None, idempotency_key="k"
    )
    with pytest.raises(IdempotencyConflict):
        billing.grant_credit(
            db, actor_id=admin.id, user_id=user.id, amount=D("6"), reason=None, idempotency_key="k"
        )
    with pytest.raises(IdempotencyConflict):
        billing.grant_credit(
            db, actor_id=admin.id, user_id=admin.id, amount=D("5"), reason=None, idempotency_key="k"
        )
    assert wallet_of(db, user.id).balance == D("5")
    assert wallet_of(db, admin.id).balance == D("0")


@pytest.mark.parametrize("amount", ["0", "-1", "1.0000001", "NaN", "Infinity", "-Infinity", "1e13"])
def test_grants_outside_the_domain_are_refused_with_invalid_amount(db, admin, user, amount):
    with pytest.raises(InvalidInput) as caught:
        billing.grant_credit(
            db, actor_id=admin.id, user_id=user.id, amount=D(amount), reason=None, idempotency_key=None
        )
    assert caught.value.error == "invalid_amount"
    assert entries(db, user.id) == []


@pytest.mark.parametrize("amount", ["1", "2.50", "0.000001", "1e12"])
def test_grant_amounts_are_exact_decimals(db, admin, user, amount):
    entry = billing.grant_credit(
        db, actor_id=admin.id, user_id=user.id, amount=D(amount), reason=None, idempotency_key=None
    )
    assert entry.amount == D(amount)


def test_a_grant_to_an_unknown_user_is_not_found(db, admin):
    with pytest.raises(NotFound):
        billing.grant_credit(
            db, actor_id=admin.id, user_id=new_id(), amount=D("1"), reason=None, idempotency_key=None
        )


# -- holds and settlement -----------------------------------------------------------------------


def test_a_hold_reserves_credit_without_moving_the_balance(db, admin, user):
    fund(db, admin, user, "10")
    placed = hold(db, user, "4")
    wallet = wallet_of(db, user.id)
    assert (wallet.balance, wallet.held, wallet.available) == (D("10"), D("4"), D("6"))
    assert placed.status == "active" and placed.expires_at > datetime.now(UTC)
    assert entries(db, user.id)[-1].kind == "hold"
    assert_ledger_clean(db)


def test_a_hold_larger_than_available_is_refused_with_the_numbers(db, admin, user):
    fund(db, admin, user, "10")
    hold(db, user, "7")
    with pytest.raises(InsufficientBalance) as caught:
        billing.place_hold(db, user_id=user.id, turn_id=new_id(), amount=D("3.5"), ttl_seconds=60)
    db.rollback()
    assert caught.value.details == {"balance": "10.000000", "available": "3.000000", "required": "3.500000"}
    assert wallet_of(db, user.id).held == D("7")


def test_settling_captures_the_actual_cost_and_releases_the_rest(db, admin, user):
    fund(db, admin, user, "10")
    placed = hold(db, user, "4")
    balance_after = settle(db, user, placed.turn_id, "1.25")
    assert balance_after == D("8.75")
    wallet = wallet_of(db, user.id)
    assert (wallet.balance, wallet.held) == (D("8.75"), D("0"))
    assert [e.kind for e in entries(db, user.id)] == ["grant", "hold", "capture", "release"]
    assert db.get(Hold, placed.id).status == "captured"
    assert_ledger_clean(db)


def test_a_provider_counting_past_the_hold_is_charged_the_hold_and_never_overdraws(db, admin, user):
    # The runner keeps a turn within its hold by its own estimate; a provider that still
    # reports more is charged no more than the hold (counted in tollgate_uncovered_charge_micros).
    fund(db, admin, user, "2")
    placed = hold(db, user, "2")
    assert settle(db, user, placed.turn_id, "3", enforced=True) == D("0")
    assert wallet_of(db, user.id).held == D("0")
    assert_ledger_clean(db)
    assert ledger_check.find_violations(db) == []


def test_a_turn_whose_hold_expired_settles_only_against_available_credit(db, admin, user):
    fund(db, admin, user, "1")
    placed = hold(db, user, "1", ttl=0)
    assert billing.expire_stale_holds(db, now=datetime.now(UTC) + timedelta(seconds=1)) == 1
    # Another turn reserves most of the freed credit before the first one settles.
    hold(db, user, "0.75")
    assert settle(db, user, placed.turn_id, "0.5", enforced=True) == D("0.75")
    wallet = wallet_of(db, user.id)
    assert (wallet.balance, wallet.held) == (D("0.75"), D("0.75"))
    assert entries(db, user.id)[-1].kind == "debit" and entries(db, user.id)[-1].amount == D("-0.25")
    assert_ledger_clean(db)


def test_an_unenforced_turn_settling_after_its_hold_was_released_pays_its_full_cost(db, admin, user):
    fund(db, admin, user, "1")
    placed = hold(db, user, "1")
    billing.release_hold(db, turn_id=placed.turn_id, reason="test")
    db.commit()
    assert settle(db, user, placed.turn_id, "1.5") == D("-0.5")


def test_without_a_hold_the_debit_may_take_the_balance_below_zero(db, admin, user):
    fund(db, admin, user, "1")
    assert settle(db, user, new_id(), "2.5") == D("-1.5")
    assert entries(db, user.id)[-1].kind == "debit"
    assert entries(db, user.id)[-1].initiated_by == "system"
    assert_ledger_clean(db)


def test_settling_a_turn_twice_bills_it_once(db, admin, user):
    fund(db, admin, user, "10")
    turn_id = hold(db, user, "4").turn_id
    first = settle(db, user, turn_id, "1")
    second = settle(db, user, turn_id, "1")
    assert first == second == D("9")
    plain = new_id()
    assert settle(db, user, plain, "2") == settle(db, user, plain, "2") == D("7")
    assert [e.kind for e in entries(db, user.id)] == ["grant", "hold", "capture", "release", "debit"]
    assert wallet_of(db, user.id).balance == D("7")


def test_a_released_hold_resolves_once_and_a_later_settle_captures_nothing_from_it(db, admin, user):
    fund(db, admin, user, "10")
    placed = hold(db, user, "4")
    assert billing.release_hold(db, turn_id=placed.turn_id, reason="provider_error") is True
    db.commit()
    assert billing.release_hold(db, turn_id=placed.turn_id, reason="again") is False
    settle(db, user, placed.turn_id, "1")
    assert db.get(Hold, placed.id).status == "released"
    assert "capture" not in [e.kind for e in entries(db, user.id)]
    assert wallet_of(db, user.id).held == D("0")
    assert_ledger_clean(db)


def test_a_captured_hold_is_neither_released_nor_expired_later(db, admin, user):
    fund(db, admin, user, "10")
    placed = hold(db, user, "4", ttl=0)
    settle(db, user, placed.turn_id, "1")
    assert billing.release_hold(db, turn_id=placed.turn_id, reason="late") is False
    db.commit()
    assert billing.expire_stale_holds(db, now=datetime.now(UTC) + timedelta(hours=1)) == 0
    assert db.get(Hold, placed.id).status == "captured"
    assert wallet_of(db, user.id).balance == D("9")
    assert_ledger_clean(db)


def test_releasing_a_turn_without_a_hold_does_nothing(db):
    assert billing.release_hold(db, turn_id=new_id(), reason="none") is False


def test_stale_holds_expire_and_give_their_credit_back(db, admin, user):
    fund(db, admin, user, "10")
    stale = hold(db, user, "3", ttl=60)
    fresh = hold(db, user, "2", ttl=3600)
    later = datetime.now(UTC) + timedelta(seconds=120)
    assert billing.expire_stale_holds(db, now=later) == 1
    assert billing.expire_stale_holds(db, now=later) == 0
    assert db.get(Hold, stale.id).status == "expired"
    assert db.get(Hold, fresh.id).status == "active"
    wallet = wallet_of(db, user.id)
    assert (wallet.balance, wallet.held) == (D("10"), D("2"))
    expiry = [e for e in entries(db, user.id) if e.kind == "expiry"]
    assert len(expiry) == 1 and expiry[0].initiated_by == "system" and expiry[0].amount == 0
    assert_ledger_clean(db)


def test_usage_rolls_up_per_user_and_for_all_users_per_utc_hour_with_quarter_prefixes(db, admin, user):
    """And for all users per hour from :30, its prefixes counted from :30."""
    fund(db, admin, user, "10")
    at = datetime(2025, 3, 1, 10, 15, tzinfo=UTC)
    settle(db, user, new_id(), "0.5", at=at)
    settle(db, user, new_id(), "0.25", at=at + timedelta(minutes=14, seconds=59))
    settle(db, user, new_id(), "0.125", at=at + timedelta(minutes=15))
    settle(db, user, new_id(), "1", at=at + timedelta(hours=1))
    rows = db.scalars(select(UsageHour).order_by(UsageHour.scope, UsageHour.hour_start)).all()
    by_hour = [
        (r.scope, r.hour_start, r.turns, r.input_tokens, r.cost, r.turns_to_15, r.turns_to_30, r.cost_to_45)
        for r in rows
    ]
    ten, eleven = datetime(2025, 3, 1, 10, tzinfo=UTC), datetime(2025, 3, 1, 11, tzinfo=UTC)
    expected = [
        (ten, 3, 300, D("0.875"), 0, 2, D("0.875")),  # 10:15, 10:29:59, 10:30
        (eleven, 1, 100, D("1"), 0, 1, D("1")),  # 11:15
    ]
    from_30 = [
        (ten - timedelta(minutes=30), 2, 200, D("0.75"), 0, 0, D("0")),  # minutes 45 and 59
        (ten + timedelta(minutes=30), 2, 200, D("1.125"), 1, 1, D("0.125")),  # minutes 0 and 45
    ]
    assert by_hour == (
        [(ALL_USERS, *row) for row in expected]
        + [(ALL_USERS_AT_30, *row) for row in from_30]
        + [(user.id, *row) for row in expected]
    )


def test_summary_usage_is_billed_once_and_never_overdraws_under_enforcement(db, admin, user):
    kwargs = dict(user_id=user.id, model="offline-small", input_tokens=1000, output_tokens=500)
    # Enforced with nothing available: the tokens are recorded, the charge stops at zero.
    assert billing.record_summary_usage(db, chat_session_id="s0", through_seq=4, enforce=True, **kwargs) == 0
    db.commit()
    assert wallet_of(db, user.id).balance == D("0")
    charged = billing.record_summary_usage(db, chat_session_id="s1", through_seq=4, enforce=False, **kwargs)
    assert charged == D("0.002")
    db.commit()
    assert billing.record_summary_usage(db, chat_session_id="s1", through_seq=4, enforce=False, **kwargs) == 0
    db.commit()
    assert wallet_of(db, user.id).balance == D("-0.002")  # 1000 × 0.001/1k + 500 × 0.002/1k
    rollup = db.scalar(select(UsageHour).where(UsageHour.scope == user.id))
    assert (rollup.turns, rollup.input_tokens, rollup.cost) == (0, 2000, D("0.002"))
    assert_ledger_clean(db)


def test_concurrent_holds_on_sqlite_never_overdraw(app, admin, user):
    runtime = app.extensions["tollgate"]
    with runtime.db.session() as session:
        fund(session, admin, user, "1")
    outcomes: list[str] = []

    def one() -> None:
        with runtime.db.session() as session:
            turn_id = new_id()
            try:
                billing.place_hold(session, user_id=user.id, turn_id=turn_id, amount=D("0.3"), ttl_seconds=60)
                session.commit()
            except InsufficientBalance:
                session.rollback()
                outcomes.append("refused")
                return
            settle(session, user, turn_id, "0.2")
            outcomes.append("ran")

    threads = [threading.Thread(target=one) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with runtime.db.session() as session:
        wallet = wallet_of(session, user.id)
        assert wallet.balance >= 0 and wallet.held == 0
        assert wallet.balance == D("1") - D("0.2") * outcomes.count("ran")
        assert_ledger_clean(session)
    assert outcomes.count("ran") >= 3


# -- pricing ------------------------------------------------------------------------------------


def test_the_offline_model_is_priced_out_of_the_box(db):
    price = pricing.price_in_force(db, "offline-small")
    db.commit()
    assert (price.input_per_1k, price.output_per_1k, price.created_by) == (D("0.001"), D("0.002"), "system")
    assert pricing.price_in_force(db, "offline-small").id == price.id  # seeded once
    assert [p.model for p in pricing.list_current_prices(db)] == ["offline-small"]


def test_an_unpriced_model_is_refused(db):
    with pytest.raises(InvalidInput) as caught:
        pricing.price_in_force(db, "gpt-unknown")
    assert caught.value.error == "model_not_priced"


def test_a_new_price_version_applies_from_now_and_history_prices_the_past(db, admin):
    before = datetime.now(UTC)
    first = pricing.set_price(db, admin.id, "gpt-x", D("1"), D("2"))
    second = pricing.set_price(db, admin.id, "gpt-x", D("0.5"), D("0.75"))
    assert second.effective_from > first.effective_from
    assert pricing.price_in_force(db, "gpt-x").id == second.id
    assert pricing.price_in_force(db, "gpt-x", at=first.effective_from).id == first.id
    with pytest.raises(InvalidInput):
        pricing.price_in_force(db, "gpt-x", at=before - timedelta(seconds=1))
    current = {p.model: p for p in pricing.list_current_prices(db)}
    assert current["gpt-x"].id == second.id
    assert db.scalar(select(AdminAuditEvent).where(AdminAuditEvent.action == "price.set")).target == "gpt-x"
    assert len(db.scalars(select(ModelPrice).where(ModelPrice.model == "gpt-x")).all()) == 2


@pytest.mark.parametrize("value", ["-0.1", "0.0000001", "NaN", "1000001"])
def test_prices_outside_the_domain_are_refused_with_invalid_price(db, admin, value):
    with pytest.raises(InvalidInput) as caught:
        pricing.set_price(db, admin.id, "gpt-x", D(value), D("1"))
    assert caught.value.error == "invalid_price"


def test_cost_is_rounded_half_up_to_six_places():
    price = ModelPrice(model="m", input_per_1k=D("0.000003"), output_per_1k=D("0"))
    assert pricing.cost_of(price, 500, 0) == D("0.000002")  # 0.0000015 rounds up
    assert pricing.cost_of(price, 100, 0) == D("0")  # 0.0000003 rounds down
    offline = ModelPrice(model="offline-small", input_per_1k=D("0.001"), output_per_1k=D("0.002"))
    assert pricing.cost_of(offline, 1234, 567) == D("0.002368")


# -- enforcement in embedded mode (no Redis) ------------------------------------------------------


def test_enforcement_follows_the_default_until_an_admin_overrides_it(app, db, admin):
    runtime = app.extensions["tollgate"]
    state = enforcement.current_state(runtime)
    assert (state.enabled, state.source, state.override, state.stale) == (False, "default", None, False)
    state = enforcement.set_override(db, runtime, actor_id=admin.id, enabled=True)
    assert (state.enabled, state.source, state.updated_by) == (True, "override", admin.id)
    assert enforcement.is_enforced(runtime) is True
    state = enforcement.clear_override(db, runtime, actor_id=admin.id)
    assert (state.enabled, state.source, state.override) == (False, "default", None)
    row = db.get(SettingEntry, enforcement.SETTING_KEY)
    assert row.version == 2 and row.value == {"override": None}
    actions = db.scalars(select(AdminAuditEvent.action).order_by(AdminAuditEvent.created_at)).all()
    assert actions == ["enforcement.override.set", "enforcement.override.clear"]


def test_an_override_made_in_one_process_is_seen_by_another_on_its_next_check(app, db, admin, settings):
    other = Runtime(settings.replace(billing_enforcement_enabled=True), role="worker")
    try:
        assert enforcement.current_state(other).enabled is True  # its own default
        enforcement.set_override(db, app.extensions["tollgate"], actor_id=admin.id, enabled=False)
        state = enforcement.current_state(other)
        assert (state.enabled, state.source, state.default_enabled) == (False, "override", True)
    finally:
        other.close()


def test_an_enforcement_check_does_not_wait_on_an_open_sqlite_write_transaction(app, db, admin):
    # Turn admission checks enforcement while its own transaction holds SQLite's write lock.
    runtime = app.extensions["tollgate"]
    enforcement.set_override(db, runtime, actor_id=admin.id, enabled=True)
    with runtime.db.session() as writer:
        writer.execute(select(Wallet)).all()  # BEGIN IMMEDIATE: the write lock is held
        started = datetime.now(UTC)
        assert enforcement.is_enforced(runtime) is True
        assert datetime.now(UTC) - started < timedelta(seconds=2)
        writer.rollback()


def test_redis_status_in_embedded_mode_is_ok(app):
    assert enforcement.redis_status(app.extensions["tollgate"])["ok"] is True
