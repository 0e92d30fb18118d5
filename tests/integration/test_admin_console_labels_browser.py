"""The admin console's "accessible labels" (issue 17), checked the way assistive technology
reads them: headless Chromium computes each form control's accessible name (WebDriver's
"Get Computed Label"), and every visible field, select, checkbox, radio and button on
every page has one. Also what an admin does with the users search: type, submit, see
only the users who match.

Browser setup and helpers: tests/integration/test_admin_console_browser.py.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.factories import make_actor
from tests.integration.test_admin_console_browser import (  # noqa: F401 - fixtures
    browser,
    live_url,
    sign_in,
    wait_for,
)

CONTROLS = "input:not([type=hidden]), select, textarea, button"


def unlabelled(driver) -> list[str]:
    """The visible form controls of the page without an accessible name."""
    return [
        element.get_attribute("outerHTML")[:200]
        for element in driver.find_elements(By.CSS_SELECTOR, CONTROLS)
        if element.is_displayed() and not element.accessible_name.strip()
    ]


def test_every_form_control_on_every_page_has_an_accessible_name(
    browser,  # noqa: F811
    live_url,  # noqa: F811
    pg_client,
    pg_admin,
    pg_user,
):
    # Give every page its forms: a webhook with a delivery, a user with a key and a ledger.
    hook = pg_client.post(
        "/api/v1/admin/webhooks",
        json={"url": "https://hooks.example.com/tollgate", "events": ["wallet.low_balance"]},
        headers=pg_admin.headers,
    ).get_json()
    for amount in ("5", "-4.5"):
        kind = "grants" if amount == "5" else "adjustments"
        body = {"amount": amount, "reason": "labels"}
        response = pg_client.post(
            f"/api/v1/admin/users/{pg_user.id}/{kind}", json=body, headers=pg_admin.headers
        )
        assert response.status_code == 201, response.get_json()

    browser.get(f"{live_url}/admin/sign-in")
    wait_for(browser, "#api_key")
    checked = {"/admin/sign-in": len(browser.find_elements(By.CSS_SELECTOR, CONTROLS))}
    missing = {"/admin/sign-in": unlabelled(browser)}
    sign_in(browser, live_url, pg_admin.key)
    wait_for(browser, "#enforcement-state")
    for path in (
        "/admin/",
        "/admin/users",
        f"/admin/users/{pg_user.id}",
        "/admin/pricing",
        "/admin/webhooks",
        f"/admin/webhooks/{hook['id']}",
        "/admin/audit",
    ):
        browser.get(f"{live_url}{path}")
        wait_for(browser, "main h1")
        assert urlsplit(browser.current_url).path == path
        checked[path] = len(browser.find_elements(By.CSS_SELECTOR, CONTROLS))
        missing[path] = unlabelled(browser)
    assert {path: found for path, found in missing.items() if found} == {}
    # The check saw the forms: the user page alone has the grant, adjustment, key and limits forms.
    assert checked[f"/admin/users/{pg_user.id}"] >= 10 and checked["/admin/"] >= 5
    assert all(count > 0 for count in checked.values()), checked


def test_an_admin_finds_a_user_with_the_search_field(
    browser,  # noqa: F811
    live_url,  # noqa: F811
    pg_db,
    pg_admin,
):
    make_actor(pg_db, "user", email="dana.search@example.test")
    make_actor(pg_db, "user", email="erik@example.test")
    sign_in(browser, live_url, pg_admin.key)
    wait_for(browser, "#enforcement-state")
    browser.find_element(By.LINK_TEXT, "Users").click()
    field = wait_for(browser, "#q")
    assert field.accessible_name == "Search by email or id"
    old_table = browser.find_element(By.ID, "users")
    field.send_keys("DANA", Keys.ENTER)
    WebDriverWait(browser, 10).until(expected_conditions.staleness_of(old_table))
    rows = browser.find_elements(By.CSS_SELECTOR, "#users tbody tr[data-user-id]")
    assert [row.find_element(By.CSS_SELECTOR, "td a").text for row in rows] == ["dana.search@example.test"]
    assert urlsplit(browser.current_url).query == "q=DANA"
    assert browser.find_element(By.ID, "q").get_attribute("value") == "DANA"
