"""Spend-limit periods: local midnight / Monday / the 1st in the limit's zone, DST-exact."""

from datetime import UTC, datetime

import pytest

from shared.services.limits import period_bounds


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("period", "tz", "now", "start", "resets_at"),
    [
        # New York springs forward on 2026-03-08: that day has 23 hours.
        ("day", "America/New_York", utc(2026, 3, 8, 12), utc(2026, 3, 8, 5), utc(2026, 3, 9, 4)),
        # ... and falls back on 2026-11-01: 25 hours.
        ("day", "America/New_York", utc(2026, 11, 1, 12), utc(2026, 11, 1, 4), utc(2026, 11, 2, 5)),
        # Half-hour offset; 23:00 UTC is already tomorrow in Kolkata.
        ("day", "Asia/Kolkata", utc(2026, 12, 1, 23), utc(2026, 12, 1, 18, 30), utc(2026, 12, 2, 18, 30)),
        ("day", "Asia/Kathmandu", utc(2026, 12, 2, 3), utc(2026, 12, 1, 18, 15), utc(2026, 12, 2, 18, 15)),
        # ISO weeks start on Monday (2026-11-30 is a Monday), across Berlin's zone.
        ("week", "Europe/Berlin", utc(2026, 12, 2, 3), utc(2026, 11, 29, 23), utc(2026, 12, 6, 23)),
        # Sunday 23:30 UTC is Monday 00:30 in Berlin: a new week there.
        ("week", "Europe/Berlin", utc(2026, 12, 6, 23, 30), utc(2026, 12, 6, 23), utc(2026, 12, 13, 23)),
        # Months, across a DST change inside the month and across a year end.
        ("month", "Europe/Berlin", utc(2026, 10, 15), utc(2026, 9, 30, 22), utc(2026, 10, 31, 23)),
        ("month", "UTC", utc(2026, 12, 31, 23, 59), utc(2026, 12, 1), utc(2027, 1, 1)),
    ],
)
def test_periods_start_at_local_calendar_boundaries(period, tz, now, start, resets_at):
    assert period_bounds(period, tz, now) == (start, resets_at)


def test_a_midnight_that_does_not_exist_starts_the_day_when_the_clock_jumps():
    # Santiago springs forward at 24:00 on 2026-09-05: 2026-09-06 starts at 01:00 local (04:00 UTC).
    start, _ = period_bounds("day", "America/Santiago", utc(2026, 9, 6, 12))
    assert start == utc(2026, 9, 6, 4)
