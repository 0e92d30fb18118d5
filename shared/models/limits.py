"""Spend, rate and concurrency limits on users and API keys (design §8, docs/limits.md)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from sqlalchemy import ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import MONEY, Base, IdColumn, UTCDateTime, check_in, new_id, utcnow


class LimitSubject(StrEnum):
    USER = "user"
    API_KEY = "api_key"


class SpendPeriod(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class Limit(Base):
    """The limits of one user or one API key; a null column is "no limit of that kind".

    Admission locks this row (``SELECT … FOR UPDATE``), so two turns of the same user or
    key are admitted one after the other and the spend check sees every earlier one.
    """

    __tablename__ = "limits"
    __table_args__ = (
        UniqueConstraint("subject_type", "subject_id"),
        check_in("subject_type", LimitSubject),
        check_in("spend_period", SpendPeriod),
    )

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    subject_type: Mapped[str] = mapped_column(String(16))
    # A user's id or an API key's id, by ``subject_type``.
    subject_id: Mapped[str] = mapped_column(IdColumn())
    # The user the limit belongs to (the key's owner for a key limit).
    user_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("users.id"), index=True)
    spend_amount: Mapped[Decimal | None] = mapped_column(MONEY)
    spend_period: Mapped[str | None] = mapped_column(String(8))
    spend_tz: Mapped[str | None] = mapped_column(String(64))
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_concurrent_turns: Mapped[int | None] = mapped_column(Integer)
    # The start of the last period a ``spend_limit.reached`` event was sent for (one per period).
    reached_period_start: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_by: Mapped[str] = mapped_column(IdColumn())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKeySpend(Base):
    """What turns made through one API key were charged, per UTC quarter hour, written by
    ``billing.settle_turn`` in the transaction of the charge (the user-level twin is
    ``usage_hours``). A key's spend in a local day, week or month is an exact sum of
    these rows, as the usage buckets are."""

    __tablename__ = "api_key_spend_rollups"
    __table_args__ = (UniqueConstraint("api_key_id", "period_start"),)

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    api_key_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("api_keys.id"))
    period_start: Mapped[datetime] = mapped_column(UTCDateTime())
    cost: Mapped[Decimal] = mapped_column(MONEY, default=Decimal("0"))
