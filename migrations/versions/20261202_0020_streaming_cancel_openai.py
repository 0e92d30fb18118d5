"""streaming, cancel and the OpenAI-compatible endpoint: a turn's estimated-usage flag, its
cancel request, the caller's messages and tools and the tool calls answered (/v1 turns);
an API key's default session

Revision ID: 20261202_0020
Revises: 20261202_0010
Create Date: 2026-12-02 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261202_0020"
down_revision: str | None = "20261202_0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMNs (no batch mode): SQLite rebuilds nothing, the ledger's triggers stay.
    op.add_column(
        "turns",
        sa.Column("usage_estimated", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column("turns", sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("turns", sa.Column("request_messages", sa.JSON(), nullable=True))
    op.add_column("turns", sa.Column("request_tools", sa.JSON(), nullable=True))
    op.add_column("turns", sa.Column("reply_tool_calls", sa.JSON(), nullable=True))
    op.add_column("api_keys", sa.Column("default_session_id", sa.String(length=36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("default_session_id")
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("reply_tool_calls")
        batch.drop_column("request_tools")
        batch.drop_column("request_messages")
        batch.drop_column("cancel_requested_at")
        batch.drop_column("usage_estimated")
