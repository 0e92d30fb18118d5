"""Admin adjustments: signed corrections with a reason, through the one ledger writer."""

import pytest

from shared.models import AdminAuditEvent


def adjust(client, admin, user_id, body, key=None):
    headers = dict(admin.headers)
    if key:
        headers["Idempotency-Key"] = key
    return client.post(f"/api/v1/admin/users/{user_id}/adjustments", json=body, headers=headers)


def balance(client, actor):
    return client.get("/api/v1/wallet", headers=actor.headers).get_json()


def test_positive_and_negative_adjustments_move_the_balance_with_a_ledger_entry(client, admin, user, db):
    assert adjust(client, admin, user.id, {"amount": "5", "reason": "goodwill"}).status_code == 201
    response = adjust(client, admin, user.id, {"amount": "-1.250000", "reason": "double grant"})
    assert response.status_code == 201
    entry = response.get_json()
    assert entry["kind"] == "adjustment"
    assert entry["amount"] == "-1.250000"
    assert entry["balance_after"] == "3.750000"
    assert entry["initiated_by"] == admin.id
    assert entry["reason"] == "double grant"
    assert balance(client, user)["balance"] == "3.750000"
    ledger = client.get("/api/v1/wallet/ledger", headers=user.headers).get_json()
    assert [e["kind"] for e in ledger] == ["adjustment", "adjustment"]
    assert db.query(AdminAuditEvent).filter_by(action="wallet.adjustment").count() == 2


def test_a_negative_adjustment_cannot_overdraw_the_available_balance(client, admin, user):
    adjust(client, admin, user.id, {"amount": "2", "reason": "start"})
    response = adjust(client, admin, user.id, {"amount": "-2.000001", "reason": "too much"})
    assert response.status_code == 409
    body = response.get_json()
    assert body["error"] == "adjustment_exceeds_available"
    assert body["available"] == "2.000000"
    assert balance(client, user)["balance"] == "2.000000"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"amount": "0", "reason": "x"}, "invalid_amount"),
        ({"amount": "-0", "reason": "x"}, "invalid_amount"),
        ({"amount": "1.0000001", "reason": "x"}, "invalid_amount"),
        ({"amount": "abc", "reason": "x"}, "invalid_amount"),
        ({"amount": True, "reason": "x"}, "invalid_amount"),
        ({"amount": "--1", "reason": "x"}, "invalid_amount"),
        ({"amount": "1", "reason": "   "}, "reason_required"),
        ({"amount": "1"}, "validation_error"),
        ({"amount": "1", "reason": ""}, "validation_error"),
    ],
)
def test_bad_adjustments_are_422(client, admin, user, body, error):
    response = adjust(client, admin, user.id, body)
    assert response.status_code == 422
    assert response.get_json()["error"] == error
    assert balance(client, user)["balance"] == "0.000000"


def test_adjustments_replay_by_idempotency_key(client, admin, user):
    first = adjust(client, admin, user.id, {"amount": "3", "reason": "fix"}, key="adj-1")
    again = adjust(client, admin, user.id, {"amount": "3", "reason": "fix"}, key="adj-1")
    assert first.get_json()["id"] == again.get_json()["id"]
    assert balance(client, user)["balance"] == "3.000000"
    other = adjust(client, admin, user.id, {"amount": "4", "reason": "fix"}, key="adj-1")
    assert other.status_code == 409 and other.get_json()["error"] == "idempotency_conflict"


def test_adjustments_need_an_admin_and_a_known_user(client, admin, user):
    assert adjust(client, user, user.id, {"amount": "1", "reason": "x"}).status_code == 403
    missing = "00000000-0000-0000-0000-000000000000"
    assert adjust(client, admin, missing, {"amount": "1", "reason": "x"}).status_code == 404
