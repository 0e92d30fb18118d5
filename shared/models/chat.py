from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db import MONEY, Base, IdColumn, UTCDateTime, check_in, new_id, utcnow


class TurnStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TurnKind(StrEnum):
    CHAT = "chat"


class ToolCallStatus(StrEnum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"


class Room(Base):
    __tablename__ = "rooms"

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ChatSession(Base):
    """A conversation in a room, with its rolling summary."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    room_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("rooms.id"), index=True)
    user_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("users.id"), index=True)
    title: Mapped[str | None] = mapped_column(String(200))
    summary: Mapped[str | None] = mapped_column(Text)
    # The highest turn seq the summary covers (0 = none).
    summary_through_seq: Mapped[int] = mapped_column(Integer, default=0)
    summary_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Turn(Base):
    __tablename__ = "turns"
    __table_args__ = (
        UniqueConstraint("session_id", "seq"),
        UniqueConstraint("user_id", "idempotency_key"),
        Index("ix_turns_status_updated", "status", "updated_at"),
        Index("ix_turns_completed_at", "completed_at"),
        Index("ix_turns_status_lease", "status", "lease_expires_at"),
        # Rate limits count a user's (a key's) turns admitted in the last minute.
        Index("ix_turns_user_created", "user_id", "created_at"),
        Index("ix_turns_api_key_created", "api_key_id", "created_at"),
        check_in("status", TurnStatus),
        check_in("kind", TurnKind),
    )

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    session_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("sessions.id"))
    room_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("rooms.id"))
    user_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("users.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16), default=TurnKind.CHAT)
    status: Mapped[str] = mapped_column(String(16), default=TurnStatus.QUEUED)
    content: Mapped[str] = mapped_column(Text)
    reply: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200))
    max_output_tokens: Mapped[int] = mapped_column(Integer)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[Decimal | None] = mapped_column(MONEY)
    balance_after: Mapped[Decimal | None] = mapped_column(MONEY)
    low_balance: Mapped[bool] = mapped_column(Boolean, default=False)
    summary_used_fallback: Mapped[bool] = mapped_column(Boolean, default=False)
    enforced: Mapped[bool] = mapped_column(Boolean, default=False)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The running attempt's lease: its worker renews it every few seconds; once it lapses
    # the turn may be taken over (shared/services/leases.py). The owner is the attempt's task id.
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The API key the turn was submitted with (limits per key; null for older rows). No
    # foreign key: SQLite would rebuild the table to add one, and keys are never deleted.
    api_key_id: Mapped[str | None] = mapped_column(IdColumn())
    # The worst case reserved against a spend limit at admission (null: no spend limit applied).
    limit_reserve: Mapped[Decimal | None] = mapped_column(MONEY)
    # Some usage was estimated with the token rule, not reported by the provider (an
    # upstream stream without a usage chunk, a stream cut short by a cancel or a drop).
    usage_estimated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # POST /turns/{id}/cancel on a running turn: its worker stops at the next chunk or round.
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # A /v1/chat/completions turn: the caller's messages are the whole context.
    request_messages: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # ... the caller's own tools (function schemas), offered to the model as they are; and the
    # tool calls the model answered with, returned to the caller to run (Tollgate runs none).
    request_tools: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    reply_tool_calls: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # The tool calls the runner recorded, in order. Read-only here: the runner inserts
    # ToolCallEvent rows by turn_id, each in its own commit.
    tool_calls: Mapped[list[ToolCallEvent]] = relationship(
        order_by="ToolCallEvent.created_at", viewonly=True, lazy="select"
    )


class ToolCallEvent(Base):
    __tablename__ = "tool_call_events"
    __table_args__ = (check_in("status", ToolCallStatus),)

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    turn_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("turns.id"), index=True)
    room_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("rooms.id"))
    tool: Mapped[str] = mapped_column(String(64))
    arguments: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    result_excerpt: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
