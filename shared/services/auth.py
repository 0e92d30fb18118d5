"""Users and API keys.

Keys are ``tg_`` + 32 random bytes (urlsafe). They carry 256 bits of entropy,
so a plain SHA-256 is a safe, constant-cost hash: a slow KDF would only add
latency to every request without adding security.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db import utcnow
from shared.errors import Conflict, InvalidInput, NotFound, Unauthorized
from shared.models import ApiKey, Role, User, Wallet
from shared.pagination import Listing
from shared.services import audit, key_cache
from shared.services.key_cache import KeyCache

KEY_PREFIX = "tg_"


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    secret: str  # the only time the full key exists outside the client


@dataclass(frozen=True)
class Caller:
    """Who a request's key belongs to: the user as authentication found it, and the key."""

    id: str
    email: str
    role: str
    created_at: datetime
    key_id: str

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def normalize_email(email: str) -> str:
    """The one form an email is stored and compared in: stripped, lower case. Called at
    the edges (the users schema, the CLI); services take the normalized address.

    :raises InvalidInput: ``invalid_email``.
    """
    email = email.strip().lower()
    local, sep, domain = email.partition("@")
    if not sep or not local or "." not in domain or " " in email or len(email) > 320:
        raise InvalidInput("Not a valid email address.", error="invalid_email", field="email")
    return email


def _issue_key(session: Session, user: User, name: str | None) -> IssuedKey:
    secret = _new_secret()
    key = ApiKey(user_id=user.id, key_hash=hash_key(secret), prefix=secret[:10], name=name)
    session.add(key)
    return IssuedKey(api_key=key, secret=secret)


def create_user(
    session: Session, email: str, role: str = Role.USER, *, actor_id: str | None = None
) -> tuple[User, IssuedKey]:
    """Create a user with an empty wallet and a first API key, in one transaction.
    ``email`` is normalized already (:func:`normalize_email`).

    :raises InvalidInput: bad role.
    :raises Conflict: ``email_taken`` when the email is already registered.
    """
    if role not in set(Role):
        raise InvalidInput(f"role must be one of {', '.join(Role)}.", error="invalid_role")
    if session.scalar(select(User.id).where(User.email == email)):
        raise Conflict("A user with this email already exists.", error="email_taken")
    try:
        user = User(email=email, role=role)
        session.add(user)
        session.flush()
        session.add(Wallet(user_id=user.id, balance=Decimal("0"), held=Decimal("0")))
        issued = _issue_key(session, user, name="initial")
        if actor_id:
            audit.record(
                session,
                actor_id,
                "user.create",
                target_type="user",
                target=user.id,
                details={"email": email, "role": role},
            )
        session.commit()
    except IntegrityError as exc:  # a concurrent create of the same email won the race
        session.rollback()
        raise Conflict("A user with this email already exists.", error="email_taken") from exc
    return user, issued


def issue_api_key(session: Session, actor_id: str, user_id: str, name: str | None) -> IssuedKey:
    """:raises NotFound: no such user."""
    user = session.get(User, user_id)
    if user is None:
        raise NotFound("No such user.")
    issued = _issue_key(session, user, name)
    session.flush()
    audit.record(
        session,
        actor_id,
        "api_key.create",
        target_type="api_key",
        target=issued.api_key.id,
        details={"user_id": user.id},
    )
    session.commit()
    return issued


def revoke_api_key(runtime, session: Session, actor_id: str, key_id: str) -> ApiKey:
    """Revoke a key; revoking a revoked key is a no-op that returns it (idempotent DELETE).
    Every web process stops accepting it at once (``key_cache``).

    :raises NotFound: no such key.
    """
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound("No such API key.")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        audit.record(
            session,
            actor_id,
            "api_key.revoke",
            target_type="api_key",
            target=key.id,
            details={"user_id": key.user_id},
        )
        session.commit()
        key_cache.publish_revoked(runtime.redis, key.key_hash)
    return key


def authenticate(
    session: Session | Callable[[], Session], secret: str | None, *, cache: KeyCache | None = None
) -> Caller:
    """The caller owning an active key: from ``cache`` when it has the key, else from the
    database (one indexed lookup), remembered in ``cache``. ``session`` may be a function
    giving the session, called only when the cache does not answer (a request answered
    without the database then builds no session at all).

    :raises Unauthorized: missing, unknown or revoked key.
    """
    if not secret or not secret.startswith(KEY_PREFIX) or len(secret) > 200:
        raise Unauthorized()
    key_hash = hash_key(secret)
    if cache is not None and (caller := cache.lookup(key_hash)) is not None:
        return caller
    generation = cache.generation() if cache is not None else None
    if not isinstance(session, Session):
        session = session()
    row = session.execute(
        select(User.id, User.email, User.role, User.created_at, ApiKey.id)
        .join(ApiKey, ApiKey.user_id == User.id)
        .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    ).first()
    if row is None:
        raise Unauthorized()
    caller = Caller(*row)
    if cache is not None:
        cache.store(key_hash, caller, generation)
    return caller


def list_users(session: Session) -> Listing:
    return Listing(session, select(User).order_by(User.created_at, User.id))


def list_keys(session: Session, user_id: str) -> list[ApiKey]:
    """:raises NotFound: no such user."""
    if session.get(User, user_id) is None:
        raise NotFound("No such user.")
    return list(session.scalars(select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.created_at)))
