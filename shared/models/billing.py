from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING

from sqlalchemy import DDL, BigInteger, ForeignKey, Index, String, UniqueConstraint, event
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db import MONEY, Base, IdColumn, UTCDateTime, check_in, new_id, utcnow

if TYPE_CHECKING:
    from shared.models.users import User


class LedgerKind(StrEnum):
    GRANT = "grant"
    ADJUSTMENT = "adjustment"
    HOLD = "hold"
    CAPTURE = "capture"
    RELEASE = "release"
    EXPIRY = "expiry"
    DEBIT = "debit"


class HoldStatus(StrEnum):
    ACTIVE = "active"
    CAPTURED = "captured"
    RELEASED = "released"
    EXPIRED = "expired"


class Wallet(Base):
    """A user's prepaid credit. ``balance`` moves only with a ledger entry.

    ``held`` is the sum of the wallet's active holds, kept beside the balance
    so ``available = balance - held`` is one row read under the wallet lock.
    """

    __tablename__ = "wallets"

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("users.id"), unique=True)
    balance: Mapped[Decimal] = mapped_column(MONEY, default=Decimal("0"))
    held: Mapped[Decimal] = mapped_column(MONEY, default=Decimal("0"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    user: Mapped[User] = relationship(back_populates="wallet")

    @property
    def available(self) -> Decimal:
        return self.balance - self.held


class LedgerEntry(Base):
    """Append-only. ``amount`` is the change to the balance (0 for hold/release/expiry);
    ``held_delta`` the change to the reserved amount."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        Index("ix_ledger_entries_wallet_created", "wallet_id", "created_at"),
        check_in("kind", LedgerKind),
    )

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    wallet_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("wallets.id"))
    user_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[Decimal] = mapped_column(MONEY)
    held_delta: Mapped[Decimal] = mapped_column(MONEY, default=Decimal("0"))
    balance_after: Mapped[Decimal] = mapped_column(MONEY)
    turn_id: Mapped[str | None] = mapped_column(IdColumn(), index=True)
    hold_id: Mapped[str | None] = mapped_column(IdColumn())
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    initiated_by: Mapped[str] = mapped_column(IdColumn())
    reason: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


# Ledger rows are never updated or deleted (design §4), and the database holds
# that rule whatever code runs: triggers refuse UPDATE and DELETE (TRUNCATE, an
# operator's tool, stays possible on Postgres). ``create_all`` installs them from
# here; migration 20261130_0001 installs the same for migrated databases.
APPEND_ONLY_DDL = {
    "postgresql": (
        """CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only: % refused', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$""",
        "CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries "
        "FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()",
    ),
    "sqlite": (
        "CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries "
        "BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only: UPDATE refused'); END",
        "CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries "
        "BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only: DELETE refused'); END",
    ),
}
for _dialect, _statements in APPEND_ONLY_DDL.items():
    for _statement in _statements:
        # DDL() formats with %: a literal % is written %%.
        event.listen(
            LedgerEntry.__table__,
            "after_create",
            DDL(_statement.replace("%", "%%")).execute_if(dialect=_dialect),
        )
# DROP TABLE takes its triggers along; the Postgres function outlives it.
event.listen(
    LedgerEntry.__table__,
    "after_drop",
    DDL("DROP FUNCTION IF EXISTS ledger_entries_append_only()").execute_if(dialect="postgresql"),
)


class Hold(Base):
    """Credit reserved for one turn. Resolves at most once: captured, released or expired."""

    __tablename__ = "holds"
    __table_args__ = (
        Index("ix_holds_status_expires", "status", "expires_at"),
        check_in("status", HoldStatus),
    )

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    wallet_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("wallets.id"), index=True)
    turn_id: Mapped[str] = mapped_column(IdColumn(), unique=True)
    amount: Mapped[Decimal] = mapped_column(MONEY)
    status: Mapped[str] = mapped_column(String(16), default=HoldStatus.ACTIVE)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ModelPrice(Base):
    """A price version; the one in force is the latest ``effective_from`` not in the future."""

    __tablename__ = "model_prices"
    __table_args__ = (UniqueConstraint("model", "effective_from"),)

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    model: Mapped[str] = mapped_column(String(200))
    input_per_1k: Mapped[Decimal] = mapped_column(MONEY)
    output_per_1k: Mapped[Decimal] = mapped_column(MONEY)
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str] = mapped_column(IdColumn())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


ALL_USERS = "*"  # the ``scope`` of the all-users level
# The ``scope`` of the all-users level on hours that start at :30 UTC (17:30–18:30 …): a
# zone whose local midnights all fall at :30 (Asia/Kolkata, America/St_Johns) maps each of
# these rows whole to one local day, with no hour to split (docs/usage.md).
ALL_USERS_AT_30 = "*30"
ALL_USERS_SCOPES = (ALL_USERS, ALL_USERS_AT_30)
# The actor id (``initiated_by``, ``created_by``) of what no admin did: captures, seeded prices.
SYSTEM_ACTOR = "system"
_HALF_HOUR = timedelta(minutes=30)


class UsageHour(Base):
    """Usage per scope, model and UTC hour, quarter-exact, written with the debit.

    Two levels in one table: ``scope`` is a user's id (the per-user level) or ``*`` (the
    all-users level, what a dashboard asks for first). The all-users level is kept twice:
    on UTC hours (``*``) and on the hours that start at :30 UTC (``*30``, ``hour_start`` on
    :30), so zones cut at :30 read whole rows. Besides the hour's totals, a row
    carries the usage of its first 15, 30 and 45 minutes (``*_to_15`` …), so the hour
    splits exactly at any quarter: every local midnight since 1972 is a UTC quarter hour,
    and a local day in Asia/Kolkata (+05:30) cuts its UTC hour at :30 (docs/usage.md).
    No foreign key on ``scope``: ``*`` is no user.
    """

    __tablename__ = "usage_hours"
    __table_args__ = (Index("ix_usage_hours_hour_start", "hour_start"),)

    scope: Mapped[str] = mapped_column(IdColumn(), primary_key=True)
    hour_start: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    turns: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost: Mapped[Decimal] = mapped_column(MONEY, default=Decimal("0"))
    turns_to_15: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens_to_15: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens_to_15: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_to_15: Mapped[Decimal] = mapped_column(MONEY, default=Decimal("0"))
    turns_to_30: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens_to_30: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens_to_30: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_to_30: Mapped[Decimal] = mapped_column(MONEY, default=Decimal("0"))
    turns_to_45: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens_to_45: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens_to_45: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_to_45: Mapped[Decimal] = mapped_column(MONEY, default=Decimal("0"))

    MEASURES = ("turns", "input_tokens", "output_tokens", "cost")
    SPLITS = (15, 30, 45)  # minutes into the hour with a stored prefix
    QUARTER = timedelta(minutes=15)  # every UTC offset in use since 1972 is a multiple of it
    ROWS_PER_EVENT = 3  # rows_for: the user's hour, all users' hour, all users' hour from :30

    @classmethod
    def hour_of(cls, at: datetime) -> datetime:
        """The start of the UTC hour holding ``at``."""
        return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)

    @classmethod
    def quarter_of(cls, at: datetime) -> datetime:
        """The start of the UTC quarter hour holding ``at``."""
        at = at.astimezone(UTC)
        return at.replace(minute=at.minute - at.minute % 15, second=0, microsecond=0)

    @classmethod
    def prefix_column(cls, measure: str, minute: int):
        """The column holding ``measure`` summed over the hour's first ``minute`` minutes
        (``minute`` in 15, 30, 45, 60; 60 is the hour's total)."""
        return getattr(cls, measure if minute == 60 else f"{measure}_to_{minute}")

    @classmethod
    def rows_for(cls, *, user_id: str, model: str, at: datetime, **amounts) -> list[dict]:
        """The three rows one usage event adds to, in the order every writer locks them: its
        user's and all users' for ``at``'s UTC hour, then all users' for the hour from :30
        holding ``at``. Each ``*_to_N`` gets the amount when ``at`` lies in the first N
        minutes of its row's hour."""
        at = at.astimezone(UTC)
        hour = cls.hour_of(at)
        half = hour + (_HALF_HOUR if at.minute >= 30 else -_HALF_HOUR)
        values = cls._values(hour, model, at, amounts)
        return [
            {"scope": user_id, **values},
            {"scope": ALL_USERS, **values},
            {"scope": ALL_USERS_AT_30, **cls._values(half, model, at, amounts)},
        ]

    @classmethod
    def _values(cls, start: datetime, model: str, at: datetime, amounts: dict) -> dict:
        minute = (at - start) // timedelta(minutes=1)
        values = {"hour_start": start, "model": model}
        for measure in cls.MEASURES:
            values[measure] = amounts[measure]
            for split in cls.SPLITS:
                values[f"{measure}_to_{split}"] = amounts[measure] if minute < split else 0
        return values
