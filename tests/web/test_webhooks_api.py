"""Webhooks on SQLite (embedded mode): the admin API and the outbox rows written with
the change that caused them (delivery itself: tests/integration/test_webhooks_pg.py)."""

import pytest
from sqlalchemy import select

from shared.models import WebhookDelivery, WebhookEvent


@pytest.fixture
def settings(settings):
    return settings.replace(webhook_allow_private=True)


def register(client, admin, events):
    response = client.post(
        "/api/v1/admin/webhooks",
        json={"url": "http://127.0.0.1:9/hook", "events": events},
        headers=admin.headers,
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def money(client, admin, user, kind, amount):
    body = {"amount": amount, "reason": "test"}
    response = client.post(f"/api/v1/admin/users/{user.id}/{kind}", json=body, headers=admin.headers)
    assert response.status_code == 201, response.get_json()


def events(db):
    db.expire_all()
    found = db.scalars(select(WebhookEvent).order_by(WebhookEvent.created_at)).all()
    db.commit()
    return [(e.type, e.data["balance"]) for e in found]


def test_the_outbox_holds_one_event_per_crossing(client, admin, user, db):
    hook = register(client, admin, ["wallet.low_balance", "wallet.depleted"])
    assert set(hook) == {"id", "url", "events", "description", "created_at", "deleted_at", "secret"}
    money(client, admin, user, "grants", "5")  # 0 -> 5: upwards, no event
    money(client, admin, user, "adjustments", "-4.5")  # 5 -> 0.5: a crossing
    money(client, admin, user, "adjustments", "-0.1")  # stays below: nothing
    money(client, admin, user, "grants", "0.6")  # 0.4 -> 1.0: back at the threshold, re-armed
    money(client, admin, user, "adjustments", "-1")  # 1.0 -> 0: a crossing, and depleted
    assert events(db) == [
        ("wallet.low_balance", "0.500000"),
        ("wallet.low_balance", "0.000000"),
        ("wallet.depleted", "0.000000"),
    ]
    assert db.scalar(select(WebhookDelivery.status).limit(1)) == "pending"
    listed = client.get(f"/api/v1/admin/webhooks/{hook['id']}/deliveries", headers=admin.headers)
    assert [d["event_type"] for d in listed.get_json()] and listed.get_json()[0]["status"] == "pending"


def test_no_subscriber_no_rows_and_a_deleted_webhook_gets_nothing(client, admin, user, db):
    hook = register(client, admin, ["enforcement.changed"])
    money(client, admin, user, "grants", "5")
    money(client, admin, user, "adjustments", "-4.5")
    assert events(db) == []
    assert client.delete(f"/api/v1/admin/webhooks/{hook['id']}", headers=admin.headers).status_code == 200
    assert client.get("/api/v1/admin/webhooks", headers=admin.headers).get_json() == []
    assert client.delete(f"/api/v1/admin/webhooks/{hook['id']}", headers=admin.headers).status_code == 404
    client.patch("/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=admin.headers)
    assert events(db) == []


@pytest.mark.parametrize(
    "body",
    [
        {"url": "http://example.com/h", "events": []},
        {"url": "http://example.com/h", "events": ["wallet.exploded"]},
        {"url": "http://example.com/h"},
        {"url": 5, "events": ["wallet.depleted"]},
        {"url": "http://example.com/h", "events": ["wallet.depleted"], "description": "x" * 501},
    ],
)
def test_bad_webhook_bodies_are_422(client, admin, body):
    assert client.post("/api/v1/admin/webhooks", json=body, headers=admin.headers).status_code == 422


def test_users_cannot_manage_webhooks(client, user):
    assert client.get("/api/v1/admin/webhooks", headers=user.headers).status_code == 403
