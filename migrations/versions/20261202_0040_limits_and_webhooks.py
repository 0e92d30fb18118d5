"""spend, rate and concurrency limits; per-key spend rollups; the webhook outbox

- ``limits``: one row per user or API key (``subject_type``, ``subject_id``);
- ``api_key_spend_rollups``: charges per API key and UTC quarter hour, written with the
  charge (a user's spend is read from ``usage_hours``, migration 20261202_0010);
- ``turns.api_key_id`` (the key a turn was submitted with) and ``turns.limit_reserve``
  (its worst case, reserved against a spend limit while it is in flight), with the
  indexes the per-minute rate check reads;
- ``webhook_endpoints``, ``webhook_events``, ``webhook_deliveries``.

Money is ``NUMERIC(20,6)`` on Postgres and integer micro-units on SQLite, as everywhere
(migration 20261130_0001). Only columns are added to existing tables, so no SQLite table
is rebuilt and the ledger's triggers stay.

Revision ID: 20261202_0040
Revises: 20261202_0030
Create Date: 2026-12-02 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261202_0040"
down_revision: str | None = "20261202_0030"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(precision=20, scale=6).with_variant(sa.BigInteger(), "sqlite")
ID = sa.String(length=36)
TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "limits",
        sa.Column("id", ID, nullable=False),
        sa.Column("subject_type", sa.String(length=16), nullable=False),
        sa.Column("subject_id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("spend_amount", MONEY, nullable=True),
        sa.Column("spend_period", sa.String(length=8), nullable=True),
        sa.Column("spend_tz", sa.String(length=64), nullable=True),
        sa.Column("requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("max_concurrent_turns", sa.Integer(), nullable=True),
        sa.Column("reached_period_start", TZ, nullable=True),
        sa.Column("updated_by", ID, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.CheckConstraint("subject_type IN ('user', 'api_key')", name="subject_type"),
        sa.CheckConstraint("spend_period IN ('day', 'week', 'month')", name="spend_period"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_limits_user_id_users"),
        sa.PrimaryKeyConstraint("id", name="pk_limits"),
        sa.UniqueConstraint("subject_type", "subject_id", name="uq_limits_subject_type_subject_id"),
    )
    op.create_index("ix_limits_user_id", "limits", ["user_id"])
    op.create_table(
        "api_key_spend_rollups",
        sa.Column("id", ID, nullable=False),
        sa.Column("api_key_id", ID, nullable=False),
        sa.Column("period_start", TZ, nullable=False),
        sa.Column("cost", MONEY, nullable=False),
        sa.ForeignKeyConstraint(
            ["api_key_id"], ["api_keys.id"], name="fk_api_key_spend_rollups_api_key_id_api_keys"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_api_key_spend_rollups"),
        sa.UniqueConstraint(
            "api_key_id", "period_start", name="uq_api_key_spend_rollups_api_key_id_period_start"
        ),
    )
    # No foreign key: SQLite adds one only by rebuilding the table (keys are never deleted).
    op.add_column("turns", sa.Column("api_key_id", ID, nullable=True))
    op.add_column("turns", sa.Column("limit_reserve", MONEY, nullable=True))
    op.create_index("ix_turns_user_created", "turns", ["user_id", "created_at"])
    op.create_index("ix_turns_api_key_created", "turns", ["api_key_id", "created_at"])

    op.create_table(
        "webhook_endpoints",
        sa.Column("id", ID, nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=True),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("secret", sa.String(length=100), nullable=False),
        sa.Column("created_by", ID, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("deleted_at", TZ, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_endpoints"),
    )
    op.create_table(
        "webhook_events",
        sa.Column("id", ID, nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.CheckConstraint(
            "type IN ('wallet.low_balance', 'wallet.depleted', 'spend_limit.reached', 'enforcement.changed')",
            name="type",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_events"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", ID, nullable=False),
        sa.Column("event_id", ID, nullable=False),
        sa.Column("endpoint_id", ID, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TZ, nullable=False),
        sa.Column("last_attempt_at", TZ, nullable=True),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_excerpt", sa.String(length=500), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", TZ, nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status"),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name="fk_webhook_deliveries_endpoint_id_webhook_endpoints",
        ),
        sa.ForeignKeyConstraint(
            ["event_id"], ["webhook_events.id"], name="fk_webhook_deliveries_event_id_webhook_events"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_deliveries"),
        sa.UniqueConstraint("event_id", "endpoint_id", name="uq_webhook_deliveries_event_id_endpoint_id"),
    )
    op.create_index("ix_webhook_deliveries_status_next", "webhook_deliveries", ["status", "next_attempt_at"])
    op.create_index(
        "ix_webhook_deliveries_endpoint_created", "webhook_deliveries", ["endpoint_id", "created_at"]
    )


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_events")
    op.drop_table("webhook_endpoints")
    op.drop_index("ix_turns_api_key_created", table_name="turns")
    op.drop_index("ix_turns_user_created", table_name="turns")
    if op.get_bind().dialect.name == "sqlite":
        # Dropping a column SQLite-side rebuilds the table; turns has no triggers to lose.
        with op.batch_alter_table("turns") as batch:
            batch.drop_column("limit_reserve")
            batch.drop_column("api_key_id")
    else:
        op.drop_column("turns", "limit_reserve")
        op.drop_column("turns", "api_key_id")
    op.drop_table("api_key_spend_rollups")
    op.drop_index("ix_limits_user_id", table_name="limits")
    op.drop_table("limits")
