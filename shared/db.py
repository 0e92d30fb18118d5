"""Engine/session factory and the declarative base.

``Database`` is built by each process (web app factory, Celery app setup, CLI)
from its ``Settings``; nothing connects at import time.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import DateTime, MetaData, Numeric, String, TypeDecorator, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from shared.settings import Settings, mask_url

log = logging.getLogger(__name__)

ID_LENGTH = 36  # one width for every id column: a UUID string
MONEY = Numeric(20, 6)
MONEY_QUANT = Decimal("0.000001")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


def IdColumn() -> String:  # noqa: N802 - reads like a type in model declarations
    return String(ID_LENGTH)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every dialect.

    Postgres stores ``timestamptz``; SQLite has no zone, so values are stored
    as naive UTC and given ``UTC`` back on load.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def is_database_unavailable(exc: BaseException) -> bool:
    """The database could not serve this unit of work: a connection killed or dropped
    (failover, restart, ``pg_terminate_backend``), refused, a pool with no free
    connection, or a transaction the server aborted (deadlock, lock timeout). Retrying
    later is the answer; none of these means the work itself was wrong."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _engine_kwargs(url: str, pooled: bool) -> dict:
    if url.startswith("sqlite"):
        # Web threads and the worker share the file; wait on locks instead of failing.
        return {"connect_args": {"timeout": 30, "check_same_thread": False}}
    kwargs: dict = {"pool_pre_ping": True, "pool_size": 10, "max_overflow": 20}
    if pooled:
        # PgBouncer in transaction mode hands each transaction a different server
        # connection, so server-side prepared statements would dangle.
        kwargs["connect_args"] = {"prepare_threshold": None}
    return kwargs


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin_immediate(conn) -> None:
    # SQLite has no row locks; BEGIN IMMEDIATE takes the write lock up front so
    # two writers serialise instead of failing on lock upgrade.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, *, pooled: bool = False, sqlite_immediate: bool = True) -> Engine:
    """``sqlite_immediate=False`` is for read-mostly observers (tests) that must not
    take SQLite's write lock with every transaction."""
    engine = create_engine(url, **_engine_kwargs(url, pooled))
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        # Let us issue BEGIN ourselves (pysqlite's implicit BEGIN is deferred).
        event.listen(engine, "connect", lambda dbapi_conn, _rec: setattr(dbapi_conn, "isolation_level", None))
        if sqlite_immediate:
            event.listen(engine, "begin", _sqlite_begin_immediate)
    return engine


class Database:
    """The engine and session factory of one process."""

    def __init__(self, url: str, *, pooled: bool = False, sqlite_immediate: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url, pooled=pooled, sqlite_immediate=sqlite_immediate)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings, *, role: str) -> Database:
        """Apply the URL precedence policy: pooled URL first, then the direct one."""
        url = settings.runtime_database_url
        source = "DATABASE_POOL_URL" if settings.runtime_url_is_pooled else "DATABASE_URL"
        log.info("%s database: %s (from %s)", role, mask_url(url), source)
        return cls(url, pooled=settings.runtime_url_is_pooled)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        session = self.sessionmaker()
        try:
            yield session
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()
