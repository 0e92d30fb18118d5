"""The ledger's one writer: grants, holds, captures, releases, expiries, debits, usage rollups.

Ledger policy (design §4): every write that moves credit runs in one
transaction that locks the wallet row (``SELECT … FOR UPDATE`` on Postgres;
SQLite serialises writers with ``BEGIN IMMEDIATE``), appends a ledger entry
with the resulting ``balance_after`` and updates the wallet. Entries are never
updated or deleted, so ``wallet.balance == sum(entries.amount)`` and
``wallet.held == sum(active holds)`` hold at every commit
(``tollgate ledger-check``).

Every entry carries a unique ``idempotency_key``; the per-turn keys are
``turn:{turn_id}:hold|capture|release|expiry|debit``, grants use
``grant:{Idempotency-Key}`` and summaries ``summary:{session_id}:{through_seq}``.
The key is the last line of defence against double billing: each function
checks state under the wallet lock first.

Lock order: (turn row, held by the caller) → wallet → hold. Hold rows are only
changed under their wallet's lock.

Functions documented "does not commit" join the caller's open transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cache

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared import metrics
from shared.db import MONEY_QUANT, new_id, utcnow
from shared.errors import Conflict, IdempotencyConflict, InsufficientBalance, InvalidInput, NotFound
from shared.models import (
    SYSTEM_ACTOR,
    ApiKeySpend,
    Hold,
    HoldStatus,
    LedgerEntry,
    LedgerKind,
    Turn,
    TurnStatus,
    UsageHour,
    User,
    Wallet,
)
from shared.pagination import Listing
from shared.services import audit, pricing

log = logging.getLogger(__name__)

MAX_CLIENT_KEY_LENGTH = 200  # leaves room for the "grant:" namespace in the 255-char column
ZERO = Decimal("0")


def money_str(value: Decimal) -> str:
    return format(Decimal(value).quantize(MONEY_QUANT), "f")


def _q(value: Decimal) -> Decimal:
    return Decimal(value).quantize(MONEY_QUANT)


# -- locking and appending -----------------------------------------------------------------


def _lock_wallet(session: Session, *, user_id: str | None = None, wallet_id: str | None = None) -> Wallet:
    """The wallet row, locked for the rest of the transaction and freshly read.

    ``populate_existing`` matters: without it a wallet already in the session's
    identity map would keep the balance read before the lock was taken.

    :raises NotFound: no such wallet.
    """
    statement = select(Wallet).with_for_update().execution_options(populate_existing=True)
    if wallet_id is not None:
        statement = statement.where(Wallet.id == wallet_id)
    else:
        statement = statement.where(Wallet.user_id == user_id)
    wallet = session.scalar(statement)
    if wallet is None:
        raise NotFound("No wallet for this user.")
    return wallet


def _fresh_hold(session: Session, turn_id: str, *, lock: bool = False) -> Hold | None:
    """The turn's hold, re-read; ``lock`` also locks its row (NO KEY UPDATE) for the transaction."""
    statement = select(Hold).where(Hold.turn_id == turn_id).execution_options(populate_existing=True)
    if lock:
        statement = statement.with_for_update(key_share=True)
    return session.scalar(statement)


def reserved_for(session: Session, turn_id: str) -> Decimal | None:
    """What the turn's hold reserved, whatever became of it since; ``None``: it has none."""
    hold = session.scalar(select(Hold).where(Hold.turn_id == turn_id))
    return hold.amount if hold is not None else None


def _entry_by_key(session: Session, *keys: str) -> LedgerEntry | None:
    return session.scalar(
        select(LedgerEntry)
        .where(LedgerEntry.idempotency_key.in_(keys))
        .execution_options(populate_existing=True)
        .limit(1)
    )


def _append(
    session: Session,
    wallet: Wallet,
    *,
    kind: str,
    key: str,
    amount: Decimal = ZERO,
    held_delta: Decimal = ZERO,
    initiated_by: str = SYSTEM_ACTOR,
    turn_id: str | None = None,
    hold_id: str | None = None,
    reason: str | None = None,
    now: datetime | None = None,
) -> LedgerEntry:
    """Move the wallet and write the entry that explains the move (caller holds the lock)."""
    now = now or utcnow()
    wallet.balance = _q(wallet.balance + amount)
    wallet.held = _q(wallet.held + held_delta)
    wallet.updated_at = now
    entry = LedgerEntry(
        id=new_id(),
        wallet_id=wallet.id,
        user_id=wallet.user_id,
        kind=kind,
        amount=_q(amount),
        held_delta=_q(held_delta),
        balance_after=wallet.balance,
        turn_id=turn_id,
        hold_id=hold_id,
        idempotency_key=key,
        initiated_by=initiated_by,
        reason=reason[:500] if reason else None,
        created_at=now,
    )
    session.add(entry)
    return entry


def _turn_key(turn_id: str, kind: str) -> str:
    return f"turn:{turn_id}:{kind}"


def record_usage(
    session: Session,
    *,
    user_id: str,
    model: str,
    at: datetime,
    turns: int,
    input_tokens: int,
    output_tokens: int,
    cost: Decimal,
) -> None:
    """Add usage to both rollup levels, the user's and all users' (model, UTC hour,
    quarter prefixes), in the caller's transaction: one multi-row
    ``INSERT … ON CONFLICT DO UPDATE``. Does not commit.

    The user's row is first: every writer locks the rows in the same order (the user's,
    already serialised by the wallet lock, then the shared all-users row), and the shared
    row stays locked only until the caller commits.
    """
    rows = UsageHour.rows_for(
        user_id=user_id,
        model=model,
        at=at,
        turns=turns,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=_q(cost),
    )
    session.execute(_usage_upsert(session.get_bind().dialect.name), rows)


def _add_key_spend(session: Session, *, api_key_id: str, at: datetime, cost: Decimal) -> None:
    """Upsert the (API key, UTC quarter hour) spend of a turn's charge, in the caller's
    transaction: what per-key spend limits read (shared/services/limits.py)."""
    session.execute(
        _key_spend_upsert(session.get_bind().dialect.name),
        {
            "id": new_id(),
            "api_key_id": api_key_id,
            "period_start": UsageHour.quarter_of(at),
            "cost": _q(cost),
        },
    )


# The two upserts every settle runs are built once per dialect and executed with parameters:
# building them per call (values inlined, a cache key over every column) cost more than the
# round trip (bench: 2.5 ms -> see docs/architecture.md "The hot path, counted").
@cache
def _usage_upsert(dialect: str):
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    table = UsageHour.__table__
    statement = insert(table)
    keys = ("scope", "hour_start", "model")
    return statement.on_conflict_do_update(
        index_elements=list(keys),
        set_={
            column.name: column + statement.excluded[column.name]
            for column in table.columns
            if column.name not in keys
        },
    )


@cache
def _key_spend_upsert(dialect: str):
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    table = ApiKeySpend.__table__
    statement = insert(table)
    return statement.on_conflict_do_update(
        index_elements=["api_key_id", "period_start"],
        set_={"cost": table.c.cost + statement.excluded.cost},
    )


# -- holds and turn settlement (join the caller's transaction) ----------------------------


def place_hold(session: Session, *, user_id: str, turn_id: str, amount: Decimal, ttl_seconds: int) -> Hold:
    """Reserve ``amount`` for a turn, expiring after ``ttl_seconds``. Does not commit.

    Placing a hold for a turn that already has one returns the existing hold.

    :raises InsufficientBalance: ``available`` (balance − active holds) is below ``amount``;
        details ``balance``, ``available``, ``required`` as money strings.
    :raises NotFound: the user has no wallet.
    """
    amount = _q(amount)
    if amount < 0:
        raise ValueError("a hold amount cannot be negative")
    wallet = _lock_wallet(session, user_id=user_id)
    existing = _fresh_hold(session, turn_id)
    if existing is not None:
        return existing
    if wallet.available < amount:
        raise InsufficientBalance(
            balance=money_str(wallet.balance),
            available=money_str(wallet.available),
            required=money_str(amount),
        )
    now = utcnow()
    hold = Hold(
        id=new_id(),
        wallet_id=wallet.id,
        turn_id=turn_id,
        amount=amount,
        status=HoldStatus.ACTIVE,
        expires_at=now + timedelta(seconds=ttl_seconds),
        created_at=now,
    )
    session.add(hold)
    _append(
        session,
        wallet,
        kind=LedgerKind.HOLD,
        key=_turn_key(turn_id, "hold"),
        held_delta=amount,
        turn_id=turn_id,
        hold_id=hold.id,
        now=now,
    )
    session.flush()
    return hold


@dataclass(frozen=True)
class Settlement:
    """How a turn was billed: the balance right after, and what it was charged."""

    balance_after: Decimal
    charged: Decimal


def _charged_so_far(session: Session, turn_id: str) -> Decimal:
    total = session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
            LedgerEntry.turn_id == turn_id, LedgerEntry.kind.in_((LedgerKind.CAPTURE, LedgerKind.DEBIT))
        )
    )
    return _q(-Decimal(total or 0))


def settle_turn(
    session: Session,
    *,
    user_id: str,
    turn_id: str,
    model: str,
    cost: Decimal,
    input_tokens: int,
    output_tokens: int,
    at: datetime,
    enforced: bool,
    completed: bool = True,
    api_key_id: str | None = None,
) -> Settlement:
    """Bill a turn that ended (completed, or failed/cancelled after using tokens) and add it
    to the usage rollups. Does not commit.

    The charge is the actual ``cost`` (design §4):

    - an **active hold** captures the cost and releases the rest. The runner keeps the
      cost within the hold; should a provider still report more than was estimated, the
      charge stops at the hold (an ``enforced`` wallet is never overdrawn) and the
      difference is logged and counted (``tollgate_uncovered_charge_micros_total``);
    - **no active hold** and ``enforced`` (the hold expired or was released while the
      turn's worker was gone): a ``debit`` against what is available now, never below
      zero, and never more than the hold was;
    - not ``enforced``: a plain ``debit`` of the cost, which may take the balance below zero.

    Rollups count the turn (``turns`` +1) only when ``completed``; tokens and the charge
    always, and the charge also to ``api_key_id``'s spend (per-key limits). A second call
    for the same turn writes nothing and returns the first result.
    """
    capture_key, debit_key = _turn_key(turn_id, "capture"), _turn_key(turn_id, "debit")
    wallet = _lock_wallet(session, user_id=user_id)
    # Checked under the lock: a concurrent settle of the same turn has committed by now.
    done = _entry_by_key(session, capture_key, debit_key)
    if done is not None:
        return Settlement(done.balance_after, _charged_so_far(session, turn_id))
    cost = _q(cost)
    if cost < 0:
        raise ValueError("a turn cost cannot be negative")
    now = utcnow()
    hold = _fresh_hold(session, turn_id)
    if hold is not None and hold.status == HoldStatus.ACTIVE:
        entry, charged = _capture(session, wallet, hold, cost, key=capture_key, now=now)
    else:
        entry, charged = _debit(
            session, wallet, hold, cost, turn_id=turn_id, enforced=enforced, key=debit_key, now=now
        )
    if charged < cost:
        metrics.hold_overrun(cost - charged)
        log.warning("turn %s charged %s of its cost %s (enforced, not covered)", turn_id, charged, cost)
    record_usage(
        session,
        user_id=user_id,
        model=model,
        at=at,
        turns=1 if completed else 0,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=charged,
    )
    if api_key_id is not None:
        _add_key_spend(session, api_key_id=api_key_id, at=at, cost=charged)
    session.flush()
    return Settlement(entry.balance_after, charged)


def _capture(
    session: Session, wallet: Wallet, hold: Hold, cost: Decimal, *, key: str, now: datetime
) -> tuple[LedgerEntry, Decimal]:
    """Capture ``cost`` (at most the hold) from the active ``hold`` and release the rest.
    Returns the last entry written and what was charged."""
    turn_id = hold.turn_id
    charged = min(cost, hold.amount)
    entry = _append(
        session,
        wallet,
        kind=LedgerKind.CAPTURE,
        key=key,
        amount=-charged,
        held_delta=-charged,
        turn_id=turn_id,
        hold_id=hold.id,
        now=now,
    )
    rest = hold.amount - charged
    if rest > 0:
        entry = _append(
            session,
            wallet,
            kind=LedgerKind.RELEASE,
            key=_turn_key(turn_id, "release"),
            held_delta=-rest,
            turn_id=turn_id,
            hold_id=hold.id,
            reason="unused part of the hold",
            # One microsecond later, so "newest first" lists show the pair in a stable order.
            now=now + timedelta(microseconds=1),
        )
    hold.status = HoldStatus.CAPTURED
    hold.resolved_at = now
    return entry, charged


def _debit(
    session: Session,
    wallet: Wallet,
    hold: Hold | None,
    cost: Decimal,
    *,
    turn_id: str,
    enforced: bool,
    key: str,
    now: datetime,
) -> tuple[LedgerEntry, Decimal]:
    """Debit a turn without an active hold: ``enforced``, at most what is available now and
    at most the hold it had; otherwise the whole ``cost``. Returns the entry and the charge."""
    charged = cost
    if enforced:
        charged = min(charged, max(wallet.available, ZERO))
        if hold is not None:
            charged = min(charged, hold.amount)
    entry = _append(
        session, wallet, kind=LedgerKind.DEBIT, key=key, amount=-charged, turn_id=turn_id, now=now
    )
    return entry, charged


def confirm_hold(session: Session, *, turn_id: str) -> bool:
    """Is the turn's hold still active? Locks the hold row for the rest of the caller's
    transaction (one statement). Does not commit.

    ``expire_stale_holds`` locks the same row before it expires a hold and then reads the
    turn, so a claim (which commits the turn ``running`` under a fresh lease in this
    transaction) and an expiry never both win; a running turn's hold is then kept by its
    lease, renewed for as long as the turn runs.
    """
    hold = _fresh_hold(session, turn_id, lock=True)
    return hold is not None and hold.status == HoldStatus.ACTIVE


def covers(session: Session, *, user_id: str, amount: Decimal) -> bool:
    """Whether the wallet's available credit covers ``amount`` right now (no lock, no write)."""
    wallet = session.scalar(
        select(Wallet).where(Wallet.user_id == user_id).execution_options(populate_existing=True)
    )
    return wallet is not None and wallet.available >= amount


def release_hold(session: Session, *, turn_id: str, reason: str) -> bool:
    """Release a turn's active hold in full. Does not commit.

    Returns False (and writes nothing) when the turn has no hold or it already
    resolved (captured, released or expired): a hold resolves at most once.
    """
    hold = session.scalar(select(Hold).where(Hold.turn_id == turn_id))
    if hold is None:
        return False
    wallet = _lock_wallet(session, wallet_id=hold.wallet_id)
    hold = _fresh_hold(session, turn_id)
    if hold is None or hold.status != HoldStatus.ACTIVE:
        return False
    now = utcnow()
    _append(
        session,
        wallet,
        kind=LedgerKind.RELEASE,
        key=_turn_key(turn_id, "release"),
        held_delta=-hold.amount,
        turn_id=turn_id,
        hold_id=hold.id,
        reason=reason,
        now=now,
    )
    hold.status = HoldStatus.RELEASED
    hold.resolved_at = now
    session.flush()
    return True


def expire_stale_holds(
    session: Session, now: datetime | None = None, *, live_after: datetime | None = None
) -> int:
    """Expire every active hold past its ``expires_at``, one transaction (and ledger
    ``expiry`` entry) per hold, so a long backlog never holds many wallet locks. Commits.

    A hold whose turn is ``running`` under a live lease (its worker is renewing it:
    shared/services/leases.py) is kept: it is paying for a model call in flight (design §4,
    "a hold cannot expire under a running turn"); ``live_after`` also keeps a running turn
    whose attempt started after it. The turn is read after the wallet lock is taken, so a
    claim (``confirm_hold``) and an expiry never both win.

    Returns how many holds this call expired.
    """
    now = now or utcnow()
    candidates = session.execute(
        select(Hold.turn_id, Hold.wallet_id)
        .where(Hold.status == HoldStatus.ACTIVE, Hold.expires_at <= now)
        .order_by(Hold.expires_at)
    ).all()
    session.commit()
    expired = 0
    for turn_id, wallet_id in candidates:
        wallet = _lock_wallet(session, wallet_id=wallet_id)
        # The hold row too: a claim confirming this hold holds it until its turn is running.
        hold = _fresh_hold(session, turn_id, lock=True)
        # Re-checked under the lock: the turn may have captured or released it meanwhile.
        if hold is None or hold.status != HoldStatus.ACTIVE or hold.expires_at > now:
            session.rollback()
            continue
        status, started_at, lease_expires_at = session.execute(
            select(Turn.status, Turn.started_at, Turn.lease_expires_at).where(Turn.id == turn_id)
        ).one_or_none() or (None, None, None)
        if status == TurnStatus.RUNNING and (
            (lease_expires_at is not None and lease_expires_at > now)
            or (live_after is not None and started_at is not None and started_at > live_after)
        ):
            session.rollback()
            continue
        _append(
            session,
            wallet,
            kind=LedgerKind.EXPIRY,
            key=_turn_key(turn_id, "expiry"),
            held_delta=-hold.amount,
            turn_id=turn_id,
            hold_id=hold.id,
            reason="hold expired",
        )
        hold.status = HoldStatus.EXPIRED
        hold.resolved_at = utcnow()
        session.commit()
        expired += 1
    if expired:
        log.info("expired %d stale holds", expired)
    return expired


def record_summary_usage(
    session: Session,
    *,
    user_id: str,
    chat_session_id: str,
    through_seq: int,
    model: str,
    input_tokens: int,
    output_tokens: int,
    enforce: bool = False,
    at: datetime | None = None,
) -> Decimal:
    """Bill the tokens of a background summary refresh as a ``debit``. Does not commit.
    Returns the charge.

    Idempotent per ``(chat_session_id, through_seq)``: a repeat charges nothing. With
    ``enforce`` the charge never takes ``available`` below zero (the caller checked
    before the call that available covered its worst case; turns admitted since may
    have reserved some of it). Usage is added to the rollups with ``turns=0``.

    :raises InvalidInput: ``model_not_priced``.
    """
    at = at or utcnow()
    key = f"summary:{chat_session_id}:{through_seq}"
    cost = pricing.cost_of(pricing.price_in_force(session, model, at), input_tokens, output_tokens)
    wallet = _lock_wallet(session, user_id=user_id)
    if _entry_by_key(session, key) is not None:
        return ZERO
    charged = min(cost, max(wallet.available, ZERO)) if enforce else cost
    if charged < cost:
        metrics.hold_overrun(cost - charged)
    _append(session, wallet, kind=LedgerKind.DEBIT, key=key, amount=-charged, reason="conversation summary")
    record_usage(
        session,
        user_id=user_id,
        model=model,
        at=at,
        turns=0,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=charged,
    )
    session.flush()
    return charged


# -- admin grants (own their transaction) --------------------------------------------------


def _check_replay(
    entry: LedgerEntry, kind: str, user_id: str, amount: Decimal, reason: str | None
) -> LedgerEntry:
    if entry.kind != kind or entry.user_id != user_id or entry.amount != amount or entry.reason != reason:
        raise IdempotencyConflict(f"This Idempotency-Key was already used for a different {kind}.")
    return entry


def _client_key(kind: str, idempotency_key: str | None) -> str:
    if idempotency_key is None:
        return f"{kind}:{new_id()}"
    if len(idempotency_key) > MAX_CLIENT_KEY_LENGTH or not idempotency_key.isprintable():
        raise InvalidInput(
            f"Idempotency-Key must be 1-{MAX_CLIENT_KEY_LENGTH} printable characters.",
            error="invalid_idempotency_key",
        )
    return f"{kind}:{idempotency_key}"


def _admin_entry(
    session: Session,
    *,
    kind: str,
    actor_id: str,
    user_id: str,
    value: Decimal,
    reason: str | None,
    idempotency_key: str | None,
) -> LedgerEntry:
    """One admin-initiated balance change (grant or adjustment), replay-safe. Commits."""
    key = _client_key(kind, idempotency_key)
    if session.get(User, user_id) is None:
        raise NotFound("No such user.")
    existing = _entry_by_key(session, key)
    if existing is not None:
        session.commit()  # ends the read transaction; nothing was written
        return _check_replay(existing, kind, user_id, value, reason)
    try:
        wallet = _lock_wallet(session, user_id=user_id)
        if value < 0 and wallet.available + value < 0:
            raise Conflict(
                "A negative adjustment may not take the available balance below zero.",
                error="adjustment_exceeds_available",
                available=money_str(wallet.available),
                amount=money_str(value),
            )
        entry = _append(
            session, wallet, kind=kind, key=key, amount=value, initiated_by=actor_id, reason=reason
        )
        audit.record(
            session,
            actor_id,
            f"wallet.{kind}",
            target_type="user",
            target=user_id,
            details={"amount": money_str(value), "ledger_entry_id": entry.id, "reason": reason},
        )
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key committed first.
        session.rollback()
        existing = _entry_by_key(session, key)
        session.commit()
        if existing is None:
            raise
        return _check_replay(existing, kind, user_id, value, reason)
    except Conflict:
        session.rollback()
        raise
    return entry


def grant_credit(
    session: Session,
    *,
    actor_id: str,
    user_id: str,
    amount: Decimal,
    reason: str | None,
    idempotency_key: str | None,
) -> LedgerEntry:
    """Credit a user's wallet; writes a ``grant`` entry and an audit event. Commits.

    ``amount``: > 0, ≤ 6 places, ≤ 1e12.
    Replaying an ``idempotency_key`` with the same user, amount and reason
    returns the first entry and credits nothing; concurrent duplicates credit
    exactly once (the key's UNIQUE constraint decides the race).

    :raises InvalidInput: ``invalid_amount``, ``invalid_idempotency_key``.
    :raises NotFound: no such user.
    :raises IdempotencyConflict: the key was used for another grant.
    """
    value = pricing.check_money(amount, field="amount", error="invalid_amount")
    reason = (reason.strip() or None) if reason else None
    return _admin_entry(
        session,
        kind=LedgerKind.GRANT,
        actor_id=actor_id,
        user_id=user_id,
        value=value,
        reason=reason,
        idempotency_key=idempotency_key,
    )


def adjust_credit(
    session: Session,
    *,
    actor_id: str,
    user_id: str,
    amount: Decimal,
    reason: str | None,
    idempotency_key: str | None,
) -> LedgerEntry:
    """An admin correction: a signed, non-zero ``amount`` (magnitude ≤ 6 places, ≤ 1e12)
    with a required reason. Commits.

    A negative adjustment may not take ``available`` below zero, so a correction
    never overdraws a wallet (nor eats credit reserved by in-flight turns).

    :raises InvalidInput: ``invalid_amount``, ``reason_required``, ``invalid_idempotency_key``.
    :raises Conflict: ``adjustment_exceeds_available``.
    :raises NotFound: no such user.
    :raises IdempotencyConflict: the key was used for another adjustment.
    """
    magnitude = pricing.check_money(abs(amount), field="amount", error="invalid_amount")
    reason = reason.strip() if reason else ""
    if not reason:
        raise InvalidInput("An adjustment needs a reason.", error="reason_required", field="reason")
    return _admin_entry(
        session,
        kind=LedgerKind.ADJUSTMENT,
        actor_id=actor_id,
        user_id=user_id,
        value=-magnitude if amount < 0 else magnitude,
        reason=reason,
        idempotency_key=idempotency_key,
    )


# -- reads ---------------------------------------------------------------------------------


def list_ledger(session: Session, user_id: str) -> Listing:
    """A user's ledger entries, newest first.

    :raises NotFound: no such user.
    """
    if session.get(User, user_id) is None:
        raise NotFound("No such user.")
    return Listing(
        session,
        select(LedgerEntry)
        .where(LedgerEntry.user_id == user_id)
        .order_by(LedgerEntry.created_at.desc(), LedgerEntry.id.desc()),
    )
