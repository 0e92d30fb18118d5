from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base, IdColumn, UTCDateTime, new_id, utcnow


class AdminAuditEvent(Base):
    __tablename__ = "admin_audit_events"

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    actor_id: Mapped[str] = mapped_column(IdColumn(), index=True)
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str | None] = mapped_column(String(32))
    # An id, or a model name for price changes: not an id column.
    target: Mapped[str | None] = mapped_column(String(200))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class SettingEntry(Base):
    """Durable runtime settings (e.g. the enforcement override), the source Redis is restored from.

    ``version`` increases on every write so caches can tell a change happened.
    """

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any | None] = mapped_column(JSON)
    version: Mapped[int] = mapped_column(Integer, default=0)
    updated_by: Mapped[str | None] = mapped_column(IdColumn())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
