"""Wallet, ledger, grants, pricing and the audit log over HTTP (SQLite app)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

import pytest
from sqlalchemy import event, func, select

from shared.db import new_id
from shared.models import ModelPrice
from shared.services import billing, pricing
from tests.factories import make_actor

LEDGER_FIELDS = {
    "id",
    "kind",
    "amount",
    "held_delta",
    "balance_after",
    "turn_id",
    "idempotency_key",
    "initiated_by",
    "reason",
    "created_at",
}


def grant(client, admin, user_id, body, key=None):
    headers = dict(admin.headers)
    if key:
        headers["Idempotency-Key"] = key
    return client.post(f"/api/v1/admin/users/{user_id}/grants", json=body, headers=headers)


def test_a_new_user_sees_an_empty_wallet(client, user):
    response = client.get("/api/v1/wallet", headers=user.headers)
    assert response.status_code == 200
    assert response.get_json() == {
        "balance": "0.000000",
        "held": "0.000000",
        "available": "0.000000",
        "low_balance": True,
        "limits": [],  # none set (tests/web/test_limits_api.py)
    }


def test_an_admin_grant_is_a_201_ledger_entry_attributed_to_the_admin(client, admin, user):
    response = grant(client, admin, user.id, {"amount": "25.50", "reason": "welcome credit"})
    assert response.status_code == 201
    body = response.get_json()
    assert set(body) == LEDGER_FIELDS
    assert body["kind"] == "grant"
    assert body["amount"] == body["balance_after"] == "25.500000"
    assert body["held_delta"] == "0.000000"
    assert body["initiated_by"] == admin.id
    assert body["reason"] == "welcome credit"
    assert body["turn_id"] is None
    wallet = client.get("/api/v1/wallet", headers=user.headers).get_json()
    assert wallet == {
        "balance": "25.500000",
        "held": "0.000000",
        "available": "25.500000",
        "low_balance": False,
        "limits": [],
    }


def test_a_json_integer_amount_is_accepted_exactly(client, admin, user):
    response = grant(client, admin, user.id, {"amount": 12})
    assert response.status_code == 201
    assert response.get_json()["amount"] == "12.000000"


def test_a_json_float_amount_is_refused_because_money_is_never_a_float(client, admin, user):
    response = grant(client, admin, user.id, {"amount": 12.5})
    assert response.status_code == 422
    assert response.get_json()["error"] == "invalid_amount"


def test_replaying_an_idempotency_key_returns_the_first_entry_without_a_second_credit(client, admin, user):
    first = grant(client, admin, user.id, {"amount": "10"}, key="grant-001")
    replay = grant(client, admin, user.id, {"amount": "10"}, key="grant-001")
    assert first.status_code == replay.status_code == 201
    assert replay.get_json() == first.get_json()
    assert client.get("/api/v1/wallet", headers=user.headers).get_json()["balance"] == "10.000000"


def test_an_idempotency_key_reused_with_another_amount_is_409(client, admin, user):
    assert grant(client, admin, user.id, {"amount": "10"}, key="grant-002").status_code == 201
    response = grant(client, admin, user.id, {"amount": "11"}, key="grant-002")
    assert response.status_code == 409
    assert response.get_json()["error"] == "idempotency_conflict"


@pytest.mark.parametrize(
    "amount",
    [
        "0",
        0,
        "-5",
        -5,
        "abc",
        "",
        "1.0000001",
        "NaN",
        "Infinity",
        "1000000000000.000001",
        "1e13",
        10**13,
        True,
        None,
        [],
        {"value": 1},
    ],
)
def test_a_bad_amount_is_422_invalid_amount_and_credits_nothing(client, admin, user, amount):
    response = grant(client, admin, user.id, {"amount": amount})
    assert response.status_code == 422, response.get_json()
    body = response.get_json()
    assert body["error"] == "invalid_amount"
    assert body["field"] == "amount"
    assert client.get("/api/v1/wallet", headers=user.headers).get_json()["balance"] == "0.000000"


@pytest.mark.parametrize("raw", ['{"amount": NaN}', '{"amount": Infinity}', '{"amount": -Infinity}'])
def test_non_finite_json_literals_are_refused_too(client, admin, user, raw):
    response = client.post(
        f"/api/v1/admin/users/{user.id}/grants",
        data=raw,
        headers={**admin.headers, "Content-Type": "application/json"},
    )
    assert response.status_code in (400, 422)
    assert response.get_json()["error"] in ("invalid_amount", "invalid_json")


def test_a_grant_without_an_amount_or_with_unknown_fields_is_422(client, admin, user):
    assert grant(client, admin, user.id, {"reason": "x"}).status_code == 422
    assert grant(client, admin, user.id, {"amount": "1", "currency": "USD"}).status_code == 422
    assert grant(client, admin, user.id, {"amount": "1", "reason": "r" * 501}).status_code == 422


def test_a_grant_to_an_unknown_user_is_404(client, admin):
    for user_id in (new_id(), "not-a-uuid"):
        response = grant(client, admin, user_id, {"amount": "1"})
        assert response.status_code == 404
        assert response.get_json()["error"] == "not_found"


def test_an_over_long_idempotency_key_is_422(client, admin, user):
    response = grant(client, admin, user.id, {"amount": "1"}, key="k" * 201)
    assert response.status_code == 422
    assert response.get_json()["error"] == "invalid_idempotency_key"


def test_the_ledger_lists_only_the_callers_entries_newest_first_and_paginates(client, admin, user, db):
    other = make_actor(db, "user")
    for amount in ("1", "2", "3"):
        assert grant(client, admin, user.id, {"amount": amount}).status_code == 201
    grant(client, admin, other.id, {"amount": "9"})
    response = client.get("/api/v1/wallet/ledger?page_size=2", headers=user.headers)
    assert response.status_code == 200
    assert [e["amount"] for e in response.get_json()] == ["3.000000", "2.000000"]
    assert json.loads(response.headers["X-Pagination"])["total"] == 3
    page2 = client.get("/api/v1/wallet/ledger?page_size=2&page=2", headers=user.headers).get_json()
    assert [e["amount"] for e in page2] == ["1.000000"]


def test_the_ledger_shows_holds_captures_and_releases_of_turns(client, admin, user, db):
    grant(client, admin, user.id, {"amount": "5"})
    turn_id = new_id()
    billing.place_hold(db, user_id=user.id, turn_id=turn_id, amount=Decimal("2"), ttl_seconds=60)
    db.commit()
    held = client.get("/api/v1/wallet", headers=user.headers).get_json()
    assert (held["balance"], held["held"], held["available"]) == ("5.000000", "2.000000", "3.000000")
    billing.settle_turn(
        db,
        user_id=user.id,
        turn_id=turn_id,
        model="offline-small",
        cost=Decimal("0.5"),
        input_tokens=10,
        output_tokens=10,
        at=billing.utcnow(),
        enforced=True,
    )
    db.commit()
    ledger = client.get("/api/v1/wallet/ledger", headers=user.headers).get_json()
    assert [(e["kind"], e["amount"], e["held_delta"]) for e in ledger] == [
        ("release", "0.000000", "-1.500000"),
        ("capture", "-0.500000", "-0.500000"),
        ("hold", "0.000000", "2.000000"),
        ("grant", "5.000000", "0.000000"),
    ]
    assert ledger[0]["turn_id"] == turn_id and ledger[0]["initiated_by"] == "system"
    assert ledger[0]["balance_after"] == "4.500000"


def test_an_admin_reads_any_users_ledger(client, admin, user):
    grant(client, admin, user.id, {"amount": "4"})
    response = client.get(f"/api/v1/admin/users/{user.id}/ledger", headers=admin.headers)
    assert response.status_code == 200
    assert [e["amount"] for e in response.get_json()] == ["4.000000"]
    assert client.get(f"/api/v1/admin/users/{new_id()}/ledger", headers=admin.headers).status_code == 404


def test_pricing_lists_the_offline_model_out_of_the_box(client, admin):
    response = client.get("/api/v1/admin/pricing", headers=admin.headers)
    assert response.status_code == 200
    [price] = response.get_json()
    assert price["model"] == "offline-small"
    assert (price["input_per_1k"], price["output_per_1k"]) == ("0.001000", "0.002000")
    assert price["created_by"] == "system"


@contextmanager
def statements(app) -> Iterator[list[str]]:
    """The SQL the app runs inside the block."""
    seen: list[str] = []

    def record(_conn, _cursor, statement, *_args):
        seen.append(statement)

    engine = app.extensions["tollgate"].db.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


@pytest.mark.parametrize("path", ["/api/v1/admin/pricing", "/v1/models"])
def test_listing_prices_writes_nothing(app, client, admin, db, path):
    client.get(path, headers=admin.headers)  # the key's first use may be recorded
    with statements(app) as seen:
        first = client.get(path, headers=admin.headers)
        again = client.get(path, headers=admin.headers)
    assert first.status_code == again.status_code == 200
    assert first.get_json() == again.get_json()
    assert [sql for sql in seen if sql.split()[0].upper() in ("INSERT", "UPDATE", "DELETE")] == []
    assert db.scalar(select(func.count()).select_from(ModelPrice)) == 0


def test_the_built_in_price_listed_is_the_row_a_turn_writes(app, client, admin, db):
    listed = client.get("/api/v1/admin/pricing", headers=admin.headers).get_json()
    pricing.price_in_force(db, "offline-small")  # what the first turn on the model does
    db.commit()
    assert client.get("/api/v1/admin/pricing", headers=admin.headers).get_json() == listed


def test_a_price_put_adds_a_version_effective_now(client, admin):
    response = client.put(
        "/api/v1/admin/pricing/acme/chat-large",
        json={"input_per_1k": "0.5", "output_per_1k": "1.25"},
        headers=admin.headers,
    )
    assert response.status_code == 200
    body = response.get_json()
    assert body["model"] == "acme/chat-large"
    assert (body["input_per_1k"], body["output_per_1k"]) == ("0.500000", "1.250000")
    assert body["created_by"] == admin.id
    again = client.put(
        "/api/v1/admin/pricing/acme/chat-large",
        json={"input_per_1k": "0", "output_per_1k": "0"},
        headers=admin.headers,
    ).get_json()
    assert again["effective_from"] > body["effective_from"]
    current = {p["model"]: p for p in client.get("/api/v1/admin/pricing", headers=admin.headers).get_json()}
    assert current["acme/chat-large"]["id"] == again["id"]
    assert set(current) == {"acme/chat-large", "offline-small"}


@pytest.mark.parametrize(
    "body",
    [
        {"input_per_1k": "-1", "output_per_1k": "1"},
        {"input_per_1k": "1", "output_per_1k": "0.0000001"},
        {"input_per_1k": "one", "output_per_1k": "1"},
        {"input_per_1k": True, "output_per_1k": "1"},
    ],
)
def test_a_bad_price_is_422_invalid_price(client, admin, body):
    response = client.put("/api/v1/admin/pricing/gpt-x", json=body, headers=admin.headers)
    assert response.status_code == 422
    assert response.get_json()["error"] == "invalid_price"


def test_a_price_put_missing_a_field_is_422(client, admin):
    response = client.put("/api/v1/admin/pricing/gpt-x", json={"input_per_1k": "1"}, headers=admin.headers)
    assert response.status_code == 422
    assert "output_per_1k" in response.get_json()["errors"]["json"]


def test_the_audit_log_lists_admin_actions_newest_first(client, admin, user):
    client.post("/api/v1/admin/users", json={"email": "audited@example.test"}, headers=admin.headers)
    grant(client, admin, user.id, {"amount": "3"})
    client.put(
        "/api/v1/admin/pricing/gpt-x", json={"input_per_1k": "1", "output_per_1k": "1"}, headers=admin.headers
    )
    response = client.get("/api/v1/admin/audit", headers=admin.headers)
    assert response.status_code == 200
    events = response.get_json()
    assert [e["action"] for e in events] == ["price.set", "wallet.grant", "user.create"]
    assert all(e["actor_id"] == admin.id for e in events)
    assert events[1]["target"] == user.id and events[1]["details"]["amount"] == "3.000000"
    assert json.loads(response.headers["X-Pagination"])["total"] == 3


ADMIN_PATHS = [
    ("post", "/api/v1/admin/users/{user}/grants"),
    ("get", "/api/v1/admin/users/{user}/ledger"),
    ("get", "/api/v1/admin/pricing"),
    ("put", "/api/v1/admin/pricing/gpt-x"),
    ("get", "/api/v1/admin/audit"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_PATHS)
def test_admin_billing_paths_need_an_admin_key(client, user, method, path):
    path = path.format(user=user.id)
    body = {"amount": "1", "input_per_1k": "1", "output_per_1k": "1"}
    anonymous = getattr(client, method)(path, json=body)
    assert anonymous.status_code == 401
    assert anonymous.get_json()["error"] == "unauthorized"
    forbidden = getattr(client, method)(path, json=body, headers=user.headers)
    assert forbidden.status_code == 403
    assert forbidden.get_json()["error"] == "forbidden"


def test_wallet_paths_need_a_key(client):
    for path in ("/api/v1/wallet", "/api/v1/wallet/ledger"):
        assert client.get(path).status_code == 401
