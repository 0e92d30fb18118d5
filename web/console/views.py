"""The console's routes; what the console is and its rules: the package docstring (``web/console``)."""

from __future__ import annotations

import re
import uuid

from flask import Blueprint, abort, g, redirect, render_template, request, url_for
from marshmallow import Schema, ValidationError
from werkzeug.wrappers import Response

from shared.errors import DomainError, Forbidden, InvalidInput, NotFound, Unauthorized
from shared.models import LimitSubject
from shared.pagination import Listing
from shared.services import (
    admin_sessions,
    audit,
    auth,
    billing,
    console,
    enforcement,
    limits,
    pricing,
    wallets,
    webhooks,
)
from web.console import chart as chart_view
from web.context import db, runtime
from web.schemas.billing import (
    AdjustmentCreateSchema,
    GrantCreateSchema,
    PriceUpdateSchema,
    checked_model_name,
)
from web.schemas.common import zone_named
from web.schemas.limits import LimitsUpdateSchema
from web.schemas.users import ApiKeyCreateSchema
from web.schemas.webhooks import EVENT_TYPES, WebhookCreateSchema

COOKIE_NAME = "tollgate_console"
COOKIE_PATH = "/admin"
PUBLIC_ENDPOINTS = {"console.sign_in", "console.static"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

blp = Blueprint(
    "console",
    __name__,
    url_prefix="/admin",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)


def console_session() -> admin_sessions.ConsoleSession:
    return g.console_session


def render(template: str, status: int = 200, **context) -> tuple[str, int]:
    return render_template(f"console/{template}", **context), status


def form_value(name: str) -> str:
    return request.form.get(name, "")


def new_form_key() -> str:
    """An Idempotency-Key for a form: resubmitting the same rendered form changes nothing twice."""
    return str(uuid.uuid4())


@blp.before_request
def require_session() -> Response | None:
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    try:
        g.console_session = admin_sessions.resume(db(), request.cookies.get(COOKIE_NAME))
    except Unauthorized:
        db().rollback()
        if request.method == "GET":
            return redirect(url_for("console.sign_in", next=request.full_path.rstrip("?")), code=303)
        abort(401)
    if request.method == "POST" and not admin_sessions.csrf_matches(
        g.console_session, request.form.get("csrf_token")
    ):
        abort(403)
    return None


@blp.after_request
def secure_headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    if request.endpoint != "console.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@blp.context_processor
def console_context() -> dict:
    return {
        "console_user": getattr(g.get("console_session"), "user", None),
        "csrf_token": getattr(g.get("console_session"), "csrf_token", ""),
        "money": billing.money_str,
    }


@blp.app_template_filter("when")
def when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


@blp.errorhandler(DomainError)
def domain_error(exc: DomainError):
    return render("error.html", exc.status_code, title=exc.error, message=exc.message)


@blp.errorhandler(401)
@blp.errorhandler(403)
def refused(exc):
    message = {
        401: "Your console session has ended. Sign in again.",
        403: "This change was refused: the form's CSRF token is missing or does not match your session. "
        "Reload the page and try again.",
    }[exc.code]
    return render("error.html", exc.code, title=exc.name, message=message)


def sign_in_view() -> Response | tuple[str, int]:
    if request.method == "GET":
        return render("sign_in.html", next=request.args.get("next", ""))
    try:
        opened = admin_sessions.sign_in(db(), form_value("api_key"))
    except (Unauthorized, Forbidden) as exc:
        message = (
            "That key belongs to a user who is not an admin."
            if isinstance(exc, Forbidden)
            else "That API key is not valid (unknown or revoked)."
        )
        return render("sign_in.html", exc.status_code, error=message, next=form_value("next"))
    target = form_value("next")
    if not target.startswith(COOKIE_PATH + "/") or target.startswith("//"):
        target = url_for("console.overview")
    response = redirect(target, code=303)
    response.set_cookie(
        COOKIE_NAME,
        opened.token,
        max_age=int(admin_sessions.SESSION_LIFETIME.total_seconds()),
        path=COOKIE_PATH,
        secure=request.is_secure,
        httponly=True,
        samesite="Strict",
    )
    return response


def sign_out_view() -> Response:
    admin_sessions.sign_out(db(), request.cookies.get(COOKIE_NAME))
    response = redirect(url_for("console.sign_in"), code=303)
    response.delete_cookie(
        COOKIE_NAME, path=COOKIE_PATH, secure=request.is_secure, httponly=True, samesite="Strict"
    )
    return response


blp.add_url_rule("/sign-in", "sign_in", sign_in_view, methods=["GET", "POST"])
blp.add_url_rule("/sign-out", "sign_out", sign_out_view, methods=["POST"])


# -- pages ---------------------------------------------------------------------------------

PAGE_SIZE = 25
LEDGER_ROWS = 50
AUDIT_PAGE_SIZE = 50
NOTICES = {
    "enforcement": "Enforcement updated for every process.",
    "granted": "Credit granted.",
    "adjusted": "Balance adjusted.",
    "revoked": "API key revoked.",
    "priced": "Price set; it applies to turns from now on.",
    "limits": "Limits saved; they apply to the next request.",
    "key_limits": "Key limits saved; they apply to the next request.",
    "webhook_deleted": "Webhook deleted; its pending deliveries ended failed.",
    "redelivered": "Delivery queued to be sent again now.",
}
WEBHOOK_PAGE_SIZE = 50
DELIVERY_PAGE_SIZE = 50
SPEND_PERIODS = ("day", "week", "month")
WHOLE_NUMBER = re.compile(r"[0-9]{1,18}")
# The zone picker's choices; the browser's own zone is added by console.js.
ZONES = (
    "UTC",
    "Europe/London",
    "Europe/Berlin",
    "America/New_York",
    "America/Chicago",
    "America/Los_Angeles",
    "America/Sao_Paulo",
    "Africa/Nairobi",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Asia/Shanghai",
    "Asia/Tokyo",
    "Australia/Sydney",
    "Pacific/Auckland",
)


def load_form(schema: Schema, *names: str) -> dict:
    """The form's fields through the JSON API's own schema, so a form obeys the body's rules.

    :raises DomainError: a field's own error code (``invalid_amount`` …).
    :raises ValidationError: any other field error.
    """
    return schema.load({name: form_value(name).strip() for name in names})


def problem(exc: DomainError | ValidationError) -> tuple[str, int]:
    """What to tell the admin about a refused change, and the status the page answers with."""
    db().rollback()
    if isinstance(exc, ValidationError):
        fields = exc.normalized_messages()
        return "; ".join(f"{name}: {' '.join(map(str, messages))}" for name, messages in fields.items()), 422
    return exc.message, exc.status_code


def page_number() -> int:
    raw = request.args.get("page", "1")
    return max(int(raw), 1) if raw.isdigit() and len(raw) < 10 else 1


def threshold():
    return runtime().settings.low_balance_threshold


def done(endpoint: str, notice: str, **values) -> Response:
    return redirect(url_for(endpoint, notice=notice, **values), code=303)


@blp.get("/")
def overview():
    """Enforcement, usage totals and chart, recent failures."""
    bucket = request.args.get("bucket", "day")
    split = request.args.get("split", "model")
    error, status = None, 200
    try:
        zone = zone_named(request.args.get("tz", "UTC"))
        chart = console.usage_chart(db(), bucket=bucket, zone=zone, split=split)
    except InvalidInput as exc:
        error, status = problem(exc)
        chart = console.usage_chart(db(), bucket="day", zone=zone_named("UTC"), split="model")
    state = enforcement.current_state(runtime())
    return render(
        "overview.html",
        status,
        error=error,
        notice=NOTICES.get(request.args.get("notice", "")),
        state=state,
        set_by=console.emails(db(), [state.updated_by]).get(state.updated_by, state.updated_by),
        totals=console.period_totals(db(), chart.query.zone),
        chart=chart,
        view=chart_view.build(chart),
        zones=ZONES if chart.query.tz in ZONES else (*ZONES, chart.query.tz),
        failures=console.recent_failures(db()),
    )


@blp.post("/enforcement")
def set_enforcement():
    """Force enforcement on or off, or go back to the default, for every process."""
    actor_id = console_session().user.id
    choice = form_value("state")
    if choice in ("on", "off"):
        enforcement.set_override(db(), runtime(), actor_id=actor_id, enabled=choice == "on")
    elif choice == "default":
        enforcement.clear_override(db(), runtime(), actor_id=actor_id)
    else:
        raise InvalidInput("state must be on, off or default.", error="invalid_state")
    return done("console.overview", "enforcement")


@blp.get("/users")
def users():
    """Users with their wallets, searchable by email or id."""
    search = request.args.get("q", "")
    listing = console.search_users(db(), search)
    number = page_number()
    found = len(listing)
    shown = listing[(number - 1) * PAGE_SIZE : number * PAGE_SIZE]
    return render(
        "users.html",
        search=search,
        rows=console.user_rows(shown, threshold()),
        spend=console.spend_usage(db(), [user.id for user in shown], runtime().clock()),
        found=found,
        page=number,
        pages=max(-(-found // PAGE_SIZE), 1),
        threshold=threshold(),
    )


def render_user(
    user_id: str,
    status: int = 200,
    *,
    error: str | None = None,
    issued=None,
    limits_form: str | None = None,
):
    """The user page; after a refused limits form, ``limits_form`` names it (``user`` or a key id)
    so that form, and only it, is drawn with what was typed."""
    user = console.get_user(db(), user_id)
    keys = auth.list_keys(db(), user_id)
    now = runtime().clock()
    user_limits = limits.get_limits(db(), LimitSubject.USER, user_id, now=now)
    key_limits = {
        key.id: limits.get_limits(db(), LimitSubject.API_KEY, key.id, now=now)
        for key in keys
        if not key.revoked_at
    }
    setters = [view["updated_by"] for view in (user_limits, *key_limits.values())]
    return render(
        "user.html",
        status,
        user=user,
        wallet=wallets.wallet_summary(db(), user_id, threshold()),
        keys=keys,
        user_limits=user_limits,
        key_limits=key_limits,
        actors=console.emails(db(), setters),
        limits_form=limits_form,
        periods=SPEND_PERIODS,
        zones=ZONES,
        ledger=billing.list_ledger(db(), user_id)[0:LEDGER_ROWS],
        turns=console.user_turns(db(), user_id),
        error=error,
        issued=issued,
        notice=NOTICES.get(request.args.get("notice", "")),
        form_key=new_form_key(),
        form=request.form if status != 200 else {},
    )


@blp.get("/users/<string:user_id>")
def user_detail(user_id: str):
    """A user's wallet, keys, ledger and turns, with the grant and adjustment forms."""
    return render_user(user_id)


def _credit_form(user_id: str, schema, move, notice: str):
    """A grant or adjustment form: the API's schema, then ``move`` (the API's service)."""
    try:
        data = load_form(schema, "amount", "reason")
        move(
            db(),
            actor_id=console_session().user.id,
            user_id=user_id,
            amount=data["amount"],
            reason=data["reason"],
            idempotency_key=form_value("idempotency_key") or None,
        )
    except (DomainError, ValidationError) as exc:
        if isinstance(exc, NotFound):
            raise
        message, status = problem(exc)
        return render_user(user_id, status, error=message)
    return done("console.user_detail", notice, user_id=user_id)


@blp.post("/users/<string:user_id>/grants")
def grant(user_id: str):
    return _credit_form(user_id, GrantCreateSchema(), billing.grant_credit, "granted")


@blp.post("/users/<string:user_id>/adjustments")
def adjust(user_id: str):
    return _credit_form(user_id, AdjustmentCreateSchema(), billing.adjust_credit, "adjusted")


@blp.post("/users/<string:user_id>/api-keys")
def issue_key(user_id: str):
    """Issue a key; the page that answers is the only place its secret is ever shown."""
    try:
        data = load_form(ApiKeyCreateSchema(), "name")
        issued = auth.issue_api_key(db(), console_session().user.id, user_id, data["name"] or None)
    except (DomainError, ValidationError) as exc:
        if isinstance(exc, NotFound):
            raise
        message, status = problem(exc)
        return render_user(user_id, status, error=message)
    return render_user(user_id, 201, issued=issued)


def limits_body() -> dict:
    """The limits form as the body of ``PUT …/limits``: an empty field is null (no limit of that
    kind), an empty amount no spend limit; whole numbers become integers, anything else is
    passed on as typed for the API's schema to refuse with its own code and message."""
    if form_value("action") == "clear":
        return {}

    def whole(name: str):
        raw = form_value(name).strip()
        if not raw:
            return None
        return int(raw) if WHOLE_NUMBER.fullmatch(raw) else raw

    body: dict = {
        "requests_per_minute": whole("requests_per_minute"),
        "max_concurrent_turns": whole("max_concurrent_turns"),
    }
    amount = form_value("spend_amount").strip()
    if amount:
        spend = {"amount": amount, "period": form_value("spend_period").strip()}
        if form_value("spend_tz").strip():
            spend["tz"] = form_value("spend_tz").strip()
        body["spend"] = spend
    return body


def save_limits(subject_type: str, subject_id: str) -> dict:
    """What ``PUT /admin/{users,api-keys}/{id}/limits`` does: its schema, then its service (audited).

    :raises DomainError: the API's 404 and 422 codes. :raises ValidationError: other field errors.
    """
    new_limits = LimitsUpdateSchema().load(limits_body())
    return limits.set_limits(
        db(),
        actor_id=console_session().user.id,
        subject_type=subject_type,
        subject_id=subject_id,
        limits=new_limits,
        now=runtime().clock(),
    )


@blp.post("/users/<string:user_id>/limits")
def set_user_limits(user_id: str):
    """Set or clear a user's spend, rate and concurrency limits."""
    try:
        save_limits(LimitSubject.USER, user_id)
    except (DomainError, ValidationError) as exc:
        if isinstance(exc, NotFound):
            raise
        message, status = problem(exc)
        return render_user(user_id, status, error=message, limits_form="user")
    return done("console.user_detail", "limits", user_id=user_id, _anchor="limits-heading")


@blp.post("/api-keys/<string:key_id>/limits")
def set_key_limits(key_id: str):
    """Set or clear one API key's limits; back to its owner's page."""
    try:
        saved = save_limits(LimitSubject.API_KEY, key_id)
    except (DomainError, ValidationError) as exc:
        if isinstance(exc, NotFound):
            raise
        message, status = problem(exc)
        owner = limits.get_limits(db(), LimitSubject.API_KEY, key_id)["user_id"]
        return render_user(owner, status, error=message, limits_form=key_id)
    return done("console.user_detail", "key_limits", user_id=saved["user_id"], _anchor=f"key-{key_id}")


@blp.post("/api-keys/<string:key_id>/revoke")
def revoke_key(key_id: str):
    key = auth.revoke_api_key(runtime(), db(), console_session().user.id, key_id)
    return done("console.user_detail", "revoked", user_id=key.user_id)


def render_pricing(status: int = 200, *, error: str | None = None):
    return render(
        "pricing.html",
        status,
        prices=pricing.list_current_prices(db()),
        history=console.price_history(db()),
        error=error,
        notice=NOTICES.get(request.args.get("notice", "")),
        form=request.form if status != 200 else {},
    )


@blp.get("/pricing")
def prices():
    """Current prices, their history, and the form to set one."""
    return render_pricing()


@blp.post("/pricing")
def set_price():
    try:
        model = checked_model_name(form_value("model").strip())
        data = load_form(PriceUpdateSchema(), "input_per_1k", "output_per_1k")
        pricing.set_price(db(), console_session().user.id, model, data["input_per_1k"], data["output_per_1k"])
    except (DomainError, ValidationError) as exc:
        message, status = problem(exc)
        return render_pricing(status, error=message)
    return done("console.prices", "priced")


@blp.get("/audit")
def audit_log():
    """Admin actions, newest first."""
    listing = Listing(db(), audit.list_events(db()))
    number = page_number()
    found = len(listing)
    events = listing[(number - 1) * AUDIT_PAGE_SIZE : number * AUDIT_PAGE_SIZE]
    return render(
        "audit.html",
        events=events,
        actors=console.emails(db(), [event.actor_id for event in events]),
        page=number,
        pages=max(-(-found // AUDIT_PAGE_SIZE), 1),
    )


# -- webhooks ------------------------------------------------------------------------------


def render_webhooks(status: int = 200, *, error: str | None = None, created=None):
    listing = console.webhook_endpoints(db())
    number = page_number()
    found = len(listing)
    return render(
        "webhooks.html",
        status,
        endpoints=listing[(number - 1) * WEBHOOK_PAGE_SIZE : number * WEBHOOK_PAGE_SIZE],
        page=number,
        pages=max(-(-found // WEBHOOK_PAGE_SIZE), 1),
        event_types=EVENT_TYPES,
        created=created,
        error=error,
        notice=NOTICES.get(request.args.get("notice", "")),
        form=request.form if status not in (200, 201) else {},
    )


@blp.get("/webhooks")
def webhook_list():
    """Every webhook (deleted ones marked), and the form to register one."""
    return render_webhooks()


@blp.post("/webhooks")
def create_webhook():
    """Register a webhook; the page that answers is the only place its signing secret is shown."""
    try:
        data = WebhookCreateSchema().load(
            {
                "url": form_value("url").strip(),
                "events": request.form.getlist("events"),
                "description": form_value("description").strip() or None,
            }
        )
        created = webhooks.create_endpoint(
            db(),
            actor_id=console_session().user.id,
            url=data["url"],
            events=data["events"],
            description=data["description"],
            allow_private=runtime().settings.webhook_allow_private,
        )
    except (DomainError, ValidationError) as exc:
        message, status = problem(exc)
        return render_webhooks(status, error=message)
    return render_webhooks(201, created=created)


@blp.post("/webhooks/<string:webhook_id>/delete")
def delete_webhook(webhook_id: str):
    webhooks.delete_endpoint(db(), actor_id=console_session().user.id, endpoint_id=webhook_id)
    return done("console.webhook_list", "webhook_deleted")


@blp.get("/webhooks/<string:webhook_id>")
def webhook_detail(webhook_id: str):
    """One webhook and its deliveries, newest first (none listed once it is deleted, as in the API)."""
    endpoint = console.webhook_endpoint(db(), webhook_id)
    deliveries, found, number = [], 0, page_number()
    if endpoint.deleted_at is None:
        listing = webhooks.list_deliveries(db(), webhook_id)
        found = len(listing)
        deliveries = listing[(number - 1) * DELIVERY_PAGE_SIZE : number * DELIVERY_PAGE_SIZE]
    return render(
        "webhook.html",
        endpoint=endpoint,
        deliveries=deliveries,
        found=found,
        page=number,
        pages=max(-(-found // DELIVERY_PAGE_SIZE), 1),
        extra={"webhook_id": webhook_id},
        notice=NOTICES.get(request.args.get("notice", "")),
    )


@blp.post("/webhooks/<string:webhook_id>/deliveries/<string:delivery_id>/redeliver")
def redeliver(webhook_id: str, delivery_id: str):
    webhooks.redeliver(
        db(), actor_id=console_session().user.id, endpoint_id=webhook_id, delivery_id=delivery_id
    )
    return done("console.webhook_detail", "redelivered", webhook_id=webhook_id)
