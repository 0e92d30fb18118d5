"""full-text search indexes (Postgres only)

GIN expression indexes for the ``search`` tool. The expressions must stay
identical to the ones in ``shared/tools/search.py`` (``FILE_VECTOR``,
``TURN_VECTOR``) or Postgres will not use them. Only the first 200,000
characters are indexed: a tsvector is limited to 1 MB.

They are not declared on the models (SQLite has no GIN); ``migrations/env.py``
tells autogenerate to ignore them. On SQLite this migration does nothing.

Revision ID: 20261125_0002
Revises: 20261125_0001
Create Date: 2026-11-25 09:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "20261125_0002"
down_revision: str | None = "20261125_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "CREATE INDEX ix_uploaded_files_text_search ON uploaded_files "
        "USING gin (to_tsvector('english', left(coalesce(text, ''), 200000)))"
    )
    op.execute(
        "CREATE INDEX ix_turns_text_search ON turns "
        "USING gin (to_tsvector('english', left(coalesce(content, '') || ' ' || coalesce(reply, ''), 200000)))"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX IF EXISTS ix_turns_text_search")
    op.execute("DROP INDEX IF EXISTS ix_uploaded_files_text_search")
