from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db import Base, IdColumn, UTCDateTime, check_in, new_id, utcnow

if TYPE_CHECKING:
    from shared.models.billing import Wallet


class Role(StrEnum):
    USER = "user"
    ADMIN = "admin"


class User(Base):
    __tablename__ = "users"
    __table_args__ = (check_in("role", Role),)

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    role: Mapped[str] = mapped_column(String(16), default=Role.USER)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    wallet: Mapped[Wallet | None] = relationship(back_populates="user", uselist=False)
    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="user")

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN


class ApiKey(Base):
    """An API key, stored as its SHA-256; the key itself is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(IdColumn(), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("users.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Where /v1/chat/completions records this key's calls without X-Tollgate-Session.
    default_session_id: Mapped[str | None] = mapped_column(IdColumn())

    user: Mapped[User] = relationship(back_populates="api_keys")


class AdminSession(Base):
    """A signed-in admin console session (web/console). The browser holds only a random
    token; this row holds its SHA-256, the CSRF token and the API key it was opened with,
    so revoking that key (or demoting the user) ends the session too."""

    __tablename__ = "admin_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("users.id"), index=True)
    api_key_id: Mapped[str] = mapped_column(IdColumn(), ForeignKey("api_keys.id"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
