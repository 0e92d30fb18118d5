"""The admin console's rules over the Flask test client (SQLite): sessions, CSRF, who may
sign in, that its changes are the API's (same rules, same audit), and that nothing it
serves points at another host. The real-browser run is tests/integration/test_admin_console_browser.py."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from types import SimpleNamespace
from urllib.parse import urljoin, urlsplit

import pytest
from sqlalchemy import select

from shared.db import Base
from shared.models import AdminAuditEvent, AdminSession, LedgerEntry
from shared.services import auth
from tests.factories import make_actor
from tests.web.test_usage_api import UsageRecorder
from web.app import create_app
from web.console.views import COOKIE_NAME


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def signed_in(client, actor) -> str:
    """Sign ``actor`` in; the CSRF token of the new session."""
    response = client.post("/admin/sign-in", data={"api_key": actor.key})
    assert response.status_code == 303, response.get_data(as_text=True)
    return csrf_of(client.get("/admin/").get_data(as_text=True))


def cookie_header(response) -> str:
    return next(value for value in response.headers.getlist("Set-Cookie") if value.startswith(COOKIE_NAME))


def enforcement(client, admin) -> dict:
    return client.get("/api/v1/admin/settings", headers=admin.headers).get_json()["enforcement"]


def alert(response) -> str:
    return " ".join(re.findall(r'role="alert">([^<]*)<', response.get_data(as_text=True)))


def test_every_page_sends_a_visitor_without_a_session_to_sign_in(client):
    for path in ("/admin/", "/admin/users", "/admin/pricing", "/admin/webhooks", "/admin/audit"):
        response = client.get(path)
        assert response.status_code == 303
        assert response.headers["Location"].startswith("/admin/sign-in?next=")
    assert client.post("/admin/enforcement", data={"state": "on"}).status_code == 401


def test_an_admin_key_becomes_a_strict_httponly_session_cookie_that_is_not_the_key(client, admin, db):
    response = client.post("/admin/sign-in", data={"api_key": admin.key})
    assert response.status_code == 303 and response.headers["Location"] == "/admin/"
    cookie = cookie_header(response)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
    assert "Secure" not in cookie  # plain HTTP here; see the TLS test below
    assert admin.key not in cookie
    # The server keeps a hash of the cookie's token, never the key or the token itself.
    token = cookie.split(";")[0].split("=", 1)[1]
    row = db.scalar(select(AdminSession))
    assert row.user_id == admin.id and row.token_hash == auth.hash_key(token)
    for path in ("/admin/", "/admin/users", f"/admin/users/{admin.id}", "/admin/pricing", "/admin/audit"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert admin.key not in page.get_data(as_text=True)
    assert db.scalar(select(AdminAuditEvent.action).where(AdminAuditEvent.actor_id == admin.id)) == (
        "console.sign_in"
    )


@pytest.mark.parametrize("kind", ["user key", "unknown key", "revoked admin key", "no key"])
def test_only_a_live_admin_key_can_sign_in(client, db, user, admin, kind):
    key = {"user key": user.key, "unknown key": "tg_" + "x" * 43, "no key": ""}.get(kind)
    if kind == "revoked admin key":
        auth.revoke_api_key(SimpleNamespace(redis=None), db, admin.id, admin.user.api_keys[0].id)
        key = admin.key
    response = client.post("/admin/sign-in", data={"api_key": key})
    assert response.status_code == (403 if kind == "user key" else 401)
    assert "not an admin" in alert(response) if kind == "user key" else "not valid" in alert(response)
    assert not [value for value in response.headers.getlist("Set-Cookie") if value.startswith(COOKIE_NAME)]
    assert client.get("/admin/").status_code == 303


def test_a_change_without_the_sessions_csrf_token_is_refused_and_changes_nothing(client, admin):
    csrf = signed_in(client, admin)
    for token in (None, "", "forged", csrf[:-1]):
        data = {"state": "on"} if token is None else {"state": "on", "csrf_token": token}
        response = client.post("/admin/enforcement", data=data)
        assert response.status_code == 403
        assert "CSRF" in alert(response)
    assert enforcement(client, admin)["enabled"] is False
    # Another admin's session has its own token: one session's token is no good in another.
    other = make_actor_client(client.application, admin)
    assert other.post("/admin/enforcement", data={"state": "on", "csrf_token": csrf}).status_code == 403
    assert client.post("/admin/enforcement", data={"state": "on", "csrf_token": csrf}).status_code == 303
    assert enforcement(client, admin)["enabled"] is True


def make_actor_client(app, admin):
    other = app.test_client()
    signed_in(other, admin)
    return other


def test_sign_out_ends_the_session_on_the_server_too(client, admin, db):
    csrf = signed_in(client, admin)
    token = client.get_cookie(COOKIE_NAME, path="/admin").value
    response = client.post("/admin/sign-out", data={"csrf_token": csrf})
    assert response.status_code == 303 and response.headers["Location"] == "/admin/sign-in"
    assert "Max-Age=0" in cookie_header(response)
    assert db.scalar(select(AdminSession)) is None
    # A copy of the old cookie is worth nothing now.
    client.set_cookie(COOKIE_NAME, token, path="/admin")
    assert client.get("/admin/").status_code == 303


def test_revoking_the_key_or_demoting_the_admin_ends_their_console_sessions(client, admin, db):
    other_admin = make_actor(db, "admin")
    signed_in(client, admin)
    auth.revoke_api_key(SimpleNamespace(redis=None), db, admin.id, admin.user.api_keys[0].id)
    assert client.get("/admin/").status_code == 303
    signed_in(client, other_admin)
    assert client.get("/admin/").status_code == 200
    other_admin.user.role = "user"
    db.commit()
    assert client.get("/admin/").status_code == 303


def test_the_cookie_is_secure_behind_a_tls_terminating_proxy(settings, db):
    app = create_app(settings.replace(trusted_proxies=1))
    Base.metadata.create_all(app.extensions["tollgate"].db.engine)
    admin = make_actor(db, "admin")
    client = app.test_client()
    response = client.post(
        "/admin/sign-in", data={"api_key": admin.key}, headers={"X-Forwarded-Proto": "https"}
    )
    assert "Secure" in cookie_header(response)
    # Without a trusted proxy, the header is not believed.
    plain = create_app(settings).test_client()
    response = plain.post(
        "/admin/sign-in", data={"api_key": admin.key}, headers={"X-Forwarded-Proto": "https"}
    )
    assert "Secure" not in cookie_header(response)
    app.extensions["tollgate"].close()
    plain.application.extensions["tollgate"].close()


def test_pages_forbid_framing_and_other_origins(client, admin):
    signed_in(client, admin)
    response = client.get("/admin/")
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Frame-Options"] == "DENY"


def test_a_grant_obeys_the_apis_rules_and_lands_in_the_ledger_and_audit_log(client, admin, user, db):
    csrf = signed_in(client, admin)
    path = f"/admin/users/{user.id}/grants"
    # The JSON API's own schema decides: an exponent is refused with its message.
    refused = client.post(path, data={"csrf_token": csrf, "amount": "1e3", "reason": ""})
    api = client.post(f"/api/v1/admin/users/{user.id}/grants", json={"amount": "1e3"}, headers=admin.headers)
    assert refused.status_code == api.status_code == 422
    assert api.get_json()["message"].replace('"', "&#34;") in alert(refused)

    form = {"csrf_token": csrf, "amount": "12.5", "reason": "welcome", "idempotency_key": "form-1"}
    assert client.post(path, data=form).status_code == 303
    # The same rendered form sent twice (a double click) credits once.
    assert client.post(path, data=form).status_code == 303
    page = client.get(f"/admin/users/{user.id}").get_data(as_text=True)
    assert 'id="wallet-balance">12.500000<' in page
    entry = db.scalar(select(LedgerEntry).where(LedgerEntry.user_id == user.id))
    assert (entry.kind, entry.amount, entry.initiated_by, entry.reason) == (
        "grant",
        Decimal("12.500000"),
        admin.id,
        "welcome",
    )
    event = db.scalar(select(AdminAuditEvent).where(AdminAuditEvent.action == "wallet.grant"))
    assert (event.actor_id, event.target, event.details["amount"]) == (admin.id, user.id, "12.500000")
    assert "wallet.grant" in client.get("/admin/audit").get_data(as_text=True)


def test_an_adjustment_needs_a_reason_and_may_not_overdraw(client, admin, user):
    csrf = signed_in(client, admin)
    path = f"/admin/users/{user.id}/adjustments"
    response = client.post(path, data={"csrf_token": csrf, "amount": "-1", "reason": ""})
    assert response.status_code == 422 and "reason" in alert(response)
    response = client.post(path, data={"csrf_token": csrf, "amount": "-1", "reason": "refund"})
    assert response.status_code == 409 and "available balance below zero" in alert(response)


def test_keys_are_issued_once_on_screen_and_revoked_through_the_api_service(client, admin, user, db):
    csrf = signed_in(client, admin)
    response = client.post(f"/admin/users/{user.id}/api-keys", data={"csrf_token": csrf, "name": "ci"})
    assert response.status_code == 201
    secret = re.search(
        r'id="issued-key" type="text" readonly value="([^"]+)"', response.get_data(as_text=True)
    )
    assert auth.authenticate(db, secret.group(1)).id == user.id
    key_id = next(key.id for key in auth.list_keys(db, user.id) if key.name == "ci")
    assert secret.group(1) not in client.get(f"/admin/users/{user.id}").get_data(as_text=True)
    response = client.post(f"/admin/api-keys/{key_id}/revoke", data={"csrf_token": csrf})
    assert response.status_code == 303
    assert (
        client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {secret.group(1)}"}).status_code
        == 401
    )
    actions = set(db.scalars(select(AdminAuditEvent.action)))
    assert {"api_key.create", "api_key.revoke"} <= actions


def test_a_price_set_in_the_console_is_the_apis_price(client, admin):
    csrf = signed_in(client, admin)
    form = {"csrf_token": csrf, "model": "acme/chat", "input_per_1k": "0.5", "output_per_1k": "1.25"}
    assert client.post("/admin/pricing", data=form).status_code == 303
    prices = client.get("/api/v1/admin/pricing", headers=admin.headers).get_json()
    assert {"model": "acme/chat", "input_per_1k": "0.500000", "output_per_1k": "1.250000"}.items() <= next(
        price for price in prices if price["model"] == "acme/chat"
    ).items()
    refused = client.post("/admin/pricing", data={**form, "model": "bad model"})
    assert refused.status_code == 422


def test_the_chart_buckets_by_day_week_or_month_in_a_zone_split_by_model_or_user(client, admin, user, db):
    recorder = UsageRecorder(db)
    now = datetime.now(UTC).replace(microsecond=0)
    recorder.turn(user.id, "offline-small", now - timedelta(minutes=5), 1000, 500, Decimal("0.002000"))
    recorder.turn(admin.id, "acme/chat", now - timedelta(days=3), 2000, 100, Decimal("1.000000"))
    db.commit()
    signed_in(client, admin)
    page = client.get("/admin/?bucket=week&tz=Asia/Kolkata&split=user").get_data(as_text=True)
    assert 'data-bucket="week" data-tz="Asia/Kolkata" data-split="user"' in page
    assert user.user.email in page and "1.002000" in page  # the legend names users; the total is exact
    page = client.get("/admin/?bucket=month&split=model").get_data(as_text=True)
    assert "acme/chat" in page and "offline-small" in page and "<rect" in page
    refused = client.get("/admin/?tz=Mars/Olympus")
    assert refused.status_code == 422 and "time zone" in alert(refused)


# -- nothing served points at another host ----------------------------------------------------

URL_ATTRIBUTES = {"src", "href", "action", "formaction", "srcset", "poster", "data", "xlink:href"}
ABSOLUTE = re.compile(r"(?:https?:)?//[\w.-]+", re.IGNORECASE)
CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)|@import\s+['"]([^'"]+)""", re.IGNORECASE)
# Swagger UI's bundle is third-party minified code: it carries URLs as data (XML namespaces,
# JSON-schema ids, RFC links in messages) that a browser never fetches, so it is checked for
# what would load something (dynamic imports, workers, script injection) rather than grepped
# for "https://". The browser test checks what /api/docs really loads.
THIRD_PARTY_JS = {"swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"}
LOADS_FROM_ELSEWHERE = re.compile(
    r"""(?:import\(|importScripts\(|new Worker\(|fetch\(|\.src\s*=)\s*['"`](?:https?:)?//""", re.IGNORECASE
)


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in URL_ATTRIBUTES and value:
                self.urls.extend(part.strip().split(" ")[0] for part in value.split(","))


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    return (not parts.scheme and not parts.netloc) or parts.scheme == "data"


# A receiver's URL is data the webhooks pages show as text (never as a link or a source).
HOOK_URL = "https://hooks.example.com/tollgate"


def test_no_page_or_asset_references_another_host(client, admin, user):
    signed_in(client, admin)
    limits = {"spend": {"amount": "5", "period": "week"}, "max_concurrent_turns": 2}
    client.put(f"/api/v1/admin/users/{user.id}/limits", json=limits, headers=admin.headers)
    hook = client.post(
        "/api/v1/admin/webhooks", json={"url": HOOK_URL, "events": ["wallet.depleted"]}, headers=admin.headers
    ).get_json()
    pages = [
        "/admin/sign-in",
        "/admin/",
        "/admin/?bucket=week&split=user",
        "/admin/users",
        f"/admin/users/{user.id}",
        "/admin/pricing",
        "/admin/webhooks",
        f"/admin/webhooks/{hook['id']}",
        "/admin/audit",
        "/api/docs",
    ]
    assets: set[str] = set()
    for path in pages:
        response = client.get(path)
        assert response.status_code == 200, path
        html = response.get_data(as_text=True)
        # The hook's URL may appear as text (webhooks pages, the audit log's details) ...
        assert HOOK_URL in html or not path.startswith("/admin/webhooks")
        text = html.replace(HOOK_URL, "")
        assert not ABSOLUTE.findall(text), (path, ABSOLUTE.findall(text))
        # ... but never in a URL attribute: the parser reads the page as served.
        parser = Links()
        parser.feed(html)
        assert all(is_local(url) for url in parser.urls), (path, parser.urls)
        assets.update(
            urljoin(path, url) for url in parser.urls if url.endswith((".css", ".js")) and is_local(url)
        )
    assert {
        "/admin/static/console.css",
        "/admin/static/console.js",
        "/api/docs/assets/swagger-ui.css",
    } <= assets
    assert {f"/api/docs/assets/{name}" for name in THIRD_PARTY_JS} <= assets
    for path in sorted(assets):
        response = client.get(path)
        assert response.status_code == 200, path
        text = response.get_data(as_text=True)
        if path.endswith(".css"):
            for match in CSS_URL.finditer(text):
                assert is_local(match.group(1) or match.group(2)), (path, match.group(0))
        elif path.rsplit("/", 1)[-1] in THIRD_PARTY_JS:
            assert not LOADS_FROM_ELSEWHERE.findall(text), path
        else:
            assert not ABSOLUTE.findall(text), (path, ABSOLUTE.findall(text))
    # Swagger UI's validator badge would send the spec's URL to validator.swagger.io.
    assert '"validatorUrl": null' in client.get("/api/docs").get_data(as_text=True)


def test_the_chart_stacks_the_five_largest_series_and_draws_the_rest_as_others():
    from datetime import date

    from shared.services.console import Chart
    from shared.services.usage import GroupBy, UsageBucket, UsageQuery
    from web.console import chart as chart_view

    query = UsageQuery(bucket="week", start=date(2026, 11, 2), end=date(2026, 11, 22), group_by=GroupBy.MODEL)
    buckets = [
        UsageBucket(bucket_start=date(2026, 11, 9), model=f"m{n}", turns=1, cost=Decimal(n) / 1000)
        for n in range(1, 9)
    ]
    view = chart_view.build(
        Chart(query=query, buckets=buckets, labels={f"m{n}": f"m{n}" for n in range(1, 9)})
    )
    assert [series.label for series in view.series] == ["m8", "m7", "m6", "m5", "m4", "3 others"]
    assert view.series[-1].total == Decimal("0.006")  # m1 + m2 + m3, exact
    assert [bar.label for bar in view.bars] == ["11-02", "11-09", "11-16"]  # empty weeks drawn too
    tallest = view.bars[1]
    assert tallest.total == Decimal("0.036") and view.peak == "0.036000"
    assert sum(segment.height for segment in tallest.segments) == pytest.approx(chart_view.PLOT_HEIGHT, abs=6)
    assert view.bars[0].segments == [] and view.total == "0.036000"
