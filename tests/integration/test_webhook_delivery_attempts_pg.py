"""Webhook delivery, attempt by attempt, on Postgres against a real HTTP receiver: the
process's own ``attempt_delivery`` and ``dispatch_due`` (what the ``webhooks`` worker and
the beat job call), with the webhook module's clock injected so that a day of retries
takes milliseconds.

- Retries double from ``WEBHOOK_RETRY_BASE_SECONDS``, at most an hour apart, the last one
  at ``WEBHOOK_MAX_AGE_SECONDS`` after the event; then the delivery ends ``failed``, with
  every attempt carrying the same event id. The beat re-sends what is due (a send lost
  after the commit included), and nothing before it is due.
- Only a short excerpt of a response is kept (the first 500 characters); a receiver that
  does not answer within ``WEBHOOK_TIMEOUT_SECONDS`` is a failed attempt, not a hung one.
- The outbox: a change that rolls back leaves no event and sends nothing.
- The receiver in docs/webhooks.md, run as the doc shows it, accepts a real delivery,
  dedupes a redelivery by its event id, and refuses a forged or stale signature.

The same flows through a real Celery worker: tests/integration/test_webhooks_pg.py.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from sqlalchemy import func, select
from werkzeug.serving import make_server

from shared.db import new_id, utcnow
from shared.models import WebhookDelivery, WebhookEvent
from shared.services import billing, webhooks
from tests.integration.conftest import ROOT
from tests.integration.test_enforced_turns_pg import grant
from web.app import create_app

DAY = 24 * 3600


class Clock:
    """The webhook module's ``utcnow``, moved by the test."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self):
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Receiver:
    """A receiver on 127.0.0.1 that answers ``status`` with ``body`` after ``delay`` seconds."""

    def __init__(self) -> None:
        self.status, self.body, self.delay = 200, b"ok", 0.0
        self.event_ids: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.event_ids.append(self.headers.get("Tollgate-Event-Id"))
                time.sleep(receiver.delay)
                self.send_response(receiver.status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.end_headers()
                self.wfile.write(receiver.body)

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def sent():
    """The delivery tasks the web process sends after its commits (none reach a worker)."""
    return []


@pytest.fixture
def hook_app(pg_app, pg_settings, sent):
    """The web app with WEBHOOK_ALLOW_PRIVATE (a local receiver), a short timeout, and its
    after-commit sends recorded instead of queued."""
    app = create_app(pg_settings.replace(webhook_allow_private=True, webhook_timeout_seconds=0.3))
    app.extensions["tollgate"].send_task = lambda name, args: sent.append(args[0])
    yield app
    app.extensions["tollgate"].close()


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(webhooks, "utcnow", clock)
    return clock


def register(client, admin, url, events) -> dict:
    response = client.post(
        "/api/v1/admin/webhooks", json={"url": url, "events": events}, headers=admin.headers
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def toggle_enforcement(client, admin, enabled=True) -> None:
    response = client.patch(
        "/api/v1/admin/settings/enforcement", json={"enabled": enabled}, headers=admin.headers
    )
    assert response.status_code == 200, response.get_json()


def delivery(pg_db, delivery_id) -> WebhookDelivery:
    pg_db.expire_all()
    row = pg_db.get(WebhookDelivery, delivery_id)
    pg_db.commit()
    return row


def due(runtime, now) -> list[str]:
    found = []
    webhooks.dispatch_due(runtime, lambda _name, args: found.append(args[0]), now=now)
    return found


def test_retries_double_up_to_an_hour_apart_until_the_max_age_then_the_delivery_fails(
    hook_app, pg_admin, pg_db, receiver, sent, clock
):
    runtime = hook_app.extensions["tollgate"]
    base, max_age = runtime.settings.webhook_retry_base_seconds, runtime.settings.webhook_max_age_seconds
    assert (base, max_age) == (30, DAY)  # the documented defaults
    client = hook_app.test_client()
    register(client, pg_admin, receiver.url, ["enforcement.changed"])
    receiver.status, receiver.body = 503, b"x" * 5000
    toggle_enforcement(client, pg_admin)
    [delivery_id] = sent  # ... and lost: no worker got it. The beat finds it due.
    assert due(runtime, clock()) == [delivery_id]
    started = clock()

    countdowns = []
    while True:
        countdown = webhooks.attempt_delivery(runtime, delivery_id)
        row = delivery(pg_db, delivery_id)
        if countdown is None:
            break
        countdowns.append(countdown)
        assert row.status == "pending" and row.response_status == 503
        assert row.next_attempt_at == clock() + timedelta(seconds=countdown)
        # Not due before its time: neither the beat nor a copy of the task sends it.
        clock.advance(countdown - 1)
        assert due(runtime, clock()) == []
        assert webhooks.attempt_delivery(runtime, delivery_id) is None
        clock.advance(1)
        assert due(runtime, clock()) == [delivery_id]

    # 30 s doubling, capped at an hour, the last wait cut at the max age: then failed.
    doubling = [30.0 * 2**n for n in range(7)]  # 30 s … 32 min
    assert countdowns[: len(doubling)] == doubling
    hourly = countdowns[len(doubling) : -1]
    assert hourly and set(hourly) == {3600.0}
    assert 0 < countdowns[-1] <= 3600
    assert clock() == started + timedelta(seconds=max_age)
    assert row.status == "failed" and row.attempts == len(countdowns) + 1 == len(receiver.event_ids)
    assert set(receiver.event_ids) == {row.event_id}  # every attempt: the same event
    assert due(runtime, clock() + timedelta(days=7)) == []
    # Only the first 500 characters of the 5,000 the receiver answered were kept.
    assert row.response_excerpt == "x" * 500


def test_a_multibyte_answer_keeps_its_first_500_characters_whole(hook_app, pg_admin, pg_db, receiver, sent):
    runtime = hook_app.extensions["tollgate"]
    client = hook_app.test_client()
    register(client, pg_admin, receiver.url, ["enforcement.changed"])
    receiver.status, receiver.body = 500, ("€" * 1000).encode()
    toggle_enforcement(client, pg_admin)
    webhooks.attempt_delivery(runtime, sent[0])
    assert delivery(pg_db, sent[0]).response_excerpt == "€" * 500


def test_a_receiver_that_does_not_answer_in_time_is_a_failed_attempt(
    hook_app, pg_admin, pg_db, receiver, sent
):
    runtime = hook_app.extensions["tollgate"]
    assert runtime.settings.webhook_timeout_seconds == 0.3
    client = hook_app.test_client()
    register(client, pg_admin, receiver.url, ["enforcement.changed"])
    receiver.delay = 1.0
    toggle_enforcement(client, pg_admin)
    started = time.monotonic()
    countdown = webhooks.attempt_delivery(runtime, sent[0])
    assert time.monotonic() - started < 0.9  # gave up at the timeout, not when the answer came
    assert countdown == runtime.settings.webhook_retry_base_seconds
    row = delivery(pg_db, sent[0])
    assert row.status == "pending" and row.response_status is None
    assert "Timeout" in row.last_error


def test_a_change_that_rolls_back_sends_nothing(hook_app, pg_admin, pg_user, pg_db, receiver, sent):
    runtime = hook_app.extensions["tollgate"]
    client = hook_app.test_client()
    register(client, pg_admin, receiver.url, ["wallet.depleted"])
    grant(client, pg_admin, pg_user.id, "1.5")

    def count(model) -> int:
        pg_db.expire_all()
        value = pg_db.scalar(select(func.count()).select_from(model))
        pg_db.commit()
        return value

    with runtime.db.session() as session:
        # Holding all of it takes available to 0: a wallet.depleted move, noted for the
        # outbox, which writes it in this transaction (its next flush, or its commit) ...
        billing.place_hold(session, user_id=pg_user.id, turn_id=new_id(), amount="1.5", ttl_seconds=60)
        assert len(session.info[billing.WALLET_MOVES]) == 1
        session.rollback()  # ... which does not commit.
        # The next commit in the same session sends nothing of what was rolled back.
        billing.place_hold(session, user_id=pg_user.id, turn_id=new_id(), amount="0.5", ttl_seconds=60)
        session.commit()
    assert (count(WebhookEvent), count(WebhookDelivery), sent) == (0, 0, [])

    # The same kind of change, committed: one event, one delivery, sent after the commit.
    with runtime.db.session() as session:
        billing.place_hold(session, user_id=pg_user.id, turn_id=new_id(), amount="1.0", ttl_seconds=60)
        session.commit()
    assert (count(WebhookEvent), count(WebhookDelivery), len(sent)) == (1, 1, 1)
    assert webhooks.attempt_delivery(runtime, sent[0]) is None
    assert delivery(pg_db, sent[0]).status == "delivered" and len(receiver.event_ids) == 1


# -- the receiver in docs/webhooks.md ------------------------------------------------------------


def doc_receiver_source() -> str:
    """The Python block of docs/webhooks.md §"Verifying the signature", as published."""
    doc = (ROOT / "docs" / "webhooks.md").read_text()
    section = doc.split("## Verifying the signature", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.fixture
def doc_receiver():
    """The doc's receiver app, served over HTTP; its globals (``SECRET``, ``seen``) exposed."""
    namespace: dict = {"__name__": "docs_webhooks_receiver"}
    exec(compile(doc_receiver_source(), "docs/webhooks.md", "exec"), namespace)  # noqa: S102 - our own doc
    server = make_server("127.0.0.1", 0, namespace["app"], threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    namespace["url"] = f"http://127.0.0.1:{server.server_port}/hooks/tollgate"
    yield namespace
    server.shutdown()
    thread.join(5)


def test_the_receiver_in_the_docs_is_ten_lines():
    assert len([line for line in doc_receiver_source().splitlines() if line.strip()]) <= 10


def test_the_receiver_in_the_docs_verifies_real_deliveries_and_dedupes_by_event_id(
    hook_app, pg_admin, pg_db, doc_receiver, sent, capsys
):
    runtime = hook_app.extensions["tollgate"]
    client = hook_app.test_client()
    hook = register(client, pg_admin, doc_receiver["url"], ["enforcement.changed"])
    doc_receiver["SECRET"] = hook["secret"]
    toggle_enforcement(client, pg_admin)
    [delivery_id] = sent
    assert webhooks.attempt_delivery(runtime, delivery_id) is None
    row = delivery(pg_db, delivery_id)
    assert row.status == "delivered" and row.response_status == 204
    assert doc_receiver["seen"] == {row.event_id}

    # A redelivery (same event id) is accepted again, and handled once.
    redeliver = f"/api/v1/admin/webhooks/{hook['id']}/deliveries/{delivery_id}/redeliver"
    assert client.post(redeliver, headers=pg_admin.headers).status_code == 200
    assert webhooks.attempt_delivery(runtime, delivery_id) is None
    assert delivery(pg_db, delivery_id).response_status == 204 and delivery(pg_db, delivery_id).attempts == 2
    assert capsys.readouterr().out.splitlines().count("enforcement.changed") == 1

    # What it refuses: another secret's signature, a changed body, a stale timestamp.
    body = b'{"id":"e1","type":"enforcement.changed","created_at":"2026-12-02T00:00:00Z","data":{}}'
    now = int(time.time())

    def send(signature: str, content: bytes = body) -> int:
        headers = {
            "Tollgate-Signature": signature,
            "Tollgate-Event-Id": "e1",
            "Content-Type": "application/json",
        }
        return httpx.post(doc_receiver["url"], content=content, headers=headers, timeout=5).status_code

    assert send(webhooks.signature("whsec_someone-else", now, body)) == 400
    assert send(webhooks.signature(hook["secret"], now, body), body.replace(b"e1", b"e2")) == 400
    assert send(webhooks.signature(hook["secret"], now - 301, body)) == 400
    stale_mac = hmac.new(hook["secret"].encode(), f"{now - 301}.".encode() + body, hashlib.sha256).hexdigest()
    assert webhooks.signature(hook["secret"], now - 301, body) == f"t={now - 301},v1={stale_mac}"
    assert send(webhooks.signature(hook["secret"], now, body)) == 204
    assert doc_receiver["seen"] == {row.event_id, "e1"}
