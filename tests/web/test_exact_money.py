"""Embedded mode (SQLite) stores money exactly and keeps the ledger append-only.

The same specifications run on Postgres in ``tests/integration/test_ledger_guards_pg.py``.
"""

from __future__ import annotations

from sqlalchemy import text

from tests.money_checks import (
    ONE_MICRO_MORE,
    grant_twelve_digits_and_read_them_back,
    ledger_rows_cannot_be_rewritten,
)


def test_a_twelve_digit_grant_reads_back_exactly_on_sqlite(client, admin, user, db):
    grant_twelve_digits_and_read_them_back(client, admin, user, db)


def test_sqlite_stores_amounts_as_integer_micro_units(client, admin, user, db):
    grant_twelve_digits_and_read_them_back(client, admin, user, db)
    stored = db.execute(
        text("SELECT balance, typeof(balance) FROM wallets WHERE user_id = :user_id"), {"user_id": user.id}
    ).one()
    assert tuple(stored) == (int(ONE_MICRO_MORE.replace(".", "")), "integer")


def test_sqlite_refuses_to_update_or_delete_ledger_rows(client, admin, user, db):
    client.post(f"/api/v1/admin/users/{user.id}/grants", json={"amount": "5"}, headers=admin.headers)
    ledger_rows_cannot_be_rewritten(db, user)
