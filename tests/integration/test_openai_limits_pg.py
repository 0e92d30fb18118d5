"""Limits on the OpenAI-compatible endpoint: a call through ``/v1`` is a turn of the key
that made it, so the key's (and the user's) spend, rate and concurrency limits apply there
as on ``/api/v1``, and the refusals come in OpenAI's error shape that the real ``openai``
SDK raises as its own exceptions (402 ``spend_limit_reached``, 429 ``rate_limited`` with
``Retry-After``)."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest
from sqlalchemy import func, select

from shared.models import Turn
from tests.integration.test_enforced_turns_pg import grant
from tests.integration.test_limits_pg import get_limits, put_limits
from tests.integration.test_openai_compat_pg import sdk, tollgate_url  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("live_worker")

HI = [{"role": "user", "content": "hi"}]


def key_id_of(pg_client, pg_admin, user) -> str:
    keys = pg_client.get(f"/api/v1/admin/users/{user.id}/api-keys", headers=pg_admin.headers).get_json()
    return keys[0]["id"]


def test_a_keys_rate_limit_refuses_v1_calls_in_openais_shape(
    tollgate_url,  # noqa: F811
    pg_client,
    pg_admin,
    pg_user,
    pg_db,
):
    key_id = key_id_of(pg_client, pg_admin, pg_user)
    put_limits(pg_client, pg_admin, f"api-keys/{key_id}", {"requests_per_minute": 2})
    client = sdk(tollgate_url, pg_user.key)
    for _ in range(2):
        assert client.chat.completions.create(model="offline-small", messages=HI).object == "chat.completion"
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="offline-small", messages=HI)
    assert refused.value.status_code == 429
    assert refused.value.body["code"] == "rate_limited"
    assert 1 <= int(refused.value.response.headers["Retry-After"]) <= 60
    # Counted against the key: both admitted calls are its turns, the refusal left no row.
    assert get_limits(pg_client, pg_admin, f"api-keys/{key_id}")["requests_last_minute"] == 2
    assert pg_db.scalar(select(func.count()).select_from(Turn).where(Turn.api_key_id == key_id)) == 2


def test_a_keys_spend_limit_refuses_v1_calls_whatever_the_enforcement_switch(
    tollgate_url,  # noqa: F811
    pg_client,
    pg_admin,
    pg_user,
    pg_db,
):
    """Enforcement is off and the wallet is empty: only the key's spend limit stands in the
    way, and it does, before any turn exists."""
    grant(pg_client, pg_admin, pg_user.user.id, "5.00")
    key_id = key_id_of(pg_client, pg_admin, pg_user)
    put_limits(
        pg_client,
        pg_admin,
        f"api-keys/{key_id}",
        {"spend": {"amount": "0.000001", "period": "day", "tz": "UTC"}},
    )
    client = sdk(tollgate_url, pg_user.key)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="offline-small", messages=HI, stream=stream)
        assert refused.value.status_code == 402
        assert refused.value.body["code"] == "spend_limit_reached"
    assert pg_db.scalar(select(func.count()).select_from(Turn)) == 0
    limits = get_limits(pg_client, pg_admin, f"api-keys/{key_id}")
    assert Decimal(limits["spend"]["spent"]) == 0
