import logging
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import CheckConstraint, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from shared.db import ID_LENGTH, Base, Database, Money
from shared.models import (
    DeliveryStatus,
    FileStatus,
    HoldStatus,
    LedgerKind,
    LimitSubject,
    Role,
    SpendPeriod,
    ToolCallStatus,
    TurnKind,
    TurnStatus,
    User,
    Wallet,
    WebhookEventType,
)
from shared.settings import Settings


def test_every_id_column_has_one_width():
    id_columns = [
        (table.name, column.name)
        for table in Base.metadata.tables.values()
        for column in table.columns
        if column.name == "id" or column.name.endswith("_id") or column.name in {"initiated_by", "created_by"}
    ]
    assert id_columns
    widths = {(t, c): Base.metadata.tables[t].columns[c].type.length for t, c in id_columns}
    assert set(widths.values()) == {ID_LENGTH}, widths


MONEY_COLUMN_NAMES = {
    "balance",
    "held",
    "amount",
    "held_delta",
    "balance_after",
    "cost",
    "spend_amount",
    "limit_reserve",
}

# Every column holding a state, a kind or a role, and the names its values come from.
STATE_COLUMNS = [
    ("users", "role", Role),
    ("turns", "status", TurnStatus),
    ("turns", "kind", TurnKind),
    ("tool_call_events", "status", ToolCallStatus),
    ("uploaded_files", "status", FileStatus),
    ("holds", "status", HoldStatus),
    ("ledger_entries", "kind", LedgerKind),
    ("limits", "subject_type", LimitSubject),
    ("limits", "spend_period", SpendPeriod),
    ("webhook_events", "type", WebhookEventType),
    ("webhook_deliveries", "status", DeliveryStatus),
]


@pytest.fixture
def sqlite_db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'x.sqlite'}")
    Base.metadata.create_all(database.engine)
    yield database
    database.dispose()


def test_money_columns_are_numeric_20_6_on_postgres_and_integer_micro_units_on_sqlite():
    money = [
        column
        for table in Base.metadata.tables.values()
        for column in table.columns
        if column.name in MONEY_COLUMN_NAMES or column.name.endswith("_per_1k")
    ]
    assert len(money) == 14
    assert all(isinstance(column.type, Money) for column in money)
    assert {column.type.compile(dialect=postgresql.dialect()) for column in money} == {"NUMERIC(20, 6)"}
    assert {column.type.compile(dialect=sqlite.dialect()) for column in money} == {"BIGINT"}


def test_twelve_digit_amounts_stay_exact_on_sqlite_in_rows_sums_and_arithmetic(sqlite_db):
    amount = Decimal("123456789012.345678")
    with sqlite_db.session() as session:
        for number in range(2):
            user = User(email=f"u{number}@b.co")
            session.add(user)
            session.flush()
            session.add(Wallet(user_id=user.id, balance=amount, held=Decimal("0.000001")))
        session.commit()
        assert session.scalars(select(Wallet.balance)).all() == [amount, amount]
        assert session.scalar(select(func.sum(Wallet.balance))) == amount * 2
        assert session.scalar(select(func.coalesce(func.sum(Wallet.held), 0))) == Decimal("0.000002")
        assert session.scalar(select(func.min(Wallet.balance - Wallet.held))) == Decimal(
            "123456789012.345677"
        )
        assert session.scalar(select(func.max(Wallet.balance * 3))) == Decimal("370370367037.037034")
        assert (
            session.scalar(select(func.count()).where(Wallet.balance > Decimal("123456789012.345677"))) == 2
        )
        stored = session.execute(text("SELECT balance, typeof(balance) FROM wallets")).first()
    assert tuple(stored) == (123456789012345678, "integer")


def test_amounts_round_half_up_to_six_places_and_floats_are_refused():
    money = Money()
    dialect = sqlite.dialect()
    assert money.process_bind_param(Decimal("0.0000005"), dialect) == 1
    assert money.process_bind_param(Decimal("-0.0000005"), dialect) == -1
    assert money.process_bind_param(Decimal("-2.5"), postgresql.dialect()) == Decimal("-2.500000")
    assert money.process_result_value(-2500000, dialect) == Decimal("-2.500000")
    with pytest.raises(TypeError, match="float"):
        money.process_bind_param(2.5, dialect)


def test_every_state_column_is_held_by_a_check_built_from_its_enum():
    checks = {
        constraint.name: constraint
        for table in Base.metadata.tables.values()
        for constraint in table.constraints
        if isinstance(constraint, CheckConstraint)
    }
    assert set(checks) == {f"ck_{table}_{column}" for table, column, _ in STATE_COLUMNS}
    for table, column, names in STATE_COLUMNS:
        sql = str(checks[f"ck_{table}_{column}"].sqltext)
        assert sql.startswith(f"{column} IN (")
        assert set(re.findall(r"'([^']*)'", sql)) == {member.value for member in names}


def test_create_all_installs_the_checks_and_the_ledger_triggers_on_sqlite(sqlite_db):
    with sqlite_db.session() as session:
        session.add(User(email="a@b.co", role="owner"))
        with pytest.raises(IntegrityError, match="ck_users_role"):
            session.commit()
    with sqlite_db.engine.begin() as conn:
        triggers = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger' ORDER BY name"))
        assert triggers.scalars().all() == ["ledger_entries_no_delete", "ledger_entries_no_update"]


def test_datetimes_come_back_as_utc_aware_on_sqlite(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'x.sqlite'}")
    Base.metadata.create_all(database.engine)
    ist = timezone(timedelta(hours=5, minutes=30))
    with database.session() as session:
        session.add(User(email="a@b.co", role="user", created_at=datetime(2026, 1, 1, 5, 30, tzinfo=ist)))
        session.commit()
    with database.session() as session:
        user = session.scalar(select(User))
    assert user.created_at == datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
    assert user.created_at.tzinfo is not None


def test_naive_datetimes_are_refused(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'x.sqlite'}")
    Base.metadata.create_all(database.engine)
    with database.session() as session, pytest.raises(Exception, match="naive"):
        session.add(User(email="a@b.co", role="user", created_at=datetime(2026, 1, 1)))
        session.commit()


def test_the_chosen_url_is_logged_with_the_password_masked(caplog):
    settings = Settings(
        database_url="postgresql+psycopg://u:direct-secret@db/app",
        database_pool_url="postgresql+psycopg://u:pool-secret@bouncer/app",
    )
    with caplog.at_level(logging.INFO, logger="shared.db"):
        database = Database.from_settings(settings, role="web")
    assert "bouncer" in database.url
    assert "from DATABASE_POOL_URL" in caplog.text
    assert "pool-secret" not in caplog.text and "***" in caplog.text


def test_a_pooled_url_disables_server_side_prepared_statements():
    pooled = Database("postgresql+psycopg://u@bouncer/app", pooled=True)
    direct = Database("postgresql+psycopg://u@db/app")
    assert pooled.engine.dialect.create_connect_args(pooled.engine.url)  # builds without connecting
    assert pooled.engine.pool._creator  # noqa: SLF001 - sanity: engine built lazily
    from shared.db import _engine_kwargs

    assert _engine_kwargs(pooled.url, True, 10, 10)["connect_args"] == {"prepare_threshold": None}
    assert "connect_args" not in _engine_kwargs(direct.url, False, 10, 10)


def test_the_connection_pool_is_bounded_by_settings():
    settings = Settings(
        database_url="postgresql+psycopg://u@db/app", database_pool_size=7, database_max_overflow=3
    )
    pool = Database.from_settings(settings, role="test").engine.pool
    assert (pool.size(), pool._max_overflow) == (7, 3)  # noqa: SLF001


def test_the_checkout_check_finds_a_closed_connection_under_gevent_without_its_cooperative_poll():
    # A process of its own: patching this one would change every later test.
    script = """
from gevent import monkey
monkey.patch_all()
import select, socket
from sqlalchemy.exc import DisconnectionError
from shared.db import _drop_dead_connection, _unpatched_poll

assert select.poll is not monkey.get_original("select", "poll")  # patched
assert _unpatched_poll() is monkey.get_original("select", "poll")

class Connection:  # what the check reads of a psycopg connection
    closed = False
    def __init__(self, sock):
        self.sock = sock
    def fileno(self):
        return self.sock.fileno()

ours, server = socket.socketpair()
_drop_dead_connection(Connection(ours), None, None)  # idle and open: kept
server.close()
try:
    _drop_dead_connection(Connection(ours), None, None)
except DisconnectionError:
    print("dropped")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "dropped", result.stderr
