from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, deferred, mapped_column

from shared.db import Base, IdColumn, UTCDateTime, check_in, new_id, utcnow


class FileStatus(StrEnum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


class UploadedFile(Base):
    """An upload, bytes kept in the database so every worker can read it."""

    __tablename__ = "uploaded_files"
    __table_args__ = (check_in("status", FileStatus),)

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    room_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("rooms.id"), index=True)
    user_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("users.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(200))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = deferred(mapped_column(LargeBinary))
    text: Mapped[str | None] = deferred(mapped_column(Text))
    status: Mapped[str] = mapped_column(String(16), default=FileStatus.PENDING)
    error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
