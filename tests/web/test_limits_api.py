"""Limits on SQLite (embedded mode, no Redis, no worker): the admin API, hostile input,
and admission refusing over a spend, rate or concurrency limit."""

import pytest

from shared.services import auth


@pytest.fixture
def chat(client, user):
    room = client.post("/api/v1/rooms", json={"name": "r"}, headers=user.headers).get_json()
    return client.post(
        f"/api/v1/rooms/{room['id']}/sessions", json={"title": "t"}, headers=user.headers
    ).get_json()


def submit(client, headers, chat, content="hello"):
    return client.post(f"/api/v1/sessions/{chat['id']}/turns", json={"content": content}, headers=headers)


def put_limits(client, admin, path, body):
    return client.put(f"/api/v1/admin/{path}/limits", json=body, headers=admin.headers)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"spend": {"amount": "-1", "period": "day"}}, "invalid_limit_amount"),
        ({"spend": {"amount": "1000000000001", "period": "day"}}, "invalid_limit_amount"),
        ({"spend": {"amount": 1.5, "period": "day"}}, "invalid_limit_amount"),
        ({"spend": {"amount": "1.1234567", "period": "day"}}, "invalid_limit_amount"),
        ({"spend": {"amount": "NaN", "period": "day"}}, "invalid_limit_amount"),
        ({"spend": {"amount": "5", "period": "fortnight"}}, "invalid_period"),
        ({"spend": {"amount": "5", "period": "day", "tz": "Mars/Olympus"}}, "invalid_timezone"),
        ({"requests_per_minute": 0}, "invalid_limit"),
        ({"requests_per_minute": 1.5}, "invalid_limit"),
        ({"requests_per_minute": "10"}, "invalid_limit"),
        ({"max_concurrent_turns": -3}, "invalid_limit"),
        ({"max_concurrent_turns": 10**12}, "invalid_limit"),
        ({"max_concurrent_turns": True}, "invalid_limit"),
    ],
)
def test_hostile_limits_are_422_with_stable_codes(client, admin, user, body, code):
    response = put_limits(client, admin, f"users/{user.id}", body)
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"] == code


def test_limits_of_unknown_subjects_are_404_and_users_cannot_set_them(client, admin, user):
    assert put_limits(client, admin, "users/00000000-0000-0000-0000-000000000000", {}).status_code == 404
    assert client.get("/api/v1/admin/api-keys/nope/limits", headers=admin.headers).status_code == 404
    assert put_limits(client, user, f"users/{user.id}", {}).status_code == 403


def test_put_then_get_shows_the_period_spent_held_and_reset(client, admin, user):
    body = {
        "spend": {"amount": "25.5", "period": "month", "tz": "Asia/Kolkata"},
        "requests_per_minute": 60,
        "max_concurrent_turns": 3,
    }
    before = client.get(f"/api/v1/admin/users/{user.id}/limits", headers=admin.headers)
    assert before.status_code == 200
    assert before.get_json()["spend"] is None and before.get_json()["updated_at"] is None
    put = put_limits(client, admin, f"users/{user.id}", body)
    assert put.status_code == 200, put.get_json()
    got = client.get(f"/api/v1/admin/users/{user.id}/limits", headers=admin.headers).get_json()
    assert got == put.get_json()
    assert got["spend"]["amount"] == "25.500000"
    assert got["spend"]["spent"] == "0.000000" and got["spend"]["held"] == "0.000000"
    assert got["spend"]["resets_at"].endswith("18:30:00+00:00")  # the 1st, 00:00 in Kolkata
    assert got["requests_per_minute"] == 60 and got["max_concurrent_turns"] == 3
    cleared = put_limits(client, admin, f"users/{user.id}", {}).get_json()
    assert cleared["spend"] is None and cleared["requests_per_minute"] is None


def test_spend_limit_refuses_with_402_whatever_the_enforcement_toggle(client, admin, user, chat):
    assert (
        put_limits(client, admin, f"users/{user.id}", {"spend": {"amount": "0", "period": "day"}}).status_code
        == 200
    )
    response = submit(client, user.headers, chat)
    assert response.status_code == 402
    body = response.get_json()
    assert body["error"] == "spend_limit_reached"
    assert body["limit_source"] == "user" and body["limit"] == "0.000000" and body["spent"] == "0.000000"
    assert body["resets_at"].endswith("T00:00:00Z")
    assert client.get(f"/api/v1/sessions/{chat['id']}/turns", headers=user.headers).get_json() == []


def test_concurrency_limit_is_429_with_retry_after(client, admin, user, chat):
    put_limits(client, admin, f"users/{user.id}", {"max_concurrent_turns": 2})
    assert [submit(client, user.headers, chat).status_code for _ in range(2)] == [202, 202]
    refused = submit(client, user.headers, chat)
    assert refused.status_code == 429
    assert refused.get_json()["error"] == "too_many_concurrent_turns"
    assert int(refused.headers["Retry-After"]) >= 1
    got = client.get(f"/api/v1/admin/users/{user.id}/limits", headers=admin.headers).get_json()
    assert got["in_flight_turns"] == 2


def test_rate_limit_is_429_with_retry_after_up_to_a_minute(client, admin, user, chat):
    put_limits(client, admin, f"users/{user.id}", {"requests_per_minute": 2})
    assert [submit(client, user.headers, chat).status_code for _ in range(2)] == [202, 202]
    refused = submit(client, user.headers, chat)
    assert refused.status_code == 429
    assert refused.get_json()["error"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


def test_a_key_limit_binds_that_key_only_and_the_owner_sees_it(client, admin, user, chat, db):
    second = auth.issue_api_key(db, admin.id, user.id, "second")
    keys = client.get(f"/api/v1/admin/users/{user.id}/api-keys", headers=admin.headers).get_json()
    first_key = next(k for k in keys if k["id"] != second.api_key.id)
    put = put_limits(client, admin, f"api-keys/{first_key['id']}", {"max_concurrent_turns": 1})
    assert put.get_json()["subject_type"] == "api_key" and put.get_json()["user_id"] == user.id
    assert submit(client, user.headers, chat).status_code == 202
    refused = submit(client, user.headers, chat)
    assert refused.status_code == 429 and refused.get_json()["limit_source"] == "api_key"
    other = {"Authorization": f"Bearer {second.secret}"}
    assert submit(client, other, chat).status_code == 202
    mine = client.get("/api/v1/wallet", headers=user.headers).get_json()
    assert [(lim["subject_type"], lim["max_concurrent_turns"]) for lim in mine["limits"]] == [("api_key", 1)]
    assert client.get("/api/v1/wallet", headers=other).get_json()["limits"] == []
