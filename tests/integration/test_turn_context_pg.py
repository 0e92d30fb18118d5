"""tests/shared/test_turn_context.py's checks of the one-statement context read, on Postgres."""

from __future__ import annotations

from tests.shared.test_turn_context import check_context_reads


def test_a_context_is_read_in_one_statement_as_the_separate_reads_read_it_on_postgres(pg_db, pg_user):
    check_context_reads(pg_db, pg_user.id)
