"""What the console's overview and users pages show, over the Flask test client (SQLite):
the usage totals for today, this week and this month in the chosen zone (exact at each
boundary), the recent failed turns (newest first, at most ten, with who and why), the
users search (email substring, any case, or exact id; wildcards taken literally) and the
low-balance flag. Labels in a real browser: tests/integration/test_admin_console_labels_browser.py."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from shared.services import console
from tests.factories import make_actor
from tests.web.test_admin_console import signed_in
from tests.web.test_streaming_embedded import new_chat, queued_turn, run
from tests.web.test_usage_api import UsageRecorder

TOTAL = re.compile(
    r'<h3>(Today|This week|This month)</h3>\s*<p class="money">([^<]+)</p>\s*<p class="muted">(\d+) turns'
)
FAILED_ROWS = re.compile(
    r'<tr>\s*<td>[^<]*</td>\s*<td><a href="/admin/users/([^"]+)">([^<]+)</a></td>\s*<td>([^<]+)</td>\s*'
    r"<td><code>([^<]+)</code>"
)


def grant(client, admin, user, amount):
    body = {"amount": amount, "reason": "test"}
    response = client.post(f"/api/v1/admin/users/{user.id}/grants", json=body, headers=admin.headers)
    assert response.status_code == 201, response.get_json()


@pytest.mark.parametrize("tz", ["UTC", "Asia/Kolkata"])
def test_the_overview_totals_count_today_this_week_and_this_month_in_the_zone(client, admin, user, db, tz):
    now = datetime.now(ZoneInfo(tz))
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    week = today - timedelta(days=today.weekday())
    month = today.replace(day=1)
    # One turn at each period's first second and one at the second before it; each cost a
    # different power of two, so every total says exactly which turns it counted.
    moments = [today, today - timedelta(seconds=1), week, week - timedelta(seconds=1), month]
    moments.append(month - timedelta(seconds=1))
    recorder = UsageRecorder(db)
    costs = []
    for index, moment in enumerate(moments):
        cost = Decimal("0.001") * 2**index
        recorder.turn(user.id, "offline-small", moment, 100, 10, cost)
        costs.append((moment, cost))
    db.commit()

    def expected(start):
        counted = [cost for moment, cost in costs if moment >= start]
        return (sum(counted, Decimal(0)), len(counted))

    signed_in(client, admin)
    page = client.get(f"/admin/?tz={tz}").get_data(as_text=True)
    shown = {label: (Decimal(cost), int(turns)) for label, cost, turns in TOTAL.findall(page)}
    assert shown == {"Today": expected(today), "This week": expected(week), "This month": expected(month)}


def test_the_overview_lists_the_ten_latest_failed_turns_with_who_and_why(app, client, admin, user, db):
    signed_in(client, admin)
    assert "No failed turns." in client.get("/admin/").get_data(as_text=True)
    other = make_actor(db, "user", email="other@example.test")
    chats = {actor.id: new_chat(client, actor) for actor in (user, other)}
    failed = []
    for n in range(console.RECENT_FAILURES + 1):
        actor = (user, other)[n % 2]
        turn = queued_turn(client, actor, chats[actor.id], f"number {n} [[offline:fail]]")
        assert run(app, turn["id"]) == "failed"
        failed.append((actor, turn["id"]))
    completed = queued_turn(client, user, chats[user.id], "this one works")
    assert run(app, completed["id"]) == "completed"

    page = client.get("/admin/").get_data(as_text=True)
    section = page.split('id="failures-heading"', 1)[1]
    rows = FAILED_ROWS.findall(section)
    newest_first = failed[::-1][: console.RECENT_FAILURES]
    assert [(user_id, email) for user_id, email, _, _ in rows] == [
        (actor.id, actor.user.email) for actor, _ in newest_first
    ]
    assert {(model, code) for _, _, model, code in rows} == {("offline-small", "provider_rejected")}
    assert section.count("The model provider rejected the request.") == console.RECENT_FAILURES


def test_users_are_found_by_any_case_email_substring_or_exact_id(client, admin, db):
    alice = make_actor(db, "user", email="alice.smith@example.test")
    make_actor(db, "user", email="bob_jones@example.test")
    make_actor(db, "user", email="carol@elsewhere.test")
    signed_in(client, admin)

    def found(query):
        page = client.get("/admin/users", query_string={"q": query}).get_data(as_text=True)
        emails = re.findall(r'<tr data-user-id="[^"]+">\s*<td><a href="[^"]+">([^<]+)</a>', page)
        count = int(re.search(r'<p class="muted">(\d+) users?\.', page).group(1))
        assert count == len(emails)
        return sorted(emails), page

    assert found("SMITH")[0] == ["alice.smith@example.test"]
    assert found("example.test")[0] == [
        admin.user.email,
        "alice.smith@example.test",
        "bob_jones@example.test",
    ]
    assert found(alice.id)[0] == ["alice.smith@example.test"]
    assert found(alice.id[:8])[0] == []  # ids match whole, not as a prefix
    # LIKE's wildcards are plain characters here.
    assert found("b_j")[0] == ["bob_jones@example.test"]
    assert found("%")[0] == [] and found("_")[0] == ["bob_jones@example.test"]
    emails, page = found("nobody")
    assert emails == [] and "No users match." in page
    assert 'value="nobody"' in page  # the search stays in its field
    assert len(found("")[0]) == 4


def test_users_below_the_low_balance_threshold_are_flagged(client, admin, db):
    low = make_actor(db, "user", email="low@example.test")
    at_threshold = make_actor(db, "user", email="exact@example.test")
    rich = make_actor(db, "user", email="rich@example.test")
    grant(client, admin, low, "0.999999")
    grant(client, admin, at_threshold, "1")
    grant(client, admin, rich, "25")
    signed_in(client, admin)
    page = client.get("/admin/users").get_data(as_text=True)
    assert "Low balance: below 1.000000." in page
    flagged = {
        user_id
        for user_id, cells in re.findall(r'<tr data-user-id="([^"]+)">(.*?)</tr>', page, re.DOTALL)
        if '<span class="badge low">low balance</span>' in cells
    }
    assert flagged == {low.id, admin.id}  # the admin's wallet is empty
