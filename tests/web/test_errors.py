"""Every error is JSON with a stable `error` code — never HTML, never a bare 500."""

import pytest
from flask import Flask


def assert_json_error(response, status, error):
    assert response.status_code == status
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["code"] == status
    assert body["error"] == error
    assert body["message"]
    assert body["status"]
    return body


def test_unknown_path_is_a_json_404(client):
    assert_json_error(client.get("/api/v1/no/such/thing"), 404, "not_found")
    assert_json_error(client.get("/"), 404, "not_found")


def test_wrong_method_is_a_json_405_with_allow(client):
    response = client.delete("/api/v1/health")
    assert_json_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["Allow"]


def test_malformed_json_is_a_400_invalid_json(client, admin):
    response = client.post(
        "/api/v1/admin/users", data="{not json", content_type="application/json", headers=admin.headers
    )
    assert_json_error(response, 400, "invalid_json")


@pytest.mark.parametrize("body", ["[]", '"text"', "42", "null"])
def test_json_that_is_not_an_object_is_a_422(client, admin, body):
    response = client.post(
        "/api/v1/admin/users", data=body, content_type="application/json", headers=admin.headers
    )
    assert response.status_code == 422
    assert response.get_json()["error"] == "validation_error"


def test_unknown_fields_are_rejected_per_field(client, admin):
    response = client.post(
        "/api/v1/admin/users", json={"email": "x@y.co", "colour": "red"}, headers=admin.headers
    )
    body = assert_json_error(response, 422, "validation_error")
    assert "colour" in body["errors"]["json"]


def test_wrong_types_are_rejected_per_field(client, admin):
    response = client.post("/api/v1/admin/users", json={"email": 5, "role": ["admin"]}, headers=admin.headers)
    body = assert_json_error(response, 422, "validation_error")
    assert set(body["errors"]["json"]) == {"email", "role"}


def test_oversized_bodies_are_a_json_413(app, admin):
    app.config["MAX_CONTENT_LENGTH"] = 1024
    response = app.test_client().post(
        "/api/v1/admin/users", data="x" * 4096, content_type="application/json", headers=admin.headers
    )
    assert_json_error(response, 413, "payload_too_large")


def test_an_unexpected_crash_is_a_json_500_without_internals(app):
    app.config["PROPAGATE_EXCEPTIONS"] = False
    app.add_url_rule("/boom-for-test", "boom", lambda: 1 / 0)
    body = assert_json_error(app.test_client().get("/boom-for-test"), 500, "internal_error")
    assert "ZeroDivision" not in str(body)


def test_a_database_that_vanished_is_a_503_not_a_500(app):
    from sqlalchemy.exc import OperationalError

    def lost():
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    app.add_url_rule("/lost-for-test", "lost", lost)
    assert_json_error(app.test_client().get("/lost-for-test"), 503, "service_unavailable")


def test_request_ids_are_echoed_or_made(client):
    assert (
        client.get("/api/v1/health", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    )
    assert len(client.get("/api/v1/health").headers["X-Request-ID"]) == 32


def test_the_app_factory_is_free_of_import_side_effects():
    import web.app

    assert not any(isinstance(value, Flask) for value in vars(web.app).values())


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/rooms", {"name": "a\u0000b"}),
        ("/api/v1/admin/users", {"email": "x\u0000@y.co"}),
        ("/api/v1/admin/users", {"email": "x@y.co", "role": "user\u0000"}),
    ],
)
def test_nul_characters_are_a_422_not_a_database_error(client, admin, path, body):
    response = client.post(path, json=body, headers=admin.headers)
    assert response.status_code == 422
    assert response.get_json()["error"] == "validation_error"


def test_nul_characters_in_path_ids_are_a_404(client, admin):
    for path in ("/api/v1/admin/users/%00/api-keys", "/api/v1/turns/a%00b", "/api/v1/admin/users/%00/ledger"):
        response = client.get(path, headers=admin.headers)
        assert response.status_code == 404, path
        assert response.get_json()["error"] == "not_found"
