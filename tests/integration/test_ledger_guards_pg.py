"""Postgres stores money exactly and refuses to rewrite the ledger, whoever asks.

The same money specifications run on SQLite in ``tests/web/test_exact_money.py``.
"""

from __future__ import annotations

import psycopg
import pytest

from tests.money_checks import (
    TWELVE_DIGITS,
    grant_twelve_digits_and_read_them_back,
    ledger_rows_cannot_be_rewritten,
)


def psql(settings) -> psycopg.Connection:
    """A plain connection, as an operator at a psql prompt would have."""
    return psycopg.connect(settings.database_url.replace("+psycopg", ""), autocommit=True)


def grant(client, admin, user, amount: str) -> None:
    response = client.post(
        f"/api/v1/admin/users/{user.id}/grants", json={"amount": amount}, headers=admin.headers
    )
    assert response.status_code == 201


def test_a_twelve_digit_grant_reads_back_exactly_on_postgres(pg_client, pg_admin, pg_user, pg_db):
    grant_twelve_digits_and_read_them_back(pg_client, pg_admin, pg_user, pg_db)


def test_postgres_refuses_to_update_or_delete_ledger_rows(pg_client, pg_admin, pg_user, pg_db):
    grant(pg_client, pg_admin, pg_user, "5")
    ledger_rows_cannot_be_rewritten(pg_db, pg_user)


def test_an_operator_cannot_update_or_delete_ledger_rows_either(pg_client, pg_admin, pg_user, pg_settings):
    grant(pg_client, pg_admin, pg_user, TWELVE_DIGITS)
    with psql(pg_settings) as conn:
        with pytest.raises(
            psycopg.errors.RestrictViolation, match="ledger_entries is append-only: UPDATE refused"
        ):
            conn.execute("UPDATE ledger_entries SET amount = 0")
        with pytest.raises(
            psycopg.errors.RestrictViolation, match="ledger_entries is append-only: DELETE refused"
        ):
            conn.execute("DELETE FROM ledger_entries")
        rows = conn.execute("SELECT amount::text FROM ledger_entries").fetchall()
    assert rows == [(TWELVE_DIGITS,)]


def test_truncate_stays_possible_for_resetting_a_database(pg_client, pg_admin, pg_user, pg_settings):
    grant(pg_client, pg_admin, pg_user, "5")
    with psql(pg_settings) as conn:
        conn.execute("TRUNCATE ledger_entries")
        assert conn.execute("SELECT count(*) FROM ledger_entries").fetchone() == (0,)


def test_postgres_refuses_an_unknown_state(pg_client, pg_admin, pg_user, pg_settings):
    with (
        psql(pg_settings) as conn,
        pytest.raises(psycopg.errors.CheckViolation, match="ck_users_role"),
    ):
        conn.execute("UPDATE users SET role = 'owner' WHERE id = %s", (pg_user.id,))
