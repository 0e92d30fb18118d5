"""Webhooks end to end: a real HTTP receiver verifying signatures, a real Celery worker on
queue ``webhooks`` (the Procfile's gevent pool), events written by the web process and by
the turn worker, retries while the receiver is down, SSRF refusals."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared.services import webhooks
from shared.task_names import TaskName
from tests.integration.conftest import WorkerProcess
from tests.integration.test_enforced_turns_pg import grant, new_chat
from tests.integration.test_turns_pg import post_turn
from web.app import create_app
from worker.celery_app import create_celery_app


class Receiver:
    """A webhook receiver on 127.0.0.1 that checks each signature as a user's would."""

    def __init__(self) -> None:
        self.secret = ""
        self.status = 200
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                header = self.headers.get("Tollgate-Signature", "")
                parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
                expected = hmac.new(
                    receiver.secret.encode(), f"{parts.get('t')}.".encode() + body, hashlib.sha256
                ).hexdigest()
                receiver.requests.append(
                    {
                        "event_id": self.headers.get("Tollgate-Event-Id"),
                        "verified": hmac.compare_digest(expected, parts.get("v1", "")),
                        "fresh": abs(time.time() - int(parts.get("t", 0))) < 300,
                        "body": json.loads(body),
                        "answered": receiver.status,
                    }
                )
                self.send_response(receiver.status)
                self.end_headers()
                self.wfile.write(b"ok" if receiver.status == 200 else b"down for maintenance")

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/tollgate"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of_type(self, event_type: str, answered: int | None = 200) -> list[dict]:
        return [
            r
            for r in self.requests
            if r["body"]["type"] == event_type and (answered is None or r["answered"] == answered)
        ]

    def wait_for(self, event_type: str, count: int, timeout: float = 20.0, answered: int | None = 200):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.of_type(event_type, answered)) >= count:
                return self.of_type(event_type, answered)
            time.sleep(0.05)
        raise AssertionError(f"{count} x {event_type} not received: {self.requests}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class WebhookWorker(WorkerProcess):
    def wait_ready(self, timeout: float) -> None:
        celery_app = create_celery_app(self.settings, role="test")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early; see {self.log_path}")
            try:
                ping = celery_app.send_task(TaskName.PING, queue="webhooks", ignore_result=False)
                if ping.get(timeout=2) == "pong":
                    return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(f"webhook worker did not answer ping in {timeout}s; see {self.log_path}")


@pytest.fixture(scope="module")
def webhook_worker(pg_settings, tmp_path_factory):
    worker = WebhookWorker(
        pg_settings,
        tmp_path_factory.mktemp("webhooks") / "worker.log",
        20,
        pool="gevent",
        queues="webhooks",
        WEBHOOK_ALLOW_PRIVATE="true",
        WEBHOOK_RETRY_BASE_SECONDS="0.5",
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def hook_app(pg_app, pg_settings):
    """The web app with WEBHOOK_ALLOW_PRIVATE=true, so a local receiver can be registered."""
    app = create_app(pg_settings.replace(webhook_allow_private=True))
    yield app
    app.extensions["tollgate"].close()


def register(client, admin, receiver, events):
    response = client.post(
        "/api/v1/admin/webhooks",
        json={"url": receiver.url, "events": events, "description": "test receiver"},
        headers=admin.headers,
    )
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["secret"].startswith("whsec_")
    receiver.secret = body["secret"]
    return body


def adjust(client, admin, user_id, amount):
    response = client.post(
        f"/api/v1/admin/users/{user_id}/adjustments",
        json={"amount": amount, "reason": "test"},
        headers=admin.headers,
    )
    assert response.status_code == 201, response.get_json()


def balance(client, user) -> Decimal:
    return Decimal(client.get("/api/v1/wallet", headers=user.headers).get_json()["balance"])


def test_low_balance_is_sent_once_per_crossing_signed_and_rearmed_by_a_grant(
    hook_app, pg_admin, pg_user, receiver, webhook_worker, live_worker
):
    client = hook_app.test_client()
    hook = register(client, pg_admin, receiver, ["wallet.low_balance", "wallet.depleted"])
    # Just at the threshold (1.00 is not low); a turn's charge takes it below: the event is
    # written by the turn worker, in the transaction of the charge.
    grant(client, pg_admin, pg_user.id, "1.000001")
    chat = new_chat(client, pg_user)
    assert post_turn(client, pg_user, chat, "first question").status_code == 201
    [first] = receiver.wait_for("wallet.low_balance", 1)
    data = first["body"]["data"]
    assert data["user_id"] == pg_user.id and data["threshold"] == "1.000000"
    assert Decimal(data["balance"]) < 1 and "available" in data
    # Another turn that stays below sends nothing.
    assert post_turn(client, pg_user, chat, "second question").status_code == 201
    # A grant back above re-arms; the next fall below is a new crossing.
    grant(client, pg_admin, pg_user.id, "2")
    adjust(client, pg_admin, pg_user.id, "-2.5")
    second = receiver.wait_for("wallet.low_balance", 2)[1]
    assert second["event_id"] != first["event_id"]
    # Down to zero available: wallet.depleted.
    adjust(client, pg_admin, pg_user.id, f"-{balance(client, pg_user)}")
    [depleted] = receiver.wait_for("wallet.depleted", 1)
    assert depleted["body"]["data"]["available"] == "0.000000"
    time.sleep(1.5)  # nothing else arrives late
    assert len(receiver.of_type("wallet.low_balance")) == 2
    assert all(r["verified"] and r["fresh"] for r in receiver.requests)
    for request in receiver.requests:
        body = request["body"]
        assert set(body) == {"id", "type", "created_at", "data"} and body["id"] == request["event_id"]
    deliveries = client.get(f"/api/v1/admin/webhooks/{hook['id']}/deliveries", headers=pg_admin.headers)
    assert [d["status"] for d in deliveries.get_json()] == ["delivered"] * 3


def recorded_delivery(client, admin, hook_id: str, timeout: float = 10.0) -> dict:
    """The hook's one delivery once the worker recorded its last answer: the receiver has the
    request before the worker commits what it answered."""
    deadline = time.monotonic() + timeout
    while True:
        [delivery] = client.get(
            f"/api/v1/admin/webhooks/{hook_id}/deliveries", headers=admin.headers
        ).get_json()
        if delivery["status"] != "pending" or time.monotonic() > deadline:
            return delivery
        time.sleep(0.05)


def test_a_receiver_down_for_a_while_gets_the_same_event_when_it_is_back(
    hook_app, pg_admin, receiver, webhook_worker
):
    client = hook_app.test_client()
    hook = register(client, pg_admin, receiver, ["enforcement.changed"])
    receiver.status = 503
    response = client.patch(
        "/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers
    )
    assert response.status_code == 200
    receiver.wait_for("enforcement.changed", 3, answered=503)  # retried with backoff
    receiver.status = 200
    [delivered] = receiver.wait_for("enforcement.changed", 1)
    attempts = receiver.of_type("enforcement.changed", answered=None)
    assert len({a["event_id"] for a in attempts}) == 1 and delivered["body"]["data"]["enabled"] is True
    assert all(a["verified"] for a in attempts)
    delivery = recorded_delivery(client, pg_admin, hook["id"])
    assert delivery["status"] == "delivered" and delivery["attempts"] == len(attempts) >= 4
    assert delivery["response_status"] == 200 and delivery["response_excerpt"] == "ok"
    # Redeliver: the same event id again.
    again = client.post(
        f"/api/v1/admin/webhooks/{hook['id']}/deliveries/{delivery['id']}/redeliver", headers=pg_admin.headers
    )
    assert again.status_code == 200
    receiver.wait_for("enforcement.changed", 2)
    assert len({a["event_id"] for a in receiver.of_type("enforcement.changed", answered=None)}) == 1


def test_spend_limit_reached_is_sent_once_per_period(hook_app, pg_admin, pg_user, receiver, webhook_worker):
    client = hook_app.test_client()
    register(client, pg_admin, receiver, ["spend_limit.reached"])
    client.put(
        f"/api/v1/admin/users/{pg_user.id}/limits",
        json={"spend": {"amount": "0", "period": "week", "tz": "Europe/Berlin"}},
        headers=pg_admin.headers,
    )
    chat = new_chat(client, pg_user)
    for _ in range(3):
        assert post_turn(client, pg_user, chat, "q", headers={"Prefer": "respond-async"}).status_code == 402
    [event] = receiver.wait_for("spend_limit.reached", 1)
    data = event["body"]["data"]
    assert data["user_id"] == pg_user.id and data["limit_source"] == "user" and data["limit"] == "0.000000"
    time.sleep(1.0)
    assert len(receiver.of_type("spend_limit.reached")) == 1


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://127.0.0.1:8080/hook", "webhook_url_private"),
        ("http://localhost/hook", "webhook_url_private"),
        ("http://[::1]/hook", "webhook_url_private"),
        ("http://10.1.2.3/hook", "webhook_url_private"),
        ("http://169.254.169.254/latest/meta-data", "webhook_url_private"),
        ("http://[::ffff:192.168.0.1]/", "webhook_url_private"),
        ("ftp://example.com/hook", "invalid_webhook_url"),
        ("javascript:alert(1)", "invalid_webhook_url"),
        ("file:///etc/passwd", "invalid_webhook_url"),
        ("https://user:secret@example.com/hook", "webhook_url_credentials"),
        ("https://example.com/" + "a" * 2100, "invalid_webhook_url"),
        ("https://exa mple.com/", "invalid_webhook_url"),
        ("https:///nohost", "invalid_webhook_url"),
    ],
)
def test_hostile_webhook_urls_are_refused_by_default(pg_client, pg_admin, url, code):
    response = pg_client.post(
        "/api/v1/admin/webhooks", json={"url": url, "events": ["wallet.depleted"]}, headers=pg_admin.headers
    )
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"] == code


@pytest.mark.parametrize("address", ["10.0.0.5", "127.0.0.1", "169.254.169.254", "::1", "fe80::1"])
def test_a_name_that_resolves_to_a_private_address_is_refused_at_delivery(pg_settings, monkeypatch, address):
    # A public-looking name passes the URL check; its DNS answer (here: rebinding to a
    # private address) is checked at delivery time, and nothing is sent.
    url = "https://hooks.example.com/tollgate"
    webhooks.check_url(url, allow_private=False)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda *args, **kwargs: [(family, socket.SOCK_STREAM, 6, "", (address, 443))]
    )
    outcome = webhooks.post(url, "whsec_x", str(uuid.uuid4()), b"{}", pg_settings)
    assert outcome.permanent and not outcome.delivered and "not allowed" in outcome.error
    assert outcome.status_code is None


def test_redirects_are_not_followed(pg_settings):
    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.send_response(307)
            self.send_header("Location", "http://169.254.169.254/")
            self.end_headers()

        def log_message(self, *_args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = pg_settings.replace(webhook_allow_private=True)
        outcome = webhooks.post(
            f"http://127.0.0.1:{server.server_address[1]}/", "whsec_x", "e", b"{}", settings
        )
        assert (
            outcome.status_code == 307 and not outcome.delivered and outcome.error == "redirect not followed"
        )
    finally:
        server.shutdown()
        server.server_close()


def test_signature_matches_stripes_scheme():
    body = b'{"id":"e"}'
    header = webhooks.signature("whsec_test", 1700000000, body)
    expected = hmac.new(b"whsec_test", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert webhooks.verify("whsec_test", header, body, now=1700000010)
    assert not webhooks.verify("whsec_test", header, body + b" ", now=1700000010)
    assert not webhooks.verify("whsec_test", header, body, now=1700009999)  # stale
