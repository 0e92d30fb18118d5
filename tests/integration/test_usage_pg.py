"""The usage suite of ``tests/web/test_usage_api.py`` again, on Postgres.

The tests are imported, not copied: pytest collects them here too and resolves
``usage_env`` from this module, so every expectation (literal buckets, totals,
CSV rows) must hold on both dialects — one suite, identical answers.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import delete, text

from shared.models import ALL_USERS_SCOPES, UsageHour
from shared.services import usage
from tests.integration.conftest import service_env
from tests.web.test_usage_api import (  # noqa: F401 - collected again with the Postgres usage_env
    EVENTS,
    UsageEnv,
    parsed_query,
    seed,
    test_a_range_without_usage_is_empty_not_an_error,
    test_a_well_formed_unknown_user_id_is_an_empty_filter,
    test_all_users_in_a_zone_cut_at_30_read_the_hours_from_30_whole,
    test_an_unknown_bucket_gives_totals_without_buckets,
    test_bad_queries_are_422_with_a_stable_code,
    test_export_by_model_quotes_commas_and_quotes_per_rfc_4180,
    test_export_by_user_in_a_zone,
    test_export_rejects_an_unknown_group_by,
    test_export_streams_the_summary_buckets_as_csv,
    test_export_with_an_unknown_bucket_is_the_header_alone,
    test_grouped_buckets_equal_the_raw_turns_grouped_the_same_way,
    test_rollup_summary_equals_the_sum_over_raw_completed_turns,
    test_rollups_written_by_billing_match_the_raw_turns,
    test_summary_buckets_usage_by_local_calendar,
    test_summary_tokens_count_as_usage_without_counting_as_turns,
    test_the_default_range_is_the_last_30_days,
    test_totals_with_an_unknown_bucket_cut_the_window_exactly,
    test_unknown_query_parameters_are_rejected,
    test_usage_is_for_admins_only,
    test_usage_rebuild_recomputes_both_levels_from_the_turns,
)


@pytest.fixture
def usage_env(pg_client, pg_db, pg_admin) -> UsageEnv:
    return seed(pg_db, pg_admin, pg_client)


def test_postgres_buckets_with_date_trunc_at_the_requested_zone(usage_env):
    """The SQL really is date_trunc over the local time (UTC plus the zone's offsets, one
    CASE arm per offset in force: Berlin changes on 2026-03-29) and is independent of the
    connection's own TimeZone setting."""
    query = parsed_query(bucket="day", start="2026-03-28", end="2026-03-30", tz="Europe/Berlin")
    statement = usage._rollup_statement("postgresql", query).statement
    assert "date_trunc" in str(statement.compile(dialect=usage_env.session.get_bind().dialect))
    baseline = usage.summarize(usage_env.session, query)
    usage_env.session.execute(text("SET TIME ZONE 'Pacific/Chatham'"))
    assert usage.summarize(usage_env.session, query) == baseline
    assert usage.summary_from_turns(usage_env.session, query) == baseline
    usage_env.session.rollback()


def test_a_zone_only_python_knows_is_summarised_without_asking_postgres(usage_env):
    """Python and Postgres each carry an IANA database and their versions may differ: the
    offsets come from Python's (as on SQLite), so a zone Postgres does not know still gets
    its answer (here Python's idea of it is UTC), never a 500."""
    query = _PythonThinksUtc(bucket="day", start=date(2026, 3, 28), end=date(2026, 3, 30))
    utc = usage.UsageQuery(bucket="day", start=date(2026, 3, 28), end=date(2026, 3, 30))
    answered = usage.summarize(usage_env.session, query).daily
    assert answered and answered == usage.summarize(usage_env.session, utc).daily


@dataclass(frozen=True)
class _PythonThinksUtc(usage.UsageQuery):
    """A query named for a zone only Postgres could check (Python's ``zone`` is UTC)."""

    @property
    def tz(self) -> str:
        return "Nowhere/Atlantis"


def test_the_usage_rebuild_command_agrees_with_the_raw_turns(usage_env, pg_settings):
    """``tollgate usage-rebuild`` as an operator runs it, after the all-users level (from :00
    and from :30) was lost."""
    session = usage_env.session
    session.execute(delete(UsageHour).where(UsageHour.scope.in_(ALL_USERS_SCOPES)))
    session.commit()
    query = parsed_query(bucket="day", start="2020-12-01", end="2026-12-31", tz="Asia/Kolkata")
    assert usage.summarize(session, query).daily == []
    session.rollback()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "tollgate"), "usage-rebuild"],
        env=service_env(pg_settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: usage rollups rebuilt from the turns")
    assert f"turns: 0 -> {len(EVENTS)}" in done.stdout
    for tz in (
        "UTC",
        "Asia/Kolkata",
        "America/St_Johns",
        "Asia/Kathmandu",
        "Pacific/Chatham",
        "Europe/Berlin",
    ):
        for bucket in ("day", "week", "month"):
            query = parsed_query(bucket=bucket, start="2020-12-01", end="2026-12-31", tz=tz)
            assert usage.summarize(session, query) == usage.summary_from_turns(session, query)
    session.rollback()
