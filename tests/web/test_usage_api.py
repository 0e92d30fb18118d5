"""Usage summary and CSV export over HTTP, on SQLite.

The dialect-neutral tests here take one fixture, ``usage_env``;
``tests/integration/test_usage_pg.py`` imports them and runs them again on
Postgres with its own ``usage_env``, so both dialects must give the same answers
(the expectations are literals, not computed per dialect).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from shared.models import ALL_USERS, ALL_USERS_AT_30, ALL_USERS_SCOPES, ChatSession, Room, Turn, UsageHour
from shared.services import billing, usage
from tests.factories import Actor, make_actor
from web.schemas.usage import UsageExportQuerySchema

SUMMARY = "/api/v1/admin/usage/summary"
EXPORT = "/api/v1/admin/usage/export.csv"
QUOTED_MODEL = 'beta, "quoted"'


def parsed_query(**params: str) -> usage.UsageQuery:
    """A query as the API makes it from query-string values: the schema, then the service."""
    return usage.make_query(**UsageExportQuerySchema().load(params))


# -- seeding ----------------------------------------------------------------------------


class UsageRecorder:
    """Writes what billing writes for a completed turn: the turn row and its rollups."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._chats: dict[str, ChatSession] = {}
        self._seq: dict[str, int] = {}

    def _chat(self, user_id: str) -> ChatSession:
        if user_id not in self._chats:
            room = Room(user_id=user_id, name="usage")
            self.session.add(room)
            self.session.flush()
            chat = ChatSession(room_id=room.id, user_id=user_id)
            self.session.add(chat)
            self.session.flush()
            self._chats[user_id] = chat
            self._seq[user_id] = 0
        return self._chats[user_id]

    def _rollup(self, user_id, model, at, turns, input_tokens, output_tokens, cost) -> None:
        billing.record_usage(
            self.session,
            user_id=user_id,
            model=model,
            at=at,
            turns=turns,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost=cost,
        )
        self.session.flush()

    def turn(self, user_id, model, at, input_tokens, output_tokens, cost) -> None:
        chat = self._chat(user_id)
        self._seq[user_id] += 1
        self.session.add(
            Turn(
                session_id=chat.id,
                room_id=chat.room_id,
                user_id=user_id,
                seq=self._seq[user_id],
                status="completed",
                content="usage",
                reply="ok",
                model=model,
                max_output_tokens=256,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost=cost,
                created_at=at,
                updated_at=at,
                completed_at=at,
            )
        )
        self._rollup(user_id, model, at, 1, input_tokens, output_tokens, cost)

    def summary_tokens(self, user_id, model, at, input_tokens, output_tokens, cost) -> None:
        """A rolling-summary refresh: billed into the rollups with turns=0, no turn row."""
        self._rollup(user_id, model, at, 0, input_tokens, output_tokens, cost)


def z(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# Event n: (user, model, completed_at UTC); n*100 input tokens, n*10 output, cost 0.nnnnnn.
EVENTS: dict[int, tuple[str, str, datetime]] = {
    # Year boundary and ISO weeks: 2020-12-28 is the Monday of 2020's week 53, which
    # runs to Sunday 2021-01-03; 2021-01-04 starts week 1 of 2021.
    1: ("ann", "alpha", z("2020-12-28T09:15")),
    2: ("ann", "alpha", z("2020-12-31T23:30")),  # Berlin: 00:30 on 1 January
    3: ("bob", "alpha", z("2021-01-01T00:10")),
    4: ("ann", QUOTED_MODEL, z("2021-01-03T12:00")),
    5: ("ann", "alpha", z("2021-01-04T08:00")),
    6: ("ann", "alpha", z("2021-01-04T08:10")),  # same rollup period as 5
    # Berlin spring forward, 2026-03-29 01:00 UTC (02:00 CET -> 03:00 CEST).
    7: ("ann", "alpha", z("2026-03-28T22:30")),  # 23:30 CET, 28 March
    8: ("ann", "alpha", z("2026-03-28T23:00")),  # 00:00 CET, 29 March
    9: ("bob", QUOTED_MODEL, z("2026-03-29T00:59")),  # 01:59 CET
    10: ("bob", QUOTED_MODEL, z("2026-03-29T01:00")),  # 03:00 CEST
    11: ("ann", "alpha", z("2026-03-29T21:59")),  # 23:59 CEST, 29 March
    12: ("ann", "alpha", z("2026-03-29T22:00")),  # 00:00 CEST, Monday 30 March
    # Berlin fall back, 2026-10-25 01:00 UTC (03:00 CEST -> 02:00 CET).
    13: ("ann", "alpha", z("2026-10-24T21:30")),  # 23:30 CEST, 24 October
    14: ("ann", "alpha", z("2026-10-24T22:00")),  # 00:00 CEST, 25 October
    15: ("bob", "alpha", z("2026-10-25T00:30")),  # 02:30 CEST (first pass)
    16: ("bob", "alpha", z("2026-10-25T01:30")),  # 02:30 CET (second pass)
    17: ("ann", QUOTED_MODEL, z("2026-10-25T22:59")),  # 23:59 CET, 25 October
    18: ("ann", QUOTED_MODEL, z("2026-10-25T23:00")),  # 00:00 CET, 26 October
    # Asia/Kolkata, +05:30: local midnight of 11 January is 18:30 UTC;
    # Asia/Kathmandu, +05:45: at 18:15 UTC. One UTC hour, three local splits.
    22: ("bob", "alpha", z("2026-01-10T18:10")),  # 23:40 IST / 23:55 NPT, 10 January
    19: ("bob", "alpha", z("2026-01-10T18:20")),  # 23:50 IST, 10 January / 00:05 NPT, 11 January
    20: ("bob", "alpha", z("2026-01-10T18:40")),  # 00:10 IST, 11 January (same UTC hour as 19)
    21: ("bob", "alpha", z("2026-01-10T19:05")),  # 00:35 IST, 11 January
}


def tokens(n: int) -> tuple[int, int, Decimal]:
    return n * 100, n * 10, Decimal(f"0.{n:03d}{n:03d}")


@dataclass
class UsageEnv:
    client: object
    session: Session
    admin: Actor
    users: dict[str, str] = field(default_factory=dict)

    def get(self, path: str, **params):
        query = {key: value.format(**self.users) for key, value in params.items() if value is not None}
        return self.client.get(path, query_string=query, headers=self.admin.headers)

    def summary(self, **params):
        response = self.get(SUMMARY, **params)
        assert response.status_code == 200, response.get_json()
        return response.get_json()


def seed(session: Session, admin: Actor, client) -> UsageEnv:
    env = UsageEnv(client=client, session=session, admin=admin)
    for name in ("ann", "bob"):
        env.users[name] = make_actor(session, "user", email=f"{name}@usage.test").id
    recorder = UsageRecorder(session)
    for n, (name, model, at) in EVENTS.items():
        recorder.turn(env.users[name], model, at, *tokens(n))
    session.commit()
    return env


def expected(buckets: list[tuple[str, list[int]]]) -> dict:
    daily = []
    totals = {"turns": 0, "input_tokens": 0, "output_tokens": 0, "cost": Decimal(0)}
    for start, events in buckets:
        row = {"turns": len(events), "input_tokens": 0, "output_tokens": 0, "cost": Decimal(0)}
        for n in events:
            input_tokens, output_tokens, cost = tokens(n)
            row["input_tokens"] += input_tokens
            row["output_tokens"] += output_tokens
            row["cost"] += cost
        for key in totals:
            totals[key] += row[key]
        daily.append({"bucket_start": start, **row, "cost": f"{row['cost']:.6f}"})
    return {"totals": {**totals, "cost": f"{totals['cost']:.6f}"}, "daily": daily}


# -- the suite (runs on SQLite here and on Postgres in tests/integration) ---------------

BOUNDARY_CASES = [
    pytest.param(
        {"bucket": "day", "start": "2020-12-28", "end": "2021-01-04"},
        [
            ("2020-12-28", [1]),
            ("2020-12-31", [2]),
            ("2021-01-01", [3]),
            ("2021-01-03", [4]),
            ("2021-01-04", [5, 6]),
        ],
        id="utc-days-across-the-year-end",
    ),
    pytest.param(
        {"bucket": "week", "start": "2020-12-28", "end": "2021-01-10"},
        [("2020-12-28", [1, 2, 3, 4]), ("2021-01-04", [5, 6])],
        id="utc-iso-week-53-then-week-1",
    ),
    pytest.param(
        {"bucket": "month", "start": "2020-12-01", "end": "2021-01-31"},
        [("2020-12-01", [1, 2]), ("2021-01-01", [3, 4, 5, 6])],
        id="utc-months-across-the-year-end",
    ),
    pytest.param(
        {"bucket": "day", "start": "2020-12-28", "end": "2021-01-04", "tz": "Europe/Berlin"},
        [("2020-12-28", [1]), ("2021-01-01", [2, 3]), ("2021-01-03", [4]), ("2021-01-04", [5, 6])],
        id="berlin-new-year-starts-an-hour-before-utc",
    ),
    pytest.param(
        {"bucket": "month", "start": "2020-12-01", "end": "2021-01-31", "tz": "Europe/Berlin"},
        [("2020-12-01", [1]), ("2021-01-01", [2, 3, 4, 5, 6])],
        id="berlin-months",
    ),
    pytest.param(
        {"bucket": "day", "start": "2026-03-28", "end": "2026-03-30", "tz": "Europe/Berlin"},
        [("2026-03-28", [7]), ("2026-03-29", [8, 9, 10, 11]), ("2026-03-30", [12])],
        id="berlin-spring-forward-day-has-23-hours",
    ),
    pytest.param(
        {"bucket": "day", "start": "2026-03-28", "end": "2026-03-30"},
        [("2026-03-28", [7, 8]), ("2026-03-29", [9, 10, 11, 12])],
        id="utc-days-around-spring-forward",
    ),
    pytest.param(
        {"bucket": "week", "start": "2026-03-23", "end": "2026-04-05", "tz": "Europe/Berlin"},
        [("2026-03-23", [7, 8, 9, 10, 11]), ("2026-03-30", [12])],
        id="berlin-week-spanning-spring-forward",
    ),
    pytest.param(
        {"bucket": "day", "start": "2026-03-29", "end": "2026-03-29", "tz": "Europe/Berlin"},
        [("2026-03-29", [8, 9, 10, 11])],
        id="berlin-range-is-local-midnight-to-midnight",
    ),
    pytest.param(
        {"bucket": "day", "start": "2026-10-24", "end": "2026-10-26", "tz": "Europe/Berlin"},
        [("2026-10-24", [13]), ("2026-10-25", [14, 15, 16, 17]), ("2026-10-26", [18])],
        id="berlin-fall-back-day-has-25-hours",
    ),
    pytest.param(
        {"bucket": "day", "start": "2026-10-24", "end": "2026-10-26"},
        [("2026-10-24", [13, 14]), ("2026-10-25", [15, 16, 17, 18])],
        id="utc-days-around-fall-back",
    ),
    pytest.param(
        {"bucket": "month", "start": "2026-10-01", "end": "2026-10-31", "tz": "Europe/Berlin"},
        [("2026-10-01", [13, 14, 15, 16, 17, 18])],
        id="berlin-month-with-fall-back",
    ),
    pytest.param(
        {"bucket": "day", "start": "2026-01-10", "end": "2026-01-11", "tz": "Asia/Kolkata"},
        [("2026-01-10", [22, 19]), ("2026-01-11", [20, 21])],
        id="kolkata-half-hour-offset-splits-at-local-midnight",
    ),
    pytest.param(
        {"bucket": "day", "start": "2026-01-11", "end": "2026-01-11", "tz": "Asia/Kolkata"},
        [("2026-01-11", [20, 21])],
        id="kolkata-range-starts-at-local-midnight",
    ),
    pytest.param(
        {"bucket": "day", "start": "2026-01-10", "end": "2026-01-11", "tz": "Asia/Kathmandu"},
        [("2026-01-10", [22]), ("2026-01-11", [19, 20, 21])],
        id="kathmandu-quarter-hour-offset-splits-at-local-midnight",
    ),
    pytest.param(
        {"bucket": "day", "start": "2026-01-10", "end": "2026-01-11"},
        [("2026-01-10", [22, 19, 20, 21])],
        id="utc-day-of-the-kolkata-events",
    ),
    pytest.param(
        {"bucket": "month", "start": "2020-01-01", "end": "2026-12-31", "user_id": "{bob}"},
        [
            ("2021-01-01", [3]),
            ("2026-01-01", [22, 19, 20, 21]),
            ("2026-03-01", [9, 10]),
            ("2026-10-01", [15, 16]),
        ],
        id="filter-by-user",
    ),
    pytest.param(
        {"bucket": "month", "start": "2020-01-01", "end": "2026-12-31", "model": QUOTED_MODEL},
        [("2021-01-01", [4]), ("2026-03-01", [9, 10]), ("2026-10-01", [17, 18])],
        id="filter-by-model",
    ),
    pytest.param(
        {
            "bucket": "week",
            "start": "2026-01-01",
            "end": "2026-12-31",
            "user_id": "{ann}",
            "model": "alpha",
            "tz": "Europe/Berlin",
        },
        [("2026-03-23", [7, 8, 11]), ("2026-03-30", [12]), ("2026-10-19", [13, 14])],
        id="filter-by-user-and-model-in-berlin-weeks",
    ),
    pytest.param(
        {"start": "2026-10-25", "end": "2026-10-25"},
        [("2026-10-25", [15, 16, 17, 18])],
        id="bucket-defaults-to-day-and-zone-to-utc",
    ),
]


@pytest.mark.parametrize(("params", "buckets"), BOUNDARY_CASES)
def test_summary_buckets_usage_by_local_calendar(usage_env, params, buckets):
    body = usage_env.summary(**params)
    assert body == {
        "bucket": params.get("bucket", "day"),
        "start": params["start"],
        "end": params["end"],
        **expected(buckets),
    }


def test_an_unknown_bucket_gives_totals_without_buckets(usage_env):
    body = usage_env.summary(bucket="fortnight", start="2026-03-28", end="2026-03-30", tz="Europe/Berlin")
    assert body == {
        "bucket": "fortnight",
        "start": "2026-03-28",
        "end": "2026-03-30",
        **expected([("-", [7, 8, 9, 10, 11, 12])]),
        "daily": [],
    }


def test_a_range_without_usage_is_empty_not_an_error(usage_env):
    body = usage_env.summary(bucket="month", start="2024-01-01", end="2024-12-31", user_id="{ann}")
    assert body["daily"] == []
    assert body["totals"] == {"turns": 0, "input_tokens": 0, "output_tokens": 0, "cost": "0.000000"}


def test_the_default_range_is_the_last_30_days(usage_env):
    recorder = UsageRecorder(usage_env.session)
    now = datetime.now(UTC)
    recorder.turn(usage_env.users["ann"], "alpha", now - timedelta(minutes=1), 7, 3, Decimal("0.000010"))
    recorder.turn(usage_env.users["ann"], "alpha", now - timedelta(days=40), 5, 5, Decimal("1"))
    usage_env.session.commit()
    body = usage_env.summary()
    today = datetime.now(UTC).date()
    assert (body["bucket"], body["start"], body["end"]) == (
        "day",
        (today - timedelta(days=29)).isoformat(),
        today.isoformat(),
    )
    assert body["totals"] == {"turns": 1, "input_tokens": 7, "output_tokens": 3, "cost": "0.000010"}
    zoned = usage_env.summary(tz="Pacific/Kiritimati")  # UTC+14: often already tomorrow there
    assert zoned["end"] == datetime.now(ZoneInfo("Pacific/Kiritimati")).date().isoformat()


# One zone per way the hour rows are cut (usage.hour_cuts): whole hours (UTC, Berlin across
# DST, New York), one cut at :30 (Kolkata; St John's, whose DST changes at :30 too), at :15
# (Kathmandu; Chatham across its DST), and the four quarters (Lord Howe: +10:30, DST +11).
ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Asia/Kolkata",
    "America/St_Johns",
    "Asia/Kathmandu",
    "Pacific/Chatham",
    "Australia/Lord_Howe",
]


@pytest.mark.parametrize("tz", ZONES)
@pytest.mark.parametrize("bucket", ["day", "week", "month", "quarter"])
def test_rollup_summary_equals_the_sum_over_raw_completed_turns(usage_env, tz, bucket):
    """The rollups and the raw turns agree in every zone and bucket, and both agree with a
    plain-Python application of the rule (a turn counts on the local date it completed)."""
    for filters in (
        {},
        {"user_id": usage_env.users["bob"]},
        {"model": QUOTED_MODEL},
        {"user_id": usage_env.users["ann"], "model": "alpha"},
    ):
        query = parsed_query(bucket=bucket, start="2020-12-01", end="2026-12-31", tz=tz, **filters)
        from_rollups = usage.summarize(usage_env.session, query)
        from_turns = usage.summary_from_turns(usage_env.session, query)
        assert from_rollups == from_turns
        assert from_rollups.totals.turns == len(_matching(usage_env, filters))
        if bucket != "quarter":
            assert _by_bucket(from_rollups) == _python_buckets(usage_env, query, filters)


def _matching(env: UsageEnv, filters: dict) -> list[int]:
    return [
        n
        for n, (name, model, _) in EVENTS.items()
        if filters.get("user_id") in (None, env.users[name]) and filters.get("model") in (None, model)
    ]


def _python_buckets(env: UsageEnv, query, filters: dict) -> dict[date, int]:
    counts: dict[date, int] = {}
    for n in _matching(env, filters):
        start = usage.bucket_start(usage.local_day(EVENTS[n][2], query.zone), query.bucket)
        counts[start] = counts.get(start, 0) + 1
    return counts


def _by_bucket(summary) -> dict[date, int]:
    return {bucket.bucket_start: bucket.turns for bucket in summary.daily}


@pytest.mark.parametrize("tz", ["UTC", "Asia/Kolkata", "Asia/Kathmandu", "Australia/Lord_Howe"])
@pytest.mark.parametrize("group_by", ["user", "model"])
def test_grouped_buckets_equal_the_raw_turns_grouped_the_same_way(usage_env, tz, group_by):
    """The export's rows (per user from the per-user level, per model from the all-users
    level) match the turns grouped by bucket and key."""
    session = usage_env.session
    for bucket in ("day", "week", "month"):
        query = parsed_query(bucket=bucket, start="2020-12-01", end="2026-12-31", tz=tz, group_by=group_by)
        dialect = session.get_bind().dialect.name
        from_rollups = list(usage._bucket_rows(session, query, usage._rollup_statement(dialect, query)))
        from_turns = list(usage._bucket_rows(session, query, usage._turns_statement(dialect, query)))
        assert from_rollups == from_turns and from_rollups


@pytest.mark.parametrize(
    ("start", "end", "tz"),
    [
        ("2026-01-11", "2026-01-11", "Asia/Kolkata"),  # the window starts and ends at :30
        ("2026-01-11", "2026-01-11", "Asia/Kathmandu"),
        ("2026-03-29", "2026-03-29", "Europe/Berlin"),
        ("2026-10-25", "2026-10-25", "Australia/Lord_Howe"),
    ],
)
def test_totals_with_an_unknown_bucket_cut_the_window_exactly(usage_env, start, end, tz):
    query = parsed_query(bucket="quarter", start=start, end=end, tz=tz)
    days = usage.summarize(usage_env.session, parsed_query(start=start, end=end, tz=tz))
    assert usage.summarize(usage_env.session, query).totals == days.totals
    assert usage.summary_from_turns(usage_env.session, query).totals == days.totals


def _hours_from_30(session) -> list[tuple]:
    rows = session.execute(
        select(UsageHour.__table__)
        .where(UsageHour.scope == ALL_USERS_AT_30)
        .order_by(UsageHour.hour_start, UsageHour.model)
    )
    return [tuple(row) for row in rows]


def test_usage_rebuild_recomputes_both_levels_from_the_turns(usage_env):
    """``tollgate usage-rebuild`` (``usage.rebuild``) repairs rollups that drifted from the
    turns, and its result agrees with the raw-turns oracle everywhere; all users' hours
    from :30 come back exactly as the debits wrote them."""
    session = usage_env.session
    queries = [
        parsed_query(bucket=bucket, start="2020-12-01", end="2026-12-31", tz=tz, **filters)
        for bucket in ("day", "week", "month")
        for tz in ("UTC", "Asia/Kolkata", "America/St_Johns", "Pacific/Chatham", "Australia/Lord_Howe")
        for filters in ({}, {"user_id": usage_env.users["bob"]}, {"model": QUOTED_MODEL})
    ]
    expected_summaries = [usage.summary_from_turns(session, query) for query in queries]
    written_from_30 = _hours_from_30(session)
    # Drift: the all-users rows of one hour lost (from :00 and from :30), one user's hour
    # doubled, an hour with no turns.
    for scope, hour in ((ALL_USERS, "2026-01-10T18:00"), (ALL_USERS_AT_30, "2026-01-10T18:30")):
        session.execute(delete(UsageHour).where(UsageHour.scope == scope, UsageHour.hour_start == z(hour)))
    session.execute(
        update(UsageHour).where(UsageHour.scope == usage_env.users["ann"]).values(turns=UsageHour.turns * 2)
    )
    UsageRecorder(session)._rollup(
        usage_env.users["bob"], "alpha", z("2024-06-01T12:00"), 5, 5, 5, Decimal("5")
    )
    session.commit()
    assert [usage.summarize(session, query) for query in queries] != expected_summaries

    result = usage.rebuild(session)

    assert [usage.summarize(session, query) for query in queries] == expected_summaries
    assert _hours_from_30(session) == written_from_30
    # before/after are the all-users level's totals: 3 turns of 18:00 lost, 5 bogus ones added.
    assert (result.before.turns, result.after.turns) == (len(EVENTS) - 3 + 5, len(EVENTS))

    def rows(condition) -> int:
        return session.scalar(select(func.count()).select_from(UsageHour).where(condition))

    assert (result.user_rows, result.all_users_rows, result.all_users_rows_at_30) == (
        rows(UsageHour.scope.not_in(ALL_USERS_SCOPES)),
        rows(UsageHour.scope == ALL_USERS),
        rows(UsageHour.scope == ALL_USERS_AT_30),
    )
    session.rollback()


@pytest.mark.parametrize(
    ("tz", "from_30"),
    [
        ("Asia/Kolkata", True),
        ("America/St_Johns", True),  # -03:30 and, from March to November, -02:30
        ("UTC", False),
        ("Asia/Kathmandu", False),  # cut at :15
        ("Australia/Lord_Howe", False),  # cut at :00 and :30 (its DST is 30 minutes)
    ],
)
def test_all_users_in_a_zone_cut_at_30_read_the_hours_from_30_whole(usage_env, tz, from_30):
    """Kolkata and St John's cut every UTC hour holding a local midnight at :30: their
    all-users summaries read all users' hours from :30 instead, each whole to one bucket,
    with no hour read twice (the model filter and the export by model too); one user's and
    the export by user still read the per-user UTC hours. The answer is the raw turns'
    (checked for every bucket and filter above); here, that the path is taken."""
    dialect = usage_env.session.get_bind().dialect.name
    for bucket in ("day", "week", "month"):
        for filters, reads_30 in (
            ({}, from_30),
            ({"model": QUOTED_MODEL}, from_30),
            ({"group_by": "model"}, from_30),
            ({"user_id": usage_env.users["bob"]}, False),
            ({"group_by": "user"}, False),
        ):
            query = parsed_query(bucket=bucket, start="2020-12-01", end="2026-12-31", tz=tz, **filters)
            request = usage._Request(query, *usage.utc_window(query.start, query.end, query.zone))
            assert usage._shape(dialect, request).from_30 is reads_30, (bucket, filters)
            bound = usage._rollup_statement(dialect, query)
            compiled = bound.statement.compile(dialect=usage_env.session.get_bind().dialect)
            sql = compiled.construct_expanded_state(bound.values).statement  # literals rendered
            if reads_30:
                assert "edge_hours" not in bound.values, (bucket, filters)  # no hour read twice
            assert (f"scope = '{ALL_USERS_AT_30}'" in sql) is reads_30, (bucket, filters)
    # Behaviour a user could see: without the UTC-hour rows for all users, Kolkata's
    # all-users answer is unchanged (it never reads them) and UTC's is empty.
    query = parsed_query(bucket="day", start="2020-12-01", end="2026-12-31", tz=tz)
    answer = usage.summarize(usage_env.session, query)
    usage_env.session.execute(delete(UsageHour).where(UsageHour.scope == ALL_USERS))
    assert (usage.summarize(usage_env.session, query) == answer) is from_30
    assert not usage.summarize(usage_env.session, parsed_query(start="2026-01-01", end="2026-01-31")).daily
    usage_env.session.rollback()


def test_rollups_written_by_billing_match_the_raw_turns(usage_env):
    """The rollups billing.settle_turn writes with each debit sum to the same report as the turns."""
    session = usage_env.session
    recorder = UsageRecorder(session)
    chat = recorder._chat(usage_env.users["ann"])
    for seq, at in enumerate(
        [z("2027-02-01T10:05"), z("2027-02-01T10:55"), z("2027-02-01T23:59")], start=100
    ):
        turn = Turn(
            session_id=chat.id,
            room_id=chat.room_id,
            user_id=usage_env.users["ann"],
            seq=seq,
            status="completed",
            content="billed",
            model="alpha",
            max_output_tokens=64,
            input_tokens=seq,
            output_tokens=seq // 10,
            cost=Decimal("0.000123") * seq,
            created_at=at,
            updated_at=at,
            completed_at=at,
        )
        session.add(turn)
        session.flush()
        billing.settle_turn(
            session,
            user_id=turn.user_id,
            turn_id=turn.id,
            model=turn.model,
            cost=turn.cost,
            input_tokens=turn.input_tokens,
            output_tokens=turn.output_tokens,
            at=at,
            enforced=False,
        )
        session.commit()
    for tz in ("UTC", "Asia/Kolkata", "Asia/Kathmandu"):
        query = parsed_query(start="2027-02-01", end="2027-02-02", tz=tz)
        assert usage.summarize(session, query) == usage.summary_from_turns(session, query)
    body = usage_env.summary(start="2027-02-01", end="2027-02-01")
    assert body["totals"] == {"turns": 3, "input_tokens": 303, "output_tokens": 30, "cost": "0.037269"}


def test_summary_tokens_count_as_usage_without_counting_as_turns(usage_env):
    before = usage_env.summary(start="2026-01-10", end="2026-01-10")
    UsageRecorder(usage_env.session).summary_tokens(
        usage_env.users["bob"], "alpha", z("2026-01-10T12:34"), 900, 90, Decimal("0.000900")
    )
    usage_env.session.commit()
    after = usage_env.summary(start="2026-01-10", end="2026-01-10")
    assert after["totals"] == {
        "turns": before["totals"]["turns"],
        "input_tokens": before["totals"]["input_tokens"] + 900,
        "output_tokens": before["totals"]["output_tokens"] + 90,
        "cost": f"{Decimal(before['totals']['cost']) + Decimal('0.000900'):.6f}",
    }


INVALID_QUERIES = [
    pytest.param(
        {"start": "2026-02-01", "end": "2026-01-01"}, "invalid_range", "start", id="start-after-end"
    ),
    pytest.param({"start": "2026-13-01"}, "invalid_date", "start", id="month-13"),
    pytest.param({"end": "2026-02-30"}, "invalid_date", "end", id="february-30"),
    pytest.param({"start": "2026/01/01"}, "invalid_date", "start", id="slashes"),
    pytest.param({"start": "20260101"}, "invalid_date", "start", id="basic-format"),
    pytest.param({"start": "2026-W01-1"}, "invalid_date", "start", id="week-date"),
    pytest.param({"end": "yesterday"}, "invalid_date", "end", id="words"),
    pytest.param({"start": "0001-01-01", "end": "0001-01-02"}, "invalid_date", "start", id="year-one"),
    pytest.param({"start": "2000-01-01", "end": "2026-01-01"}, "range_too_large", "end", id="26-years"),
    pytest.param({"user_id": "not-a-uuid"}, "invalid_user_id", "user_id", id="user-id-not-uuid"),
    pytest.param({"user_id": "123"}, "invalid_user_id", "user_id", id="user-id-number"),
    pytest.param(
        {"user_id": "{12345678-1234-5678-1234-567812345678}"}, "invalid_user_id", "user_id", id="braced-uuid"
    ),
    pytest.param({"tz": "Mars/Olympus_Mons"}, "invalid_timezone", "tz", id="unknown-zone"),
    pytest.param({"tz": "../../etc/passwd"}, "invalid_timezone", "tz", id="path-as-zone"),
    pytest.param({"tz": "+05:30"}, "invalid_timezone", "tz", id="offset-as-zone"),
    pytest.param({"model": "m" * 201}, "invalid_model", "model", id="model-too-long"),
    pytest.param({"start": "2026-01-01T00:00"}, "invalid_date", "start", id="date-time"),
    pytest.param({"end": "9999-12-31"}, "invalid_date", "end", id="after-max-date"),
    pytest.param(
        {"user_id": "12345678123456781234567812345678"},
        "invalid_user_id",
        "user_id",
        id="uuid-without-hyphens",
    ),
    pytest.param({"tz": "europe/berlin"}, "invalid_timezone", "tz", id="zone-in-lower-case"),
]


@pytest.mark.parametrize(("params", "error", "field_name"), INVALID_QUERIES)
@pytest.mark.parametrize("path", [SUMMARY, EXPORT])
def test_bad_queries_are_422_with_a_stable_code(usage_env, path, params, error, field_name):
    response = usage_env.get(
        path, **{key: value.replace("{", "{{").replace("}", "}}") for key, value in params.items()}
    )
    assert response.status_code == 422
    assert response.content_type == "application/json"
    body = response.get_json()
    assert body["error"] == error
    assert body["errors"] == {"query": {field_name: [body["message"]]}}


@pytest.mark.parametrize("path", [SUMMARY, EXPORT])
def test_unknown_query_parameters_are_rejected(usage_env, path):
    response = usage_env.get(path, bukket="day")
    assert response.status_code == 422
    assert response.get_json()["error"] == "validation_error"
    assert "bukket" in response.get_json()["errors"]["query"]


def test_a_well_formed_unknown_user_id_is_an_empty_filter(usage_env):
    body = usage_env.summary(
        user_id="12345678-1234-5678-1234-567812345678", start="2020-12-01", end="2026-12-31"
    )
    assert body["daily"] == [] and body["totals"]["turns"] == 0


def test_usage_is_for_admins_only(usage_env):
    user = make_actor(usage_env.session, "user")
    for path in (SUMMARY, EXPORT):
        assert usage_env.client.get(path).status_code == 401
        forbidden = usage_env.client.get(path, headers=user.headers)
        assert forbidden.status_code == 403 and forbidden.get_json()["error"] == "forbidden"


# -- CSV ----------------------------------------------------------------------------------


def read_csv(response) -> list[list[str]]:
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    return list(csv.reader(io.StringIO(response.get_data(as_text=True), newline="")))


def test_export_streams_the_summary_buckets_as_csv(usage_env):
    params = {"bucket": "day", "start": "2026-03-28", "end": "2026-03-30", "tz": "Europe/Berlin"}
    response = usage_env.get(EXPORT, **params)
    assert response.is_streamed
    assert "attachment" in response.headers["Content-Disposition"]
    rows = read_csv(response)
    summary = usage_env.summary(**params)
    assert rows[0] == ["bucket_start", "turns", "input_tokens", "output_tokens", "cost"]
    assert rows[1:] == [
        [b["bucket_start"], str(b["turns"]), str(b["input_tokens"]), str(b["output_tokens"]), b["cost"]]
        for b in summary["daily"]
    ]
    assert response.get_data(as_text=True).endswith("\r\n")


def test_export_by_model_quotes_commas_and_quotes_per_rfc_4180(usage_env):
    response = usage_env.get(EXPORT, bucket="month", start="2026-01-01", end="2026-12-31", group_by="model")
    raw = response.get_data(as_text=True)
    assert '"beta, ""quoted"""' in raw
    rows = read_csv(response)
    assert rows == [
        ["bucket_start", "model", "turns", "input_tokens", "output_tokens", "cost"],
        _csv_row("2026-01-01", "alpha", [22, 19, 20, 21]),
        _csv_row("2026-03-01", "alpha", [7, 8, 11, 12]),
        _csv_row("2026-03-01", QUOTED_MODEL, [9, 10]),
        _csv_row("2026-10-01", "alpha", [13, 14, 15, 16]),
        _csv_row("2026-10-01", QUOTED_MODEL, [17, 18]),
    ]


def test_export_by_user_in_a_zone(usage_env):
    users = usage_env.users
    response = usage_env.get(
        EXPORT, bucket="week", start="2020-12-28", end="2021-01-10", tz="Europe/Berlin", group_by="user"
    )
    rows = read_csv(response)
    expected_rows = sorted(
        [
            _csv_row("2020-12-28", users["ann"], [1, 2, 4]),
            _csv_row("2020-12-28", users["bob"], [3]),
            _csv_row("2021-01-04", users["ann"], [5, 6]),
        ]
    )
    assert rows[0] == ["bucket_start", "user_id", "turns", "input_tokens", "output_tokens", "cost"]
    assert rows[1:] == expected_rows


def test_export_with_an_unknown_bucket_is_the_header_alone(usage_env):
    rows = read_csv(usage_env.get(EXPORT, bucket="year", start="2020-12-01", end="2026-12-31"))
    assert rows == [["bucket_start", "turns", "input_tokens", "output_tokens", "cost"]]


def test_export_rejects_an_unknown_group_by(usage_env):
    response = usage_env.get(EXPORT, group_by="team")
    assert response.status_code == 422
    assert response.get_json()["error"] == "invalid_group_by"


def _csv_row(start: str, key: str, events: list[int]) -> list[str]:
    row = expected([(start, events)])["daily"][0]
    return [start, key, str(row["turns"]), str(row["input_tokens"]), str(row["output_tokens"]), row["cost"]]


# -- SQLite wiring and SQLite-only checks ------------------------------------------------


@pytest.fixture
def usage_env(client, db, admin) -> UsageEnv:
    return seed(db, admin, client)


def test_the_openapi_documents_the_summary_and_the_csv_columns(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    summary = spec["paths"]["/api/v1/admin/usage/summary"]["get"]
    assert {"200", "401", "403", "422"} <= set(summary["responses"])
    names = {parameter["name"] for parameter in summary["parameters"]}
    assert names == {"bucket", "start", "end", "user_id", "model", "tz"}
    export = spec["paths"]["/api/v1/admin/usage/export.csv"]["get"]
    csv_doc = export["responses"]["200"]
    assert "text/csv" in csv_doc["content"]
    for column in ("bucket_start", "user_id", "model", "turns", "input_tokens", "output_tokens", "cost"):
        assert f"`{column}`" in csv_doc["description"]
    assert "group_by" in {parameter["name"] for parameter in export["parameters"]}
