"""Alembic environment: the URL is DATABASE_URL (never the pooled one, design §1).

Tests and the CLI may hand a URL in through ``config.attributes["url"]``.
"""

from __future__ import annotations

import logging
from logging.config import fileConfig

from alembic import context
from sqlalchemy import event

import shared.models  # noqa: F401 - registers every table on Base.metadata
from shared.db import Base, make_engine
from shared.settings import Settings, mask_url

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

log = logging.getLogger("alembic.env")
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url")
    if url:
        return url
    return Settings.from_env().database_url


# Postgres-only indexes created by hand in migrations, not declared on the models.
UNMODELLED_INDEXES = {"ix_uploaded_files_text_search", "ix_turns_text_search"}


def _include_object(obj, name, type_, reflected, compare_to) -> bool:
    return not (type_ == "index" and reflected and name in UNMODELLED_INDEXES)


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_object=_include_object,
    )


def _foreign_keys_off(dbapi_connection, _record) -> None:
    dbapi_connection.execute("PRAGMA foreign_keys=OFF")


def _check_foreign_keys(connection) -> None:
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        raise RuntimeError(f"migration left rows pointing nowhere: {broken[:10]}")


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = _url()
    log.info("migrating %s (from DATABASE_URL)", mask_url(url))
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds a SQLite table (create, copy, drop, rename), and with
        # foreign keys on, dropping a table that other rows point at fails. SQLite
        # ignores the pragma inside a transaction, so it is set as each connection
        # opens; the whole database is checked before the migration commits.
        event.listen(engine, "connect", _foreign_keys_off)
    with engine.connect() as conn:
        _configure(conn)
        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                _check_foreign_keys(conn)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
