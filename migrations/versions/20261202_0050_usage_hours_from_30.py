"""the all-users usage level also on the hours that start at :30 UTC (scope ``*30``)

A zone whose local midnights all fall at :30 UTC (Asia/Kolkata, America/St_Johns,
Australia/Adelaide) cut every UTC hour holding one, so a day summary there re-read those
hours to split them. ``usage_hours`` now also holds, for all users, rows whose
``hour_start`` is on :30 (``scope = '*30'``): the same totals and quarter prefixes,
counted from their own start, written by every debit beside the ``*`` row. Such a zone
maps each of them whole to one local day (docs/usage.md).

The backfill derives them from the ``*`` rows, exactly (both are sums of the same
quarters): hour ``H``'s first half is the second half of the row from ``H - 30 min``, its
second half the first half of the row from ``H + 30 min``. So it keeps what only the
rollups hold (conversation-summary tokens, which have no turn row). On Postgres it locks
``usage_hours`` against writers first (as ``tollgate usage-rebuild`` does) and replaces any
``*30`` rows already written, so a debit can be counted neither twice nor not at all. No
schema change: ``scope`` is a string without a foreign key.

Revision ID: 20261202_0050
Revises: 20261202_0040
Create Date: 2026-12-02 14:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261202_0050"
down_revision: str | None = "20261202_0040"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MEASURES = ("turns", "input_tokens", "output_tokens", "cost")
SPLITS = (60, 15, 30, 45)  # the hour's totals, then its prefixes
ALL_USERS = "*"
ALL_USERS_AT_30 = "*30"


def _column(measure: str, split: int) -> str:
    return measure if split == 60 else f"{measure}_to_{split}"


def _minutes(measure: str, start: int, end: int) -> str:
    """An hour row's ``measure`` in its minutes ``[start, end)``."""
    if start == end:
        return "0"
    return f"{_column(measure, end)} - {_column(measure, start)}" if start else _column(measure, end)


def _shifted(dialect: str, minutes: int) -> str:
    if dialect == "postgresql":
        return f"hour_start + interval '{minutes} minutes'"
    return f"strftime('%Y-%m-%d %H:%M:00.000000', hour_start, '{minutes:+d} minutes')"


def _half(dialect: str, shift: int, parts: dict[int, tuple[int, int]]) -> str:
    """Each all-users hour as the part of the hour from ``hour_start + shift`` it holds."""
    values = [
        f"{_minutes(measure, *parts[split])} AS {_column(measure, split)}"
        for split in SPLITS
        for measure in MEASURES
    ]
    used = " OR ".join(f"{_minutes(measure, *parts[60])} <> 0" for measure in MEASURES)
    return (
        f"SELECT {_shifted(dialect, shift)} AS hour_start, model, {', '.join(values)}"
        f" FROM usage_hours WHERE scope = '{ALL_USERS}' AND ({used})"
    )


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("LOCK TABLE usage_hours IN EXCLUSIVE MODE")
    op.execute(f"DELETE FROM usage_hours WHERE scope = '{ALL_USERS_AT_30}'")
    names = [_column(measure, split) for split in SPLITS for measure in MEASURES]
    # Hour H's first half: minutes 30-60 of the hour from H - 30, so in its prefix to 45 only.
    first_half = _half(dialect, -30, {60: (0, 30), 15: (0, 0), 30: (0, 0), 45: (0, 15)})
    # Hour H's second half: minutes 0-30 of the hour from H + 30.
    second_half = _half(dialect, 30, {60: (30, 60), 15: (30, 45), 30: (30, 60), 45: (30, 60)})
    op.execute(
        f"INSERT INTO usage_hours (scope, hour_start, model, {', '.join(names)})"
        f" SELECT '{ALL_USERS_AT_30}', hour_start, model, {', '.join(f'SUM({name})' for name in names)}"
        f" FROM ({first_half} UNION ALL {second_half}) AS halves"
        " GROUP BY hour_start, model ORDER BY hour_start, model"
    )


def downgrade() -> None:
    op.execute(f"DELETE FROM usage_hours WHERE scope = '{ALL_USERS_AT_30}'")
