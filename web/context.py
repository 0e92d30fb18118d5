"""Per-request access to the process runtime, the DB session and the caller."""

from __future__ import annotations

import logging

from flask import current_app, g, request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from shared.errors import InvalidInput
from shared.runtime import Runtime
from shared.services.auth import Caller

log = logging.getLogger(__name__)


def runtime() -> Runtime:
    return current_app.extensions["tollgate"]


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def db(*, transaction: bool = False) -> Session:
    """The request's session. A safe-method request reads without a transaction
    (``Database.read_sessionmaker``): no BEGIN/ROLLBACK round trips around its reads,
    unless it asks for one (``transaction``: e.g. a server-side cursor needs it)."""
    reads_only = request.method in SAFE_METHODS and not transaction
    if "db_session" in g and g.db_session_reads_only and not reads_only:
        close_db()  # its reads are done; nothing to keep
    if "db_session" not in g:
        database = runtime().db
        g.db_session = (database.read_sessionmaker if reads_only else database.sessionmaker)()
        g.db_session_reads_only = reads_only
    return g.db_session


def close_db(_exc: BaseException | None = None) -> None:
    session = g.pop("db_session", None)
    if session is not None:
        try:
            session.close()
        except DBAPIError as exc:
            # The connection died after the response was built (e.g. killed by Postgres):
            # SQLAlchemy has discarded it; raising here would turn that response into a 500.
            log.warning("database session could not be closed cleanly: %s", exc)


def current_user() -> Caller:
    return g.current_user


def current_api_key_id() -> str | None:
    """The id of the API key the request authenticated with."""
    user = g.get("current_user")
    return user.key_id if user is not None else None


def idempotency_key() -> str | None:
    """The ``Idempotency-Key`` header, stripped; ``None`` when absent or blank.

    :raises InvalidInput: ``invalid_idempotency_key`` for control characters (a NUL
        cannot be stored in Postgres text; it would surface as a 500). The services
        check the length, which differs by use.
    """
    value = request.headers.get("Idempotency-Key")
    if not value or not value.strip():
        return None
    value = value.strip()
    if not value.isprintable():
        raise InvalidInput("Idempotency-Key must be printable characters.", error="invalid_idempotency_key")
    return value
