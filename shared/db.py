"""Engine/session factory and the declarative base.

``Database`` is built by each process (web app factory, Celery app setup, CLI)
from its ``Settings``; nothing connects at import time.
"""

from __future__ import annotations

import logging
import select
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from functools import cache

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    MetaData,
    Numeric,
    String,
    TypeDecorator,
    create_engine,
    event,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    InvalidRequestError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.sql import operators

from shared.settings import Settings, mask_url

log = logging.getLogger(__name__)

ID_LENGTH = 36  # one width for every id column: a UUID string
MONEY_SCALE = 6
MONEY_QUANT = Decimal(1).scaleb(-MONEY_SCALE)  # 0.000001
_SCALAR_OPERATORS = {operators.mul, operators.truediv, operators.floordiv, operators.mod}

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id() -> str:
    return str(uuid.uuid4())


def is_uuid(value: str) -> bool:
    """True for an id as ``new_id`` writes it (canonical, case-insensitive); guards
    ``session.get`` so a malformed id from a URL is "not found", not a database error."""
    try:
        return str(uuid.UUID(value)) == value.lower()
    except (ValueError, AttributeError, TypeError):
        return False


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


class Money(TypeDecorator[Decimal]):
    """Credit amounts: ``NUMERIC(20,6)`` on Postgres, integer micro-units on SQLite.

    SQLite has no decimal type: a NUMERIC column keeps a fraction as a float, so
    ``123456789012.345678`` would read back as ``…345673``. There the column is a
    BIGINT of millionths (exact up to 9,223,372,036,854.775807), and sums, ``+``,
    ``-`` and comparisons in SQL stay exact integer arithmetic. Values always come
    back as ``Decimal`` with 6 places.
    """

    impl = Numeric(20, MONEY_SCALE)
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(20, MONEY_SCALE))

    def coerce_compared_value(self, op, value):
        # A factor or divisor is a plain number, not an amount: ``cost * 2`` must not
        # bind 2 as money (2,000,000 micro-units on SQLite).
        if op in _SCALAR_OPERATORS:
            return Numeric().coerce_compared_value(op, value)
        return self

    def process_bind_param(self, value, dialect) -> Decimal | int | None:
        if value is None:
            return None
        if isinstance(value, float):
            raise TypeError("money must be a Decimal or an int, not a float")
        amount = Decimal(value).quantize(MONEY_QUANT, rounding=ROUND_HALF_UP)
        if dialect.name == "sqlite":
            return int(amount.scaleb(MONEY_SCALE))
        return amount

    def process_result_value(self, value, dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            micro_units = Decimal(value if isinstance(value, int) else str(value))
            return micro_units.scaleb(-MONEY_SCALE).quantize(MONEY_QUANT)
        return Decimal(value).quantize(MONEY_QUANT)


MONEY = Money()


def check_in(column: str, allowed: type[StrEnum]) -> CheckConstraint:
    """``CHECK (column IN (...))`` over an enum's values, named ``ck_<table>_<column>``
    by the naming convention: the database refuses a state the code does not know."""
    values = ", ".join(f"'{member.value}'" for member in allowed)
    return CheckConstraint(f"{column} IN ({values})", name=column)


def dialect_insert(dialect: str, table):
    """``INSERT`` for ``table`` in ``dialect``'s own flavour, which has ``ON CONFLICT``."""
    if dialect == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def is_database_unavailable(exc: BaseException) -> bool:
    """The database could not serve this unit of work: a connection killed or dropped
    (failover, restart, ``pg_terminate_backend``), refused, a pool with no free
    connection, or a transaction the server aborted (deadlock, lock timeout). Retrying
    later is the answer; none of these means the work itself was wrong."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return (isinstance(exc, DBAPIError) and exc.connection_invalidated) or _checkout_exhausted(exc)


def _checkout_exhausted(exc: BaseException) -> bool:
    """The pool found its connection dead at checkout (``_drop_dead_connection``), and the
    fresh one it opened in its place too: SQLAlchemy then gives up with a bare
    ``InvalidRequestError("This connection is closed")`` raised by its checkout. A server
    killing every new connection is unavailable, not a bug of ours."""
    if type(exc) is not InvalidRequestError or exc.args != ("This connection is closed",):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_checkout"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _engine_kwargs(url: str, pooled: bool, pool_size: int, max_overflow: int) -> dict:
    if url.startswith("sqlite"):
        # Web threads and the worker share the file; wait on locks instead of failing.
        return {"connect_args": {"timeout": 30, "check_same_thread": False}}
    # Bounded: hundreds of turns in flight in one process share these connections, each
    # holding one only while it talks to the database (never across a model call).
    kwargs: dict = {
        # No SELECT 1 round trip per checkout: `_drop_dead_connection` checks the socket.
        "pool_pre_ping": False,
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": 30,
    }
    if pooled:
        # PgBouncer in transaction mode hands each transaction a different server
        # connection, so server-side prepared statements would dangle.
        kwargs["connect_args"] = {"prepare_threshold": None}
    return kwargs


def _drop_dead_connection(dbapi_connection, _record, _proxy) -> None:
    """Checkout check without a round trip (instead of ``pool_pre_ping``'s ``SELECT 1``).

    An idle connection between transactions has nothing to read: when its socket is
    readable, the server has closed it or sent its last words (``pg_terminate_backend``,
    a restart, a failover, PgBouncer closing it). The pool then discards it and checks out
    another (SQLAlchemy retries on ``DisconnectionError``). A connection cut off without
    the server's word (a partition) fails on first use instead: a 503 and a fresh pool.
    """
    if dbapi_connection.closed:
        raise DisconnectionError("connection closed")
    poller = _unpatched_poll()()
    poller.register(dbapi_connection.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    if poller.poll(0):
        raise DisconnectionError("the server closed the connection")


@cache
def _unpatched_poll():
    """``select.poll`` as the OS gives it, also in a gevent-patched process. A zero timeout
    never waits, so it cannot hold the worker up; gevent's cooperative poll would start and
    stop a watcher on the loop for the same answer, about 50 µs per checkout (issue 12).
    Unpatched, ``select.poll`` is the original already."""
    if "gevent.monkey" in sys.modules:
        from gevent.monkey import get_original

        return get_original("select", "poll")
    return select.poll


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


# psycopg remembers how it rewrote a statement's text (named placeholders to $n) only for
# texts up to 4 KB with up to 50 parameters; longer ones are parsed by a regex on every
# execution. A turn's settle is one such statement (the wallet move with its ledger, usage
# and hold riders: ~5 KB, ~60 parameters), which cost ~0.4 ms of the worker's CPU a turn.
# Our statements are a fixed set built once (docs/architecture.md), so the cache (an LRU)
# takes them all; summaries with literal windows are bounded by the LRU like any other.
PSYCOPG_CACHED_STATEMENT_LENGTH = 16_384
PSYCOPG_CACHED_STATEMENT_PARAMS = 256


def _cache_long_statements() -> None:
    """Raise psycopg's cache limits (private constants: a psycopg that renamed them loses only
    the speed-up, with a warning; test_hot_path_pg fails on it)."""
    from psycopg import _queries

    for name, least in (
        ("MAX_CACHED_STATEMENT_LENGTH", PSYCOPG_CACHED_STATEMENT_LENGTH),
        ("MAX_CACHED_STATEMENT_PARAMS", PSYCOPG_CACHED_STATEMENT_PARAMS),
    ):
        current = getattr(_queries, name, None)
        if isinstance(current, int):
            setattr(_queries, name, max(current, least))
        else:
            log.warning("psycopg has no %s: long statements are parsed on every execution", name)


def make_engine(
    url: str,
    *,
    pooled: bool = False,
    sqlite_immediate: bool = True,
    pool_size: int = 10,
    max_overflow: int = 10,
) -> Engine:
    """``sqlite_immediate=False`` is for read-mostly observers (tests) that must not
    take SQLite's write lock with every transaction."""
    engine = create_engine(url, **_engine_kwargs(url, pooled, pool_size, max_overflow))
    if engine.dialect.name == "postgresql":
        event.listen(engine, "checkout", _drop_dead_connection)
        _cache_long_statements()
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        # Let us issue BEGIN ourselves (pysqlite's implicit BEGIN is deferred).
        event.listen(engine, "connect", lambda dbapi_conn, _rec: setattr(dbapi_conn, "isolation_level", None))
        if sqlite_immediate:
            event.listen(engine, "begin", _sqlite_begin_immediate)
    return engine


class Database:
    """The engine and session factory of one process."""

    def __init__(
        self,
        url: str,
        *,
        pooled: bool = False,
        sqlite_immediate: bool = True,
        pool_size: int = 10,
        max_overflow: int = 10,
    ) -> None:
        self.url = url
        self.engine = make_engine(
            url,
            pooled=pooled,
            sqlite_immediate=sqlite_immediate,
            pool_size=pool_size,
            max_overflow=max_overflow,
        )
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        # Reads that need no transaction (a safe-method request: each statement sees what
        # was committed when it ran, as it would under READ COMMITTED anyway) skip the
        # BEGIN and ROLLBACK round trips on Postgres. SQLite keeps its transactions.
        self.read_sessionmaker = self.sessionmaker
        if self.engine.dialect.name == "postgresql":
            reads = self.engine.execution_options(isolation_level="AUTOCOMMIT")
            self.read_sessionmaker = sessionmaker(reads, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings, *, role: str) -> Database:
        """Apply the URL precedence policy: pooled URL first, then the direct one."""
        url = settings.runtime_database_url
        source = "DATABASE_POOL_URL" if settings.runtime_url_is_pooled else "DATABASE_URL"
        log.info("%s database: %s (from %s)", role, mask_url(url), source)
        return cls(
            url,
            pooled=settings.runtime_url_is_pooled,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
        )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self, *, reads_only: bool = False) -> Iterator[Session]:
        """``reads_only``: for reads alone (``read_sessionmaker``: no transaction on Postgres),
        or a write that is one statement: it commits as it runs (the turn's claim)."""
        session = (self.read_sessionmaker if reads_only else self.sessionmaker)()
        try:
            yield session
        finally:
            session.close()

    def reads_without_transaction(self, session: Session) -> None:
        """Run ``session``'s next statements, up to its commit, each in autocommit (Postgres):
        a block of reads (or a write that is one statement) then costs no BEGIN and no
        COMMIT round trip. Call it before the session's first statement of that block;
        SQLite keeps its transaction."""
        if self.engine.dialect.name == "postgresql":
            session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})

    def dispose(self) -> None:
        self.engine.dispose()
