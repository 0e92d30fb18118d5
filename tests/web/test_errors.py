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


# -- hostile JSON bodies: one parser for every endpoint (web/api/__init__.py) ----------------

DEEPLY_NESTED = b"[" * 200_000
HOSTILE_JSON = [
    pytest.param(DEEPLY_NESTED, "nested deeper than 64 levels", id="200000-brackets"),
    pytest.param(b'{"name": ' + b"[" * 65 + b"]" * 65 + b"}", "nested deeper than 64 levels", id="65-levels"),
    pytest.param(b'{"name": "\\ud800", "content": "\\udc80x"}', "unpaired UTF-16 surrogate", id="surrogate"),
    pytest.param(b'{"name": ' + b"9" * 5000 + b"}", "too many digits", id="5000-digit-integer"),
    pytest.param(b'{"name": "caf\xe9"}', "not UTF-8", id="latin-1"),
]


@pytest.fixture
def chat_session(client, user) -> dict:
    room = client.post("/api/v1/rooms", json={"name": "r"}, headers=user.headers).get_json()
    return client.post(f"/api/v1/rooms/{room['id']}/sessions", json={}, headers=user.headers).get_json()


@pytest.mark.parametrize(("body", "reason"), HOSTILE_JSON)
def test_hostile_json_bodies_are_a_400_invalid_json_naming_the_reason(
    client, user, chat_session, body, reason
):
    for path in ("/api/v1/rooms", f"/api/v1/sessions/{chat_session['id']}/turns"):
        response = client.post(path, data=body, content_type="application/json", headers=user.headers)
        error = assert_json_error(response, 400, "invalid_json")
        assert reason in error["message"], (path, error)


def test_nesting_up_to_64_levels_is_parsed_and_left_to_the_schema(client, user):
    body = b'{"name": ' + b"[" * 63 + b"]" * 63 + b"}"  # the object plus 63 lists: 64 levels
    response = client.post("/api/v1/rooms", data=body, content_type="application/json", headers=user.headers)
    assert_json_error(response, 422, "validation_error")


def test_surrogate_pairs_and_escaped_backslashes_are_ordinary_text(client, user):
    # A proper pair (😀 as \ud83d\ude00) and a literal backslash-u are not lone surrogates.
    body = b'{"name": "smile \\ud83d\\ude00 and \\\\ud800"}'
    response = client.post("/api/v1/rooms", data=body, content_type="application/json", headers=user.headers)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["name"] == "smile \U0001f600 and \\ud800"


def test_an_idempotency_key_with_control_characters_is_a_422(client, user, chat_session):
    for key in ("a\x00b", "tab\there", "del\x7f"):
        response = client.post(
            f"/api/v1/sessions/{chat_session['id']}/turns",
            json={"content": "hi"},
            headers={**user.headers, "Idempotency-Key": key},
        )
        assert_json_error(response, 422, "invalid_idempotency_key")
