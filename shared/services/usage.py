"""Usage summaries: day / week / month buckets over the rollups, CSV export, and rebuild.

Usage is pre-aggregated in ``usage_hours`` by ``services/billing.py`` in the same
transaction as the debit, in two levels: per (user, model, UTC hour) and for all users
per (model, UTC hour), the latter also per hour from :30 UTC (scope ``*30``). A row also
carries the usage of its hour's first 15, 30 and 45 minutes, so it is quarter-exact. A
summary reads one level, never the turns: one user's rows for ``user_id``, every user's
rows for the export's ``group_by=user``, the all-users rows otherwise (those from :30 in a
zone whose local midnights all fall at :30); the model filter narrows either.

**Bucketing rule (both dialects, every zone).** A turn counts on the local date of its
``completed_at`` in the requested zone. Every UTC offset in use since 1972 is a multiple
of 15 minutes (Asia/Kolkata +05:30, Asia/Kathmandu +05:45, Pacific/Chatham +12:45
included), so each local midnight starts a UTC quarter hour and a local day, week or month
is an exact union of quarters; ``start``/``end`` select the quarters whose local start
lies in ``[start 00:00, end+1 00:00)``. ``hour_cuts`` says where a zone's local midnights
fall in the UTC hour (nowhere but :00 for UTC and Berlin, :30 for Kolkata, :15 for
Kathmandu, any quarter for Lord Howe); an hour's usage before and after such a cut is the
difference of two stored prefixes, and each part counts on the local date of its start
(``_rollup_statement``).

Both dialects shift the part's start by the zone's UTC offset (one ``CASE`` arm per offset
in force during the range, computed here from Python's IANA database; Postgres's own is
never asked), then Postgres truncates with ``date_trunc`` and SQLite with
``'weekday 0', '-6 days'`` / ``'start of month'``. Both answer identically (tests run one
suite on both).

``summary_from_turns`` computes the same summary from the raw completed turns with a
plain ``GROUP BY date_trunc`` over each turn's local ``completed_at``: the oracle of the
tests and the baseline of ``bench/usage.py``. Summary-refresh tokens are billed into the
rollups with ``turns=0`` and have no turn row, so they appear only in ``summarize``.
``rebuild`` (``tollgate usage-rebuild``) recomputes both levels from the turns.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from functools import cached_property, lru_cache, partial
from zoneinfo import ZoneInfo

from sqlalchemy import (
    ARRAY,
    BindParameter,
    DateTime,
    Integer,
    Interval,
    Select,
    String,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    union_all,
)
from sqlalchemy.orm import Session

from shared.db import MONEY_QUANT, UTCDateTime
from shared.errors import InvalidInput
from shared.models import ALL_USERS, ALL_USERS_AT_30, ALL_USERS_SCOPES, Turn, TurnStatus, UsageHour

BUCKETS = ("day", "week", "month")
DEFAULT_RANGE_DAYS = 30
MAX_RANGE_DAYS = 3660  # ten years and change; beyond that a summary is a data export
MIN_DATE = date(1970, 1, 1)
MAX_DATE = date(9998, 12, 31)
MAX_MODEL_LENGTH = 200
EXPORT_BATCH = 1000
UTC_ZONE = ZoneInfo("UTC")
_PERIOD = UsageHour.QUARTER
_DAY = timedelta(days=1)


class GroupBy(StrEnum):
    """The export's ``group_by``: one row per bucket and user, or per bucket and model."""

    USER = "user"
    MODEL = "model"


# -- the query --------------------------------------------------------------------------


@dataclass(frozen=True)
class UsageQuery:
    """A validated request. ``bucket`` may be unknown: totals only, no buckets."""

    bucket: str
    start: date
    end: date
    zone: ZoneInfo = UTC_ZONE
    user_id: str | None = None
    model: str | None = None
    group_by: GroupBy | None = None

    @property
    def tz(self) -> str:
        """The zone's IANA name."""
        return self.zone.key

    @property
    def known_bucket(self) -> bool:
        return self.bucket in BUCKETS


@dataclass
class UsageTotals:
    turns: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: Decimal = Decimal("0.000000")

    def add(self, other: UsageTotals) -> None:
        self.turns += other.turns
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost += other.cost


@dataclass
class UsageBucket(UsageTotals):
    bucket_start: date = MIN_DATE
    user_id: str | None = None
    model: str | None = None


@dataclass
class UsageSummary:
    bucket: str
    start: date
    end: date
    totals: UsageTotals
    daily: list[UsageBucket] = field(default_factory=list)


def query_error(field_name: str, error: str, message: str) -> InvalidInput:
    """A bad query-string value: 422 with ``error`` and the message under ``errors.query``."""
    return InvalidInput(message, error=error, field=field_name, errors={"query": {field_name: [message]}})


def make_query(
    *,
    bucket: str | None = None,
    start: date | None = None,
    end: date | None = None,
    tz: ZoneInfo | None = None,
    user_id: str | None = None,
    model: str | None = None,
    group_by: GroupBy | None = None,
    today: date | None = None,
) -> UsageQuery:
    """The query of a summary or an export, from values the edge parsed
    (``web/schemas/usage.py``); this applies the defaults and the range rules.

    Defaults: ``bucket=day``, ``tz=UTC``, ``end`` = today in ``tz``, ``start`` =
    ``end - 29 days``. An unknown ``bucket`` is kept (the summary then has totals only).

    :raises InvalidInput: ``invalid_range`` (start after end), ``range_too_large``.
    """
    zone = tz or UTC_ZONE
    if end is None:
        end = today or datetime.now(zone).date()
    if start is None:
        start = end - timedelta(days=DEFAULT_RANGE_DAYS - 1)
    if start > end:
        raise query_error("start", "invalid_range", f"start ({start}) is after end ({end}).")
    if (end - start).days + 1 > MAX_RANGE_DAYS:
        raise query_error("end", "range_too_large", f"The range may span at most {MAX_RANGE_DAYS} days.")
    return UsageQuery(
        bucket=bucket or "day",
        start=start,
        end=end,
        zone=zone,
        user_id=user_id,
        model=model,
        group_by=group_by,
    )


# -- pure bucketing rules (the SQL below implements exactly these) -----------------------


def ceil_period(moment: datetime) -> datetime:
    """The first rollup period starting at or after ``moment`` (itself for every
    local midnight of a zone whose offset is a multiple of 15 minutes)."""
    floor = UsageHour.quarter_of(moment)
    return floor if floor == moment else floor + _PERIOD


def utc_window(start: date, end: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """``[lo, hi)`` in UTC, period-aligned: the periods whose local start lies in [start, end+1 day)."""

    def midnight(day: date) -> datetime:
        # A local midnight that does not exist (a DST gap at 00:00) resolves forward (fold=0
        # gives the pre-transition offset, i.e. the instant just after the gap).
        return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)

    return ceil_period(midnight(start)), ceil_period(midnight(end + _DAY))


def local_day(period_start: datetime, zone: ZoneInfo) -> date:
    """The local date a rollup period (or a turn) counts on: the date of its start in ``zone``."""
    return period_start.astimezone(zone).date()


def bucket_start(day: date, bucket: str) -> date:
    """The first day of ``day``'s bucket: itself, its ISO week's Monday, or the 1st."""
    if bucket == "day":
        return day
    if bucket == "week":
        return day - timedelta(days=day.weekday())
    if bucket == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown bucket {bucket!r}")


def _offset_minutes(moment: datetime, zone: ZoneInfo) -> int:
    return int(moment.astimezone(zone).utcoffset().total_seconds() // 60)


@lru_cache(maxsize=256)
def offset_segments(zone: ZoneInfo, lo: datetime, hi: datetime) -> list[tuple[datetime | None, int]]:
    """The zone's UTC offset (minutes) at each period start in ``[lo, hi)``, as segments
    (:func:`_offset_segments`, remembered: a summary asks for the same range several times)."""
    return list(_offset_segments(zone, lo, hi))


@lru_cache(maxsize=256)
def _offset_segments(zone: ZoneInfo, lo: datetime, hi: datetime) -> tuple[tuple[datetime | None, int], ...]:
    """The zone's UTC offset (minutes) at each period start in ``[lo, hi)``, as segments.

    ``[(until, minutes), ...]``: ``minutes`` applies to instants before ``until``; the
    last segment's ``until`` is ``None``. Walks day by day and scans the periods of
    any day whose offset changed, so it finds every transition that lasts a day.
    """
    current = _offset_minutes(lo, zone)
    segments: list[tuple[datetime | None, int]] = []
    day_start = lo
    while day_start < hi:
        day_end = min(day_start + _DAY, hi)
        if _offset_minutes(day_end - _PERIOD, zone) != current:
            moment = day_start
            while moment < day_end:
                minutes = _offset_minutes(moment, zone)
                if minutes != current:
                    segments.append((moment, current))
                    current = minutes
                moment += _PERIOD
        day_start = day_end
    segments.append((None, current))
    return tuple(segments)


# -- SQL --------------------------------------------------------------------------------


def hour_cuts(zone: ZoneInfo, lo: datetime, hi: datetime) -> tuple[int, ...]:
    """Where summaries in ``zone`` cut each UTC hour of ``[lo, hi)``, in minutes past the hour.

    Within one part of an hour the local date never changes, so a part counts on the local
    date of its start. ``(0,)`` (whole hours) when every local midnight in the window falls
    on a UTC hour (UTC, Berlin across DST); ``(0, m)`` when every one falls ``m`` minutes
    past an hour and the offset changes only on ``:00`` or ``:m`` (Kolkata and St John's 30,
    Kathmandu and Chatham 15); otherwise the four quarters (Lord Howe's 30-minute DST).
    """
    segments = offset_segments(zone, lo, hi)
    past_the_hour = {(-minutes) % 60 for _, minutes in segments}
    if len(past_the_hour) == 1:
        (cut,) = past_the_hour
        edges = {until.minute for until, _ in segments if until is not None} | {lo.minute, hi.minute}
        if cut % 15 == 0 and edges <= {0, cut}:
            return (0,) if cut == 0 else (0, cut)
    return (0, 15, 30, 45)


def cost_between(session: Session, scope: str, start: datetime, end: datetime) -> Decimal:
    """What ``scope`` (a user id, or ``ALL_USERS``) was charged in ``[start, end)``, two UTC
    quarter-hour boundaries (local midnights are): one indexed range over the scope's hour
    rows, the first and last hour cut at the quarter with their stored prefixes. What spend
    limits read (shared/services/limits.py)."""
    first, last = UsageHour.hour_of(start), UsageHour.hour_of(end)

    def before(minute: int):
        """The part of an hour row's cost before ``minute`` (0, 15, 30 or 45) past the hour."""
        return literal(0) if minute == 0 else getattr(UsageHour, f"cost_to_{minute}")

    start_minute, end_minute = start.astimezone(UTC).minute, end.astimezone(UTC).minute
    amount = (
        UsageHour.cost
        - case((UsageHour.hour_start == first, before(start_minute)), else_=literal(0))
        - case((UsageHour.hour_start == last, UsageHour.cost - before(end_minute)), else_=literal(0))
    )
    upper = UsageHour.hour_start <= last if end_minute else UsageHour.hour_start < last
    total = session.scalar(
        select(func.coalesce(func.sum(amount), 0)).where(
            UsageHour.scope == scope, UsageHour.hour_start >= first, upper
        )
    )
    return _to_cost(total)


def _to_cost(value: Decimal | None) -> Decimal:
    # A SUM over a MONEY column is MONEY too (exact: integer micro-units on SQLite),
    # so it arrives as a Decimal; None when nothing was summed.
    return Decimal("0").quantize(MONEY_QUANT) if value is None else value


def _to_date(value) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


# -- statements built once per shape ---------------------------------------------------
#
# Building a summary's statement is Python work (SQLAlchemy constructs, their cache key):
# it was 0.6–0.9 ms for UTC and 1.4–2.2 ms for Kolkata, most of a one-user summary's time.
# So each statement is built once per *shape* (``_Shape``: what its structure depends on)
# and remembered, with SQLAlchemy's compiled form; everything else (the window, the zone's
# offsets and transitions, the hours that start a bucket, the user, the model) is a named
# parameter whose value a rule computes from the request (``_Parameters``): ~0.05 ms.


@dataclass(frozen=True)
class _Request:
    """One summary's values: its query and UTC window ``[lo, hi)`` (``utc_window``)."""

    query: UsageQuery
    lo: datetime
    hi: datetime

    @cached_property
    def segments(self) -> list[tuple[datetime | None, int]]:
        return offset_segments(self.query.zone, self.lo, self.hi)

    @cached_property
    def edge_hours(self) -> tuple[datetime, ...]:
        """The hours holding a bucket's first local midnight or an offset change."""
        return _hours_of(bucket_changes(self.query, self.lo, self.hi))


@dataclass(frozen=True)
class _Shape:
    """What a summary statement's SQL depends on; every other value is a parameter."""

    dialect: str
    bucket: str | None  # None: an unknown bucket, totals only
    offsets: int  # offsets in force over the window: one CASE arm each but the last
    cuts: tuple[int, ...]  # hour_cuts
    whole_hours: bool  # stage 2 by whole hours plus edge corrections (_whole_hour_parts)
    from_30: bool  # all users' hours from :30 (ALL_USERS_AT_30), each whole to one bucket
    user: bool
    model: bool
    group_by: GroupBy | None

    @property
    def postgres(self) -> bool:
        return self.dialect == "postgresql"

    @property
    def keyed(self) -> bool:
        return self.group_by is not None


def _shape(dialect: str, request: _Request) -> _Shape:
    """The shape of the request's statements; whole hours (plus edge corrections) whenever
    the zone cuts hours at most once and the window starts and ends at that cut. For all
    users, when that cut is at :30 and the offset changes only at :30 too (Kolkata, St
    John's, Adelaide), the hours from :30: no local date changes inside one of them."""
    query, lo, hi = request.query, request.lo, request.hi
    cuts = hour_cuts(query.zone, lo, hi)
    cut = cuts[-1]
    whole_hours = len(cuts) <= 2 and lo.minute == hi.minute == cut
    changes_at_30 = all(until.minute == 30 for until, _ in request.segments if until is not None)
    return _Shape(
        dialect=dialect,
        bucket=query.bucket if query.known_bucket else None,
        offsets=len(request.segments),
        cuts=cuts,
        whole_hours=whole_hours,
        from_30=whole_hours
        and cut == 30
        and changes_at_30
        and not query.user_id
        and query.group_by != GroupBy.USER,
        user=bool(query.user_id),
        model=bool(query.model),
        group_by=query.group_by,
    )


class _Parameters:
    """The named parameters of a statement built once per shape, each with its rule: how
    its value follows from a request. A name is bound once; using it again in the same
    statement reuses the parameter (one value, the same placeholder).

    On Postgres the values derived here (the window, offsets, transitions, edge hours) are
    rendered into the SQL text when it runs (``literal_execute``; the statement is still
    built and compiled once): once psycopg has prepared a statement (its fifth run) Postgres
    may switch to a generic plan, and one blind to the window guessed 14 rows for all
    users' 25,550 a year and sorted them (month: 26 against 21 ms). The user id and the
    model, which the request supplies, stay bound parameters (``from_request``).
    """

    def __init__(self, shape: _Shape) -> None:
        self._inline = shape.postgres
        self._binds: dict[str, BindParameter] = {}
        self._rules: dict[str, Callable[[_Request], object]] = {}

    def bind(
        self,
        name: str,
        rule: Callable[[_Request], object],
        type_,
        *,
        from_request: bool = False,
        expanding: bool = False,
    ):
        if name not in self._binds:
            inline = self._inline and not from_request
            self._binds[name] = bindparam(name, type_=type_, expanding=expanding, literal_execute=inline)
            self._rules[name] = rule
        return self._binds[name]

    def values(self, request: _Request) -> dict[str, object]:
        return {name: rule(request) for name, rule in self._rules.items()}


@dataclass(frozen=True)
class _Bound:
    """A statement (built once per shape) and one request's values for its parameters."""

    statement: Select
    values: dict[str, object]


def _bind(build: Callable[[_Shape], tuple[Select, _Parameters]], dialect: str, query: UsageQuery) -> _Bound:
    """``build``'s statement for the query's shape, with the query's values."""
    lo, hi = utc_window(query.start, query.end, query.zone)
    request = _Request(query, lo, hi)
    statement, parameters = build(_shape(dialect, request))
    return _Bound(statement, parameters.values(request))


def _window_edge(parameters: _Parameters, edge: str, minutes_before: int = 0):
    """The request's ``lo`` or ``hi``, ``minutes_before`` minutes earlier."""
    before = timedelta(minutes=minutes_before)
    return parameters.bind(
        f"{edge}_{minutes_before}", lambda request: getattr(request, edge) - before, UTCDateTime()
    )


def _sqlite_modifier(minutes: int) -> str:
    return f"{minutes:+d} minutes"


def _bucket_expr(shape: _Shape, parameters: _Parameters, moment, shift_minutes: int = 0):
    """SQL for the local bucket start of the UTC instant ``moment + shift_minutes``.

    ``moment`` is a UTC datetime column (timestamptz on Postgres, naive UTC text on
    SQLite, where it is also compared with the transition instants, moved back by the
    shift instead of shifting every row). Offset ``i`` in force over the window
    (``offset_segments``) is the parameter ``offset_<shift>_<i>``, the instant it ends
    ``until_<shift>_<i>``.
    """
    shift = timedelta(minutes=shift_minutes)

    def offset(index: int):
        # Local time = UTC + the zone's offset, taken from Python's IANA database on both
        # dialects (one value, or one CASE arm per offset in force during the range):
        # cheaper per row than converting to a named zone, the dialects agree by
        # construction, and Postgres's own zone database is never consulted.
        def rule(request: _Request):
            minutes = request.segments[index][1] + shift_minutes
            return timedelta(minutes=minutes) if shape.postgres else _sqlite_modifier(minutes)

        return parameters.bind(
            f"offset_{shift_minutes}_{index}", rule, Interval() if shape.postgres else String()
        )

    def until(index: int):
        return parameters.bind(
            f"until_{shift_minutes}_{index}",
            lambda request: request.segments[index][0] - shift,
            UTCDateTime(),
        )

    last = shape.offsets - 1
    if last == 0:
        to_local = offset(0)
    else:
        to_local = case(
            *[(moment < until(index), offset(index)) for index in range(last)], else_=offset(last)
        )
    if shape.postgres:
        return func.date_trunc(shape.bucket, func.timezone("UTC", moment) + to_local)
    truncation = {"day": (), "week": ("weekday 0", "-6 days"), "month": ("start of month",)}[shape.bucket]
    return func.date(moment, to_local, *truncation)


def _group_column(shape: _Shape, source):
    if shape.group_by == GroupBy.USER:
        return source.scope if source is UsageHour else source.user_id
    if shape.group_by == GroupBy.MODEL:
        return source.model
    return None


def _filters(shape: _Shape, parameters: _Parameters, user_column, model_column) -> list:
    """The query's user and model filters, as parameters."""
    filters = []
    if shape.user:
        user_id = parameters.bind("user_id", lambda r: r.query.user_id, user_column.type, from_request=True)
        filters.append(user_column == user_id)
    if shape.model:
        model = parameters.bind("model", lambda r: r.query.model, model_column.type, from_request=True)
        filters.append(model_column == model)
    return filters


def _level_filters(shape: _Shape, parameters: _Parameters) -> list:
    """The level a query reads: one user's rows, every user's rows (``group_by=user``), or
    the all-users rows (on UTC hours, or from :30 for ``_Shape.from_30``). The model filter
    then narrows either."""
    filters = _filters(shape, parameters, UsageHour.scope, UsageHour.model)
    if not shape.user:
        # In the SQL text, so a generic plan still knows the all-users rows from a user's.
        def scope(value: str):
            return literal(value, UsageHour.scope.type, literal_execute=True)

        if shape.group_by == GroupBy.USER:
            level = UsageHour.scope.not_in([scope(value) for value in ALL_USERS_SCOPES])
        else:
            level = UsageHour.scope == scope(ALL_USERS_AT_30 if shape.from_30 else ALL_USERS)
        filters.insert(0, level)
    return filters


def bucket_changes(query: UsageQuery, lo: datetime, hi: datetime) -> tuple[datetime, ...]:
    """Every instant in ``[lo, hi]`` where the local bucket may change: the local midnight
    starting each bucket (``lo`` and ``hi`` included; every day for ``day``, Mondays for
    ``week``, the 1st for ``month``, none inside for totals) and each change of the zone's
    offset (which could move the local date)."""
    return _bucket_changes(query.zone, query.bucket, query.start, query.end, lo, hi)


@lru_cache(maxsize=256)
def _bucket_changes(zone: ZoneInfo, bucket: str, start: date, end: date, lo: datetime, hi: datetime):
    moments = {lo, hi}
    if bucket in BUCKETS:
        for day in _days(start, end):
            if bucket_start(day, bucket) == day:
                moments.add(utc_window(day, day, zone)[0])
    moments.update(until for until, _ in offset_segments(zone, lo, hi) if until is not None)
    return tuple(sorted(moments))


@lru_cache(maxsize=256)
def _hours_of(moments: tuple[datetime, ...]) -> tuple[datetime, ...]:
    return tuple(sorted({UsageHour.hour_of(moment) for moment in moments}))


@lru_cache(maxsize=256)
def _array_text(moments: tuple[datetime, ...]) -> str:
    """Postgres's array input for UTC instants: ``{2025-01-01T18:00:00+00:00,…}``."""
    return "{" + ",".join(moment.isoformat() for moment in moments) + "}"


def _days(first: date, last: date) -> Iterator[date]:
    day = first
    while day <= last:
        yield day
        day += _DAY


def _hour_rows(shape: _Shape, parameters: _Parameters, minutes: list[int], *conditions):
    """Stage 1: the level's rows in the window (and their group key), as the prefixes for
    ``minutes`` of each measure (60: the hour's totals), labelled ``<measure>_<minute>``.

    Not summed per hour first: one aggregate over the rows, each mapped to its bucket, costs
    less than two (all users' day in UTC: 18 against 28 ms on the bench year).
    """
    columns = [UsageHour.hour_start.label("hour_start")]
    for minute in minutes:
        for measure in UsageHour.MEASURES:
            columns.append(UsageHour.prefix_column(measure, minute).label(f"{measure}_{minute}"))
    key_col = _group_column(shape, UsageHour)
    if key_col is not None:
        columns.append(key_col.label("group_key"))
    return select(*columns).where(*_level_filters(shape, parameters), *conditions)


def _rollup_statement(dialect: str, query: UsageQuery) -> _Bound:
    """The statement that sums the rollups for ``query`` (see :func:`_rollup_sql`)."""
    return _bind(_rollup_sql, dialect, query)


@lru_cache(maxsize=256)
def _rollup_sql(shape: _Shape) -> tuple[Select, _Parameters]:
    """Three stages over the hour rows of the level the query reads, built once per shape.

    1. The level's rows in the window (and group key): the totals, and the prefixes the
       zone cuts at.
    2. Map each to its local bucket (``UNION ALL`` of parts):

       - whole hours or one cut at ``m`` past the hour (UTC, Berlin; Kolkata ``m=30``):
         every hour goes whole to the bucket of ``hour + m``; then, for the few hours
         holding a bucket's first local midnight at ``m`` (``bucket_changes``: one a day,
         a week or a month, read again by key), the first ``m`` minutes move back to the
         bucket of the hour's start. Kolkata maps each row once plus two per bucket for
         one user; for all users it reads the hours from :30 (``from_30``), which start at
         the cut: each goes whole to the bucket of its start, as UTC's hours do.
       - otherwise each hour in its parts (Lord Howe's 30-minute DST: the four
         quarters), each part to the bucket of its own start.
    3. Sum per bucket (and key) in one aggregate; buckets whose parts hold no usage are
       left out.
    """
    parameters = _Parameters(shape)
    part = partial(_part, shape, parameters)
    if shape.whole_hours:
        parts = _whole_hour_parts(shape, parameters, part)
    else:
        parts = _cut_hour_parts(shape, parameters, part)
    return _bucket_sums(shape, parts), parameters


def _part(shape: _Shape, parameters: _Parameters, source, shift_minutes: int, measures: list, *conditions):
    """Stage 2 for one part: ``source``'s rows mapped to the bucket of ``hour_start + shift_minutes``."""
    bucket = (
        []
        if shape.bucket is None
        else [_bucket_expr(shape, parameters, source.c.hour_start, shift_minutes).label("bucket")]
    )
    keys = [source.c.group_key] if shape.keyed else []
    labelled = [value.label(measure) for measure, value in zip(UsageHour.MEASURES, measures, strict=True)]
    return select(*bucket, *keys, *labelled).where(*conditions)


def _whole_hour_parts(shape: _Shape, parameters: _Parameters, part) -> list:
    """Every hour whole to the bucket of ``hour + cut``, then the first ``cut`` minutes of
    the hours that start a bucket moved back to the bucket of the hour's start. The hours
    from :30 start at the cut: nothing to move."""
    cut = 0 if shape.from_30 else shape.cuts[-1]
    # Hours whose moment at ``cut`` lies in [lo, hi): here lo - cut and hi - cut are on the hour.
    first, last = _window_edge(parameters, "lo", cut), _window_edge(parameters, "hi", cut)
    hours = _hour_rows(shape, parameters, [60], UsageHour.hour_start >= first, UsageHour.hour_start < last)
    hours = hours.subquery("hours")
    parts = [part(hours, cut, [hours.c[f"{measure}_60"] for measure in UsageHour.MEASURES])]
    if cut:
        edges = _hour_rows(shape, parameters, [cut], _edge_hours(shape, parameters)).cte("edges")
        head = [edges.c[f"{measure}_{cut}"] for measure in UsageHour.MEASURES]
        # Out of the bucket of hour + cut (counted whole above, when it was in the window)…
        moved = [-value for value in head]
        parts.append(part(edges, cut, moved, edges.c.hour_start >= first, edges.c.hour_start < last))
        # …into the bucket of the hour's start, when that start is in the window.
        lo, hi = _window_edge(parameters, "lo"), _window_edge(parameters, "hi")
        parts.append(part(edges, 0, head, edges.c.hour_start >= lo, edges.c.hour_start < hi))
    return parts


def _edge_hours(shape: _Shape, parameters: _Parameters):
    """The condition for the hour rows of ``_Request.edge_hours``. Postgres: one text
    parameter cast to an array (366 separate parameters cost more to bind and plan, and
    psycopg adapting a list of 366 datetimes cost more than the look-ups); SQLite: an
    expanding ``IN``."""
    if shape.postgres:
        hours = parameters.bind("edge_hours", lambda r: _array_text(r.edge_hours), String())
        return UsageHour.hour_start == any_(cast(hours, ARRAY(DateTime(timezone=True))))
    hours = parameters.bind("edge_hours", lambda r: r.edge_hours, UTCDateTime(), expanding=True)
    return UsageHour.hour_start.in_(hours)


def _cut_hour_parts(shape: _Shape, parameters: _Parameters, part) -> list:
    """Each hour in its parts between the cuts, each part to the bucket of its own start."""
    cuts = shape.cuts
    minutes = [*cuts[1:], 60]
    first_hour = parameters.bind("lo_hour", lambda r: UsageHour.hour_of(r.lo), UTCDateTime())
    hours = _hour_rows(
        shape,
        parameters,
        minutes,
        UsageHour.hour_start >= first_hour,
        UsageHour.hour_start < _window_edge(parameters, "hi"),
    )
    hours = hours.cte("hours")
    parts = []
    for start, end in zip(cuts, minutes, strict=True):
        measures = []
        for measure in UsageHour.MEASURES:
            value = hours.c[f"{measure}_{end}"]
            measures.append(value - hours.c[f"{measure}_{start}"] if start else value)
        in_window = (
            hours.c.hour_start >= _window_edge(parameters, "lo", start),
            hours.c.hour_start < _window_edge(parameters, "hi", start),
        )
        parts.append(part(hours, start, measures, *in_window))
    return parts


def _bucket_sums(shape: _Shape, parts: list):
    """Stage 3: the parts summed per bucket (and key), buckets without usage left out."""
    mapped = (parts[0] if len(parts) == 1 else union_all(*parts)).subquery("parts")
    sums = [func.sum(mapped.c[measure]) for measure in UsageHour.MEASURES]
    if shape.bucket is None:
        return select(*sums)
    outer_keys = [mapped.c.bucket] + ([mapped.c.group_key] if shape.keyed else [])
    return (
        select(*outer_keys, *sums)
        .group_by(*outer_keys)
        .having(or_(*[total != 0 for total in sums]))
        .order_by(*outer_keys)
    )


def _turns_statement(dialect: str, query: UsageQuery) -> _Bound:
    """The baseline over the raw turns (see :func:`_turns_sql`)."""
    return _bind(_turns_sql, dialect, query)


@lru_cache(maxsize=256)
def _turns_sql(shape: _Shape) -> tuple[Select, _Parameters]:
    """The baseline: one plain GROUP BY over the completed turns, each turn
    bucketed by its own ``completed_at`` in the zone (the rollups must agree)."""
    parameters = _Parameters(shape)
    key_col = _group_column(shape, Turn)
    measures = [
        func.count(),
        func.sum(Turn.input_tokens),
        func.sum(Turn.output_tokens),
        func.sum(func.coalesce(Turn.cost, 0)),
    ]
    keys = []
    if shape.bucket is not None:
        keys.append(_bucket_expr(shape, parameters, Turn.completed_at).label("bucket"))
        if key_col is not None:
            keys.append(key_col.label("group_key"))
    statement = select(*keys, *measures).where(
        Turn.status == TurnStatus.COMPLETED,
        Turn.completed_at >= _window_edge(parameters, "lo"),
        Turn.completed_at < _window_edge(parameters, "hi"),
        *_filters(shape, parameters, Turn.user_id, Turn.model),
    )
    if keys:
        # Positional GROUP BY: the bucket expression's parameters would otherwise be
        # rendered again, as a different expression to Postgres.
        positions = [literal_column(str(index + 1)) for index in range(len(keys))]
        statement = statement.group_by(*positions).order_by(*positions)
    return statement, parameters


def _rows(session: Session, bound: _Bound, *, stream: bool = False):
    options = {"stream_results": True, "yield_per": EXPORT_BATCH} if stream else {}
    # No zone name reaches the database (offsets come from Python's IANA database), so a
    # zone Postgres's own database lacks cannot fail a query. Core rows: no ORM result
    # machinery for plain tuples.
    return session.connection().execute(bound.statement, bound.values, execution_options=options)


def _bucket_rows(session: Session, query: UsageQuery, bound: _Bound, *, stream: bool = False):
    keyed = query.group_by is not None
    group_key = None
    result = _rows(session, bound, stream=stream)
    for row in result if stream else result.all():  # .all(): one fetch, not one a row
        if keyed:
            bucket_value, group_key, turns, input_tokens, output_tokens, cost = row
        else:
            bucket_value, turns, input_tokens, output_tokens, cost = row
        yield UsageBucket(
            bucket_start=_to_date(bucket_value),
            user_id=group_key if query.group_by == GroupBy.USER else None,
            model=group_key if query.group_by == GroupBy.MODEL else None,
            turns=int(turns or 0),
            input_tokens=int(input_tokens or 0),
            output_tokens=int(output_tokens or 0),
            cost=_to_cost(cost),
        )


def _summary(
    session: Session, query: UsageQuery, statement: Callable[[str, UsageQuery], _Bound]
) -> UsageSummary:
    bound = statement(session.get_bind().dialect.name, query)
    totals = UsageTotals(cost=Decimal("0").quantize(MONEY_QUANT))
    daily: list[UsageBucket] = []
    if query.known_bucket:
        for bucket in _bucket_rows(session, query, bound):
            daily.append(bucket)
            totals.add(bucket)
    else:
        turns, input_tokens, output_tokens, cost = _rows(session, bound).one()
        totals = UsageTotals(
            turns=int(turns or 0),
            input_tokens=int(input_tokens or 0),
            output_tokens=int(output_tokens or 0),
            cost=_to_cost(cost),
        )
    return UsageSummary(bucket=query.bucket, start=query.start, end=query.end, totals=totals, daily=daily)


def summarize(session: Session, query: UsageQuery) -> UsageSummary:
    """Buckets and totals from the rollups (see the module doc for the rules).

    ``group_by`` is ignored here (the summary is one series); buckets are ascending
    and only those with usage appear. An unknown bucket gives totals and no buckets.
    """
    return _summary(session, _ungrouped(query), _rollup_statement)


def summary_from_turns(session: Session, query: UsageQuery) -> UsageSummary:
    """The same summary from raw completed turns: the oracle and the benchmark baseline."""
    return _summary(session, _ungrouped(query), _turns_statement)


def grouped_buckets(session: Session, query: UsageQuery) -> list[UsageBucket]:
    """The buckets per user or per model (``query.group_by``), as the CSV export lists them:
    ascending by bucket, then by the group key. An unknown bucket gives none."""
    if not query.known_bucket:
        return []
    return list(_bucket_rows(session, query, _rollup_statement(session.get_bind().dialect.name, query)))


def _ungrouped(query: UsageQuery) -> UsageQuery:
    if query.group_by is None:
        return query
    return UsageQuery(query.bucket, query.start, query.end, query.zone, query.user_id, query.model)


def usage_summary(session: Session, **params) -> UsageSummary:
    """Summarise the query ``make_query`` makes of ``params``. :raises InvalidInput: see ``make_query``."""
    return summarize(session, make_query(**params))


# -- CSV --------------------------------------------------------------------------------

CSV_COLUMNS = ("bucket_start", "turns", "input_tokens", "output_tokens", "cost")


def csv_header(group_by: str | None) -> list[str]:
    key = {"user": ["user_id"], "model": ["model"]}.get(group_by or "", [])
    return [CSV_COLUMNS[0], *key, *CSV_COLUMNS[1:]]


def export_csv(session: Session, **params) -> Iterator[str]:
    """Validate now, then stream CSV lines (RFC 4180 quoting, CRLF line ends).

    Columns: ``bucket_start`` (local ISO date), then ``user_id`` or ``model``
    with ``group_by``, then ``turns, input_tokens, output_tokens, cost``.
    Rows ascend by bucket, then by the group key. An unknown bucket yields the
    header alone (the summary's ``daily: []``).

    :raises InvalidInput: as ``make_query``, before the first line is produced.
    """
    query = make_query(**params)
    # Build (and so validate) the statement before the response starts streaming.
    bound = _rollup_statement(session.get_bind().dialect.name, query) if query.known_bucket else None
    return _csv_lines(session, query, bound)


def _csv_lines(session: Session, query: UsageQuery, bound: _Bound | None) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def flush() -> str:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    writer.writerow(csv_header(query.group_by))
    yield flush()
    if bound is None:
        return
    if session.get_bind().dialect.name == "postgresql":
        buckets = _bucket_rows(session, query, bound, stream=True)  # server-side cursor
    else:
        # SQLite: a web transaction holds the database's write lock (BEGIN IMMEDIATE), so
        # read everything and end the transaction before a slow client reads the body.
        buckets = list(_bucket_rows(session, query, bound))
        session.rollback()
    pending = 0
    try:
        for bucket in buckets:
            key = {"user": [bucket.user_id], "model": [bucket.model]}.get(query.group_by or "", [])
            writer.writerow(
                [
                    bucket.bucket_start.isoformat(),
                    *key,
                    bucket.turns,
                    bucket.input_tokens,
                    bucket.output_tokens,
                    format(bucket.cost, "f"),
                ]
            )
            pending += 1
            if pending >= EXPORT_BATCH:
                pending = 0
                yield flush()
        if pending:
            yield flush()
    finally:
        session.rollback()  # read-only; end the snapshot as soon as the body is written


# -- rebuild ----------------------------------------------------------------------------


@dataclass
class RebuildResult:
    user_rows: int
    all_users_rows: int
    all_users_rows_at_30: int
    before: UsageTotals
    after: UsageTotals


def _level_totals(session: Session) -> UsageTotals:
    turns, input_tokens, output_tokens, cost = session.execute(
        select(
            func.sum(UsageHour.turns),
            func.sum(UsageHour.input_tokens),
            func.sum(UsageHour.output_tokens),
            func.sum(UsageHour.cost),
        ).where(UsageHour.scope == ALL_USERS)
    ).one()
    return UsageTotals(int(turns or 0), int(input_tokens or 0), int(output_tokens or 0), _to_cost(cost))


def _hour_and_minute(dialect: str, moment):
    """A UTC instant's hour start (in the column's stored form) and its minute past the hour."""
    if dialect == "postgresql":
        utc = func.timezone("UTC", moment)
        return func.timezone("UTC", func.date_trunc("hour", utc)), func.date_part("minute", utc)
    return func.strftime("%Y-%m-%d %H:00:00.000000", moment), func.cast(func.strftime("%M", moment), Integer)


def _hour_shifted(dialect: str, minutes: int):
    """``hour_start`` moved by ``minutes``, in the column's stored form."""
    if dialect == "postgresql":
        return UsageHour.hour_start + literal(timedelta(minutes=minutes), Interval())
    return func.strftime("%Y-%m-%d %H:%M:00.000000", UsageHour.hour_start, _sqlite_modifier(minutes))


def _all_users_from_30(dialect: str) -> Select:
    """All users' hours from :30 (``ALL_USERS_AT_30``), from their UTC hours: the hour from
    ``H - 30 min`` holds the first half of hour ``H``, the one from ``H + 30 min`` its second
    half, each half's prefixes counted from the new hour's start (hour H's first 15 minutes
    are minutes 30–45 of the hour from ``H - 30 min``). Exact: both levels are sums of the
    same quarters. Columns in ``rebuild``'s order; migration 20261202_0050 backfills with
    the same SQL."""

    def minutes(measure: str, start: int, end: int):
        """Hour H's ``measure`` in its minutes ``[start, end)``."""
        if start == end:
            return literal_column("0")
        value = UsageHour.prefix_column(measure, end)
        return value - UsageHour.prefix_column(measure, start) if start else value

    def half(shift: int, parts: dict[int, tuple[int, int]]) -> Select:
        """Hour H's rows as the part of the hour from ``H + shift`` they hold: for each of
        its prefixes (``parts[split]``), H's minutes in it; hours with usage there only."""
        columns = [
            minutes(measure, *parts[split]).label(f"{measure}_{split}")
            for split in (60, *UsageHour.SPLITS)
            for measure in UsageHour.MEASURES
        ]
        used = or_(*[minutes(measure, *parts[60]) != 0 for measure in UsageHour.MEASURES])
        hour_start = _hour_shifted(dialect, shift).label("hour_start")
        return select(hour_start, UsageHour.model, *columns).where(UsageHour.scope == ALL_USERS, used)

    # H's first half is the second half of the hour from H - 30: in its prefix to 45 only.
    first_half = half(-30, {60: (0, 30), 15: (0, 0), 30: (0, 0), 45: (0, 15)})
    # H's second half is the first half of the hour from H + 30.
    second_half = half(30, {60: (30, 60), 15: (30, 45), 30: (30, 60), 45: (30, 60)})
    halves = union_all(first_half, second_half).subquery("halves")
    sums = [
        func.sum(halves.c[f"{measure}_{split}"])
        for split in (60, *UsageHour.SPLITS)
        for measure in UsageHour.MEASURES
    ]
    return (
        select(literal(ALL_USERS_AT_30), halves.c.hour_start, halves.c.model, *sums)
        .group_by(halves.c.hour_start, halves.c.model)
        .order_by(halves.c.hour_start, halves.c.model)
    )


def rebuild(session: Session) -> RebuildResult:
    """Recompute both levels from the turns, in one transaction that commits.

    Every billed turn (``cost`` set: completed, or failed/cancelled after using tokens)
    adds its tokens and its charged cost to the hour of ``completed_at``, and counts as a
    turn when completed — what ``billing.settle_turn`` adds with the debit. The all-users
    level is then summed from the per-user level, and its hours from :30 from its UTC
    hours (``_all_users_from_30``). Writers wait meanwhile (Postgres: an
    ``EXCLUSIVE`` table lock; SQLite: the write lock); readers see the old rows until the
    commit.

    Conversation-summary refreshes have no turn row (their tokens live only in the rollups,
    their charge in the ledger), so a rebuild drops them: ``before``/``after`` show by how much.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(text("LOCK TABLE usage_hours IN EXCLUSIVE MODE"))
        # One GROUP BY over every turn: let it hash in memory rather than sort on disk.
        session.execute(text("SET LOCAL work_mem = '256MB'"))
    before = _level_totals(session)
    session.execute(delete(UsageHour))
    hour, minute = _hour_and_minute(dialect, Turn.completed_at)
    amounts = {
        "turns": case((Turn.status == TurnStatus.COMPLETED, 1), else_=0),
        "input_tokens": Turn.input_tokens,
        "output_tokens": Turn.output_tokens,
        "cost": Turn.cost,
    }
    names = ["scope", "hour_start", "model"]
    sums = []
    for split in (60, *UsageHour.SPLITS):
        for measure in UsageHour.MEASURES:
            names.append(UsageHour.prefix_column(measure, split).key)
            amount = amounts[measure] if split == 60 else case((minute < split, amounts[measure]), else_=0)
            sums.append(func.sum(amount))
    per_user = (
        select(Turn.user_id, hour, Turn.model, *sums)
        .where(Turn.completed_at.is_not(None), Turn.cost.is_not(None))
        # Positional: the hour expression's bound values would otherwise appear twice.
        .group_by(literal_column("1"), literal_column("2"), literal_column("3"))
        # In time order, as the debits write them: a rebuilt table reads like a live one.
        .order_by(literal_column("2"), literal_column("1"), literal_column("3"))
    )
    session.execute(insert(UsageHour).from_select(names, per_user))
    measures = [getattr(UsageHour, name) for name in names[3:]]
    all_users = (
        select(literal(ALL_USERS), UsageHour.hour_start, UsageHour.model, *[func.sum(m) for m in measures])
        .where(UsageHour.scope.not_in(ALL_USERS_SCOPES))
        .group_by(UsageHour.hour_start, UsageHour.model)
        .order_by(UsageHour.hour_start, UsageHour.model)
    )
    session.execute(insert(UsageHour).from_select(names, all_users))
    session.execute(insert(UsageHour).from_select(names, _all_users_from_30(dialect)))
    after = _level_totals(session)
    is_all_users, is_at_30 = UsageHour.scope == ALL_USERS, UsageHour.scope == ALL_USERS_AT_30
    user_rows, all_users_rows, all_users_rows_at_30 = session.execute(
        select(
            func.count().filter(UsageHour.scope.not_in(ALL_USERS_SCOPES)),
            func.count().filter(is_all_users),
            func.count().filter(is_at_30),
        )
    ).one()
    session.commit()
    return RebuildResult(user_rows, all_users_rows, all_users_rows_at_30, before, after)
