"""Signed webhooks through an outbox (design §8, docs/webhooks.md).

**Outbox.** An event row and one delivery row per subscribed endpoint are written in the
transaction of the change that caused the event (:func:`emit`): a change that rolls back
sends nothing, a change that commits is delivered even if every process dies right after.
Wallet events are found by a ``before_flush`` (and ``before_commit``) hook on the process's
sessionmaker (:func:`install`) that compares each dirty wallet's balance and available
credit with what they were before, and each move ``billing`` made with one ``UPDATE …
RETURNING`` (noted in the session), so every writer — grants, adjustments, holds,
captures, debits, expiries — is covered without a call in each of them, and under the
wallet's row lock:

- ``wallet.low_balance``: the balance goes from ``>= LOW_BALANCE_THRESHOLD`` to below it.
  Once per crossing: a change that stays below is no crossing; a change back above
  re-arms it (the next fall below is a new crossing).
- ``wallet.depleted``: available credit goes from above 0 to 0 or less.

**Delivery.** After the commit the process sends ``tollgate.deliver_webhook`` (queue
``webhooks``) for each new delivery; the beat job ``tollgate.dispatch_webhooks`` re-sends
every pending delivery that is due, so a lost message or a dead worker only delays one.
An attempt claims the row for a minute (``next_attempt_at``), POSTs without holding a
database connection, then records the outcome: 2xx → ``delivered``; anything else →
retried with exponential backoff (``WEBHOOK_RETRY_BASE_SECONDS`` doubling, at most an
hour apart) until ``WEBHOOK_MAX_AGE_SECONDS`` (24 h) after the event, then ``failed``.
At least once: receivers dedupe by ``Tollgate-Event-Id``.

**SSRF.** http(s) URLs only, no credentials in them; the host is resolved at every
attempt and every address it resolves to must be public (no private, loopback,
link-local, multicast, reserved or unspecified address) unless
``WEBHOOK_ALLOW_PRIVATE=true``; the connection goes to the address that was checked (a
second lookup could answer differently); redirects are not followed; short timeouts;
only the first 500 characters of a response are kept.
"""

from __future__ import annotations

import codecs
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import event as sa_event
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from shared.db import MONEY_QUANT, is_uuid, new_id, utcnow
from shared.errors import InvalidInput, NotFound
from shared.models import (
    DeliveryStatus,
    Wallet,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
    WebhookEventType,
)
from shared.pagination import Listing
from shared.services import audit, billing
from shared.task_names import TaskName

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Tollgate-Signature"
EVENT_ID_HEADER = "Tollgate-Event-Id"
MAX_URL_LENGTH = 2048
EXCERPT_CHARS = 500
ATTEMPT_LEASE = timedelta(seconds=60)
MAX_BACKOFF_SECONDS = 3600.0
DISPATCH_BATCH = 500
SESSION_KEY = "tollgate_webhook_deliveries"


# -- signing ----------------------------------------------------------------------------------


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """``t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` (Stripe's scheme)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, tolerance: int = 300, now: float | None = None) -> bool:
    """What a receiver does: recompute the HMAC, compare in constant time, refuse stale ``t``."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


# -- URLs and addresses -----------------------------------------------------------------------


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _invalid_url(message: str, error: str = "invalid_webhook_url") -> InvalidInput:
    return InvalidInput(message, error=error, field="url")


def check_url(url: object, *, allow_private: bool) -> str:
    """A webhook URL as given, if acceptable. Host names are resolved at delivery time.

    :raises InvalidInput: ``invalid_webhook_url`` (not http(s), no host, too long, spaces or
        control characters, a bad port), ``webhook_url_credentials`` (user:pass@),
        ``webhook_url_private`` (a private, loopback or link-local address or ``localhost``).
    """
    if not isinstance(url, str) or not url:
        raise _invalid_url("url must be an http(s) URL.")
    if len(url) > MAX_URL_LENGTH:
        raise _invalid_url(f"url must be at most {MAX_URL_LENGTH} characters.")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise _invalid_url("url must not contain spaces or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise _invalid_url("url is not a valid URL.") from exc
    if parts.scheme not in ("http", "https"):
        raise _invalid_url("url must use http or https.")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise _invalid_url("url must not contain credentials.", "webhook_url_credentials")
    if not host:
        raise _invalid_url("url must name a host.")
    if port == 0:
        raise _invalid_url("url has an invalid port.")
    if not allow_private:
        literal = None
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            pass
        if host == "localhost" or host.endswith(".localhost") or (literal is not None and not _public(host)):
            raise _invalid_url(
                "url points at a private, loopback or link-local address (WEBHOOK_ALLOW_PRIVATE is off).",
                "webhook_url_private",
            )
    return url


# -- endpoints (admin) ------------------------------------------------------------------------


def _events(events: object) -> list[str]:
    known = [member.value for member in WebhookEventType]
    if not isinstance(events, list) or not events or any(e not in known for e in events):
        raise InvalidInput(
            f"events must be a non-empty list of: {', '.join(known)}.", error="invalid_events", field="events"
        )
    return sorted(set(events), key=known.index)


def create_endpoint(
    session: Session,
    *,
    actor_id: str,
    url: str,
    events: list[str],
    description: str | None,
    allow_private: bool,
) -> tuple[WebhookEndpoint, str]:
    """Register a receiver; returns it with its signing secret (shown once). Audited. Commits.

    :raises InvalidInput: see :func:`check_url`; ``invalid_events``.
    """
    url = check_url(url, allow_private=allow_private)
    subscribed = _events(events)
    secret = "whsec_" + secrets.token_urlsafe(32)
    endpoint = WebhookEndpoint(
        id=new_id(),
        url=url,
        events=subscribed,
        description=(description.strip() or None) if description else None,
        secret=secret,
        created_by=actor_id,
        created_at=utcnow(),
    )
    session.add(endpoint)
    audit.record(
        session,
        actor_id,
        "webhook.create",
        target_type="webhook",
        target=endpoint.id,
        details={"url": url, "events": subscribed},
    )
    session.commit()
    return endpoint, secret


def list_endpoints(session: Session) -> Listing:
    return Listing(
        session,
        select(WebhookEndpoint)
        .where(WebhookEndpoint.deleted_at.is_(None))
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id),
    )


def _endpoint(session: Session, endpoint_id: str) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, endpoint_id) if is_uuid(endpoint_id) else None
    if endpoint is None or endpoint.deleted_at is not None:
        raise NotFound("No such webhook.")
    return endpoint


def delete_endpoint(session: Session, *, actor_id: str, endpoint_id: str) -> WebhookEndpoint:
    """Stop sending to a receiver; its pending deliveries end ``failed``. Audited. Commits.

    :raises NotFound: no such (or an already deleted) webhook.
    """
    endpoint = _endpoint(session, endpoint_id)
    now = utcnow()
    endpoint.deleted_at = now
    for delivery in session.scalars(
        select(WebhookDelivery).where(
            WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.status == DeliveryStatus.PENDING
        )
    ):
        delivery.status = DeliveryStatus.FAILED
        delivery.last_error = "webhook deleted"
    audit.record(session, actor_id, "webhook.delete", target_type="webhook", target=endpoint.id)
    session.commit()
    return endpoint


def list_deliveries(session: Session, endpoint_id: str) -> Listing:
    """A webhook's deliveries, newest first. :raises NotFound: no such webhook."""
    endpoint = _endpoint(session, endpoint_id)
    return _DeliveryListing(
        session,
        select(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()),
    )


def present_delivery(session: Session, delivery: WebhookDelivery, event: WebhookEvent | None = None) -> dict:
    event = event or session.get(WebhookEvent, delivery.event_id)
    return {
        "id": delivery.id,
        "endpoint_id": delivery.endpoint_id,
        "event_id": delivery.event_id,
        "event_type": event.type,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": delivery.next_attempt_at if delivery.status == DeliveryStatus.PENDING else None,
        "last_attempt_at": delivery.last_attempt_at,
        "response_status": delivery.response_status,
        "response_excerpt": delivery.response_excerpt,
        "last_error": delivery.last_error,
        "delivered_at": delivery.delivered_at,
        "created_at": delivery.created_at,
    }


class _DeliveryListing(Listing):
    def __getitem__(self, window: slice) -> list:
        page = super().__getitem__(window)
        if not page:
            return []
        events = {
            e.id: e
            for e in self.session.scalars(
                select(WebhookEvent).where(WebhookEvent.id.in_({d.event_id for d in page}))
            )
        }
        return [present_delivery(self.session, d, events[d.event_id]) for d in page]


def redeliver(session: Session, *, actor_id: str, endpoint_id: str, delivery_id: str) -> dict:
    """Send a delivery again now (delivered or failed ones too: same event id, new attempt).
    Audited. Commits; the process sends the task after the commit.

    :raises NotFound: no such webhook or delivery.
    """
    endpoint = _endpoint(session, endpoint_id)
    delivery = session.get(WebhookDelivery, delivery_id) if is_uuid(delivery_id) else None
    if delivery is None or delivery.endpoint_id != endpoint.id:
        raise NotFound("No such delivery.")
    now = utcnow()
    delivery.status = DeliveryStatus.PENDING
    delivery.next_attempt_at = now
    # A fresh 24 h of retries from now.
    delivery.created_at = now
    session.info.setdefault(SESSION_KEY, []).append(delivery.id)
    audit.record(
        session, actor_id, "webhook.redeliver", target_type="webhook_delivery", target=delivery.id, details={}
    )
    session.commit()
    return present_delivery(session, delivery)


# -- emitting (joins the caller's transaction) --------------------------------------------------


def emit(
    session: Session, event_type: str, data: dict, *, now: datetime | None = None
) -> WebhookEvent | None:
    """Write an event and its deliveries in the caller's transaction (the outbox). Does not
    commit. Nothing is written when no live endpoint subscribes to ``event_type``."""
    with session.no_autoflush:
        endpoints = [
            endpoint
            for endpoint in session.scalars(
                select(WebhookEndpoint).where(WebhookEndpoint.deleted_at.is_(None))
            )
            if event_type in (endpoint.events or [])
        ]
    if not endpoints:
        return None
    now = now or utcnow()
    event = WebhookEvent(id=new_id(), type=str(event_type), data=data, created_at=now)
    session.add(event)
    pending = session.info.setdefault(SESSION_KEY, [])
    for endpoint in endpoints:
        delivery = WebhookDelivery(
            id=new_id(),
            event=event,
            endpoint=endpoint,
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        session.add(delivery)
        pending.append(delivery.id)
    log.info("webhook event %s %s for %d endpoint(s)", event.type, event.id, len(endpoints))
    return event


def _money(value: Decimal) -> str:
    return format(Decimal(value).quantize(MONEY_QUANT), "f")


def _before(history, current):
    return history.deleted[0] if history.deleted else current


def _wallet_events(session: Session, threshold: Decimal) -> None:
    """Events for every wallet this session moved since the last check: dirty ORM wallets,
    and the moves ``billing`` made with one ``UPDATE`` (noted in ``session.info``)."""
    for wallet in [obj for obj in session.dirty if isinstance(obj, Wallet)]:
        state = inspect(wallet)
        balance_history, held_history = state.attrs.balance.history, state.attrs.held.history
        if not balance_history.has_changes() and not held_history.has_changes():
            continue
        old_balance = _before(balance_history, wallet.balance)
        old_held = _before(held_history, wallet.held)
        if old_balance is None or old_held is None:
            continue
        _wallet_moved(
            session, threshold, wallet.id, wallet.user_id, old_balance, old_held, wallet.balance, wallet.held
        )
    _noted_wallet_moves(session, threshold)


def _noted_wallet_moves(session: Session, threshold: Decimal) -> None:
    for move in session.info.pop(billing.WALLET_MOVES, ()):
        _wallet_moved(session, threshold, *move)


def _wallet_moved(
    session: Session,
    threshold: Decimal,
    wallet_id: str,
    user_id: str,
    old_balance: Decimal,
    old_held: Decimal,
    balance: Decimal,
    held: Decimal,
) -> None:
    old_available, available = old_balance - old_held, balance - held
    data = {
        "user_id": user_id,
        "wallet_id": wallet_id,
        "balance": _money(balance),
        "available": _money(available),
        "threshold": _money(threshold),
    }
    if old_balance >= threshold > balance:
        emit(session, WebhookEventType.WALLET_LOW_BALANCE, data)
    if old_available > 0 >= available:
        emit(session, WebhookEventType.WALLET_DEPLETED, data)


def install(runtime, database) -> None:
    """Hook the outbox into ``database``'s sessionmaker: wallet events at flush, the delivery
    tasks sent after commit (through ``runtime.send_task``, when the process has one)."""
    maker = database.sessionmaker
    threshold = runtime.settings.low_balance_threshold

    def before_flush(session, _context, _instances) -> None:
        _wallet_events(session, threshold)

    def after_commit(session) -> None:
        delivery_ids = session.info.pop(SESSION_KEY, None)
        sender = getattr(runtime, "send_task", None)
        if not delivery_ids or sender is None:
            return
        for delivery_id in delivery_ids:
            try:
                sender(TaskName.DELIVER_WEBHOOK, args=[delivery_id])
            except Exception:
                # The beat job tollgate.dispatch_webhooks sends it later.
                log.warning("could not enqueue webhook delivery %s", delivery_id, exc_info=True)

    def after_rollback(session) -> None:
        session.info.pop(SESSION_KEY, None)
        session.info.pop(billing.WALLET_MOVES, None)

    sa_event.listen(maker, "before_flush", before_flush)
    # A move noted by billing may be the transaction's last write: checked before the commit.
    sa_event.listen(maker, "before_commit", lambda session: _noted_wallet_moves(session, threshold))
    sa_event.listen(maker, "after_commit", after_commit)
    sa_event.listen(maker, "after_soft_rollback", lambda session, _previous: after_rollback(session))


# -- delivering -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status_code: int | None = None
    excerpt: str | None = None
    error: str | None = None
    # Retrying cannot help (the address is not allowed).
    permanent: bool = False

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def event_body(event: WebhookEvent) -> bytes:
    created = event.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    payload = {"id": event.id, "type": event.type, "created_at": created, "data": event.data}
    return json.dumps(payload, separators=(",", ":")).encode()


def post(url: str, secret: str, event_id: str, body: bytes, settings) -> Outcome:
    """One signed POST to ``url``, to an address checked after resolution. Never raises."""
    import httpx

    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return Outcome(error=f"could not resolve {host[:100]}: {exc}"[:500])
    addresses = [info[4][0] for info in infos]
    if not addresses:
        return Outcome(error=f"could not resolve {host[:100]}")
    if not settings.webhook_allow_private:
        refused = [address for address in addresses if not _public(address)]
        if refused:
            return Outcome(
                error=f"address not allowed: {host[:100]} resolves to {refused[0]}",
                permanent=True,
            )
    address = addresses[0]
    literal = f"[{address}]" if ":" in address else address
    target = urlunsplit(parts._replace(netloc=f"{literal}:{port}"))
    timestamp = int(time.time())
    headers = {
        "Host": parts.netloc,
        "Content-Type": "application/json",
        "User-Agent": "Tollgate-Webhooks/1",
        EVENT_ID_HEADER: event_id,
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    timeout = httpx.Timeout(settings.webhook_timeout_seconds)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            with client.stream(
                "POST", target, content=body, headers=headers, extensions=extensions
            ) as response:
                # Characters, not bytes: a cut inside a multibyte character would keep
                # fewer characters and a replacement character at the end.
                decoder = codecs.getincrementaldecoder("utf-8")("replace")
                received = ""
                for chunk in response.iter_bytes():
                    received += decoder.decode(chunk)
                    if len(received) >= EXCERPT_CHARS:
                        break
                else:
                    received += decoder.decode(b"", final=True)
                excerpt = received[:EXCERPT_CHARS].replace("\x00", "")
                error = None
                if 300 <= response.status_code < 400:
                    error = "redirect not followed"
                elif not 200 <= response.status_code < 300:
                    error = f"HTTP {response.status_code}"
                return Outcome(status_code=response.status_code, excerpt=excerpt, error=error)
    except httpx.HTTPError as exc:
        return Outcome(error=f"{type(exc).__name__}: {exc}"[:500])


def backoff_seconds(base: float, attempt: int) -> float:
    return min(base * (2 ** max(attempt - 1, 0)), MAX_BACKOFF_SECONDS)


def _locked_delivery(session: Session, delivery_id: str) -> WebhookDelivery | None:
    return session.scalar(
        select(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


def attempt_delivery(runtime, delivery_id: str) -> float | None:
    """Make one attempt at a due delivery. Returns the seconds until its next attempt when it
    stays pending, else None (delivered, failed, not due, or another attempt holds it)."""
    settings = runtime.settings
    now = utcnow()
    with runtime.db.session() as session:
        delivery = _locked_delivery(session, delivery_id)
        if delivery is None or delivery.status != DeliveryStatus.PENDING or delivery.next_attempt_at > now:
            session.rollback()
            return None
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
        event = session.get(WebhookEvent, delivery.event_id)
        # Claimed: a copy of this task (or the dispatcher) finds it not due for a minute.
        delivery.attempts += 1
        delivery.last_attempt_at = now
        delivery.next_attempt_at = now + ATTEMPT_LEASE
        url, secret, event_id, body = endpoint.url, endpoint.secret, event.id, event_body(event)
        started, attempt = delivery.created_at, delivery.attempts
        session.commit()
    outcome = post(url, secret, event_id, body, settings)
    now = utcnow()
    with runtime.db.session() as session:
        delivery = _locked_delivery(session, delivery_id)
        if delivery is None or delivery.status != DeliveryStatus.PENDING:
            session.rollback()
            return None
        delivery.response_status = outcome.status_code
        delivery.response_excerpt = outcome.excerpt
        delivery.last_error = outcome.error
        countdown = None
        deadline = started + timedelta(seconds=settings.webhook_max_age_seconds)
        if outcome.delivered:
            delivery.status = DeliveryStatus.DELIVERED
            delivery.delivered_at = now
        elif outcome.permanent or now >= deadline:
            delivery.status = DeliveryStatus.FAILED
        else:
            due = min(
                now + timedelta(seconds=backoff_seconds(settings.webhook_retry_base_seconds, attempt)),
                deadline,
            )
            delivery.next_attempt_at = due
            countdown = max((due - now).total_seconds(), 0.0)
        session.commit()
    log.info("webhook delivery %s attempt %d: %s", delivery_id, attempt, outcome.error or "delivered")
    return countdown


def dispatch_due(runtime, send_task, *, now: datetime | None = None) -> int:
    """Beat job: send a delivery task for every pending delivery that is due (new ones whose
    after-commit send was lost, retries whose countdown task was lost). Returns how many."""
    now = now or utcnow()
    with runtime.db.session() as session:
        due = session.scalars(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.status == DeliveryStatus.PENDING, WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(DISPATCH_BATCH)
        ).all()
        session.commit()
    for delivery_id in due:
        send_task(TaskName.DELIVER_WEBHOOK, args=[delivery_id])
    return len(due)
