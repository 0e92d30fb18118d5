from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING

from sqlalchemy import DDL, ForeignKey, Index, Integer, String, UniqueConstraint, event
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


class UsageRollup(Base):
    """Usage pre-aggregated per user, model and UTC quarter hour, written with the debit."""

    __tablename__ = "usage_rollups"
    __table_args__ = (
        UniqueConstraint("user_id", "model", "period_start"),
        Index("ix_usage_rollups_period_start", "period_start"),
    )

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("users.id"))
    model: Mapped[str] = mapped_column(String(200))
    period_start: Mapped[datetime] = mapped_column(UTCDateTime())
    turns: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[Decimal] = mapped_column(MONEY, default=Decimal("0"))

    PERIOD = timedelta(minutes=15)  # every UTC offset in use since 1972 is a multiple of it

    @classmethod
    def period_of(cls, at: datetime) -> datetime:
        """The start of the UTC quarter hour holding ``at``."""
        at = at.astimezone(UTC)
        return at.replace(minute=at.minute - at.minute % 15, second=0, microsecond=0)
