import logging
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from shared.db import ID_LENGTH, Base, Database
from shared.models import User
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


def test_money_columns_are_numeric_20_6():
    money = [
        column
        for table in Base.metadata.tables.values()
        for column in table.columns
        if column.name in {"balance", "held", "amount", "held_delta", "balance_after", "cost"}
        or column.name.endswith("_per_1k")
    ]
    assert money
    assert {(c.type.precision, c.type.scale) for c in money} == {(20, 6)}


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

    assert _engine_kwargs(pooled.url, True)["connect_args"] == {"prepare_threshold": None}
    assert "connect_args" not in _engine_kwargs(direct.url, False)
