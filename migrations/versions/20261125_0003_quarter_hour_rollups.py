"""usage rollups per quarter hour: ``hour_start`` becomes ``period_start``

Hourly rollups cannot be split at a local midnight that falls on the half or
quarter hour (Asia/Kolkata +05:30, Asia/Kathmandu +05:45). Every UTC offset in
use since 1972 is a multiple of 15 minutes, so quarter-hour periods start on
some local midnight of every zone and a day, week or month is an exact union
of periods. Existing hourly rows stay valid: an hour-aligned row is a period
that simply holds a whole hour (totals and whole-hour zones are unchanged).

Revision ID: 20261125_0003
Revises: 20261125_0002
Create Date: 2026-11-25 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261125_0003"
down_revision: str | None = "20261125_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _drop_keys(column: str) -> None:
    with op.batch_alter_table("usage_rollups", schema=None) as batch_op:
        batch_op.drop_index(f"ix_usage_rollups_{column}")
        batch_op.drop_constraint(f"uq_usage_rollups_user_id_model_{column}", type_="unique")


def _rename_with_keys(old: str, new: str) -> None:
    with op.batch_alter_table("usage_rollups", schema=None) as batch_op:
        batch_op.alter_column(old, new_column_name=new)
    with op.batch_alter_table("usage_rollups", schema=None) as batch_op:
        batch_op.create_unique_constraint(f"uq_usage_rollups_user_id_model_{new}", ["user_id", "model", new])
        batch_op.create_index(f"ix_usage_rollups_{new}", [new], unique=False)


def upgrade() -> None:
    _drop_keys("hour_start")
    _rename_with_keys("hour_start", "period_start")


def downgrade() -> None:
    _drop_keys("period_start")
    # Fold the quarters of each hour into one row before the hourly unique key returns.
    if op.get_bind().dialect.name == "postgresql":
        hour = "date_trunc('hour', period_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
    else:
        hour = "strftime('%Y-%m-%d %H:00:00.000000', period_start)"
    op.execute(f"UPDATE usage_rollups SET period_start = {hour}")
    same = (
        "r.user_id = usage_rollups.user_id AND r.model = usage_rollups.model "
        "AND r.period_start = usage_rollups.period_start"
    )
    sums = ", ".join(
        f"{column} = (SELECT SUM(r.{column}) FROM usage_rollups r WHERE {same})"
        for column in ("turns", "input_tokens", "output_tokens", "cost")
    )
    keep = "SELECT MIN(id) FROM usage_rollups GROUP BY user_id, model, period_start"
    op.execute(f"UPDATE usage_rollups SET {sums} WHERE id IN ({keep})")
    op.execute(f"DELETE FROM usage_rollups WHERE id NOT IN ({keep})")
    _rename_with_keys("period_start", "hour_start")
