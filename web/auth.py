"""Who may call what, decided in one place for both the code and the OpenAPI spec.

- ``/api/v1/health*`` and the spec/docs are public;
- ``/api/v1/admin/*`` needs an admin key (403 for a user key);
- everything else under ``/api/v1`` needs any valid key.
"""

from __future__ import annotations

from apispec import BasePlugin
from flask import g, request

from shared.errors import Forbidden, NotFound
from shared.services import auth as auth_service
from web.context import db

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
    user = auth_service.authenticate(db(), bearer_token())
    if role == "admin" and not user.is_admin:
        raise Forbidden()
    g.current_user = user


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
