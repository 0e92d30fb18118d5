"""Per-request access to the process runtime, the DB session and the caller."""

from __future__ import annotations

import logging

from flask import current_app, g, request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from shared.models import User
from shared.runtime import Runtime

log = logging.getLogger(__name__)


def runtime() -> Runtime:
    return current_app.extensions["tollgate"]


def db() -> Session:
    if "db_session" not in g:
        g.db_session = runtime().db.sessionmaker()
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


def current_user() -> User:
    return g.current_user


def idempotency_key() -> str | None:
    value = request.headers.get("Idempotency-Key")
    return value.strip() if value and value.strip() else None
