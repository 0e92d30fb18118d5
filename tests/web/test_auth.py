from shared.services import auth
from tests.factories import make_actor


def test_health_needs_no_key(client):
    response = client.get("/api/v1/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_missing_malformed_and_unknown_keys_are_401(client):
    for headers in (
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer tg_nope"},
    ):
        response = client.get("/api/v1/auth/me", headers=headers)
        assert response.status_code == 401, headers
        assert response.get_json()["error"] == "unauthorized"


def test_me_shows_the_caller_and_their_wallet(client, user):
    response = client.get("/api/v1/auth/me", headers=user.headers)
    assert response.status_code == 200
    body = response.get_json()
    assert body["id"] == user.id and len(body["id"]) == 36
    assert body["email"] == user.user.email
    assert body["role"] == "user"
    assert body["created_at"].endswith("+00:00")
    assert body["wallet"] == {
        "balance": "0.000000",
        "held": "0.000000",
        "available": "0.000000",
        "low_balance": True,
    }


def test_a_user_key_is_forbidden_on_admin_paths(client, user):
    for method, path in [("get", "/api/v1/admin/users"), ("post", "/api/v1/admin/users")]:
        response = getattr(client, method)(path, headers=user.headers, json={"email": "z@z.co"})
        assert response.status_code == 403
        assert response.get_json()["error"] == "forbidden"


def test_admin_creates_a_user_whose_key_is_shown_once_and_works(client, admin, db):
    response = client.post("/api/v1/admin/users", json={"email": "  New@Example.COM "}, headers=admin.headers)
    assert response.status_code == 201
    body = response.get_json()
    assert body["user"]["email"] == "new@example.com"
    assert body["user"]["role"] == "user"
    secret = body["api_key"]
    assert secret.startswith("tg_") and len(secret) > 40
    assert body["key"]["prefix"] == secret[:10]
    assert "key_hash" not in body["key"]
    me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {secret}"})
    assert me.get_json()["email"] == "new@example.com"
    # Stored hashed: the secret itself is nowhere in the database.
    from shared.models import ApiKey

    stored = db.query(ApiKey).filter_by(user_id=body["user"]["id"]).one()
    assert stored.key_hash == auth.hash_key(secret) and secret not in stored.key_hash


def test_creating_a_user_writes_an_audit_event(client, admin, db):
    from shared.models import AdminAuditEvent

    client.post("/api/v1/admin/users", json={"email": "audited@example.com"}, headers=admin.headers)
    event = db.query(AdminAuditEvent).filter_by(action="user.create").one()
    assert event.actor_id == admin.id


def test_duplicate_emails_are_a_409(client, admin):
    assert (
        client.post("/api/v1/admin/users", json={"email": "dup@x.co"}, headers=admin.headers).status_code
        == 201
    )
    response = client.post("/api/v1/admin/users", json={"email": "DUP@x.co"}, headers=admin.headers)
    assert response.status_code == 409
    assert response.get_json()["error"] == "email_taken"


def test_bad_emails_and_roles_are_422(client, admin):
    for payload in (
        {"email": "no-at-sign"},
        {"email": "a@b"},
        {"email": ""},
        {"email": "a@b.co", "role": "root"},
        {},
    ):
        response = client.post("/api/v1/admin/users", json=payload, headers=admin.headers)
        assert response.status_code == 422, payload


def test_users_are_listed_with_pagination(client, admin, db):
    for _ in range(3):
        make_actor(db)
    response = client.get("/api/v1/admin/users?page=1&page_size=2", headers=admin.headers)
    assert response.status_code == 200
    assert len(response.get_json()) == 2
    assert '"total": 4' in response.headers["X-Pagination"]
    assert client.get("/api/v1/admin/users?page=0", headers=admin.headers).status_code == 422
    assert client.get("/api/v1/admin/users?page_size=abc", headers=admin.headers).status_code == 422


def test_issued_keys_work_and_revoked_keys_stop_at_once(client, admin, user):
    issued = client.post(
        f"/api/v1/admin/users/{user.id}/api-keys", json={"name": "ci"}, headers=admin.headers
    )
    assert issued.status_code == 201
    secret, key_id = issued.get_json()["api_key"], issued.get_json()["key"]["id"]
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.get("/api/v1/auth/me", headers=headers).status_code == 200
    listed = client.get(f"/api/v1/admin/users/{user.id}/api-keys", headers=admin.headers).get_json()
    assert {k["id"] for k in listed} >= {key_id}
    revoked = client.delete(f"/api/v1/admin/api-keys/{key_id}", headers=admin.headers)
    assert revoked.status_code == 200 and revoked.get_json()["revoked_at"]
    assert client.get("/api/v1/auth/me", headers=headers).status_code == 401
    # The user's other key still works; revoking twice is harmless.
    assert client.get("/api/v1/auth/me", headers=user.headers).status_code == 200
    assert client.delete(f"/api/v1/admin/api-keys/{key_id}", headers=admin.headers).status_code == 200


def test_unknown_users_and_keys_are_404(client, admin):
    missing = "00000000-0000-0000-0000-000000000000"
    assert (
        client.post(f"/api/v1/admin/users/{missing}/api-keys", json={}, headers=admin.headers).status_code
        == 404
    )
    assert client.get(f"/api/v1/admin/users/{missing}/api-keys", headers=admin.headers).status_code == 404
    assert client.delete(f"/api/v1/admin/api-keys/{missing}", headers=admin.headers).status_code == 404
    assert client.delete("/api/v1/admin/api-keys/not-a-uuid", headers=admin.headers).status_code == 404
