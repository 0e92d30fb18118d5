"""Spend, rate and concurrency limits on users and API keys (design §8, docs/limits.md).

Everything is counted in the database, the one thing every web process and worker
shares (embedded mode included), never in per-process memory:

- **in flight** = the subject's turns ``queued`` or ``running`` whose hold has not
  expired. A turn leaves it by ending (completed, failed, cancelled — whatever path ends
  it, worker loss and recovery included) or by its hold expiring (such a turn can only
  end ``failed``), so no slot can leak: it is derived from the turn rows, not kept
  in a counter that a lost worker could forget to decrement.
- **requests per minute** = the subject's turns admitted in the last 60 s (sliding window).
- **spent** = the charges of the current period (local midnight / Monday / first of the
  month in ``tz``), read from the quarter-hour rollups that ``billing.settle_turn`` writes
  in the transaction of each charge (``usage_hours`` per user, ``api_key_spend_rollups``
  per key): a charge counts in the period its turn completed in.
- **held** = the worst cases reserved (``turns.limit_reserve``) by the subject's in-flight
  turns; the reserve leaves ``held`` in the same commit as the charge enters ``spent``.

Admission locks the subject's limit rows (user first, then key) for the rest of the
submit transaction, so turns of one subject are admitted one at a time and each sees every
earlier admission: ``spent + held + this turn's worst case <= amount`` holds under any
concurrency. Lock order: session row → limit rows → wallet.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from sqlalchemy import Select, and_, bindparam, exists, func, or_, select, update
from sqlalchemy.orm import Session

from shared.db import MONEY_QUANT, is_uuid, utcnow
from shared.errors import InvalidInput, NotFound, SpendLimitReached, TooManyRequests
from shared.models import (
    ApiKey,
    ApiKeySpend,
    Hold,
    HoldStatus,
    Limit,
    LimitSubject,
    SpendPeriod,
    Turn,
    TurnStatus,
    User,
    WebhookEventType,
)
from shared.services import audit, pricing, usage, wallets, webhooks

log = logging.getLogger(__name__)

MAX_SPEND_AMOUNT = pricing.MAX_AMOUNT
MAX_REQUESTS_PER_MINUTE = 1_000_000
MAX_CONCURRENT_TURNS = 100_000
RATE_WINDOW = timedelta(seconds=60)
# A slot frees when some turn ends, which nobody can predict; a short wait is the honest hint.
CONCURRENCY_RETRY_AFTER_SECONDS = 2
IN_FLIGHT = (TurnStatus.QUEUED.value, TurnStatus.RUNNING.value)


def _money(value: Decimal) -> str:
    return format(Decimal(value).quantize(MONEY_QUANT), "f")


@dataclass(frozen=True)
class SpendLimit:
    amount: Decimal
    period: SpendPeriod
    tz: str  # a known IANA zone name


@dataclass(frozen=True)
class Limits:
    """A subject's limits as the edge parsed them (``web/schemas/limits.py``); None: no limit."""

    spend: SpendLimit | None
    requests_per_minute: int | None
    max_concurrent_turns: int | None


def _check_count(value: int | None, field: str, maximum: int) -> int | None:
    if value is not None and not 1 <= value <= maximum:
        raise InvalidInput(
            f"{field} must be an integer from 1 to {maximum}, or null.", error="invalid_limit", field=field
        )
    return value


def check_limits(limits: Limits) -> Limits:
    """The limits' domain rules: a spend amount from 0 to ``MAX_SPEND_AMOUNT`` (6 places),
    counts from 1 to their maximum.

    :raises InvalidInput: ``invalid_limit_amount``, ``invalid_limit``.
    """
    spend = limits.spend
    if spend is not None:
        amount = pricing.check_money(
            spend.amount,
            field="amount",
            error="invalid_limit_amount",
            allow_zero=True,
            maximum=MAX_SPEND_AMOUNT,
        )
        spend = SpendLimit(amount=amount, period=spend.period, tz=spend.tz)
    return Limits(
        spend=spend,
        requests_per_minute=_check_count(
            limits.requests_per_minute, "requests_per_minute", MAX_REQUESTS_PER_MINUTE
        ),
        max_concurrent_turns=_check_count(
            limits.max_concurrent_turns, "max_concurrent_turns", MAX_CONCURRENT_TURNS
        ),
    )


def period_bounds(period: str, tz: str, now: datetime) -> tuple[datetime, datetime]:
    """``[start, resets_at)`` in UTC of the ``period`` holding ``now`` in zone ``tz``: from
    local midnight / Monday 00:00 / the 1st 00:00, DST-exact (usage.utc_window's rule)."""
    zone = ZoneInfo(tz)
    today = now.astimezone(zone).date()
    if period == SpendPeriod.DAY:
        first, last = today, today
    elif period == SpendPeriod.WEEK:
        first = today - timedelta(days=today.weekday())
        last = first + timedelta(days=6)
    else:
        first = today.replace(day=1)
        following = date(first.year + (first.month == 12), first.month % 12 + 1, 1)
        last = following - timedelta(days=1)
    return usage.utc_window(first, last, zone)


# -- what is counted ------------------------------------------------------------------------


def _subject_filter(row: Limit):
    if row.subject_type == LimitSubject.API_KEY:
        return Turn.api_key_id == row.subject_id
    return Turn.user_id == row.subject_id


def _in_flight(row: Limit, exclude_turn_id: str | None):
    clauses = [
        _subject_filter(row),
        Turn.status.in_(IN_FLIGHT),
        ~exists().where(Hold.turn_id == Turn.id, Hold.status == HoldStatus.EXPIRED),
    ]
    if exclude_turn_id is not None:
        clauses.append(Turn.id != exclude_turn_id)
    return and_(*clauses)


def in_flight_turns(session: Session, row: Limit, exclude_turn_id: str | None = None) -> int:
    return session.scalar(select(func.count()).select_from(Turn).where(_in_flight(row, exclude_turn_id))) or 0


def held(session: Session, row: Limit, exclude_turn_id: str | None = None) -> Decimal:
    total = session.scalar(
        select(func.coalesce(func.sum(Turn.limit_reserve), 0)).where(_in_flight(row, exclude_turn_id))
    )
    return Decimal(total or 0).quantize(MONEY_QUANT)


def spent(session: Session, row: Limit, start: datetime, end: datetime) -> Decimal:
    """What the limit's subject was charged in ``[start, end)`` (local-midnight bounds)."""
    if row.subject_type != LimitSubject.API_KEY:
        return usage.cost_between(session, row.subject_id, start, end)
    statement = select(func.coalesce(func.sum(ApiKeySpend.cost), 0)).where(
        ApiKeySpend.api_key_id == row.subject_id,
        ApiKeySpend.period_start >= start,
        ApiKeySpend.period_start < end,
    )
    return Decimal(session.scalar(statement) or 0).quantize(MONEY_QUANT)


def _recent(row: Limit, now: datetime, exclude_turn_id: str | None):
    clauses = [_subject_filter(row), Turn.created_at > now - RATE_WINDOW]
    if exclude_turn_id is not None:
        clauses.append(Turn.id != exclude_turn_id)
    return and_(*clauses)


def requests_last_minute(
    session: Session, row: Limit, now: datetime, exclude_turn_id: str | None = None
) -> int:
    return (
        session.scalar(select(func.count()).select_from(Turn).where(_recent(row, now, exclude_turn_id))) or 0
    )


def _rate_retry_after(session: Session, row: Limit, now: datetime, exclude_turn_id: str) -> int:
    """Seconds until the oldest of the last ``requests_per_minute`` admissions leaves the window."""
    oldest_counted = session.scalar(
        select(Turn.created_at)
        .where(_recent(row, now, exclude_turn_id))
        .order_by(Turn.created_at.desc())
        .offset(row.requests_per_minute - 1)
        .limit(1)
    )
    if oldest_counted is None:
        return 1
    return max(1, math.ceil((oldest_counted + RATE_WINDOW - now).total_seconds()))


# -- admission ------------------------------------------------------------------------------


def _limits_of(*subjects) -> Select:
    # One statement, user row before key row ("user" > "api_key"): every admission takes
    # them in the same order, so two of them never wait on each other in a cycle.
    return (
        select(Limit)
        .where(or_(*subjects))
        .order_by(Limit.subject_type.desc())
        .with_for_update()
        .execution_options(populate_existing=True)
    )


# Built once: every admission reads them (the key's row only for a caller with an API key).
_USER_LIMITS = and_(Limit.subject_type == LimitSubject.USER, Limit.subject_id == bindparam("user_id"))
_KEY_LIMITS = and_(Limit.subject_type == LimitSubject.API_KEY, Limit.subject_id == bindparam("api_key_id"))
# Whether any limit row applies (``api_key_id`` NULL matches no key row): the admission reads
# it in the statement that locks the chat session, and calls :func:`admit` only when it does.
ANY_APPLIES = exists().where(or_(_USER_LIMITS, _KEY_LIMITS)).label("limited")
_LOCKED_USER_LIMITS = _limits_of(_USER_LIMITS)
_LOCKED_USER_AND_KEY_LIMITS = _limits_of(_USER_LIMITS, _KEY_LIMITS)


def _locked_rows(session: Session, user_id: str, api_key_id: str | None) -> list[Limit]:
    if api_key_id is None:
        return list(session.scalars(_LOCKED_USER_LIMITS, {"user_id": user_id}))
    return list(session.scalars(_LOCKED_USER_AND_KEY_LIMITS, {"user_id": user_id, "api_key_id": api_key_id}))


def admit(
    session: Session, turn: Turn, worst_case: Callable[[], Decimal], *, now: datetime | None = None
) -> Decimal | None:
    """Check the limits of the turn's user and API key against the just-flushed ``turn``,
    holding their rows locked until the caller's transaction ends. Does not commit.

    Returns the worst case reserved against a spend limit (set on ``turn.limit_reserve``),
    or None when no spend limit applies (``worst_case`` is then not called).

    :raises TooManyRequests: ``too_many_concurrent_turns`` or ``rate_limited``.
    :raises SpendLimitReached: spent + held + this turn's worst case exceeds a spend limit.
    """
    rows = _locked_rows(session, turn.user_id, turn.api_key_id)
    if not rows:
        return None
    now = now or utcnow()
    for row in rows:
        _check_concurrency(session, row, turn)
        _check_rate(session, row, turn, now)
    reserve = None
    for row in rows:
        if row.spend_amount is None:
            continue
        if reserve is None:
            reserve = Decimal(worst_case()).quantize(MONEY_QUANT)
        _check_spend(session, row, turn, reserve, now)
    if reserve is not None:
        turn.limit_reserve = reserve
    return reserve


def _check_concurrency(session: Session, row: Limit, turn: Turn) -> None:
    """:raises TooManyRequests: ``too_many_concurrent_turns``."""
    if row.max_concurrent_turns is None:
        return
    running = in_flight_turns(session, row, turn.id)
    if running >= row.max_concurrent_turns:
        raise TooManyRequests(
            f"At most {row.max_concurrent_turns} turns may be in flight at once for this "
            f"{'API key' if row.subject_type == LimitSubject.API_KEY else 'user'}.",
            error="too_many_concurrent_turns",
            retry_after=CONCURRENCY_RETRY_AFTER_SECONDS,
            limit_source=row.subject_type,
            limit=row.max_concurrent_turns,
            in_flight=running,
        )


def _check_rate(session: Session, row: Limit, turn: Turn, now: datetime) -> None:
    """:raises TooManyRequests: ``rate_limited``."""
    if row.requests_per_minute is None:
        return
    recent = requests_last_minute(session, row, now, turn.id)
    if recent >= row.requests_per_minute:
        raise TooManyRequests(
            f"At most {row.requests_per_minute} turns per minute.",
            error="rate_limited",
            retry_after=_rate_retry_after(session, row, now, turn.id),
            limit_source=row.subject_type,
            limit=row.requests_per_minute,
        )


def _check_spend(session: Session, row: Limit, turn: Turn, reserve: Decimal, now: datetime) -> None:
    """:raises SpendLimitReached: spent + held + ``reserve`` exceeds the row's spend limit."""
    start, resets_at = period_bounds(row.spend_period, row.spend_tz or "UTC", now)
    # held before spent: a settle committing between the two reads is then counted
    # twice (refusing too early, never admitting too much), not missed.
    reserved = held(session, row, turn.id)
    charged = spent(session, row, start, resets_at)
    if charged + reserved + reserve > row.spend_amount:
        exc = SpendLimitReached(
            limit_source=row.subject_type,
            limit=_money(row.spend_amount),
            spent=_money(charged),
            held=_money(reserved),
            required=_money(reserve),
            resets_at=resets_at.isoformat().replace("+00:00", "Z"),
        )
        exc.limit_id, exc.period_start = row.id, start  # type: ignore[attr-defined]
        raise exc


def note_refusal(session: Session, exc: SpendLimitReached) -> bool:
    """After a spend-limit refusal (its transaction rolled back): write one
    ``spend_limit.reached`` event per limit and period, in the transaction that marks the
    period as notified. Commits. Never raises: the 402 stands whatever happens here."""
    limit_id, period_start = getattr(exc, "limit_id", None), getattr(exc, "period_start", None)
    if limit_id is None:
        return False
    try:
        marked = session.execute(
            update(Limit)
            .where(
                Limit.id == limit_id,
                or_(Limit.reached_period_start.is_(None), Limit.reached_period_start != period_start),
            )
            .values(reached_period_start=period_start)
        ).rowcount
        if marked:
            row = session.get(Limit, limit_id)
            webhooks.emit(
                session,
                WebhookEventType.SPEND_LIMIT_REACHED,
                {
                    "user_id": row.user_id,
                    "limit_source": row.subject_type,
                    "api_key_id": row.subject_id if row.subject_type == LimitSubject.API_KEY else None,
                    "period": row.spend_period,
                    "tz": row.spend_tz,
                    **{key: exc.details[key] for key in ("limit", "spent", "held", "resets_at")},
                },
            )
        session.commit()
        return bool(marked)
    except Exception:
        session.rollback()
        log.warning("could not record spend_limit.reached for limit %s", limit_id, exc_info=True)
        return False


# -- admin and owner views --------------------------------------------------------------------


def _subject_owner(session: Session, subject_type: str, subject_id: str) -> str:
    """The user a limit subject belongs to. :raises NotFound: no such user or key."""
    if subject_type == LimitSubject.API_KEY:
        key = session.get(ApiKey, subject_id) if is_uuid(subject_id) else None
        if key is None:
            raise NotFound("No such API key.")
        return key.user_id
    user = session.get(User, subject_id) if is_uuid(subject_id) else None
    if user is None:
        raise NotFound("No such user.")
    return user.id


def _row(session: Session, subject_type: str, subject_id: str) -> Limit | None:
    return session.scalar(
        select(Limit)
        .where(Limit.subject_type == subject_type, Limit.subject_id == subject_id)
        .execution_options(populate_existing=True)
    )


def present(session: Session, row: Limit, now: datetime) -> dict:
    """LimitsRead: the limits with the current period's ``spent``, ``held``, ``resets_at``."""
    spend = None
    if row.spend_amount is not None:
        start, resets_at = period_bounds(row.spend_period, row.spend_tz or "UTC", now)
        spend = {
            "amount": row.spend_amount,
            "period": row.spend_period,
            "tz": row.spend_tz or "UTC",
            "spent": spent(session, row, start, resets_at),
            "held": held(session, row),
            "period_start": start,
            "resets_at": resets_at,
        }
    return {
        "subject_type": row.subject_type,
        "subject_id": row.subject_id,
        "user_id": row.user_id,
        "spend": spend,
        "requests_per_minute": row.requests_per_minute,
        "max_concurrent_turns": row.max_concurrent_turns,
        "in_flight_turns": in_flight_turns(session, row),
        "requests_last_minute": requests_last_minute(session, row, now),
        "updated_by": row.updated_by,
        "updated_at": row.updated_at,
    }


def get_limits(session: Session, subject_type: str, subject_id: str, *, now: datetime | None = None) -> dict:
    """:raises NotFound: no such user or key."""
    user_id = _subject_owner(session, subject_type, subject_id)
    row = _row(session, subject_type, subject_id) or Limit(
        subject_type=subject_type, subject_id=subject_id, user_id=user_id, updated_by=None, updated_at=None
    )
    view = present(session, row, now or utcnow())
    session.commit()
    return view


def set_limits(
    session: Session,
    *,
    actor_id: str,
    subject_type: str,
    subject_id: str,
    limits: Limits,
    now: datetime | None = None,
) -> dict:
    """Replace a user's or API key's limits (None: none of that kind); audited. Commits.

    :raises NotFound: no such user or key.
    :raises InvalidInput: see :func:`check_limits`.
    """
    limits = check_limits(limits)
    user_id = _subject_owner(session, subject_type, subject_id)
    now = now or utcnow()
    row = _row(session, subject_type, subject_id)
    if row is None:
        row = Limit(subject_type=subject_type, subject_id=subject_id, user_id=user_id, created_at=now)
        session.add(row)
    spend = limits.spend
    row.spend_amount = spend.amount if spend else None
    row.spend_period = spend.period if spend else None
    row.spend_tz = spend.tz if spend else None
    row.requests_per_minute = limits.requests_per_minute
    row.max_concurrent_turns = limits.max_concurrent_turns
    row.updated_by, row.updated_at = actor_id, now
    audit.record(
        session,
        actor_id,
        "limits.set",
        target_type=subject_type,
        target=subject_id,
        details={
            "spend": {"amount": _money(spend.amount), "period": spend.period, "tz": spend.tz}
            if spend
            else None,
            "requests_per_minute": limits.requests_per_minute,
            "max_concurrent_turns": limits.max_concurrent_turns,
        },
    )
    session.flush()
    view = present(session, row, now)
    session.commit()
    return view


def wallet_view(
    session: Session, user_id: str, api_key_id: str | None, low_balance_threshold: Decimal, *, now: datetime
) -> dict:
    """GET /wallet: the wallet summary and the limits that apply to the caller.

    :raises NotFound: the user has no wallet.
    """
    summary = wallets.wallet_summary(session, user_id, low_balance_threshold)
    return {**vars(summary), "limits": own_limits(session, user_id, api_key_id, now=now)}


def own_limits(
    session: Session, user_id: str, api_key_id: str | None, *, now: datetime | None = None
) -> list[dict]:
    """The limits that apply to the caller: their user's and the key they called with."""
    now = now or utcnow()
    subjects = [and_(Limit.subject_type == LimitSubject.USER, Limit.subject_id == user_id)]
    if api_key_id is not None:
        subjects.append(and_(Limit.subject_type == LimitSubject.API_KEY, Limit.subject_id == api_key_id))
    rows = session.scalars(select(Limit).where(or_(*subjects)).order_by(Limit.subject_type.desc())).all()
    return [present(session, row, now) for row in rows]
