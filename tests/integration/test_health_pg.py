"""Readiness against real Postgres, Redis and the broker — and what it says when one is missing.

Anyone gets the status alone; an admin key gets the checks and may ask for the worker ping.
"""

import time

import psycopg
import redis as redis_lib

from shared.db import Database
from shared.migrations import migrate
from shared.settings import Settings
from tests.factories import make_actor
from web.app import create_app

NOT_READY = {"code": 503, "status": "Service Unavailable", "message": "Not ready.", "error": "not_ready"}


def test_ready_when_database_redis_and_broker_answer(pg_client, pg_admin):
    response = pg_client.get("/api/v1/health/ready", headers=pg_admin.headers)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["down"] == []
    assert body["checks"]["migrations"]["database_revision"] == body["checks"]["migrations"]["code_head"]
    assert body["checks"]["broker"]["transport"] == "redis"
    assert body["version"]


def test_anyone_else_gets_the_status_alone(pg_client, pg_user):
    for headers in ({}, pg_user.headers, {"Authorization": "Bearer tg_unknown"}):
        response = pg_client.get("/api/v1/health/ready", headers=headers)
        assert response.status_code == 200
        assert response.get_json() == {"status": "ok"}


def test_ready_can_round_trip_a_ping_through_a_live_worker(pg_client, pg_admin, live_worker):
    response = pg_client.get("/api/v1/health/ready?worker=true", headers=pg_admin.headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["checks"]["worker"] == {"ok": True}


def test_without_an_admin_key_the_worker_ping_is_refused_and_never_sent(pg_client, pg_user, pg_settings):
    broker = redis_lib.Redis.from_url(pg_settings.celery_broker_url)
    queued_before = broker.llen("turns")
    started = time.monotonic()
    anonymous = pg_client.get("/api/v1/health/ready?worker=true")
    as_user = pg_client.get("/api/v1/health/ready?worker=true", headers=pg_user.headers)
    assert (anonymous.status_code, anonymous.get_json()["error"]) == (401, "unauthorized")
    assert (as_user.status_code, as_user.get_json()["error"]) == (403, "forbidden")
    assert time.monotonic() - started < 2.0  # no web thread waited on a worker
    assert broker.llen("turns") == queued_before
    broker.close()


def test_not_ready_names_redis_and_broker_when_redis_is_down_for_an_admin_only(pg_settings, pg_admin):
    dead = "redis://127.0.0.1:1/0"
    app = create_app(pg_settings.replace(redis_url=dead, celery_broker_url=dead, celery_result_backend=dead))
    client = app.test_client()
    anonymous = client.get("/api/v1/health/ready")
    assert anonymous.status_code == 503 and anonymous.get_json() == NOT_READY
    response = client.get("/api/v1/health/ready", headers=pg_admin.headers)
    assert response.status_code == 503
    body = response.get_json()
    assert body["error"] == "not_ready"
    assert set(body["down"]) == {"redis", "broker"}
    assert body["checks"]["database"]["ok"] is True
    app.extensions["tollgate"].close()


def test_not_ready_when_the_database_is_unreachable(pg_settings, pg_admin, caplog):
    app = create_app(pg_settings.replace(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none"))
    # The admin key cannot be checked without the database: everyone gets the status alone,
    # and the log says what is down.
    for headers in ({}, pg_admin.headers):
        response = app.test_client().get("/api/v1/health/ready", headers=headers)
        assert response.status_code == 503 and response.get_json() == NOT_READY
    assert "down: database, migrations" in caplog.text
    worker_ping = app.test_client().get("/api/v1/health/ready?worker=true", headers=pg_admin.headers)
    assert worker_ping.status_code == 503 and worker_ping.get_json()["error"] == "service_unavailable"
    # Liveness makes no dependency calls.
    assert app.test_client().get("/api/v1/health").status_code == 200
    app.extensions["tollgate"].close()


def test_not_ready_when_the_database_was_never_migrated(new_pg_database, pg_settings, pg_admin):
    url = new_pg_database()  # a deploy whose release step did not run
    app = create_app(pg_settings.replace(database_url=url))
    for headers in ({}, pg_admin.headers):  # no key can be checked in an empty database
        response = app.test_client().get("/api/v1/health/ready", headers=headers)
        assert response.status_code == 503 and response.get_json() == NOT_READY
    app.extensions["tollgate"].close()


def test_an_admin_sees_a_database_that_lags_the_code_migrations(new_pg_database, pg_settings):
    url = new_pg_database()
    migrate(pg_settings.replace(database_url=url))
    database = Database(url)
    with database.session() as session:
        admin = make_actor(session, "admin")
    database.dispose()
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '19990101_0001'")
    app = create_app(pg_settings.replace(database_url=url))
    response = app.test_client().get("/api/v1/health/ready", headers=admin.headers)
    assert response.status_code == 503
    body = response.get_json()
    assert body["down"] == ["migrations"]
    migrations = body["checks"]["migrations"]
    assert migrations["database_revision"] == "19990101_0001" and migrations["code_head"]
    assert app.test_client().get("/api/v1/health/ready").get_json() == NOT_READY
    app.extensions["tollgate"].close()


def test_embedded_settings_do_not_need_redis(tmp_path):
    settings = Settings.from_env({"TOLLGATE_VAR_DIR": str(tmp_path)})

    migrate(settings)
    app = create_app(settings)
    response = app.test_client().get("/api/v1/health/ready")
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"status": "ok"}
    app.extensions["tollgate"].close()
