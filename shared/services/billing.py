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
checks state under a lock first (the wallet's, or for a turn's settlement the turn's,
which its caller holds).

Lock order: (turn row, held by the caller) → hold → wallet. A hold row is locked
before its wallet and only changed under its own row lock; the wallet, the one row every
charge of a user shares, is locked last and as late as the transaction allows (a turn's
settlement takes it with the one ``UPDATE … RETURNING`` that moves it), so it stays
locked for the few statements that need its balance.

Functions documented "does not commit" join the caller's open transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import NoReturn

from sqlalchemy import and_, bindparam, exists, func, insert, select, union_all, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.session import make_transient_to_detached
from sqlalchemy.orm.util import identity_key

from shared import metrics
from shared.db import MONEY, MONEY_QUANT, UTCDateTime, dialect_insert, new_id, utcnow
from shared.errors import Conflict, IdempotencyConflict, InsufficientBalance, InvalidInput, NotFound
from shared.models import (
    SYSTEM_ACTOR,
    ApiKeySpend,
    Hold,
    HoldStatus,
    LedgerEntry,
    LedgerKind,
    ModelPrice,
    Turn,
    TurnStatus,
    UsageHour,
    User,
    Wallet,
)
from shared.pagination import Listing
from shared.services import audit, pricing
from shared.services.turn_columns import turn_columns, turn_values

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


# A turn's hold, by its turn: built once (read two or three times a turn).
_HOLD_OF_TURN = select(Hold).where(Hold.turn_id == bindparam("turn_id"))
_FRESH_HOLD = _HOLD_OF_TURN.execution_options(populate_existing=True)
_FRESH_HOLD_LOCKED = _FRESH_HOLD.with_for_update(key_share=True)


def _fresh_hold(session: Session, turn_id: str, *, lock: bool = False) -> Hold | None:
    """The turn's hold, re-read; ``lock`` also locks its row (NO KEY UPDATE) for the transaction."""
    return session.scalar(_FRESH_HOLD_LOCKED if lock else _FRESH_HOLD, {"turn_id": turn_id})


class _LockIt:
    def __repr__(self) -> str:
        return "LOCK_IT"


# ``hold=`` of settle_turn and release_hold: read and lock the turn's hold here. Any other
# value is the hold the caller read and locked itself in this transaction (None: it has none).
LOCK_IT = _LockIt()
HoldArgument = Hold | None | _LockIt


def _locked_hold(session: Session, turn_id: str, hold: HoldArgument) -> Hold | None:
    return _fresh_hold(session, turn_id, lock=True) if hold is LOCK_IT else hold


def reserved_for(session: Session, turn_id: str) -> Decimal | None:
    """What the turn's hold reserved, whatever became of it since; ``None``: it has none."""
    hold = session.scalar(_HOLD_OF_TURN, {"turn_id": turn_id})
    return hold.amount if hold is not None else None


# Built once (a settle without an active hold, and every summary charge, look one up).
_ENTRY_BY_KEYS = (
    select(LedgerEntry)
    .where(LedgerEntry.idempotency_key.in_(bindparam("keys", expanding=True)))
    .execution_options(populate_existing=True)
    .limit(1)
)


def _entry_by_key(session: Session, *keys: str) -> LedgerEntry | None:
    return session.scalar(_ENTRY_BY_KEYS, {"keys": list(keys)})


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


@dataclass(frozen=True)
class _Move:
    """One ledger entry of a wallet move: what ``_append`` takes, for ``_move_wallet``."""

    kind: str
    key: str
    amount: Decimal
    held_delta: Decimal
    turn_id: str | None
    hold_id: str | None
    reason: str | None
    created_at: datetime


WALLET_MOVES = "tollgate.wallet_moves"
SUMMARY_REASON = "conversation summary"


@dataclass(frozen=True)
class _Riders:
    """Rows written with a wallet move, in the same round trip on Postgres: the usage
    rollups (``UsageHour.rows_for``), an API key's spend (``_key_spend_row``), a new hold
    (its columns but the wallet's id, which the move supplies) and a hold's capture
    (``{"id", "resolved_at"}``: the row, locked by the caller, marked captured)."""

    usage: list[dict] | None = None
    key_spend: dict | None = None
    new_hold: dict | None = None
    captured_hold: dict | None = None
    # The turn's row (``TurnRow``) and its id: Postgres only (``settle_turn`` writes it
    # itself nowhere else).
    turn_row: tuple[str, TurnRow] | None = None


def _move_wallet(
    session: Session,
    user_id: str,
    moves: list[_Move],
    *,
    covering: Decimal | None = None,
    riders: _Riders = _Riders(),
    guard: _Guard | None = None,
) -> tuple[str, Decimal] | None:
    """Move the user's wallet by ``moves``, append their entries and write ``riders``,
    without loading the wallet: an ``UPDATE … RETURNING`` takes the wallet's lock and moves
    it, the entries get the ``balance_after`` it returned. On Postgres it is all one
    statement (the update, the entries' and the riders' inserts as CTEs), so the wallet
    stays locked for that one round trip and the commit; elsewhere one statement each.

    For moves whose amount does not depend on the balance (a capture within its hold, an
    unenforced debit), or that need only ``covering`` to be available (a hold: the check
    is the ``UPDATE``'s condition, evaluated on the locked row). Returns the wallet's id and
    the balance after. Does not commit.

    The move is noted in ``session.info[WALLET_MOVES]`` (balance and held before and after)
    for hooks that watch wallets (the webhooks outbox), as a flushed ORM wallet would be.

    ``guard`` (Postgres): the statement moves nothing unless what the guard says still
    holds (``_guarded``), and then returns ``None``.

    :raises NotFound: no wallet for this user.
    :raises InsufficientBalance: ``available`` is below ``covering``.
    """
    amount = sum((move.amount for move in moves), ZERO)
    held_delta = sum((move.held_delta for move in moves), ZERO)
    params = {
        "w_user_id": user_id,
        "w_amount": _q(amount),
        "w_held_delta": _q(held_delta),
        "w_now": moves[-1].created_at,
        "w_covering": covering,
    }
    # Entry i's balance_after is the new balance less the moves after it.
    rest = amount
    entries = []
    for move in moves:
        rest -= move.amount
        entries.append(
            {
                "id": new_id(),
                "user_id": user_id,
                "kind": move.kind,
                "amount": _q(move.amount),
                "held_delta": _q(move.held_delta),
                "offset": _q(rest),
                "turn_id": move.turn_id,
                "hold_id": move.hold_id,
                "idempotency_key": move.key,
                "initiated_by": SYSTEM_ACTOR,
                "reason": move.reason,
                "created_at": move.created_at,
            }
        )
    postgres = session.get_bind().dialect.name == "postgresql"
    if postgres:
        statement = _wallet_move_statement(
            len(entries),
            covering is not None,
            riders.usage is not None,
            riders.key_spend is not None,
            riders.new_hold is not None,
            riders.captured_hold is not None,
            tuple(sorted(riders.turn_row[1].values)) if riders.turn_row is not None else None,
            None if guard is None else guard.kind,
        )
        for index, entry in enumerate(entries):
            params.update({f"e{index}_{name}": value for name, value in entry.items()})
        for index, row in enumerate(riders.usage or ()):
            params.update({f"u{index}_{name}": value for name, value in row.items()})
        params.update({f"k_{name}": value for name, value in (riders.key_spend or {}).items()})
        params.update({f"h_{name}": value for name, value in (riders.new_hold or {}).items()})
        params.update({f"c_{name}": value for name, value in (riders.captured_hold or {}).items()})
        if riders.turn_row is not None:
            turn_id, turn_row = riders.turn_row
            params.update(turn_values(turn_row.values))
            params.update(t_id=turn_id, t_low_balance_below=turn_row.low_balance_below)
        if guard is not None:
            params.update(guard.params)
        row = session.execute(statement, params).one_or_none()
        if row is None and guard is not None:
            return None
    else:
        row = session.execute(_wallet_update(covering is not None), params).one_or_none()
    if row is None:
        _refuse(session, user_id, covering)
    wallet_id, balance, held = row
    if not postgres:
        rows = []
        for entry in entries:
            offset = entry.pop("offset")
            rows.append({**entry, "wallet_id": wallet_id, "balance_after": balance - offset})
        session.execute(insert(LedgerEntry.__table__), rows)
        _write_riders(session, riders, wallet_id)
    stale = session.identity_map.get(identity_key(Wallet, wallet_id))
    if stale is not None:
        session.expire(stale)
    session.info.setdefault(WALLET_MOVES, []).append(
        (wallet_id, user_id, balance - amount, held - held_delta, balance, held)
    )
    return wallet_id, _q(balance)


@cache
def _wallet_update(covering: bool):
    """``UPDATE wallets … RETURNING id, balance, held`` for ``_move_wallet``'s parameters."""
    wallets = Wallet.__table__
    statement = update(wallets).where(wallets.c.user_id == bindparam("w_user_id"))
    if covering:
        available = wallets.c.balance - wallets.c.held
        statement = statement.where(available >= bindparam("w_covering", type_=MONEY))
    return statement.values(
        balance=wallets.c.balance + bindparam("w_amount", type_=MONEY),
        held=wallets.c.held + bindparam("w_held_delta", type_=MONEY),
        updated_at=bindparam("w_now", type_=UTCDateTime()),
    ).returning(wallets.c.id, wallets.c.balance, wallets.c.held)


@cache
def _wallet_move_statement(
    entries: int,
    covering: bool,
    usage: bool,
    key_spend: bool,
    new_hold: bool,
    captured_hold: bool,
    turn_row: tuple[str, ...] | None = None,
    guard: str | None = None,
):
    """``_move_wallet`` on Postgres, one statement per shape, built once: the wallet's
    ``UPDATE`` as CTE ``w``, the entries inserted from it (``e``), a new hold inserted
    (``h``) or a locked one marked captured (``c``), then the usage rows (``u``) and the
    key's spend (``k``) upserted — in that order, as every writer locks them — and ``w``'s
    row selected. ``turn_row``: the columns of an ended turn's row written too (``t``; its
    lock was taken first, by the caller), ``cost``, ``balance_after`` and ``low_balance``
    among them, the last two from ``w``. ``guard`` (a ``_Guard``'s kind): the wallet moves
    only if what the guard says holds (``_guarded``); every other part is written only
    with the wallet's move."""
    w = _wallet_update(covering)
    ctes = []
    if guard is not None:
        w, ctes = _guarded(w, guard)
    w = w.cte("w")
    ledger = LedgerEntry.__table__
    names = [column.name for column in ledger.columns]

    def entry(index: int):
        def value(name: str):
            if name == "wallet_id":
                return w.c.id
            if name == "balance_after":
                return w.c.balance - bindparam(f"e{index}_offset", type_=MONEY)
            return bindparam(f"e{index}_{name}", type_=ledger.c[name].type)

        return select(*(value(name) for name in names))

    rows = [entry(index) for index in range(entries)]
    ctes.append(insert(ledger).from_select(names, rows[0] if entries == 1 else union_all(*rows)).cte("e"))
    holds = Hold.__table__
    if new_hold:
        values = [
            w.c.id if column.name == "wallet_id" else bindparam(f"h_{column.name}", type_=column.type)
            for column in holds.columns
        ]
        ctes.append(
            insert(holds).from_select([column.name for column in holds.columns], select(*values)).cte("h")
        )
    if captured_hold:
        ctes.append(_hold_capture().where(exists(select(w.c.id))).cte("c"))
    if usage:
        table = UsageHour.__table__
        names = [column.name for column in table.columns]
        # Rows as SELECTs of parameters (a multi-row VALUES of parameters is not cacheable),
        # from ``w``: written only if the wallet moved (a refused ``covering`` moves none).
        # In ``UsageHour.rows_for``'s order, the order every writer locks them in.
        rows = [
            select(
                *(bindparam(f"u{index}_{column.name}", type_=column.type) for column in table.columns)
            ).select_from(w)
            for index in range(UsageHour.ROWS_PER_EVENT)
        ]
        statement = pg_insert(table).from_select(names, union_all(*rows))
        ctes.append(_on_usage_conflict(statement).cte("u"))
    if key_spend:
        table = ApiKeySpend.__table__
        row = select(
            *(bindparam(f"k_{column.name}", type_=column.type) for column in table.columns)
        ).select_from(w)
        statement = pg_insert(table).from_select([column.name for column in table.columns], row)
        ctes.append(_on_key_spend_conflict(statement).cte("k"))
    if turn_row is not None:
        turns = Turn.__table__
        balance = select(w.c.balance).scalar_subquery()
        below = bindparam("t_low_balance_below", type_=MONEY)
        written = (
            update(turns)
            .where(turns.c.id == bindparam("t_id"), exists(select(w.c.id)))
            .values({**turn_columns(turn_row), "balance_after": balance, "low_balance": balance < below})
        )
        ctes.append(written.cte("t"))
    return select(w.c.id, w.c.balance, w.c.held).add_cte(*ctes)


@dataclass(frozen=True)
class _Guard:
    """What a wallet move run as one autocommit statement checks first (``_guarded``):
    ``kind`` and its parameters (all ``g_…``)."""

    kind: str
    params: dict

    @classmethod
    def of_turn(cls, turn_id: str, known: SettleGuard) -> _Guard:
        params = {"g_turn_id": turn_id, "g_owner": known.lease_owner, "g_events_at": known.low_balance_below}
        if known.hold is None:
            return cls("no_hold", params)
        return cls("hold", {**params, "g_hold_id": known.hold.id, "g_hold_amount": known.hold.amount})


def _guarded(w, kind: str):
    """``w`` (the wallet's UPDATE) moving only if:

    - ``"hold"``, ``"no_hold"``: the turn ``:g_turn_id`` is still ``running`` under lease
      ``:g_owner`` and its hold still active as ``:g_hold_id`` of ``:g_hold_amount``
      (``"no_hold"``: it still has no active hold); the CTEs that lock the turn, then its
      hold, come first;
    - ``"new_entry"``: no ledger entry has the move's key yet (``e0_idempotency_key``: a
      repeat charges nothing, as the look-up it replaces);

    and in every case only if the move crosses no line a wallet webhook event watches (the
    balance falling under ``:g_events_at``, the available credit falling to zero or under):
    those events are written with the move by the outbox's commit hook, which a statement
    on its own does not run. Returns ``w`` and the CTEs to put before it."""
    turns, holds, wallets = Turn.__table__, Hold.__table__, Wallet.__table__
    ledger = LedgerEntry.__table__
    running = select(turns.c.id).where(
        turns.c.status == TurnStatus.RUNNING, turns.c.lease_owner == bindparam("g_owner")
    )
    locked_turn = locked_hold = None
    if kind == "new_entry":
        key = bindparam("e0_idempotency_key", type_=ledger.c.idempotency_key.type)
        known = ~exists(select(ledger.c.id).where(ledger.c.idempotency_key == key))
    elif kind == "hold":
        active = select(holds.c.id).where(
            holds.c.status == HoldStatus.ACTIVE,
            holds.c.id == bindparam("g_hold_id"),
            holds.c.amount == bindparam("g_hold_amount", type_=MONEY),
        )
        locked_turn, locked_hold = turn_then_its_hold(
            running, active, ("guarded_turn", "guarded_hold"), turn_param="g_turn_id"
        )
        known = exists(select(locked_hold.c.id))
    else:
        locked_turn = running.where(turns.c.id == bindparam("g_turn_id")).with_for_update(key_share=True)
        locked_turn = locked_turn.cte("guarded_turn")
        none_active = ~exists(
            select(holds.c.id).where(
                holds.c.turn_id == bindparam("g_turn_id"), holds.c.status == HoldStatus.ACTIVE
            )
        )
        known = and_(exists(select(locked_turn.c.id)), none_active)
    amount = bindparam("w_amount", type_=MONEY)
    held_delta = bindparam("w_held_delta", type_=MONEY)
    events_at = bindparam("g_events_at", type_=MONEY)
    balance, held = wallets.c.balance, wallets.c.held
    low_balance_event = and_(balance >= events_at, balance + amount < events_at)
    depleted_event = and_(balance - held > 0, balance + amount - held - held_delta <= 0)
    guarded = w.where(known, ~low_balance_event, ~depleted_event)
    return guarded, [cte for cte in (locked_turn, locked_hold) if cte is not None]


@cache
def _hold_capture():
    """``UPDATE holds`` marking hold ``c_id`` captured at ``c_resolved_at``: a CTE of a move
    on Postgres, a statement of its own elsewhere."""
    holds = Hold.__table__
    return (
        update(holds)
        .where(holds.c.id == bindparam("c_id"))
        .values(status=HoldStatus.CAPTURED, resolved_at=bindparam("c_resolved_at", type_=UTCDateTime()))
    )


def _write_riders(session: Session, riders: _Riders, wallet_id: str | None = None) -> None:
    """The riders as statements of their own (where they are not CTEs of a move);
    ``wallet_id``: the moved wallet's, for a new hold."""
    dialect = session.get_bind().dialect.name
    holds = Hold.__table__
    if riders.new_hold is not None:
        session.execute(insert(holds), {**riders.new_hold, "wallet_id": wallet_id})
    if riders.captured_hold is not None:
        session.execute(_hold_capture(), {f"c_{name}": value for name, value in riders.captured_hold.items()})
    if riders.usage is not None:
        session.execute(_usage_upsert(dialect), riders.usage)
    if riders.key_spend is not None:
        session.execute(_key_spend_upsert(dialect), riders.key_spend)


def _refuse(session: Session, user_id: str, required: Decimal | None) -> NoReturn:
    """Why ``_move_wallet`` moved nothing: no wallet, or not enough available credit (its
    figures as read now, without a lock)."""
    wallet = session.scalar(
        select(Wallet).where(Wallet.user_id == user_id).execution_options(populate_existing=True)
    )
    if wallet is None or required is None:
        raise NotFound("No wallet for this user.")
    raise InsufficientBalance(
        balance=money_str(wallet.balance),
        available=money_str(wallet.available),
        required=money_str(required),
    )


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
    quarter prefixes; all users' also on the hour from :30), in the caller's transaction:
    one multi-row ``INSERT … ON CONFLICT DO UPDATE``. Does not commit.

    The user's row is first: every writer locks the rows in the same order (the user's,
    already serialised by the wallet lock, then the shared all-users rows, ``*`` before
    ``*30``), and the shared rows stay locked only until the caller commits.
    """
    _write_riders(session, _Riders(_usage_rows(user_id, model, at, turns, input_tokens, output_tokens, cost)))


def _usage_rows(
    user_id: str, model: str, at: datetime, turns: int, input_tokens: int, output_tokens: int, cost: Decimal
) -> list[dict]:
    """The ``usage_hours`` rows one charge adds to (``UsageHour.rows_for``): the user's,
    all users', all users' from :30."""
    return UsageHour.rows_for(
        user_id=user_id,
        model=model,
        at=at,
        turns=turns,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=_q(cost),
    )


def _key_spend_row(api_key_id: str, at: datetime, cost: Decimal) -> dict:
    """The (API key, UTC quarter hour) spend row of a turn's charge: what per-key spend
    limits read (shared/services/limits.py)."""
    return {
        "id": new_id(),
        "api_key_id": api_key_id,
        "period_start": UsageHour.quarter_of(at),
        "cost": _q(cost),
    }


# The two upserts every settle runs are built once per dialect and executed with parameters:
# building them per call (values inlined, a cache key over every column) cost more than the
# round trip (bench: 2.5 ms -> see docs/architecture.md "The hot path, counted").
@cache
def _usage_upsert(dialect: str):
    return _on_usage_conflict(dialect_insert(dialect, UsageHour.__table__))


def _on_usage_conflict(statement):
    table = UsageHour.__table__
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
    return _on_key_spend_conflict(dialect_insert(dialect, ApiKeySpend.__table__))


def _on_key_spend_conflict(statement):
    table = ApiKeySpend.__table__
    return statement.on_conflict_do_update(
        index_elements=["api_key_id", "period_start"],
        set_={"cost": table.c.cost + statement.excluded.cost},
    )


# -- holds and turn settlement (join the caller's transaction) ----------------------------


def place_hold(
    session: Session, *, user_id: str, turn_id: str, amount: Decimal, ttl_seconds: int, new_turn: bool = False
) -> Hold:
    """Reserve ``amount`` for a turn, expiring after ``ttl_seconds``. Does not commit.

    Placing a hold for a turn that already has one returns the existing hold (``new_turn``:
    the turn was created in the caller's transaction, so there is none to look for).

    :raises InsufficientBalance: ``available`` (balance − active holds) is below ``amount``;
        details ``balance``, ``available``, ``required`` as money strings.
    :raises NotFound: the user has no wallet.
    """
    amount = _q(amount)
    if amount < 0:
        raise ValueError("a hold amount cannot be negative")
    # The caller holds the turn (created in this transaction, or its row locked), so no
    # other hold for it can appear meanwhile; the unique turn_id stays the last defence.
    existing = None if new_turn else _fresh_hold(session, turn_id)
    if existing is not None:
        return existing
    now = utcnow()
    hold = Hold(
        id=new_id(),
        turn_id=turn_id,
        amount=amount,
        status=HoldStatus.ACTIVE,
        expires_at=now + timedelta(seconds=ttl_seconds),
        created_at=now,
        resolved_at=None,
    )
    move = _Move(LedgerKind.HOLD, _turn_key(turn_id, "hold"), ZERO, amount, turn_id, hold.id, None, now)
    row = {
        column.key: getattr(hold, column.key)
        for column in Hold.__table__.columns
        if column.key != "wallet_id"
    }
    hold.wallet_id, _ = _move_wallet(session, user_id, [move], covering=amount, riders=_Riders(new_hold=row))
    # Written by the move: the session keeps it as a loaded row, not one to insert.
    make_transient_to_detached(hold)
    session.add(hold)
    return hold


@dataclass(frozen=True)
class Settlement:
    """How a turn was billed: the balance right after, and what it was charged.
    ``turn_written``: the settlement's wallet statement also wrote the turn's row
    (``TurnRow``)."""

    balance_after: Decimal
    charged: Decimal
    turn_written: bool = False


@dataclass(frozen=True)
class SettleGuard:
    """What a turn's runner knows of it, for its settlement to be one autocommit statement
    on Postgres instead of a locked transaction (``settle_turn(guard=…)``): the turn is
    ``running`` under ``lease_owner``, and ``hold`` is its active hold (``None``: it has
    none), as its claim left them. The statement locks the turn, then the hold, and moves
    nothing unless that is still so and the move fires no wallet webhook event (a balance
    falling under ``low_balance_below``, available credit falling to zero): the caller
    then settles the usual way, which writes those events with the move."""

    lease_owner: str
    hold: Hold | None
    low_balance_below: Decimal


@dataclass(frozen=True)
class TurnRow:
    """The ended turn's row, for its settlement to write in the wallet's statement on
    Postgres (a rider, as the usage rollups are): ``values``, its new columns but the three
    the settlement decides: ``cost`` (what was charged), ``balance_after`` (the wallet's
    balance after) and ``low_balance`` (that balance below ``low_balance_below``). The
    turn's row is locked before the wallet's: by the caller, or by the guarded statement
    itself (``SettleGuard``)."""

    values: dict
    low_balance_below: Decimal


def turn_then_its_hold(turn_query, hold_query, names: tuple[str, str], turn_param: str = "turn_id"):
    """CTEs locking the turn (``turn_query``, a select on ``turns``) and then its hold
    (``hold_query``, on ``holds``), in the order every path locks them (the claim, a settle,
    a cancel): the hold's CTE joins the locked turn, so its row is locked only once the
    turn's lock is granted. Both by the turn's id (parameter ``turn_param``), named twice for
    the planner: each table by its index, whatever its statistics say (a table that grew
    since its last ANALYZE was scanned whole). In a statement that updates ``holds``, the
    parameter must not be named as one of its columns: SQLAlchemy would add it to the SET."""
    turns, holds = Turn.__table__, Hold.__table__
    locked_turn = (
        turn_query.where(turns.c.id == bindparam(turn_param)).with_for_update(key_share=True).cte(names[0])
    )
    locked_hold = (
        hold_query.join(locked_turn, holds.c.turn_id == locked_turn.c.id)
        .where(holds.c.turn_id == bindparam(turn_param))
        .with_for_update(of=holds, key_share=True)
        .cte(names[1])
    )
    return locked_turn, locked_hold


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
    hold: HoldArgument = LOCK_IT,
    unsettled: bool = False,
    turn_row: TurnRow | None = None,
    guard: SettleGuard | None = None,
) -> Settlement | None:
    """Bill a turn that ended (completed, or failed/cancelled after using tokens) and add it
    to the usage rollups. Does not commit. ``hold``: the turn's hold, already locked by the
    caller after the turn (``LOCK_IT``: locked here). ``unsettled``: the caller holds the
    turn's row lock and found the turn not finished; a turn is settled only in the
    transaction that finishes it (``turn_runner._end_locked``), so there is no earlier
    settle to look for. ``turn_row``: the ended turn's row, written by the wallet's
    statement when the charge is one (Postgres: ``Settlement.turn_written``); the caller
    writes it otherwise. ``guard`` (Postgres, with ``turn_row``): no lock taken by the
    caller; the whole settlement is one statement that first checks what the guard says
    (``SettleGuard``), and ``None`` is returned, with nothing written, when it is not so.

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
    if guard is not None:
        if guard.hold is None and enforced:
            return None  # a debit of what is available: read under the wallet's lock, below
        hold, unsettled = guard.hold, True
    hold = _locked_hold(session, turn_id, hold)
    active = hold is not None and hold.status == HoldStatus.ACTIVE
    # An active hold means no settle yet (a settle captures it in its own transaction).
    # Otherwise the caller's lock on the turn row keeps other settles of this turn out while
    # we look (the entries' unique keys stay the last line of defence).
    done = None if active or unsettled else _entry_by_key(session, capture_key, debit_key)
    if done is not None:
        return Settlement(done.balance_after, _charged_so_far(session, turn_id))
    cost = _q(cost)
    if cost < 0:
        raise ValueError("a turn cost cannot be negative")
    now = utcnow()

    postgres = session.get_bind().dialect.name == "postgresql"

    def riders(charged: Decimal, *, with_turn: bool = False) -> _Riders:
        usage = _usage_rows(user_id, model, at, 1 if completed else 0, input_tokens, output_tokens, charged)
        key_spend = _key_spend_row(api_key_id, at, charged) if api_key_id is not None else None
        turn = None
        if with_turn and turn_row is not None and postgres:
            turn = (turn_id, replace(turn_row, values={**turn_row.values, "cost": charged}))
        return _Riders(usage, key_spend, turn_row=turn)

    if active:
        charged = min(cost, hold.amount)
        moves = _capture(hold, charged, key=capture_key, now=now)
        capture = replace(riders(charged, with_turn=True), captured_hold={"id": hold.id, "resolved_at": now})
        moved = _move_wallet(session, user_id, moves, riders=capture, guard=_guarding(turn_id, guard))
        if moved is None:
            return None
        balance_after, written = moved[1], capture.turn_row is not None
        set_committed_value(hold, "status", HoldStatus.CAPTURED)
        set_committed_value(hold, "resolved_at", now)
    elif not enforced:
        charged = cost
        move = _Move(LedgerKind.DEBIT, debit_key, -cost, ZERO, turn_id, None, None, now)
        debit = riders(charged, with_turn=True)
        moved = _move_wallet(session, user_id, [move], riders=debit, guard=_guarding(turn_id, guard))
        if moved is None:
            return None
        balance_after, written = moved[1], debit.turn_row is not None
    else:
        balance_after, charged = _debit_available(
            session, user_id, turn_id, hold, cost, key=debit_key, now=now
        )
        _write_riders(session, riders(charged))
        written = False
    if charged < cost:
        metrics.hold_overrun(cost - charged)
        log.warning("turn %s charged %s of its cost %s (enforced, not covered)", turn_id, charged, cost)
    return Settlement(balance_after, charged, turn_written=written)


def _guarding(turn_id: str, guard: SettleGuard | None) -> _Guard | None:
    return None if guard is None else _Guard.of_turn(turn_id, guard)


def _capture(hold: Hold, charged: Decimal, *, key: str, now: datetime) -> list[_Move]:
    """The moves that capture ``charged`` from the active ``hold`` (locked by the caller)
    and release the rest; the move marks the hold captured (``_Riders.captured_hold``)."""
    turn_id = hold.turn_id
    moves = [_Move(LedgerKind.CAPTURE, key, -charged, -charged, turn_id, hold.id, None, now)]
    rest = hold.amount - charged
    if rest > 0:
        # One microsecond later, so "newest first" lists show the pair in a stable order.
        later = now + timedelta(microseconds=1)
        reason = "unused part of the hold"
        moves.append(
            _Move(
                LedgerKind.RELEASE,
                _turn_key(turn_id, "release"),
                ZERO,
                -rest,
                turn_id,
                hold.id,
                reason,
                later,
            )
        )
    return moves


def _debit_available(
    session: Session, user_id: str, turn_id: str, hold: Hold | None, cost: Decimal, *, key: str, now: datetime
) -> tuple[Decimal, Decimal]:
    """Debit an enforced turn whose hold is gone (expired or released while its worker was
    away): at most what is available now, at most what the hold was. Returns the balance
    after and what was charged."""
    wallet = _lock_wallet(session, user_id=user_id)
    charged = min(cost, max(wallet.available, ZERO))
    if hold is not None:
        charged = min(charged, hold.amount)
    entry = _append(
        session, wallet, kind=LedgerKind.DEBIT, key=key, amount=-charged, turn_id=turn_id, now=now
    )
    session.flush()
    return entry.balance_after, charged


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


def release_hold(session: Session, *, turn_id: str, reason: str, hold: HoldArgument = LOCK_IT) -> bool:
    """Release a turn's active hold in full. Does not commit. ``hold``: as for
    :func:`settle_turn`.

    Returns False (and writes nothing) when the turn has no hold or it already
    resolved (captured, released or expired): a hold resolves at most once.
    """
    hold = _locked_hold(session, turn_id, hold)
    if hold is None or hold.status != HoldStatus.ACTIVE:
        return False
    wallet = _lock_wallet(session, wallet_id=hold.wallet_id)
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
    whose attempt started after it. The turn is read after the hold's lock is taken, so a
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
        # The hold row first (the lock order): a claim confirming this hold, or a settle
        # capturing it, holds it until its transaction ends.
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
        wallet = _lock_wallet(session, wallet_id=wallet_id)
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
    price: ModelPrice | None = None,
    events_at: Decimal | None = None,
) -> Decimal | None:
    """Bill the tokens of a background summary refresh as a ``debit``, at ``price`` (read
    by the caller already) or the price in force. Does not commit. Returns the charge.

    ``events_at`` (Postgres; the low-balance threshold): the caller runs this in
    autocommit, and the charge is one statement that moves the wallet only if no entry has
    the summary's key yet, available credit covers it when enforced, and it fires no wallet
    webhook event (``_guarded``); else it writes nothing and returns ``None``, for the
    caller to charge again in a transaction.

    Idempotent per ``(chat_session_id, through_seq)``: a repeat charges nothing. With
    ``enforce`` the charge never takes ``available`` below zero (the caller checked
    before the call that available covered its worst case; turns admitted since may
    have reserved some of it). Usage is added to the rollups with ``turns=0``.

    :raises InvalidInput: ``model_not_priced``.
    """
    at = at or utcnow()
    key = f"summary:{chat_session_id}:{through_seq}"
    price = price or pricing.price_in_force(session, model, at)
    cost = pricing.cost_of(price, input_tokens, output_tokens)
    # Most often what is available covers it: one statement moves the wallet, appends the
    # entry and adds the usage. (A concurrent repeat then fails on the entry's unique key.)
    move = _Move(LedgerKind.DEBIT, key, -cost, ZERO, None, None, SUMMARY_REASON, utcnow())
    usage = _Riders(_usage_rows(user_id, model, at, 0, input_tokens, output_tokens, cost))
    covering = cost if enforce else None
    if events_at is not None and session.get_bind().dialect.name == "postgresql":
        guard = _Guard("new_entry", {"g_events_at": events_at})  # the look-up below, in SQL
        moved = _move_wallet(session, user_id, [move], covering=covering, riders=usage, guard=guard)
        return None if moved is None else cost
    if _entry_by_key(session, key) is not None:
        return ZERO
    try:
        _move_wallet(session, user_id, [move], covering=covering, riders=usage)
        return cost
    except InsufficientBalance:
        pass
    # Enforced and not covered any more: what is available, under the wallet's lock.
    wallet = _lock_wallet(session, user_id=user_id)
    if _entry_by_key(session, key) is not None:
        return ZERO
    charged = min(cost, max(wallet.available, ZERO))
    if charged < cost:
        metrics.hold_overrun(cost - charged)
    _append(session, wallet, kind=LedgerKind.DEBIT, key=key, amount=-charged, reason=SUMMARY_REASON)
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
