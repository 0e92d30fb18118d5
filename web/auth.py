"""Who may call what, decided in one place for both the code and the OpenAPI spec.

- ``/api/v1/health*`` and the spec/docs are public (readiness tells an admin key
  more: :func:`admin_caller`);
- ``/api/v1/admin/*`` needs an admin key (403 for a user key);
- everything else under ``/api/v1`` needs any valid key.
"""

from __future__ import annotations

import logging

from apispec import BasePlugin
from flask import g, request
from sqlalchemy.exc import SQLAlchemyError

from shared.errors import Forbidden, NotFound, ServiceUnavailable, Unauthorized
from shared.services import auth as auth_service
from web.context import db, runtime

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
PUBLIC_PREFIXES = (f"{API_PREFIX}/health", f"{API_PREFIX}/openapi.json", "/api/docs", "/metrics")
ADMIN_PREFIX = f"{API_PREFIX}/admin"


def required_role(path: str) -> str | None:
    """``None`` for public paths, else ``"user"`` or ``"admin"``."""
    if not path.startswith(API_PREFIX) or path.startswith(PUBLIC_PREFIXES):
        return None
    if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
        return "admin"
    return "user"


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def authenticate_request() -> None:
    """``before_request`` hook. Unrouted URLs fall through to a plain 404."""
    if request.url_rule is None:
        return
    if any("\x00" in str(value) for value in (request.view_args or {}).values()):
        # No id holds a NUL; refusing it here keeps it away from the database.
        raise NotFound()
    role = required_role(request.url_rule.rule)
    if role is None:
        return
    user = auth_service.authenticate(db, bearer_token(), cache=runtime().key_cache)
    if role == "admin" and not user.is_admin:
        raise Forbidden()
    g.current_user = user


def admin_caller(*, required: bool = False) -> bool:
    """On a public endpoint: did the caller send a valid admin key?

    Not required: a missing, unknown, revoked or non-admin key, or one that cannot be
    checked (the database is down or not migrated: readiness must still answer), is
    simply "no" — the caller is answered as anyone would be. Required: 401 without a
    valid key, 403 for a non-admin key, 503 when the key cannot be checked.

    :raises Unauthorized: (required only)
    :raises Forbidden: (required only)
    :raises ServiceUnavailable: (required only)
    """
    token = bearer_token()
    if token is None:
        if required:
            raise Unauthorized()
        return False
    session = db()
    try:
        is_admin = auth_service.authenticate(session, token).is_admin
    except Unauthorized:
        if required:
            raise
        return False
    except SQLAlchemyError as exc:
        log.warning("could not check an API key on a public endpoint: %s", exc)
        if required:
            raise ServiceUnavailable("The API key could not be checked; try again shortly.") from exc
        return False
    finally:
        # End the read now: readiness opens connections of its own, and on SQLite this
        # session's BEGIN IMMEDIATE would lock them out until the request ends.
        session.rollback()
    if required and not is_admin:
        raise Forbidden()
    return is_admin


class AuthDocPlugin(BasePlugin):
    """Documents the bearer scheme and the 401/403 answers on every protected operation."""

    def operation_helper(self, path=None, operations=None, **kwargs):
        role = required_role(path or "")
        if role is None or not operations:
            return
        for operation in operations.values():
            operation.setdefault("security", [{"bearerAuth": []}])
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", {"$ref": "#/components/responses/Unauthorized"})
            if role == "admin":
                responses.setdefault("403", {"$ref": "#/components/responses/Forbidden"})
