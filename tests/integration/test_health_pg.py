"""Readiness against real Postgres, Redis and the broker — and what it says when one is missing."""

import psycopg

from shared.settings import Settings
from web.app import create_app


def test_ready_when_database_redis_and_broker_answer(pg_client):
    response = pg_client.get("/api/v1/health/ready")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["down"] == []
    assert body["checks"]["migrations"]["database_revision"] == body["checks"]["migrations"]["code_head"]
    assert body["checks"]["broker"]["transport"] == "redis"
    assert body["version"]


def test_ready_can_round_trip_a_ping_through_a_live_worker(pg_client, live_worker):
    response = pg_client.get("/api/v1/health/ready?worker=true")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["checks"]["worker"] == {"ok": True}


def test_not_ready_names_redis_and_broker_when_redis_is_down(pg_settings):
    dead = "redis://127.0.0.1:1/0"
    app = create_app(pg_settings.replace(redis_url=dead, celery_broker_url=dead, celery_result_backend=dead))
    response = app.test_client().get("/api/v1/health/ready")
    assert response.status_code == 503
    body = response.get_json()
    assert body["error"] == "not_ready"
    assert set(body["down"]) == {"redis", "broker"}
    assert body["checks"]["database"]["ok"] is True
    app.extensions["tollgate"].close()


def test_not_ready_when_the_database_is_unreachable(pg_settings):
    app = create_app(pg_settings.replace(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none"))
    response = app.test_client().get("/api/v1/health/ready")
    assert response.status_code == 503
    assert {"database", "migrations"} <= set(response.get_json()["down"])
    # Liveness makes no dependency calls.
    assert app.test_client().get("/api/v1/health").status_code == 200


def test_not_ready_when_the_database_lags_the_code_migrations(new_pg_database, pg_settings):
    url = new_pg_database()  # never migrated: a deploy whose release step did not run
    app = create_app(pg_settings.replace(database_url=url))
    response = app.test_client().get("/api/v1/health/ready")
    assert response.status_code == 503
    migrations = response.get_json()["checks"]["migrations"]
    assert migrations["ok"] is False and migrations["database_revision"] is None
    assert migrations["code_head"]
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('19990101_0001')")
    again = app.test_client().get("/api/v1/health/ready").get_json()
    assert again["checks"]["migrations"]["database_revision"] == "19990101_0001"
    assert "migrations" in again["down"]
    app.extensions["tollgate"].close()


def test_embedded_settings_do_not_need_redis(tmp_path):
    settings = Settings.from_env({"TOLLGATE_VAR_DIR": str(tmp_path)})
    from shared.cli import migrate

    migrate(settings)
    app = create_app(settings)
    response = app.test_client().get("/api/v1/health/ready")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["checks"]["broker"]["transport"] == "filesystem"
