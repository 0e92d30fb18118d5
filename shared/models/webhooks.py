"""Webhook endpoints and the outbox of events and deliveries (design §8, docs/webhooks.md)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db import Base, IdColumn, UTCDateTime, check_in, new_id, utcnow


class WebhookEventType(StrEnum):
    WALLET_LOW_BALANCE = "wallet.low_balance"
    WALLET_DEPLETED = "wallet.depleted"
    SPEND_LIMIT_REACHED = "spend_limit.reached"
    ENFORCEMENT_CHANGED = "enforcement.changed"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookEndpoint(Base):
    """A receiver. The signing secret is kept (it signs every delivery) and shown once."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str | None] = mapped_column(String(500))
    events: Mapped[list[str]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(100))
    created_by: Mapped[str] = mapped_column(IdColumn())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Deleted endpoints stay, so their deliveries can still be read; nothing new goes to them.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookEvent(Base):
    """One event, written in the transaction of the change that caused it (the outbox)."""

    __tablename__ = "webhook_events"
    __table_args__ = (check_in("type", WebhookEventType),)

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    type: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(Base):
    """One event to one endpoint: pending until a 2xx (delivered) or 24 h of retries (failed)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "endpoint_id"),
        Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
        check_in("status", DeliveryStatus),
    )

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    event_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("webhook_events.id"))
    endpoint_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("webhook_endpoints.id"))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    response_status: Mapped[int | None] = mapped_column(Integer)
    # At most a short excerpt of what the receiver answered; never the whole body.
    response_excerpt: Mapped[str | None] = mapped_column(String(500))
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    # Declared so one flush inserts the event before its deliveries (the unit of work
    # orders inserts by relationships, not by foreign keys alone).
    event: Mapped[WebhookEvent] = relationship()
    endpoint: Mapped[WebhookEndpoint] = relationship()
