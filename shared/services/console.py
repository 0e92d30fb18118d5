"""Read models for the admin console's pages (``web/console``).

Only reads live here. Every change the console makes goes through the same
service the JSON API calls (``billing.grant_credit``, ``enforcement.set_override``,
``pricing.set_price``, ``auth.issue_api_key`` …), so its rules and its audit
events are the API's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, selectinload

from shared.db import is_uuid
from shared.errors import InvalidInput, NotFound
from shared.models import Limit, LimitSubject, ModelPrice, Turn, TurnStatus, User, WebhookEndpoint
from shared.pagination import Listing
from shared.services import limits, usage, wallets
from shared.services.wallets import WalletSummary

RECENT_FAILURES = 10
USER_TURNS = 20
PRICE_HISTORY = 200
# How far back a chart looks: 30 days, 12 weeks (from a Monday) or 12 months (from a 1st).
CHART_SPANS = {"day": timedelta(days=29), "week": timedelta(weeks=11)}
SPLITS = ("model", "user")
MAX_SEARCH = 320


@dataclass(frozen=True)
class UserRow:
    user: User
    wallet: WalletSummary | None


@dataclass(frozen=True)
class SpendUsage:
    spent: Decimal
    amount: Decimal
    period: str


@dataclass(frozen=True)
class PeriodTotals:
    today: usage.UsageTotals
    this_week: usage.UsageTotals
    this_month: usage.UsageTotals


@dataclass(frozen=True)
class Chart:
    query: usage.UsageQuery
    buckets: list[usage.UsageBucket]
    labels: dict[str, str]  # group key -> what to show (a user's email for split=user)


def search_users(session: Session, search: str | None) -> Listing:
    """Users by email substring (case-insensitive) or exact id, oldest first, wallets loaded."""
    statement = select(User).options(selectinload(User.wallet)).order_by(User.created_at, User.id)
    search = (search or "").strip()[:MAX_SEARCH]
    if search:
        pattern = "%" + search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        statement = statement.where(or_(User.email.like(pattern, escape="\\"), User.id == search))
    return Listing(session, statement)


def user_rows(users: list[User], low_balance_threshold: Decimal) -> list[UserRow]:
    return [
        UserRow(user, wallets.summary_of(user.wallet, low_balance_threshold) if user.wallet else None)
        for user in users
    ]


def recent_failures(session: Session, limit: int = RECENT_FAILURES) -> list[tuple[Turn, str]]:
    """The latest failed turns (refusals by the worker's re-check included), with their user's email.

    Refusals at admission (402) create no turn by design (§3); they are counted in
    ``/metrics`` as ``tollgate_enforcement_refusals_total``.
    """
    rows = session.execute(
        select(Turn, User.email)
        .join(User, User.id == Turn.user_id)
        .where(Turn.status == TurnStatus.FAILED)
        .order_by(Turn.updated_at.desc(), Turn.id.desc())
        .limit(limit)
    )
    return [(turn, email) for turn, email in rows]


def user_turns(session: Session, user_id: str, limit: int = USER_TURNS) -> list[Turn]:
    return list(
        session.scalars(
            select(Turn)
            .where(Turn.user_id == user_id)
            .order_by(Turn.created_at.desc(), Turn.id.desc())
            .limit(limit)
        )
    )


def price_history(session: Session, limit: int = PRICE_HISTORY) -> list[ModelPrice]:
    """Every price version, newest first per model."""
    return list(
        session.scalars(
            select(ModelPrice).order_by(ModelPrice.model, ModelPrice.effective_from.desc()).limit(limit)
        )
    )


def period_totals(session: Session, zone: ZoneInfo, today: date | None = None) -> PeriodTotals:
    """Usage totals for today, this ISO week and this month, in ``zone``."""
    today = today or datetime.now(zone).date()

    def since(start: date) -> usage.UsageTotals:
        query = usage.UsageQuery(bucket="day", start=start, end=today, zone=zone)
        return usage.summarize(session, query).totals

    return PeriodTotals(
        today=since(today),
        this_week=since(today - timedelta(days=today.weekday())),
        this_month=since(today.replace(day=1)),
    )


def usage_chart(
    session: Session, *, bucket: str, zone: ZoneInfo, split: str, today: date | None = None
) -> Chart:
    """The buckets of the last 30 days, 12 weeks or 12 months in ``zone``, per model or user.

    :raises InvalidInput: an unknown bucket or split is ``invalid_input``.
    """
    if bucket not in usage.BUCKETS or split not in SPLITS:
        raise InvalidInput(
            "bucket must be day, week or month and split model or user.", error="invalid_input"
        )
    today = today or datetime.now(zone).date()
    if bucket == "month":
        months_back = today.year * 12 + today.month - 1 - 11
        start = date(months_back // 12, months_back % 12 + 1, 1)
    else:
        start = today - CHART_SPANS[bucket]
        if bucket == "week":
            start -= timedelta(days=start.weekday())
    query = usage.UsageQuery(bucket=bucket, start=start, end=today, zone=zone, group_by=usage.GroupBy(split))
    buckets = usage.grouped_buckets(session, query)
    keys = {bucket.user_id if split == "user" else bucket.model for bucket in buckets}
    labels = {key: key for key in keys if key}
    if split == "user" and keys:
        labels.update(emails(session, list(keys)))
    return Chart(query=query, buckets=buckets, labels=labels)


def get_user(session: Session, user_id: str) -> User:
    """:raises NotFound: no such user."""
    user = session.get(User, user_id)
    if user is None:
        raise NotFound("No such user.")
    return user


def emails(session: Session, user_ids: list[str | None]) -> dict[str, str]:
    """Email by user id, for showing who did something (``system`` and unknown ids are left out)."""
    wanted = {user_id for user_id in user_ids if user_id}
    if not wanted:
        return {}
    return {
        row.id: row.email for row in session.execute(select(User.id, User.email).where(User.id.in_(wanted)))
    }


def spend_usage(session: Session, user_ids: list[str], now: datetime) -> dict[str, SpendUsage]:
    """This period's spent against the user spend limit, for the users (of a page) that have one:
    one query for the limit rows, then ``limits.spent`` (the admission's own sum) per limited user."""
    if not user_ids:
        return {}
    rows = session.scalars(
        select(Limit).where(
            Limit.subject_type == LimitSubject.USER,
            Limit.subject_id.in_(user_ids),
            Limit.spend_amount.is_not(None),
        )
    )
    found = {}
    for row in rows:
        start, end = limits.period_bounds(row.spend_period, row.spend_tz or "UTC", now)
        found[row.subject_id] = SpendUsage(
            limits.spent(session, row, start, end), row.spend_amount, row.spend_period
        )
    return found


def webhook_endpoints(session: Session) -> Listing:
    """Every webhook, deleted ones too (``webhooks.list_endpoints`` hides those), newest first."""
    return Listing(
        session,
        select(WebhookEndpoint).order_by(WebhookEndpoint.created_at.desc(), WebhookEndpoint.id.desc()),
    )


def webhook_endpoint(session: Session, endpoint_id: str) -> WebhookEndpoint:
    """:raises NotFound: no such webhook (a deleted one is found: its page says so)."""
    endpoint = session.get(WebhookEndpoint, endpoint_id) if is_uuid(endpoint_id) else None
    if endpoint is None:
        raise NotFound("No such webhook.")
    return endpoint
