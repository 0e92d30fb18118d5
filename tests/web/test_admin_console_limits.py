"""The console's limits and webhooks pages over the Flask test client (SQLite): a change made
from a form is the JSON API's (same schema and codes, same service, same audit event), the
CSRF token is required, and a webhook's signing secret is shown once."""

from __future__ import annotations

import re
from html import unescape

import pytest
from sqlalchemy import select

from shared.models import AdminAuditEvent, WebhookDelivery
from shared.services import auth
from tests.web.test_admin_console import alert, signed_in


@pytest.fixture
def settings(settings):
    return settings.replace(webhook_allow_private=True)


def api_limits(client, admin, path):
    response = client.get(f"/api/v1/admin/{path}/limits", headers=admin.headers)
    assert response.status_code == 200
    return response.get_json()


def limits_form(csrf, **fields):
    return {
        "csrf_token": csrf,
        "spend_amount": "",
        "spend_period": "day",
        "spend_tz": "UTC",
        "requests_per_minute": "",
        "max_concurrent_turns": "",
        "action": "save",
        **fields,
    }


def test_user_limits_set_in_the_console_are_the_apis_and_audited(client, admin, user, db):
    csrf = signed_in(client, admin)
    form = limits_form(
        csrf, spend_amount="25.5", spend_period="month", spend_tz="Asia/Kolkata", requests_per_minute="60"
    )
    response = client.post(f"/admin/users/{user.id}/limits", data=form)
    assert response.status_code == 303
    got = api_limits(client, admin, f"users/{user.id}")
    assert got["spend"]["amount"] == "25.500000" and got["spend"]["period"] == "month"
    assert got["spend"]["tz"] == "Asia/Kolkata" and got["spend"]["resets_at"].endswith("18:30:00+00:00")
    assert (got["requests_per_minute"], got["max_concurrent_turns"], got["updated_by"]) == (
        60,
        None,
        admin.id,
    )
    event = db.scalar(select(AdminAuditEvent).where(AdminAuditEvent.action == "limits.set"))
    assert (event.actor_id, event.target_type, event.target) == (admin.id, "user", user.id)
    assert event.details["spend"] == {"amount": "25.500000", "period": "month", "tz": "Asia/Kolkata"}

    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "Limits saved" in page
    spend = re.search(r'id="user-spend">(.*?)</dd>', page, re.S).group(1)
    assert '0.000000</span> spent of <span class="money">25.500000</span> per month (Asia/Kolkata)' in spend
    assert "resets " in spend and "18:30:00 UTC" in spend
    assert 'id="user-rpm">60 ' in page
    assert f"by {admin.user.email}" in page  # who set them, by email
    # The users list shows the spend against the limit, compactly.
    assert "0.000000 / 25.500000" in client.get("/admin/users").get_data(as_text=True)

    # Clearing: the "Remove all limits" button sends no limits at all.
    response = client.post(f"/admin/users/{user.id}/limits", data=limits_form(csrf, action="clear"))
    assert response.status_code == 303
    got = api_limits(client, admin, f"users/{user.id}")
    assert (got["spend"], got["requests_per_minute"], got["max_concurrent_turns"]) == (None, None, None)
    # An empty amount is "no spend limit", the other fields still apply.
    client.post(f"/admin/users/{user.id}/limits", data=limits_form(csrf, max_concurrent_turns="3"))
    got = api_limits(client, admin, f"users/{user.id}")
    assert (got["spend"], got["max_concurrent_turns"]) == (None, 3)


def day(amount, **extra):
    return {"spend": {"amount": amount, "period": "day", **extra}}


@pytest.mark.parametrize(
    ("fields", "body", "code"),
    [
        ({"spend_amount": "-1"}, day("-1"), "invalid_limit_amount"),
        ({"spend_amount": "1.1234567"}, day("1.1234567"), "invalid_limit_amount"),
        ({"spend_amount": "5", "spend_period": "fortnight"}, day("5", period="fortnight"), "invalid_period"),
        ({"spend_amount": "5", "spend_tz": "Mars/Olympus"}, day("5", tz="Mars/Olympus"), "invalid_timezone"),
        ({"requests_per_minute": "0"}, {"requests_per_minute": 0}, "invalid_limit"),
        ({"requests_per_minute": "1.5"}, {"requests_per_minute": 1.5}, "invalid_limit"),
        ({"max_concurrent_turns": "-3"}, {"max_concurrent_turns": -3}, "invalid_limit"),
        ({"max_concurrent_turns": "1000000000000"}, {"max_concurrent_turns": 10**12}, "invalid_limit"),
    ],
)
def test_bad_limits_show_the_apis_message_and_change_nothing(client, admin, user, fields, body, code):
    csrf = signed_in(client, admin)
    api = client.put(f"/api/v1/admin/users/{user.id}/limits", json=body, headers=admin.headers)
    assert api.status_code == 422 and api.get_json()["error"] == code
    refused = client.post(f"/admin/users/{user.id}/limits", data=limits_form(csrf, **fields))
    assert refused.status_code == 422
    assert api.get_json()["message"] in unescape(alert(refused))
    # The refused form is drawn again with what was typed.
    typed = next(iter(fields.values()))
    assert f'value="{typed}"' in refused.get_data(as_text=True)
    assert api_limits(client, admin, f"users/{user.id}")["updated_at"] is None


def test_a_keys_limits_are_set_on_that_key_only(client, admin, user, db):
    csrf = signed_in(client, admin)
    second = auth.issue_api_key(db, admin.id, user.id, "second")
    key_id = second.api_key.id
    page = client.get(f"/admin/users/{user.id}").get_data(as_text=True)
    assert f'id="key-{key_id}-limits-form"' in page
    response = client.post(
        f"/admin/api-keys/{key_id}/limits",
        data=limits_form(csrf, spend_amount="2", spend_period="week", max_concurrent_turns="1"),
    )
    assert response.status_code == 303 and response.headers["Location"].endswith(f"#key-{key_id}")
    got = api_limits(client, admin, f"api-keys/{key_id}")
    assert (got["subject_type"], got["user_id"], got["max_concurrent_turns"]) == ("api_key", user.id, 1)
    assert got["spend"]["amount"] == "2.000000" and got["spend"]["period"] == "week"
    assert api_limits(client, admin, f"users/{user.id}")["updated_at"] is None
    page = client.get(f"/admin/users/{user.id}").get_data(as_text=True)
    assert "0.000000 / 2.000000 per week · 1 at once" in page
    event = db.scalar(select(AdminAuditEvent).where(AdminAuditEvent.action == "limits.set"))
    assert (event.target_type, event.target) == ("api_key", key_id)
    # A refusal re-opens that key's form with the API's message.
    refused = client.post(f"/admin/api-keys/{key_id}/limits", data=limits_form(csrf, requests_per_minute="x"))
    assert refused.status_code == 422 and "requests_per_minute must be an integer" in alert(refused)
    assert f'id="key-{key_id}" open' in refused.get_data(as_text=True)
    assert client.post("/admin/api-keys/nope/limits", data=limits_form(csrf)).status_code == 404


def test_limits_and_webhook_changes_without_the_csrf_token_are_refused(client, admin, user, db):
    signed_in(client, admin)
    for token in (None, "forged"):
        form = limits_form(token or "", spend_amount="1")
        if token is None:
            del form["csrf_token"]
        response = client.post(f"/admin/users/{user.id}/limits", data=form)
        assert response.status_code == 403 and "CSRF" in alert(response)
        hook = {"url": "http://127.0.0.1:9/hook", "events": "wallet.depleted"}
        if token:
            hook["csrf_token"] = token
        assert client.post("/admin/webhooks", data=hook).status_code == 403
    assert api_limits(client, admin, f"users/{user.id}")["updated_at"] is None
    assert client.get("/api/v1/admin/webhooks", headers=admin.headers).get_json() == []
    assert db.scalar(select(AdminAuditEvent).where(AdminAuditEvent.action == "limits.set")) is None


def test_a_webhook_is_registered_with_its_secret_shown_once_listed_and_deleted(client, admin, db):
    csrf = signed_in(client, admin)
    form = {
        "csrf_token": csrf,
        "url": "http://127.0.0.1:9/hook",
        "events": ["wallet.depleted", "wallet.low_balance"],
        "description": "ops pager",
    }
    response = client.post("/admin/webhooks", data=form)
    assert response.status_code == 201
    html = response.get_data(as_text=True)
    secret = re.search(r'id="webhook-secret" type="text" readonly value="([^"]+)"', html).group(1)
    assert secret.startswith("whsec_")
    listed = client.get("/api/v1/admin/webhooks", headers=admin.headers).get_json()
    assert [(h["url"], h["events"], h["description"]) for h in listed] == [
        ("http://127.0.0.1:9/hook", ["wallet.low_balance", "wallet.depleted"], "ops pager")
    ]
    hook_id = listed[0]["id"]
    page = client.get("/admin/webhooks").get_data(as_text=True)
    assert secret not in page and f'data-webhook-id="{hook_id}"' in page and "ops pager" in page
    assert "wallet.low_balance, wallet.depleted" in page
    assert db.scalar(select(AdminAuditEvent.action).where(AdminAuditEvent.action == "webhook.create"))

    # The API's refusals, with its messages.
    refused = client.post("/admin/webhooks", data={**form, "url": "ftp://example.com/x"})
    assert refused.status_code == 422 and "url must use http or https." in alert(refused)
    refused = client.post("/admin/webhooks", data={**form, "events": []})
    assert refused.status_code == 422 and "events" in alert(refused)
    refused = client.post("/admin/webhooks", data={**form, "events": ["wallet.exploded"]})
    assert refused.status_code == 422 and "events" in alert(refused)

    response = client.post(f"/admin/webhooks/{hook_id}/delete", data={"csrf_token": csrf})
    assert response.status_code == 303
    assert client.get("/api/v1/admin/webhooks", headers=admin.headers).get_json() == []
    page = client.get("/admin/webhooks").get_data(as_text=True)
    assert "Webhook deleted" not in page  # the notice rides on the redirect only
    assert "deleted</span>" in page and f'data-webhook-id="{hook_id}"' in page
    assert "Webhook deleted" in client.get(response.headers["Location"]).get_data(as_text=True)
    assert client.post(f"/admin/webhooks/{hook_id}/delete", data={"csrf_token": csrf}).status_code == 404
    assert "no longer listed" in client.get(f"/admin/webhooks/{hook_id}").get_data(as_text=True)
    assert db.scalar(select(AdminAuditEvent.action).where(AdminAuditEvent.action == "webhook.delete"))


def test_deliveries_are_listed_and_one_can_be_sent_again(client, admin, user, db):
    csrf = signed_in(client, admin)
    client.post(
        "/admin/webhooks",
        data={"csrf_token": csrf, "url": "http://127.0.0.1:9/hook", "events": ["wallet.depleted"]},
    )
    hook_id = client.get("/api/v1/admin/webhooks", headers=admin.headers).get_json()[0]["id"]
    # Credit then take it all back: the wallet is depleted, one delivery is written.
    body = {"amount": "1", "reason": "test"}
    client.post(f"/api/v1/admin/users/{user.id}/grants", json=body, headers=admin.headers)
    client.post(
        f"/api/v1/admin/users/{user.id}/adjustments", json={**body, "amount": "-1"}, headers=admin.headers
    )
    api = client.get(f"/api/v1/admin/webhooks/{hook_id}/deliveries", headers=admin.headers).get_json()
    assert len(api) == 1
    delivery = api[0]
    page = client.get(f"/admin/webhooks/{hook_id}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert f'data-delivery-id="{delivery["id"]}"' in html and "wallet.depleted" in html
    assert f">{delivery['status']}</span>" in html and "1 delivery, newest first" in html

    # Say it failed for good (no worker runs here): redeliver puts it back in the queue.
    row = db.get(WebhookDelivery, delivery["id"])
    row.status, row.last_error = "failed", "gave up"
    db.commit()
    assert ">failed</span>" in client.get(f"/admin/webhooks/{hook_id}").get_data(as_text=True)
    response = client.post(
        f"/admin/webhooks/{hook_id}/deliveries/{delivery['id']}/redeliver", data={"csrf_token": csrf}
    )
    assert response.status_code == 303
    assert "Delivery queued" in client.get(response.headers["Location"]).get_data(as_text=True)
    db.expire_all()
    row = db.get(WebhookDelivery, delivery["id"])
    assert row.status == "pending" and row.next_attempt_at is not None
    event = db.scalar(select(AdminAuditEvent).where(AdminAuditEvent.action == "webhook.redeliver"))
    assert (event.actor_id, event.target) == (admin.id, delivery["id"])
    missing = f"/admin/webhooks/{hook_id}/deliveries/00000000-0000-0000-0000-000000000000/redeliver"
    assert client.post(missing, data={"csrf_token": csrf}).status_code == 404
    assert client.get("/admin/webhooks/nope").status_code == 404
