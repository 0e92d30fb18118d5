"""Schema fuzzing: every documented operation, driven by Schemathesis from the app's own spec.

The schema is read from ``/api/v1/openapi.json`` of the app under test (Postgres,
Redis and a live Celery worker, as in production) and every operation gets
``MAX_EXAMPLES`` generated requests per generation phase, once with an admin's key and
once with a user's key, judged by all of Schemathesis' default checks (no 5xx, documented
status codes, content types, headers and response schemas, invalid input refused, valid
input accepted, auth enforced). See docs/testing.md for the settings and why.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.factories import make_actor

MAX_EXAMPLES = 200

# The one relaxation, explained in docs/testing.md: whether a usage query is valid depends
# on how its parameters relate (start <= end, at most 3660 days) and on the IANA zone
# database, which JSON Schema cannot state; such a query is a documented 422.
CROSS_FIELD_422 = {
    "include-path-regex": "^/api/v1/admin/usage/",
    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "422"]}},
}

# Likewise semantic, not structural: whether a spend limit's `tz` is an IANA zone, and
# whether a webhook URL is http(s), credential-free and not a private address
# (docs/limits.md, docs/webhooks.md); such a body is a documented 422 with a stable code.
SEMANTIC_422 = {
    "include-path-regex": "^/api/v1/admin/(webhooks|users/[^/]+/limits|api-keys/[^/]+/limits)$",
    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "422"]}},
}

schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(params=["admin", "user"])
def role(request) -> str:
    return request.param


@pytest.fixture
def api_schema(request, pg_app, pg_db, role, live_worker):
    if not hasattr(request.node, "_nodeid"):
        # Schemathesis 4.32 relabels the test node through ``_nodeid``, which pytest 9.2
        # no longer has; give it one to write to (it only changes report labels).
        request.node._nodeid = request.node.nodeid
    actor = make_actor(pg_db, role)
    config = schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {"bearerAuth": {"bearer": actor.key}}},
            "operations": [CROSS_FIELD_422, SEMANTIC_422],
        }
    )
    return schemathesis.openapi.from_wsgi("/api/v1/openapi.json", pg_app, config=config)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_operation_conforms_to_its_documented_schema(case):
    case.call_and_validate()


# Findings of the fuzz run, pinned as plain regression tests.


def test_a_nul_in_a_query_string_is_a_422_not_a_500(pg_client, pg_admin):
    response = pg_client.get("/api/v1/admin/usage/summary?model=a%00b", headers=pg_admin.headers)
    assert response.status_code == 422
    assert "model" in response.get_json()["errors"]["query"]


def test_a_paginated_list_refuses_an_unknown_query_parameter(pg_client, pg_user):
    response = pg_client.get("/api/v1/rooms?pagesize=5", headers=pg_user.headers)
    assert response.status_code == 422
    assert "pagesize" in response.get_json()["errors"]["query"]


def test_money_in_the_spec_is_a_decimal_string_and_x_pagination_is_json(pg_client):
    spec = pg_client.get("/api/v1/openapi.json").get_json()
    assert spec["components"]["schemas"]["WalletSummary"]["properties"]["balance"]["type"] == "string"
    assert "application/json" in spec["components"]["headers"]["PAGINATION"]["content"]
    assert spec["components"]["schemas"]["Error"]["additionalProperties"] is True


def test_a_price_for_an_unprintable_model_name_is_422_invalid_model(pg_client, pg_admin):
    response = pg_client.put(
        "/api/v1/admin/pricing/%C2%8B",
        json={"input_per_1k": "1", "output_per_1k": "1"},
        headers=pg_admin.headers,
    )
    assert response.status_code == 422
    assert response.get_json()["error"] == "invalid_model"


@pytest.mark.parametrize("path", ["/api/v1/rooms", "/api/v1/wallet/ledger", "/api/v1/admin/users"])
def test_a_page_past_any_64_bit_offset_is_an_empty_page_not_a_500(pg_client, pg_admin, path):
    response = pg_client.get(f"{path}?page_size=64&page=62567588472597569536", headers=pg_admin.headers)
    assert response.status_code == 200
    assert response.get_json() == []
