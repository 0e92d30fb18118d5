"""usage rollups in two levels, per UTC hour and quarter-exact: ``usage_hours``

``usage_rollups`` held one row per user, model and UTC quarter hour: 0.83 rows per turn
on a year of bursty traffic, too many for an all-users summary to be fast. ``usage_hours``
holds one row per scope, model and UTC hour, where ``scope`` is a user's id (the per-user
level) or ``*`` (the all-users level), and each row also carries the usage of the hour's
first 15, 30 and 45 minutes (``*_to_15`` …), so an hour still splits exactly at every
local midnight (all on UTC quarter hours since 1972). Quarter rows convert losslessly
both ways: up, each quarter adds to its hour and to the prefixes it lies in; down, each
quarter is the difference of two prefixes.

Revision ID: 20261202_0010
Revises: 20261130_0002
Create Date: 2026-12-02 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261202_0010"
down_revision: str | None = "20261130_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MEASURES = ("turns", "input_tokens", "output_tokens", "cost")
SPLITS = (15, 30, 45)
ALL_USERS = "*"


def _money(dialect: str):
    # SQLite keeps money as integer micro-units (20261130_0001).
    return sa.BigInteger() if dialect == "sqlite" else sa.Numeric(precision=20, scale=6)


def _hour_and_minute(dialect: str, column: str) -> tuple[str, str]:
    if dialect == "postgresql":
        return (
            f"date_trunc('hour', {column} AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
            f"CAST(extract(minute FROM {column} AT TIME ZONE 'UTC') AS integer)",
        )
    return f"strftime('%Y-%m-%d %H:00:00.000000', {column})", f"CAST(strftime('%M', {column}) AS INTEGER)"


def _measure_columns() -> list[str]:
    return [*MEASURES, *[f"{measure}_to_{split}" for split in SPLITS for measure in MEASURES]]


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    counter = [sa.Column(name, sa.BigInteger(), nullable=False) for name in MEASURES[:3]]
    columns = [
        sa.Column("scope", sa.String(length=36), nullable=False),
        sa.Column("hour_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        *counter,
        sa.Column("cost", _money(dialect), nullable=False),
    ]
    for split in SPLITS:
        columns += [sa.Column(f"{name}_to_{split}", sa.BigInteger(), nullable=False) for name in MEASURES[:3]]
        columns.append(sa.Column(f"cost_to_{split}", _money(dialect), nullable=False))
    op.create_table(
        "usage_hours",
        *columns,
        sa.PrimaryKeyConstraint("scope", "hour_start", "model", name=op.f("pk_usage_hours")),
    )
    op.create_index("ix_usage_hours_hour_start", "usage_hours", ["hour_start"], unique=False)

    hour, minute = _hour_and_minute(dialect, "period_start")
    sums = [f"SUM({measure})" for measure in MEASURES]
    for split in SPLITS:
        sums += [f"SUM(CASE WHEN {minute} < {split} THEN {measure} ELSE 0 END)" for measure in MEASURES]
    names = ", ".join(_measure_columns())
    op.execute(
        f"INSERT INTO usage_hours (scope, hour_start, model, {names}) "
        f"SELECT user_id, {hour}, model, {', '.join(sums)} FROM usage_rollups GROUP BY user_id, {hour}, model"
    )
    totals = ", ".join(f"SUM({name})" for name in _measure_columns())
    op.execute(
        f"INSERT INTO usage_hours (scope, hour_start, model, {names}) "
        f"SELECT '{ALL_USERS}', hour_start, model, {totals} FROM usage_hours GROUP BY hour_start, model"
    )
    with op.batch_alter_table("usage_rollups", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_rollups_period_start")
    op.drop_table("usage_rollups")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_table(
        "usage_rollups",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("turns", sa.Integer(), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cost", _money(dialect), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_usage_rollups_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_rollups")),
        sa.UniqueConstraint(
            "user_id", "model", "period_start", name=op.f("uq_usage_rollups_user_id_model_period_start")
        ),
    )
    with op.batch_alter_table("usage_rollups", schema=None) as batch_op:
        batch_op.create_index("ix_usage_rollups_period_start", ["period_start"], unique=False)

    def prefix(measure: str, minute: int) -> str:
        if minute == 0:
            return "0"
        return measure if minute == 60 else f"{measure}_to_{minute}"

    new_id = "gen_random_uuid()::text" if dialect == "postgresql" else "lower(hex(randomblob(16)))"
    for start in (0, 15, 30, 45):
        if dialect == "postgresql":
            quarter = f"hour_start + interval '{start} minutes'"
        else:
            quarter = f"strftime('%Y-%m-%d %H:', hour_start) || '{start:02d}:00.000000'"
        values = [f"{prefix(measure, start + 15)} - {prefix(measure, start)}" for measure in MEASURES]
        used = " OR ".join(f"{value} <> 0" for value in values)
        op.execute(
            "INSERT INTO usage_rollups (id, user_id, model, period_start, turns, input_tokens, output_tokens,"
            f" cost) SELECT {new_id}, scope, model, {quarter}, {', '.join(values)} FROM usage_hours"
            f" WHERE scope <> '{ALL_USERS}' AND ({used})"
        )
    with op.batch_alter_table("usage_hours", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_hours_hour_start")
    op.drop_table("usage_hours")
