"""the database guards the ledger: CHECK constraints on states and kinds, an append-only
ledger, and exact money on SQLite

- ``CHECK (column IN (...))`` on every status, kind and role column, named by the naming
  convention (``ck_<table>_<column>``). The lists are frozen here as they stand at this
  revision (the models build theirs from the ``StrEnum``s; the migration tests compare
  the two): a new state is a new migration.
- ``ledger_entries`` refuses UPDATE and DELETE: a plpgsql trigger on Postgres,
  ``RAISE(ABORT, ...)`` triggers on SQLite. TRUNCATE stays possible on Postgres.
- SQLite only: every money column becomes a BIGINT of micro-units (value x 10^6),
  converted in place, so amounts are exact (a NUMERIC column there holds a float).
  Postgres keeps ``NUMERIC(20,6)``.

SQLite adds a constraint or changes a type by rebuilding the table (batch mode), and a
rebuild drops the table's triggers: the triggers are created last here, and a later
migration that rebuilds ``ledger_entries`` on SQLite must create them again.

Revision ID: 20261130_0001
Revises: 20261125_0003
Create Date: 2026-11-30 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261130_0001"
down_revision: str | None = "20261125_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECKS = {
    "users": {"role": ("user", "admin")},
    "turns": {
        "status": ("queued", "running", "completed", "failed", "cancelled"),
        "kind": ("chat",),
    },
    "tool_call_events": {"status": ("ok", "error", "timeout")},
    "uploaded_files": {"status": ("pending", "ready", "failed")},
    "holds": {"status": ("active", "captured", "released", "expired")},
    "ledger_entries": {"kind": ("grant", "adjustment", "hold", "capture", "release", "expiry", "debit")},
}

MONEY_COLUMNS = {
    "wallets": ("balance", "held"),
    "ledger_entries": ("amount", "held_delta", "balance_after"),
    "holds": ("amount",),
    "model_prices": ("input_per_1k", "output_per_1k"),
    "turns": ("cost", "balance_after"),
    "usage_rollups": ("cost",),
}
NUMERIC = sa.Numeric(precision=20, scale=6)
MICRO_UNITS = 1_000_000

TABLES = (
    "users",
    "wallets",
    "model_prices",
    "usage_rollups",
    "holds",
    "ledger_entries",
    "uploaded_files",
    "turns",
    "tool_call_events",
)
assert set(TABLES) == set(CHECKS) | set(MONEY_COLUMNS)

APPEND_ONLY = {
    "postgresql": (
        """CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only: % refused', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$""",
        "CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries "
        "FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()",
    ),
    "sqlite": (
        "CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries "
        "BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only: UPDATE refused'); END",
        "CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries "
        "BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only: DELETE refused'); END",
    ),
}
DROP_APPEND_ONLY = {
    "postgresql": (
        "DROP TRIGGER IF EXISTS ledger_entries_append_only ON ledger_entries",
        "DROP FUNCTION IF EXISTS ledger_entries_append_only()",
    ),
    "sqlite": (
        "DROP TRIGGER IF EXISTS ledger_entries_no_update",
        "DROP TRIGGER IF EXISTS ledger_entries_no_delete",
    ),
}


def _allowed(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in TABLES:
        money = MONEY_COLUMNS.get(table, ()) if dialect == "sqlite" else ()
        checks = CHECKS.get(table, {})
        # Convert while the column is still NUMERIC: the rebuild below casts to BIGINT,
        # which would cut the fraction off an amount still in whole units.
        for column in money:
            op.execute(f"UPDATE {table} SET {column} = CAST(ROUND({column} * {MICRO_UNITS}) AS INTEGER)")
        if not money and not checks:
            continue
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in money:
                batch_op.alter_column(column, existing_type=NUMERIC, type_=sa.BigInteger())
            for column, values in checks.items():
                batch_op.create_check_constraint(op.f(f"ck_{table}_{column}"), _allowed(column, values))
    for statement in APPEND_ONLY[dialect]:
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for statement in DROP_APPEND_ONLY[dialect]:
        op.execute(statement)
    for table in reversed(TABLES):
        money = MONEY_COLUMNS.get(table, ()) if dialect == "sqlite" else ()
        checks = CHECKS.get(table, {})
        if not money and not checks:
            continue
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in checks:
                batch_op.drop_constraint(op.f(f"ck_{table}_{column}"), type_="check")
            for column in money:
                batch_op.alter_column(column, existing_type=sa.BigInteger(), type_=NUMERIC)
        for column in money:
            op.execute(f"UPDATE {table} SET {column} = {column} / {MICRO_UNITS}.0")
