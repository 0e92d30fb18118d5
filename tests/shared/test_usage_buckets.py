"""The bucketing rules of ``services/usage.py`` as plain functions: no database."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from shared.errors import InvalidInput
from shared.models import UsageHour
from shared.services.usage import (
    DEFAULT_RANGE_DAYS,
    MAX_RANGE_DAYS,
    bucket_start,
    csv_header,
    hour_cuts,
    local_day,
    make_query,
    offset_segments,
    utc_window,
)

BERLIN = ZoneInfo("Europe/Berlin")
KOLKATA = ZoneInfo("Asia/Kolkata")


def z(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("day", "week_start"),
    [
        (date(2020, 12, 28), date(2020, 12, 28)),  # Monday of ISO 2020-W53
        (date(2020, 12, 31), date(2020, 12, 28)),
        (date(2021, 1, 1), date(2020, 12, 28)),
        (date(2021, 1, 3), date(2020, 12, 28)),  # Sunday, still 2020-W53
        (date(2021, 1, 4), date(2021, 1, 4)),  # 2021-W01
        (date(2025, 12, 29), date(2025, 12, 29)),  # 2026-W01 starts in December
        (date(2026, 1, 1), date(2025, 12, 29)),
    ],
)
def test_weeks_start_on_the_iso_monday_even_across_the_year_end(day, week_start):
    assert bucket_start(day, "week") == week_start
    assert week_start.isocalendar().weekday == 1
    assert day.isocalendar()[:2] == week_start.isocalendar()[:2]


def test_days_are_themselves_and_months_start_on_the_first():
    assert bucket_start(date(2024, 2, 29), "day") == date(2024, 2, 29)
    assert bucket_start(date(2024, 2, 29), "month") == date(2024, 2, 1)
    assert bucket_start(date(2020, 12, 31), "month") == date(2020, 12, 1)
    with pytest.raises(ValueError):
        bucket_start(date(2024, 2, 29), "fortnight")


def test_a_period_counts_on_the_local_date_it_starts():
    assert local_day(z("2020-12-31T23:00"), ZoneInfo("UTC")) == date(2020, 12, 31)
    assert local_day(z("2020-12-31T23:00"), BERLIN) == date(2021, 1, 1)
    assert local_day(z("2026-03-29T21:00"), BERLIN) == date(2026, 3, 29)  # 23:00 CEST
    assert local_day(z("2026-03-29T22:00"), BERLIN) == date(2026, 3, 30)
    assert local_day(z("2026-10-25T22:00"), BERLIN) == date(2026, 10, 25)  # 23:00 CET
    # Kolkata is +05:30: local midnight is 18:30 UTC, the start of a quarter-hour period.
    assert local_day(z("2026-01-10T18:15"), KOLKATA) == date(2026, 1, 10)
    assert local_day(z("2026-01-10T18:30"), KOLKATA) == date(2026, 1, 11)
    # Kathmandu is +05:45: local midnight is 18:15 UTC.
    assert local_day(z("2026-01-10T18:00"), ZoneInfo("Asia/Kathmandu")) == date(2026, 1, 10)
    assert local_day(z("2026-01-10T18:15"), ZoneInfo("Asia/Kathmandu")) == date(2026, 1, 11)


@pytest.mark.parametrize(
    ("moment", "period"),
    [
        ("2026-01-10T18:00:00", "2026-01-10T18:00"),
        ("2026-01-10T18:14:59.999999", "2026-01-10T18:00"),
        ("2026-01-10T18:15:00", "2026-01-10T18:15"),
        ("2026-01-10T18:44:10", "2026-01-10T18:30"),
        ("2026-01-10T18:59:59", "2026-01-10T18:45"),
    ],
)
def test_rollup_periods_are_utc_quarter_hours(moment, period):
    assert UsageHour.quarter_of(z(moment)) == z(period)
    # The same instant given in another zone lands in the same UTC period.
    assert UsageHour.quarter_of(z(moment).astimezone(KOLKATA)) == z(period)


def test_the_utc_window_runs_from_local_midnight_to_local_midnight():
    assert utc_window(date(2026, 1, 1), date(2026, 1, 31), ZoneInfo("UTC")) == (
        z("2026-01-01T00:00"),
        z("2026-02-01T00:00"),
    )
    # 29 March 2026 in Berlin is 23 hours long; 25 October is 25 hours long.
    lo, hi = utc_window(date(2026, 3, 29), date(2026, 3, 29), BERLIN)
    assert (lo, hi) == (z("2026-03-28T23:00"), z("2026-03-29T22:00")) and hi - lo == timedelta(hours=23)
    lo, hi = utc_window(date(2026, 10, 25), date(2026, 10, 25), BERLIN)
    assert (lo, hi) == (z("2026-10-24T22:00"), z("2026-10-25T23:00")) and hi - lo == timedelta(hours=25)


@pytest.mark.parametrize(
    ("zone", "lo", "hi"),
    [
        ("Asia/Kolkata", "2026-01-10T18:30", "2026-01-11T18:30"),  # +05:30
        ("Asia/Kathmandu", "2026-01-10T18:15", "2026-01-11T18:15"),  # +05:45
        ("America/St_Johns", "2026-01-11T03:30", "2026-01-12T03:30"),  # -03:30
        ("Pacific/Chatham", "2026-01-10T10:15", "2026-01-11T10:15"),  # +13:45 in January
    ],
)
def test_fractional_offset_zones_get_exactly_their_local_day(zone, lo, hi):
    assert utc_window(date(2026, 1, 11), date(2026, 1, 11), ZoneInfo(zone)) == (z(lo), z(hi))


def test_offset_segments_find_each_dst_change_at_the_hour():
    lo, hi = utc_window(date(2026, 1, 1), date(2026, 12, 31), BERLIN)
    assert offset_segments(BERLIN, lo, hi) == [
        (z("2026-03-29T01:00"), 60),
        (z("2026-10-25T01:00"), 120),
        (None, 60),
    ]
    lo, hi = utc_window(date(2020, 1, 1), date(2026, 12, 31), KOLKATA)
    assert offset_segments(KOLKATA, lo, hi) == [(None, 330)]
    chatham = ZoneInfo("Pacific/Chatham")  # +13:45 / +12:45, changes at 02:45 / 03:45 local
    lo, hi = utc_window(date(2026, 1, 1), date(2026, 12, 31), chatham)
    assert [minutes for _, minutes in offset_segments(chatham, lo, hi)] == [825, 765, 825]


def test_every_period_gets_the_offset_in_force_at_its_start():
    lo, hi = utc_window(date(2026, 3, 1), date(2026, 11, 30), BERLIN)
    segments = offset_segments(BERLIN, lo, hi)
    moment = lo
    while moment < hi:
        minutes = next(m for until, m in segments if until is None or moment < until)
        assert minutes == moment.astimezone(BERLIN).utcoffset() // timedelta(minutes=1)
        moment += UsageHour.QUARTER


def test_query_defaults_are_day_utc_and_the_last_30_days():
    query = make_query(today=date(2026, 3, 1))
    assert (query.bucket, query.tz, query.start, query.end) == (
        "day",
        "UTC",
        date(2026, 1, 31),
        date(2026, 3, 1),
    )
    assert (query.end - query.start).days + 1 == DEFAULT_RANGE_DAYS
    assert make_query(end=date(2026, 1, 30)).start == date(2026, 1, 1)
    assert make_query(start=date(2026, 1, 1), today=date(2026, 1, 5)).end == date(2026, 1, 5)


def test_query_keeps_an_unknown_bucket():
    query = make_query(bucket="year", today=date(2026, 1, 1))
    assert query.bucket == "year" and not query.known_bucket


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"start": date(2026, 1, 2), "end": date(2026, 1, 1)}, "invalid_range"),
        ({"start": date(2016, 1, 1), "end": date(2026, 12, 31)}, "range_too_large"),
    ],
)
def test_range_errors_carry_stable_codes(params, error):
    with pytest.raises(InvalidInput) as caught:
        make_query(today=date(2026, 6, 1), **params)
    assert caught.value.error == error
    assert caught.value.status_code == 422


def test_the_range_cap_is_inclusive():
    start = date(2020, 1, 1)
    make_query(start=start, end=start + timedelta(days=MAX_RANGE_DAYS - 1))
    with pytest.raises(InvalidInput):
        make_query(start=start, end=start + timedelta(days=MAX_RANGE_DAYS))


def test_csv_header_names_the_group_column():
    assert csv_header(None) == ["bucket_start", "turns", "input_tokens", "output_tokens", "cost"]
    assert csv_header("user")[:2] == ["bucket_start", "user_id"]
    assert csv_header("model")[:2] == ["bucket_start", "model"]


@pytest.mark.parametrize(
    ("zone", "cuts"),
    [
        ("UTC", (0,)),
        ("Europe/Berlin", (0,)),  # DST changes at 01:00 UTC, midnights on the hour
        ("Asia/Kolkata", (0, 30)),
        ("America/St_Johns", (0, 30)),  # -03:30/-02:30, changes at 05:30/04:30 UTC
        ("Asia/Kathmandu", (0, 15)),
        ("Pacific/Chatham", (0, 15)),  # +13:45/+12:45, changes at 14:00 UTC
        ("Australia/Lord_Howe", (0, 15, 30, 45)),  # +11/+10:30: midnights at :00 and :30
    ],
)
def test_hours_are_cut_only_where_a_local_midnight_can_fall(zone, cuts):
    lo, hi = utc_window(date(2025, 1, 1), date(2025, 12, 31), ZoneInfo(zone))
    assert hour_cuts(ZoneInfo(zone), lo, hi) == cuts
    # Every local midnight in the year lies on a cut, so no part of an hour spans two local dates.
    day = date(2025, 1, 1)
    while day <= date(2025, 12, 31):
        midnight = datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(zone)).astimezone(UTC)
        assert midnight.minute in cuts
        day += timedelta(days=1)


def test_one_usage_event_adds_to_its_users_hour_and_all_users_hours_with_quarter_prefixes():
    """The user's and all users' UTC hour, then all users' hour from :30, in that order (the
    lock order of every writer); each row's prefixes count from its own start."""
    rows = UsageHour.rows_for(
        user_id="u1", model="m", at=z("2026-01-10T18:31"), turns=1, input_tokens=7, output_tokens=3, cost=2
    )
    assert [(row["scope"], row["hour_start"]) for row in rows] == [
        ("u1", z("2026-01-10T18:00")),
        ("*", z("2026-01-10T18:00")),
        ("*30", z("2026-01-10T18:30")),
    ]
    prefixes = ("turns", "turns_to_15", "turns_to_30", "turns_to_45")
    assert [rows[0][name] for name in prefixes] == [1, 0, 0, 1]  # 18:31 is minute 31 of 18:00
    assert [rows[2][name] for name in prefixes] == [1, 1, 1, 1]  # and minute 1 of 18:30
    assert (rows[0]["input_tokens_to_45"], rows[0]["cost_to_30"]) == (7, 0)
    assert {key: value for key, value in rows[1].items() if key != "scope"} == {
        key: value for key, value in rows[0].items() if key != "scope"
    }


@pytest.mark.parametrize(
    ("at", "hour_from_30", "prefixes"),
    [
        ("2026-01-10T18:00", "2026-01-10T17:30", [1, 0, 0, 1]),  # minute 30 of 17:30
        ("2026-01-10T18:29:59", "2026-01-10T17:30", [1, 0, 0, 0]),  # minute 59
        ("2026-01-10T18:30", "2026-01-10T18:30", [1, 1, 1, 1]),  # minute 0
        ("2026-01-10T18:59", "2026-01-10T18:30", [1, 0, 1, 1]),  # minute 29
    ],
)
def test_the_hour_from_30_holding_an_event_counts_its_prefixes_from_30(at, hour_from_30, prefixes):
    (_, _, row) = UsageHour.rows_for(
        user_id="u1", model="m", at=z(at), turns=1, input_tokens=1, output_tokens=1, cost=1
    )
    assert (row["scope"], row["hour_start"]) == ("*30", z(hour_from_30))
    assert [row[name] for name in ("turns", "turns_to_15", "turns_to_30", "turns_to_45")] == prefixes


def test_cost_between_cuts_hours_at_quarters_exactly_as_the_charges_fell(db, user):
    """What spend limits read: ``usage.cost_between`` over hour rows with quarter prefixes
    equals the plain sum of the charges in ``[start, end)`` for every pair of quarter
    bounds across three hours, both levels, on SQLite's integer micro-units."""
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal

    from shared.models import ALL_USERS
    from shared.services import billing, usage

    base = datetime(2026, 3, 29, 0, 0, tzinfo=UTC)
    charges = []
    for n in range(36):  # a charge every 5 minutes for three hours, different amounts
        at = base + timedelta(minutes=5 * n, seconds=7)
        cost = Decimal("0.000100") * (n + 1)
        charges.append((at, cost))
        billing.record_usage(
            db, user_id=user.id, model="m", at=at, turns=1, input_tokens=1, output_tokens=1, cost=cost
        )
    db.commit()
    quarters = [base + timedelta(minutes=15 * q) for q in range(13)]
    for i, start in enumerate(quarters):
        for end in quarters[i:]:
            expected = sum((cost for at, cost in charges if start <= at < end), Decimal("0"))
            assert usage.cost_between(db, user.id, start, end) == expected, (start, end)
            assert usage.cost_between(db, ALL_USERS, start, end) == expected, (start, end)
