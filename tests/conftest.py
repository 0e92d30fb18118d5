"""Fixtures for fast tests on SQLite: ``settings``, ``app``, ``client``, ``db``, ``admin``, ``user``.

Integration fixtures (real Postgres, Redis and a Celery worker process) live in
``tests/integration/conftest.py``.
"""

from __future__ import annotations

import pytest

import shared.models  # noqa: F401 - registers tables
from shared.db import Base, Database
from shared.settings import Settings
from tests.factories import Actor, make_actor
from web.app import create_app


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'tollgate.sqlite'}",
        var_dir=tmp_path,
        turn_wait_seconds=0.0,
    )


@pytest.fixture
def app(settings):
    app = create_app(settings)
    runtime = app.extensions["tollgate"]
    Base.metadata.create_all(runtime.db.engine)
    yield app
    runtime.close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def db(app):
    """A session for the test itself. Deferred BEGIN: its reads must not hold SQLite's
    write lock against the requests the test makes."""
    database = Database(app.extensions["tollgate"].settings.database_url, sqlite_immediate=False)
    with database.session() as session:
        yield session
    database.dispose()


@pytest.fixture
def admin(db) -> Actor:
    return make_actor(db, "admin")


@pytest.fixture
def user(db) -> Actor:
    return make_actor(db, "user")
