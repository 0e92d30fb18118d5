"""The admin console in a real headless browser (Debian's chromium + chromium-driver, driven
by Selenium) against the app on Postgres + Redis, served over HTTP by a live server.

What an admin does: sign in, toggle enforcement (the JSON API then reports the same state),
grant credit (the balance changes), switch the chart between day/week/month and a zone,
sign out; set a user's spend limit (the JSON API reads it back), register a webhook (its
secret shown once), read its deliveries and send one again. A user key cannot sign in; a
change without the CSRF token is refused. The run saves a screenshot of each page under
var/screenshots/ (docs/admin_console.md shows some).
"""

from __future__ import annotations

import os
import shutil
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import urlsplit

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait
from werkzeug.serving import make_server

from tests.integration.conftest import ROOT
from tests.web.test_usage_api import UsageRecorder

SCREENSHOTS = ROOT / "var" / "screenshots"
DESKTOP = (1200, 900)
PHONE = (390, 844)


@pytest.fixture(scope="module")
def browser():
    chromium = os.environ.get("TEST_CHROMIUM") or shutil.which("chromium")
    driver_path = os.environ.get("TEST_CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not driver_path:
        raise RuntimeError(
            "chromium / chromedriver missing: run tests through `make test` (scripts/test_services.py)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={DESKTOP[0]},{DESKTOP[1]}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture
def live_url(pg_app, browser):
    """The app on Postgres + Redis, served over HTTP on a free loopback port."""
    server = make_server("127.0.0.1", 0, pg_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    browser.set_window_size(*DESKTOP)
    yield f"http://127.0.0.1:{server.server_port}"
    browser.delete_all_cookies()
    server.shutdown()
    thread.join(timeout=10)


def wait_for(browser, css: str, timeout: float = 10):
    return WebDriverWait(browser, timeout).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def shot(browser, name: str) -> None:
    """The whole page, not only the window: the window grows to the page's height for it."""
    width, height = browser.get_window_size()["width"], browser.get_window_size()["height"]
    page_height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(width, max(height, min(page_height + 140, 4000)))
    browser.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    browser.set_window_size(width, height)


def element_shot(browser, css: str, name: str) -> None:
    """One part of the page, with the window grown to the page's height so none of it is cut."""
    width, height = browser.get_window_size()["width"], browser.get_window_size()["height"]
    page_height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(width, max(height, min(page_height + 140, 4000)))
    browser.find_element(By.CSS_SELECTOR, css).screenshot(str(SCREENSHOTS / f"{name}.png"))
    browser.set_window_size(width, height)


def sign_in(browser, base: str, key: str) -> None:
    browser.get(f"{base}/admin/")
    field = wait_for(browser, "#api_key")
    assert urlsplit(browser.current_url).path == "/admin/sign-in"
    field.send_keys(key)
    browser.find_element(By.ID, "sign-in").click()


def chart(browser) -> dict:
    figure = wait_for(browser, "#usage-chart")
    return {name: figure.get_attribute(f"data-{name}") for name in ("bucket", "tz", "split")}


def choose(browser, select_id: str, value: str) -> None:
    """Pick an option; console.js submits the chart's form on change (a new page loads)."""
    old = browser.find_element(By.ID, "usage-chart")
    Select(browser.find_element(By.ID, select_id)).select_by_value(value)
    WebDriverWait(browser, 10).until(expected_conditions.staleness_of(old))


def seed_usage(pg_db, *actors) -> None:
    recorder = UsageRecorder(pg_db)
    now = datetime.now(UTC)
    for days_ago in range(0, 75, 4):
        for index, actor in enumerate(actors):
            model = ("offline-small", "acme/chat-large")[index % 2]
            cost = Decimal(days_ago % 7 + 1 + index) / 10
            recorder.turn(actor.id, model, now - timedelta(days=days_ago, minutes=5), 900, 300, cost)
    pg_db.commit()


def test_an_admin_toggles_enforcement_grants_credit_and_reads_the_charts(
    browser, live_url, pg_client, pg_db, pg_admin, pg_user
):
    seed_usage(pg_db, pg_admin, pg_user)
    sign_in(browser, live_url, pg_admin.key)
    wait_for(browser, "#enforcement-state")
    assert urlsplit(browser.current_url).path == "/admin/"
    # The session cookie is HttpOnly: page scripts cannot read it, and no key is stored.
    assert browser.execute_script("return document.cookie") == ""
    assert pg_admin.key not in browser.execute_script(
        "return JSON.stringify(localStorage) + JSON.stringify(sessionStorage)"
    )
    assert browser.find_element(By.ID, "enforcement-state").text == "Off"
    shot(browser, "overview")

    # Enforcement: force it on, confirm, and the JSON API reports the same state.
    browser.find_element(By.CSS_SELECTOR, "input[name=state][value=on]").click()
    browser.find_element(By.ID, "enforcement-apply").click()
    WebDriverWait(browser, 5).until(expected_conditions.alert_is_present()).accept()
    WebDriverWait(browser, 10).until(
        expected_conditions.text_to_be_present_in_element((By.ID, "enforcement-state"), "On")
    )
    assert "forced on" in browser.find_element(By.ID, "enforcement-source").text
    api = pg_client.get("/api/v1/admin/settings", headers=pg_admin.headers).get_json()["enforcement"]
    assert (api["enabled"], api["source"], api["updated_by"]) == (True, "override", pg_admin.id)
    # Dismissing the confirm changes nothing.
    browser.find_element(By.CSS_SELECTOR, "input[name=state][value=default]").click()
    browser.find_element(By.ID, "enforcement-apply").click()
    WebDriverWait(browser, 5).until(expected_conditions.alert_is_present()).dismiss()
    api = pg_client.get("/api/v1/admin/settings", headers=pg_admin.headers).get_json()["enforcement"]
    assert api["source"] == "override"

    # The chart: day -> week -> month, then a zone and the split by user.
    assert chart(browser) == {"bucket": "day", "tz": "UTC", "split": "model"}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#usage-chart svg rect[fill]")) > 5
    choose(browser, "bucket", "week")
    assert chart(browser)["bucket"] == "week"
    shot(browser, "overview-week")
    choose(browser, "bucket", "month")
    assert chart(browser)["bucket"] == "month"
    choose(browser, "tz", "Asia/Kolkata")
    choose(browser, "split", "user")
    assert chart(browser) == {"bucket": "month", "tz": "Asia/Kolkata", "split": "user"}
    legend = browser.find_element(By.CSS_SELECTOR, "#usage-chart .legend").text
    assert pg_user.user.email in legend and pg_admin.user.email in legend
    assert "Usage (Asia/Kolkata)" in browser.page_source
    shot(browser, "overview-month-kolkata-by-user")

    # Grant credit from the user's page; the balance changes there and in the API.
    browser.find_element(By.LINK_TEXT, "Users").click()
    wait_for(browser, "#users")
    shot(browser, "users")
    browser.find_element(By.LINK_TEXT, pg_user.user.email).click()
    assert wait_for(browser, "#wallet-balance").text == "0.000000"
    browser.find_element(By.ID, "grant-amount").send_keys("25.5")
    browser.find_element(By.ID, "grant-reason").send_keys("pilot credit")
    browser.find_element(By.CSS_SELECTOR, "#grant-form button").click()
    WebDriverWait(browser, 10).until(
        expected_conditions.text_to_be_present_in_element((By.ID, "wallet-balance"), "25.500000")
    )
    assert "Credit granted." in browser.find_element(By.CSS_SELECTOR, ".notice").text
    wallet = pg_client.get("/api/v1/auth/me", headers=pg_user.headers).get_json()["wallet"]
    assert wallet["balance"] == "25.500000"
    shot(browser, "user")
    browser.find_element(By.CSS_SELECTOR, "section[aria-labelledby=wallet-heading]").screenshot(
        str(SCREENSHOTS / "user-wallet.png")
    )

    for page in ("pricing", "audit"):
        browser.get(f"{live_url}/admin/{page}")
        wait_for(browser, "main h1")
        shot(browser, page)
    assert "wallet.grant" in browser.page_source and "enforcement.override.set" in browser.page_source

    # Phone width: the overview still fits (no sideways scrolling of the page itself).
    browser.set_window_size(*PHONE)
    browser.get(f"{live_url}/admin/")
    wait_for(browser, "#usage-chart")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
    shot(browser, "overview-phone")
    browser.set_window_size(*DESKTOP)

    # Every resource the console loaded came from this origin.
    assert_only_this_origin(browser, live_url)

    # Sign out: back at the sign-in page, and the console is closed again.
    browser.find_element(By.ID, "sign-out").click()
    wait_for(browser, "#api_key")
    browser.get(f"{live_url}/admin/users")
    wait_for(browser, "#api_key")
    assert urlsplit(browser.current_url).path == "/admin/sign-in"
    shot(browser, "sign-in")


def test_an_admin_sets_a_spend_limit_and_registers_a_webhook(browser, live_url, pg_client, pg_admin, pg_user):
    sign_in(browser, live_url, pg_admin.key)
    wait_for(browser, "#enforcement-state")
    browser.get(f"{live_url}/admin/users/{pg_user.id}")
    assert wait_for(browser, "#user-spend").text == "no limit"

    # A monthly spend limit in Kolkata time and a rate limit, from the user's page.
    browser.find_element(By.ID, "user-spend-amount").send_keys("40.25")
    Select(browser.find_element(By.ID, "user-spend-period")).select_by_value("month")
    zone = browser.find_element(By.ID, "user-spend-tz")
    zone.clear()
    zone.send_keys("Asia/Kolkata")
    browser.find_element(By.ID, "user-rpm-input").send_keys("30")
    browser.find_element(By.CSS_SELECTOR, "#user-limits-form button[value=save]").click()
    WebDriverWait(browser, 10).until(
        expected_conditions.text_to_be_present_in_element((By.ID, "user-spend"), "40.250000")
    )
    assert "Limits saved" in browser.find_element(By.CSS_SELECTOR, ".notice").text
    spend = browser.find_element(By.ID, "user-spend").text
    assert "0.000000 spent of 40.250000 per month (Asia/Kolkata)" in spend and "18:30:00 UTC" in spend
    got = pg_client.get(f"/api/v1/admin/users/{pg_user.id}/limits", headers=pg_admin.headers).get_json()
    assert (got["spend"]["amount"], got["spend"]["tz"], got["requests_per_minute"]) == (
        "40.250000",
        "Asia/Kolkata",
        30,
    )
    # A bad value is refused with the API's message; what was typed stays in the field.
    rpm = browser.find_element(By.ID, "user-rpm-input")
    rpm.clear()
    rpm.send_keys("0")
    browser.find_element(By.CSS_SELECTOR, "#user-limits-form button[value=save]").click()
    assert "requests_per_minute must be an integer" in wait_for(browser, "[role=alert]").text
    assert browser.find_element(By.ID, "user-rpm-input").get_attribute("value") == "0"
    browser.get(f"{live_url}/admin/users/{pg_user.id}")
    wait_for(browser, "section[aria-labelledby=limits-heading]")
    element_shot(browser, "section[aria-labelledby=limits-heading]", "user-limits")
    shot(browser, "user-with-limits")
    browser.get(f"{live_url}/admin/users")
    assert "0.000000 / 40.250000" in wait_for(browser, "#users").text

    # Webhooks: register one; the secret is on the answer only.
    browser.find_element(By.LINK_TEXT, "Webhooks").click()
    wait_for(browser, "#webhook-form")
    browser.find_element(By.ID, "webhook-url").send_keys("https://hooks.example.com/tollgate")
    browser.find_element(By.CSS_SELECTOR, "input[name=events][value='wallet.low_balance']").click()
    browser.find_element(By.ID, "webhook-description").send_keys("ops pager")
    browser.find_element(By.CSS_SELECTOR, "#webhook-form button").click()
    secret = wait_for(browser, "#webhook-secret").get_attribute("value")
    assert secret.startswith("whsec_")
    shot(browser, "webhook-created")
    hooks = pg_client.get("/api/v1/admin/webhooks", headers=pg_admin.headers).get_json()
    assert [(h["url"], h["events"]) for h in hooks] == [
        ("https://hooks.example.com/tollgate", ["wallet.low_balance"])
    ]
    browser.get(f"{live_url}/admin/webhooks")
    assert secret not in wait_for(browser, "#webhooks").get_attribute("outerHTML")
    shot(browser, "webhooks")

    # A low balance crossing writes a delivery (no worker runs here: it stays pending).
    body = {"amount": "5", "reason": "test"}
    pg_client.post(f"/api/v1/admin/users/{pg_user.id}/grants", json=body, headers=pg_admin.headers)
    pg_client.post(
        f"/api/v1/admin/users/{pg_user.id}/adjustments",
        json={**body, "amount": "-4.5"},
        headers=pg_admin.headers,
    )
    browser.find_element(By.LINK_TEXT, "https://hooks.example.com/tollgate").click()
    row = wait_for(browser, "#deliveries tbody tr[data-delivery-id]")
    assert "wallet.low_balance" in row.text and "pending" in row.text
    row.find_element(By.CSS_SELECTOR, "button").click()
    assert "Delivery queued" in wait_for(browser, ".notice").text
    shot(browser, "webhook-deliveries")
    element_shot(browser, "section[aria-labelledby=deliveries-heading]", "webhook-deliveries-card")

    # Phone width: the new pages fit too.
    browser.set_window_size(*PHONE)
    for path in (f"/admin/users/{pg_user.id}", "/admin/webhooks"):
        browser.get(f"{live_url}{path}")
        wait_for(browser, "main h1")
        assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE[0], path
    shot(browser, "webhooks-phone")
    browser.get(f"{live_url}/admin/users/{pg_user.id}")
    wait_for(browser, "#limits-heading")
    shot(browser, "user-limits-phone")
    browser.set_window_size(*DESKTOP)

    # Delete, confirmed: the API lists it no more; the console marks it deleted.
    browser.get(f"{live_url}/admin/webhooks")
    wait_for(browser, "#webhooks form[data-confirm] button").click()
    WebDriverWait(browser, 5).until(expected_conditions.alert_is_present()).accept()
    assert "Webhook deleted" in wait_for(browser, ".notice").text
    assert "deleted" in browser.find_element(By.ID, "webhooks").text
    assert pg_client.get("/api/v1/admin/webhooks", headers=pg_admin.headers).get_json() == []
    assert_only_this_origin(browser, live_url)


def assert_only_this_origin(browser, base: str) -> None:
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(function (e) { return e.name; })"
    )
    assert all(url.startswith(base + "/") or url.startswith("data:") for url in loaded), loaded


def test_the_api_docs_render_from_the_apps_own_files(browser, live_url):
    browser.get(f"{live_url}/api/docs")
    WebDriverWait(browser, 20).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".swagger-ui .info .title"))
    )
    assert "Tollgate" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
    shot(browser, "api-docs")
    assert_only_this_origin(browser, live_url)


def test_a_user_key_cannot_sign_in(browser, live_url, pg_user):
    sign_in(browser, live_url, pg_user.key)
    message = wait_for(browser, "[role=alert]").text
    assert "not an admin" in message
    assert urlsplit(browser.current_url).path == "/admin/sign-in"
    assert browser.get_cookies() == []
    shot(browser, "sign-in-refused")


def test_a_change_without_the_csrf_token_is_refused(browser, live_url, pg_client, pg_admin):
    sign_in(browser, live_url, pg_admin.key)
    wait_for(browser, "#enforcement-state")
    # A forged form: the same request without the session's hidden token.
    browser.execute_script(
        "var form = document.querySelector('form[data-confirm]');"
        "form.removeAttribute('data-confirm');"
        "form.querySelector('input[name=csrf_token]').remove();"
        "form.querySelector('input[value=on]').checked = true;"
        "form.submit();"
    )
    message = wait_for(browser, "[role=alert]").text
    assert "CSRF" in message
    api = pg_client.get("/api/v1/admin/settings", headers=pg_admin.headers).get_json()["enforcement"]
    assert (api["enabled"], api["source"]) == (False, "default")
    shot(browser, "csrf-refused")
