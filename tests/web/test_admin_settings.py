"""Admin settings and the enforcement override over HTTP, in embedded mode (SQLite, no Redis)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from shared.models import AdminAuditEvent
from shared.settings import Settings
from web.app import create_app

ENFORCEMENT_FIELDS = {"enabled", "source", "default_enabled", "override", "updated_by", "updated_at"}


def test_settings_show_the_default_enforcement_and_billing_settings(client, admin):
    response = client.get("/api/v1/admin/settings", headers=admin.headers)
    assert response.status_code == 200
    assert response.get_json() == {
        "enforcement": {
            "enabled": False,
            "source": "default",
            "default_enabled": False,
            "override": None,
            "updated_by": None,
            "updated_at": None,
        },
        "low_balance_threshold": "1.000000",
        "default_model": "offline-small",
        "model_provider": "offline",
    }
    assert "X-Enforcement-Stale" not in response.headers


def test_patch_overrides_enforcement_and_delete_returns_to_the_default(client, admin, db):
    response = client.patch(
        "/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=admin.headers
    )
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == ENFORCEMENT_FIELDS
    assert (body["enabled"], body["source"], body["override"]) == (True, "override", True)
    assert body["default_enabled"] is False
    assert body["updated_by"] == admin.id and body["updated_at"].endswith("+00:00")
    shown = client.get("/api/v1/admin/settings", headers=admin.headers).get_json()["enforcement"]
    assert shown == body

    response = client.delete("/api/v1/admin/settings/enforcement", headers=admin.headers)
    assert response.status_code == 200
    body = response.get_json()
    assert (body["enabled"], body["source"], body["override"]) == (False, "default", None)
    # DELETE is idempotent.
    assert client.delete("/api/v1/admin/settings/enforcement", headers=admin.headers).status_code == 200
    actions = db.scalars(select(AdminAuditEvent.action).order_by(AdminAuditEvent.created_at)).all()
    assert actions == ["enforcement.override.set", "enforcement.override.clear", "enforcement.override.clear"]


def test_an_override_can_switch_enforcement_off_against_a_default_of_on(settings, admin_factory):
    app, admin = admin_factory(settings.replace(billing_enforcement_enabled=True))
    client = app.test_client()
    assert client.get("/api/v1/admin/settings", headers=admin.headers).get_json()["enforcement"]["enabled"]
    body = client.patch(
        "/api/v1/admin/settings/enforcement", json={"enabled": False}, headers=admin.headers
    ).get_json()
    assert (body["enabled"], body["source"], body["default_enabled"]) == (False, "override", True)


@pytest.mark.parametrize(
    "body", [{"enabled": "yes"}, {"enabled": 1}, {"enabled": "true"}, {"enabled": None}, {}]
)
def test_enabled_must_be_a_json_boolean(client, admin, body):
    response = client.patch("/api/v1/admin/settings/enforcement", json=body, headers=admin.headers)
    assert response.status_code == 422
    payload = response.get_json()
    assert payload["error"] == "validation_error"
    assert "enabled" in payload["errors"]["json"]


def test_unknown_fields_and_non_json_bodies_are_refused(client, admin):
    response = client.patch(
        "/api/v1/admin/settings/enforcement", json={"enabled": True, "force": True}, headers=admin.headers
    )
    assert response.status_code == 422
    response = client.patch(
        "/api/v1/admin/settings/enforcement",
        data="{not json",
        headers={**admin.headers, "Content-Type": "application/json"},
    )
    assert response.status_code in (400, 422)
    assert response.get_json()["error"]


def test_a_change_through_one_app_is_seen_by_another_app_on_the_same_database(client, admin, settings):
    other = create_app(settings)
    try:
        other_client = other.test_client()
        client.patch("/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=admin.headers)
        seen = other_client.get("/api/v1/admin/settings", headers=admin.headers).get_json()["enforcement"]
        assert (seen["enabled"], seen["source"]) == (True, "override")
        other_client.delete("/api/v1/admin/settings/enforcement", headers=admin.headers)
        back = client.get("/api/v1/admin/settings", headers=admin.headers).get_json()["enforcement"]
        assert (back["enabled"], back["source"]) == (False, "default")
    finally:
        other.extensions["tollgate"].close()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/v1/admin/settings"),
        ("patch", "/api/v1/admin/settings/enforcement"),
        ("delete", "/api/v1/admin/settings/enforcement"),
    ],
)
def test_settings_need_an_admin_key(client, user, method, path):
    assert getattr(client, method)(path, json={"enabled": True}).status_code == 401
    response = getattr(client, method)(path, json={"enabled": True}, headers=user.headers)
    assert response.status_code == 403
    assert response.get_json()["error"] == "forbidden"


@pytest.fixture
def admin_factory():
    """An app built from given settings (its own SQLite file) and an admin on it."""
    from shared.db import Base
    from tests.factories import make_actor

    apps = []

    def make(settings: Settings):
        app = create_app(settings)
        runtime = app.extensions["tollgate"]
        Base.metadata.create_all(runtime.db.engine)
        apps.append(app)
        with runtime.db.session() as session:
            return app, make_actor(session, "admin")

    yield make
    for app in apps:
        app.extensions["tollgate"].close()
