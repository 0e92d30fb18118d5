"""Admin console sessions: an admin API key exchanged for a server-side session.

The browser keeps only a random token (an HttpOnly cookie set by ``web/console``);
the ``admin_sessions`` row keeps its SHA-256, the session's CSRF token and the API
key it was opened with. The key itself is never stored, in the browser or here.

A session is valid while it has not expired, its API key is not revoked and its
user is still an admin: revoking the key or demoting the user ends every console
session opened with it on the next request. Rows live in the database in both
modes (embedded SQLite and production), so there is one code path, and a Redis
flush or restart does not sign admins out.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from shared.db import utcnow
from shared.errors import Forbidden, Unauthorized
from shared.models import AdminSession, ApiKey, User
from shared.services import audit
from shared.services.auth import authenticate, hash_key

SESSION_LIFETIME = timedelta(hours=12)
MAX_TOKEN_LENGTH = 100


@dataclass(frozen=True)
class ConsoleSession:
    user: User
    csrf_token: str
    token: str  # the browser's cookie value; never stored


def sign_in(session: Session, secret: str | None) -> ConsoleSession:
    """Open a console session for an admin API key; audited. Commits.

    Expired sessions are swept here, so the table holds only live ones and a few
    stale rows between sign-ins.

    :raises Unauthorized: missing, unknown or revoked key.
    :raises Forbidden: the key is valid but its user is not an admin.
    """
    caller = authenticate(session, (secret or "").strip())
    if not caller.is_admin:
        session.rollback()
        raise Forbidden("The admin console needs an admin API key.")
    now = utcnow()
    session.execute(delete(AdminSession).where(AdminSession.expires_at <= now))
    token = secrets.token_urlsafe(32)
    row = AdminSession(
        token_hash=hash_key(token),
        user_id=caller.id,
        api_key_id=caller.key_id,
        csrf_token=secrets.token_urlsafe(32),
        created_at=now,
        expires_at=now + SESSION_LIFETIME,
    )
    session.add(row)
    audit.record(
        session,
        caller.id,
        "console.sign_in",
        target_type="api_key",
        target=caller.key_id,
        details={"prefix": session.get(ApiKey, caller.key_id).prefix},
    )
    session.commit()
    return ConsoleSession(user=session.get(User, caller.id), csrf_token=row.csrf_token, token=token)


def resume(session: Session, token: str | None) -> ConsoleSession:
    """The live session for a cookie's token.

    :raises Unauthorized: no token, an unknown or expired one, its key revoked, or
        its user no longer an admin.
    """
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise Unauthorized("Sign in with an admin API key.")
    row = session.execute(
        select(AdminSession, User)
        .join(User, User.id == AdminSession.user_id)
        .join(ApiKey, ApiKey.id == AdminSession.api_key_id)
        .where(
            AdminSession.token_hash == hash_key(token),
            AdminSession.expires_at > utcnow(),
            ApiKey.revoked_at.is_(None),
        )
    ).first()
    if row is None or not row.User.is_admin:
        raise Unauthorized("Your console session has ended; sign in again.")
    return ConsoleSession(user=row.User, csrf_token=row.AdminSession.csrf_token, token=token)


def csrf_matches(console_session: ConsoleSession, submitted: str | None) -> bool:
    """Constant-time comparison of a submitted CSRF token with the session's."""
    if not submitted:
        return False
    return hmac.compare_digest(console_session.csrf_token.encode(), submitted.encode("utf-8", "replace"))


def sign_out(session: Session, token: str | None) -> None:
    """End a session; ending an unknown or ended one does nothing. Commits."""
    if token and len(token) <= MAX_TOKEN_LENGTH:
        session.execute(delete(AdminSession).where(AdminSession.token_hash == hash_key(token)))
    session.commit()
