"""Readiness on SQLite (embedded mode): anyone learns the status, an admin key the details."""

import time

import pytest

from shared.migrations import migrate
from tests.web.test_files import queued_tasks
from web.app import create_app


@pytest.fixture
def migrated_app(settings):
    migrate(settings)
    app = create_app(settings)
    yield app
    app.extensions["tollgate"].close()


@pytest.fixture
def ready_client(migrated_app):
    return migrated_app.test_client()


@pytest.fixture
def ready_admin(migrated_app, ready_client):
    from shared.db import Database
    from tests.factories import make_actor

    database = Database(migrated_app.extensions["tollgate"].settings.database_url, sqlite_immediate=False)
    with database.session() as session:
        actors = make_actor(session, "admin"), make_actor(session, "user")
    database.dispose()
    return actors


def test_anyone_gets_the_status_alone(ready_client, ready_admin):
    _, user = ready_admin
    for headers in ({}, user.headers, {"Authorization": "Bearer tg_not_a_key"}):
        response = ready_client.get("/api/v1/health/ready", headers=headers)
        assert response.status_code == 200, response.get_json()
        assert response.get_json() == {"status": "ok"}, headers


def test_an_admin_key_gets_the_checks(ready_client, ready_admin):
    admin, _ = ready_admin
    body = ready_client.get("/api/v1/health/ready", headers=admin.headers).get_json()
    assert body["status"] == "ok" and body["down"] == [] and body["version"]
    assert body["checks"]["broker"]["transport"] == "filesystem"
    assert body["checks"]["migrations"]["database_revision"] == body["checks"]["migrations"]["code_head"]


def test_the_worker_ping_needs_an_admin_key_and_is_never_sent_otherwise(ready_client, ready_admin, settings):
    _, user = ready_admin
    started = time.monotonic()
    anonymous = ready_client.get("/api/v1/health/ready?worker=true")
    wrong_key = ready_client.get(
        "/api/v1/health/ready?worker=true", headers={"Authorization": "Bearer tg_not_a_key"}
    )
    as_user = ready_client.get("/api/v1/health/ready?worker=true", headers=user.headers)
    assert (anonymous.status_code, anonymous.get_json()["error"]) == (401, "unauthorized")
    assert (wrong_key.status_code, wrong_key.get_json()["error"]) == (401, "unauthorized")
    assert (as_user.status_code, as_user.get_json()["error"]) == (403, "forbidden")
    # Nothing waited on a worker, and no ping task was queued.
    assert time.monotonic() - started < 2.0
    assert not [task for task in queued_tasks(settings) if task["task"] == "tollgate.ping"]


def test_not_ready_says_only_not_ready_unless_the_caller_is_an_admin(settings, ready_admin, migrated_app):
    admin, user = ready_admin
    # Nothing listens on port 1: the broker check fails.
    broken = settings.replace(celery_broker_url="redis://127.0.0.1:1/0")
    app = create_app(broken)
    client = app.test_client()
    try:
        for headers in ({}, user.headers):
            response = client.get("/api/v1/health/ready", headers=headers)
            assert response.status_code == 503
            assert response.get_json() == {
                "code": 503,
                "status": "Service Unavailable",
                "message": "Not ready.",
                "error": "not_ready",
            }
        detailed = client.get("/api/v1/health/ready", headers=admin.headers)
        assert detailed.status_code == 503
        body = detailed.get_json()
        assert body["error"] == "not_ready" and body["down"] == ["broker"]
        assert body["checks"]["database"]["ok"] is True
    finally:
        app.extensions["tollgate"].close()


def test_a_database_that_was_never_migrated_is_not_ready_for_anyone(client, admin):
    # The conftest's app creates tables without Alembic: no revision, so migrations are "down".
    for headers in ({}, admin.headers):
        response = client.get("/api/v1/health/ready", headers=headers)
        assert response.status_code == 503 and response.get_json()["error"] == "not_ready"
    assert "migrations" in client.get("/api/v1/health/ready", headers=admin.headers).get_json()["down"]


def test_the_spec_documents_the_optional_key_and_the_answers(client):
    ready = client.get("/api/v1/openapi.json").get_json()["paths"]["/api/v1/health/ready"]["get"]
    assert ready["security"] == [{}, {"bearerAuth": []}]
    assert {"200", "401", "403", "503"} <= set(ready["responses"])
    worker = next(p for p in ready["parameters"] if p["name"] == "worker")
    assert "Admin key only" in worker["description"]
