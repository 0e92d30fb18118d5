"""The admin console: server-rendered HTML pages at ``/admin/`` (design §9, docs/admin_console.md).

- **Sign-in**: an admin API key is exchanged for a server-side session
  (``shared/services/admin_sessions.py``); the browser gets a random token in an
  HttpOnly, SameSite=Strict cookie (Secure when the request came over HTTPS) and
  never the key.
- **CSRF**: every POST but the sign-in carries the session's token in a hidden
  field; without it, or with another, nothing changes (403).
- **One rule, one place**: each change calls the service the JSON API calls, so
  validation, idempotency and audit events are the API's.
- **Assets**: templates, CSS and JS ship in this package; charts are inline SVG
  drawn on the server. The Content-Security-Policy allows this origin only.
"""

from __future__ import annotations

import uuid

from flask import Blueprint, abort, g, redirect, render_template, request, url_for
from marshmallow import Schema, ValidationError
from werkzeug.wrappers import Response

from shared.errors import DomainError, Forbidden, InvalidInput, NotFound, Unauthorized
from shared.pagination import Listing
from shared.services import admin_sessions, audit, auth, billing, console, enforcement, pricing, wallets
from web.console import chart as chart_view
from web.context import db, runtime
from web.schemas.billing import (
    AdjustmentCreateSchema,
    GrantCreateSchema,
    PriceUpdateSchema,
    checked_model_name,
)
from web.schemas.users import ApiKeyCreateSchema

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
}
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
    tz = request.args.get("tz", "UTC")
    split = request.args.get("split", "model")
    error, status = None, 200
    try:
        chart = console.usage_chart(db(), bucket=bucket, tz=tz, split=split)
    except InvalidInput as exc:
        error, status = problem(exc)
        chart = console.usage_chart(db(), bucket="day", tz="UTC", split="model")
    state = enforcement.current_state(runtime())
    return render(
        "overview.html",
        status,
        error=error,
        notice=NOTICES.get(request.args.get("notice", "")),
        state=state,
        set_by=console.emails(db(), [state.updated_by]).get(state.updated_by, state.updated_by),
        totals=console.period_totals(db(), chart.query.tz),
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
        found=found,
        page=number,
        pages=max(-(-found // PAGE_SIZE), 1),
        threshold=threshold(),
    )


def render_user(user_id: str, status: int = 200, *, error: str | None = None, issued=None):
    user = console.get_user(db(), user_id)
    return render(
        "user.html",
        status,
        user=user,
        wallet=wallets.wallet_summary(db(), user_id, threshold()),
        keys=auth.list_keys(db(), user_id),
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


@blp.post("/users/<string:user_id>/grants")
def grant(user_id: str):
    try:
        data = load_form(GrantCreateSchema(), "amount", "reason")
        billing.grant_credit(
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
    return done("console.user_detail", "granted", user_id=user_id)


@blp.post("/users/<string:user_id>/adjustments")
def adjust(user_id: str):
    try:
        data = load_form(AdjustmentCreateSchema(), "amount", "reason")
        billing.adjust_credit(
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
    return done("console.user_detail", "adjusted", user_id=user_id)


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
