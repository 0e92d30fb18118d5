from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from sqlalchemy import ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db import MONEY, Base, IdColumn, UTCDateTime, new_id, utcnow

if TYPE_CHECKING:
    from shared.models.users import User

LEDGER_KINDS = ("grant", "adjustment", "hold", "capture", "release", "expiry", "debit")
HOLD_STATUSES = ("active", "captured", "released", "expired")


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
    __table_args__ = (Index("ix_ledger_entries_wallet_created", "wallet_id", "created_at"),)

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


class Hold(Base):
    """Credit reserved for one turn. Resolves at most once: captured, released or expired."""

    __tablename__ = "holds"
    __table_args__ = (Index("ix_holds_status_expires", "status", "expires_at"),)

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    wallet_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("wallets.id"), index=True)
    turn_id: Mapped[str] = mapped_column(IdColumn(), unique=True)
    amount: Mapped[Decimal] = mapped_column(MONEY)
    status: Mapped[str] = mapped_column(String(16), default="active")
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
