"""turn leases: a running attempt's owner and lease expiry, renewed by its worker

Revision ID: 20261130_0002
Revises: 20261130_0001
Create Date: 2026-11-30 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261130_0002"
down_revision: str | None = "20261130_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Adding nullable columns and an index rebuilds nothing on SQLite (no batch mode), so
    # the ledger's triggers are untouched.
    op.add_column("turns", sa.Column("lease_owner", sa.String(length=64), nullable=True))
    op.add_column("turns", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_turns_status_lease", "turns", ["status", "lease_expires_at"])


def downgrade() -> None:
    op.drop_index("ix_turns_status_lease", table_name="turns")
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
