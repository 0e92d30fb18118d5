"""Every documented operation, fed hostile ids, bodies and query strings, answers JSON below 500.

A lightweight sweep on SQLite; the schema-driven fuzzing of the hardening issue goes further.
"""

import itertools
import re

import pytest

HOSTILE_IDS = ["x", "0" * 36, "00000000-0000-0000-0000-000000000000", "é" * 40, "a" * 500, "..", "%20"]
HOSTILE_BODIES = [
    None,
    [],
    "text",
    0,
    {},
    {"x": 1},
    {"content": ["a"], "name": {"a": 1}, "email": None, "amount": [1], "enabled": "yes", "model": 5},
    {"content": "hi", "name": "n", "email": "a@b.co", "amount": "1e400", "enabled": True, "reason": "r"},
    {"input_per_1k": "-1", "output_per_1k": "NaN"},
]
HOSTILE_QUERIES = [
    "",
    "?page=-1",
    "?page_size=100000",
    "?page=abc",
    "?bucket=year&start=2020-13-45",
    "?worker=maybe",
]


def operations(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    for path, item in spec["paths"].items():
        for method in item:
            if method in {"get", "post", "put", "patch", "delete"}:
                yield path, method


@pytest.fixture
def sweep(client, admin):
    def run(headers):
        failures = []
        for path, method in operations(client):
            params = re.findall(r"{(\w+)}", path)
            ids = HOSTILE_IDS if params else [""]
            for ident, body, query in itertools.product(ids, HOSTILE_BODIES, HOSTILE_QUERIES):
                url = re.sub(r"{\w+}", ident, path) + query
                kwargs = {"headers": headers}
                if method in {"post", "put", "patch"}:
                    kwargs["json"] = body
                response = getattr(client, method)(url, **kwargs)
                if response.status_code >= 500 and response.status_code != 503:
                    failures.append((method, url, body, response.status_code))
                if response.mimetype != "application/json" and response.status_code >= 400:
                    failures.append((method, url, body, "non-JSON error"))
        return failures

    return run


def test_no_operation_answers_5xx_to_hostile_input_as_admin(sweep, admin):
    assert sweep(admin.headers) == []


def test_no_operation_answers_5xx_to_hostile_input_as_a_user(sweep, user):
    assert sweep(user.headers) == []


def test_no_operation_answers_5xx_without_a_key(sweep):
    assert sweep({}) == []


RAW_JSON_BODIES = [
    b"[" * 200_000,
    b"{" * 100_000,
    b'{"a": ' + b"[" * 65 + b"]" * 65 + b"}",
    b'{"content": "\\ud800", "name": "\\udfff", "email": "\\ud800@x.co"}',
    b'{"amount": ' + b"1" * 5000 + b"}",
    b"\xff\xfe{}",
]


def test_every_operation_answers_hostile_raw_json_with_a_4xx(client, admin):
    failures = []
    for path, method in operations(client):
        if method not in {"post", "put", "patch"}:
            continue
        url = re.sub(r"{\w+}", "00000000-0000-0000-0000-000000000000", path)
        for body in RAW_JSON_BODIES:
            response = getattr(client, method)(
                url, data=body, content_type="application/json", headers=admin.headers
            )
            if not (400 <= response.status_code < 500 and response.mimetype == "application/json"):
                failures.append((method, url, body[:20], response.status_code))
    assert failures == []
