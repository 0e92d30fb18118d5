"""Usage summaries on a year of data: rollups (the service) against a plain GROUP BY over raw turns.

Loads one synthetic year (2025) into a fresh, migrated Postgres database with
server-side SQL only (``INSERT … SELECT generate_series``): 1,000 users, a room
and a session each, ``--turns`` completed turns (default 5,000,000) over 5
models, then builds both rollup levels (per user and all users, per UTC hour with
quarter prefixes, all users also per hour from :30: what ``billing.record_usage``
maintains live) with
``usage.rebuild``, the code behind ``tollgate usage-rebuild``. Then, for month /
week / day buckets over the whole year, for all users and for one user, it times
``usage.summarize`` (rollups) and ``usage.summary_from_turns`` (plain ``GROUP BY
date_trunc`` over the completed turns) ``--runs`` times each in the same run,
checks that both give the same answer, and reports p50/p99 and the ratio
turns/rollups. The same all-users summaries in Asia/Kolkata (+05:30: every local
day cuts a UTC hour) are timed beside UTC and checked against the raw turns once.
It prints the EXPLAIN (ANALYZE) plan of each query shape, and exports the year as
CSV (all users, per day, group_by user) over growing ranges, each in a fresh
process, printing rows/s and peak RSS.

Synthetic shape: each user works in bursts of 4 turns within one UTC hour (a
conversation), about 14 turns a day, 70% on their preferred model. Turn texts
are short (real turns carry KBs of content and reply, which only makes raw-turn
scans slower). For the load, the turns table's secondary indexes and the
full-text GIN index are dropped and the B-tree ones rebuilt afterwards (bulk-load
practice; the GIN index plays no part in usage queries and is not rebuilt).

    python bench/usage.py [--turns 5000000] [--runs 20] [--export-months 1,3,12]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
from _stack import fresh_database, percentile, report
from sqlalchemy import text

from shared.db import Database
from shared.migrations import migrate
from shared.services import usage
from shared.settings import Settings

USERS = 1000
MODELS = ["gpt-4o-mini", "gpt-4o", "claude-3-5-haiku", "llama-3.1-70b", "offline-small"]
# (input, output) credit per 1k tokens, per model, in the same order.
PRICES = [(0.15, 0.6), (2.5, 10.0), (0.8, 4.0), (0.6, 0.6), (0.05, 0.1)]
BURST = 4  # turns per conversation hour
YEAR_START = date(2025, 1, 1)
YEAR_END = date(2025, 12, 31)

# An id that looks like a UUID and grows with n, so bulk inserts append to the B-tree.
UUID_OF = (
    "overlay(overlay(overlay(overlay(lpad(to_hex({n}), 32, '0') placing '-' from 21 for 0) "
    "placing '-' from 17 for 0) placing '-' from 13 for 0) placing '-' from 9 for 0)"
)


def uuid_sql(expression: str, namespace: int) -> str:
    return UUID_OF.format(n=f"({namespace}::bigint << 40) + ({expression})")


LOAD_SQL = [
    f"""INSERT INTO users (id, email, role, created_at)
        SELECT {uuid_sql("u", 1)}, 'bench' || u || '@example.test', 'user', timestamptz '2024-12-01'
        FROM generate_series(0, {USERS - 1}) AS u""",
    f"""INSERT INTO wallets (id, user_id, balance, held, updated_at)
        SELECT {uuid_sql("u", 2)}, {uuid_sql("u", 1)}, 0, 0, timestamptz '2024-12-01'
        FROM generate_series(0, {USERS - 1}) AS u""",
    f"""INSERT INTO rooms (id, user_id, name, created_at)
        SELECT {uuid_sql("u", 3)}, {uuid_sql("u", 1)}, 'bench', timestamptz '2024-12-01'
        FROM generate_series(0, {USERS - 1}) AS u""",
    f"""INSERT INTO sessions (id, room_id, user_id, summary_through_seq, created_at)
        SELECT {uuid_sql("u", 4)}, {uuid_sql("u", 3)}, {uuid_sql("u", 1)}, 0, timestamptz '2024-12-01'
        FROM generate_series(0, {USERS - 1}) AS u""",
]

TURN_INDEXES = [
    "ix_turns_text_search",
    "ix_turns_completed_at",
    "ix_turns_status_updated",
    "ix_turns_user_id",
]
TURN_CONSTRAINTS = ["uq_turns_session_id_seq", "uq_turns_user_id_idempotency_key"]
REBUILD_SQL = [
    "ALTER TABLE turns ADD CONSTRAINT uq_turns_session_id_seq UNIQUE (session_id, seq)",
    "ALTER TABLE turns ADD CONSTRAINT uq_turns_user_id_idempotency_key UNIQUE (user_id, idempotency_key)",
    "CREATE INDEX ix_turns_completed_at ON turns (completed_at)",
    "CREATE INDEX ix_turns_status_updated ON turns (status, updated_at)",
    "CREATE INDEX ix_turns_user_id ON turns (user_id)",
]


def turns_sql(total: int) -> str:
    per_user = total // USERS
    bursts_per_user = max(per_user // BURST, 1)
    models = "(ARRAY[" + ", ".join(f"'{m}'" for m in MODELS) + "])"
    price_in = "(ARRAY[" + ", ".join(f"{p[0]}" for p in PRICES) + "]::numeric[])"
    price_out = "(ARRAY[" + ", ".join(f"{p[1]}" for p in PRICES) + "]::numeric[])"
    # i -> user u = i % USERS, the user's k-th turn; burst b = k / BURST picks day and hour.
    return f"""
    INSERT INTO turns (id, session_id, room_id, user_id, seq, kind, status, content, reply, model,
                       max_output_tokens, input_tokens, output_tokens, cost, balance_after, low_balance,
                       summary_used_fallback, enforced, attempts, created_at, started_at, updated_at,
                       completed_at)
    SELECT {uuid_sql("i", 5)}, {uuid_sql("u", 4)}, {uuid_sql("u", 3)}, {uuid_sql("u", 1)}, k + 1,
           'chat', 'completed', 'bench turn ' || i, 'ok', {models}[m + 1], 1024, tin, tout,
           round(({price_in}[m + 1] * tin + {price_out}[m + 1] * tout) / 1000, 6), 0, false,
           false, false, 1, done - interval '3 seconds', done - interval '2 seconds', done, done
    FROM (
        SELECT i, u, k, tin, tout,
               CASE WHEN k % 10 < 7 THEN u % 5 ELSE (u + 1 + k % 4) % 5 END AS m,
               timestamptz '2025-01-01 00:00:00+00'
                 + ((k / {BURST}) * 365 / {bursts_per_user}) * interval '1 day'
                 + (7 + (u * 5 + (k / {BURST}) * 3) % 14) * interval '1 hour'
                 + ((k % {BURST}) * 13 + i % 7) * interval '1 minute'
                 + (i % 59) * interval '1 second' AS done
        FROM (
            SELECT i, i % {USERS} AS u, i / {USERS} AS k,
                   200 + (i * 7919) % 1800 AS tin, 50 + (i * 104729) % 700 AS tout
            FROM generate_series(0, {per_user * USERS - 1}::bigint) AS i
        ) numbered
    ) shaped
    """


def load(url: str, total: int) -> dict:
    figures = {}
    started = time.perf_counter()
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("SET work_mem = '256MB'")
        for statement in LOAD_SQL:
            conn.execute(statement)
        for name in TURN_INDEXES:
            conn.execute(f"DROP INDEX IF EXISTS {name}")
        for name in TURN_CONSTRAINTS:
            conn.execute(f"ALTER TABLE turns DROP CONSTRAINT IF EXISTS {name}")
        step = time.perf_counter()
        conn.execute(turns_sql(total))
        figures["load_turns_s"] = time.perf_counter() - step
        step = time.perf_counter()
        for statement in REBUILD_SQL:
            conn.execute(statement)
        figures["rebuild_indexes_s"] = time.perf_counter() - step
        conn.execute("VACUUM (ANALYZE) turns")
    database = Database(url)
    try:
        with database.session() as session:
            step = time.perf_counter()
            rebuilt = usage.rebuild(session)  # tollgate usage-rebuild
            figures["build_rollups_s"] = time.perf_counter() - step
    finally:
        database.dispose()
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) usage_hours")
        figures["turns"] = conn.execute("SELECT count(*) FROM turns").fetchone()[0]
        figures["rollup_rows_per_user"] = rebuilt.user_rows
        figures["rollup_rows_all_users"] = rebuilt.all_users_rows
        figures["rollup_rows_all_users_at_30"] = rebuilt.all_users_rows_at_30
        figures["turns_mb"] = conn.execute("SELECT pg_total_relation_size('turns')").fetchone()[0] / 2**20
        figures["rollups_mb"] = (
            conn.execute("SELECT pg_total_relation_size('usage_hours')").fetchone()[0] / 2**20
        )
        figures["one_user_id"] = conn.execute(f"SELECT {uuid_sql('7', 1)}").fetchone()[0]
    figures["load_total_s"] = time.perf_counter() - started
    return figures


def timed(session, entries: dict, runs: int) -> tuple[dict, dict]:
    """Time each ``name: (function, query)`` ``runs`` times, interleaved run by run, so
    every entry sees the same machine; the warm-up's answers are returned to compare."""
    answers = {}
    for name, (function, query) in entries.items():
        answers[name] = function(session, query)  # warm-up, and the answer to compare
        session.rollback()
    samples: dict = {name: [] for name in entries}
    for _ in range(runs):
        for name, (function, query) in entries.items():
            started = time.perf_counter()
            function(session, query)
            samples[name].append(time.perf_counter() - started)
            session.rollback()
    return samples, answers


def explain(session, query: usage.UsageQuery, build=usage._rollup_statement) -> list[str]:
    """The EXPLAIN (ANALYZE) plan of the statement the service runs for ``query``."""
    bound = build("postgresql", query)
    compiled = bound.statement.compile(dialect=session.get_bind().dialect)
    expanded = compiled.construct_expanded_state(bound.values)  # literal_execute values rendered
    rows = session.connection().exec_driver_sql(
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) " + expanded.statement, expanded.parameters
    )
    plan = [row[0] for row in rows]
    session.rollback()
    return plan


def scans(plan: list[str]) -> str:
    """The plan's table accesses, e.g. ``Index Scan using pk_usage_hours on usage_hours``."""
    found = []
    for line in plan:
        text = line.strip().removeprefix("->").strip()
        if "Scan" in text and " on " in text:
            found.append(text.split("  ")[0])
    return "; ".join(dict.fromkeys(found))


def export_child(url: str, start: str, end: str) -> None:
    """Run in a fresh process: export [start, end] as CSV, print rows, seconds and RSS."""
    database = Database(url)
    with database.session() as session:
        session.execute(text("SELECT 1"))
        session.rollback()
        baseline_kb = int(Path("/proc/self/statm").read_text().split()[1]) * (
            os.sysconf("SC_PAGE_SIZE") // 1024
        )
        started = time.perf_counter()
        rows = -1  # the header
        for chunk in usage.export_csv(
            session,
            bucket="day",
            start=date.fromisoformat(start),
            end=date.fromisoformat(end),
            group_by=usage.GroupBy.USER,
        ):
            rows += chunk.count("\r\n")
        seconds = time.perf_counter() - started
    database.dispose()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": rows, "seconds": seconds, "peak_kb": peak_kb, "baseline_kb": baseline_kb}))


def export_in_child(url: str, months: int) -> dict:
    end = date(YEAR_START.year, 1, 1) + timedelta(days=round(months * 365 / 12) - 1)
    end = min(end, YEAR_END)
    done = subprocess.run(
        [sys.executable, __file__, "--export-child", url, YEAR_START.isoformat(), end.isoformat()],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=5_000_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--export-months", default="1,3,12", help="CSV export ranges, in months from 1 January"
    )
    parser.add_argument("--export-child", nargs=3, metavar=("URL", "START", "END"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_child:
        export_child(*args.export_child)
        return
    figures: dict = {}
    with fresh_database() as url:
        migrate(Settings(database_url=url))
        loaded = load(url, args.turns)
        one_user = loaded.pop("one_user_id")
        figures.update(loaded)
        database = Database(url)
        try:
            with database.session() as session:
                for scope, user_id in (("all", None), ("user", one_user)):
                    for bucket in ("month", "week", "day"):
                        name = f"{scope}_{bucket}"
                        query = usage.UsageQuery(
                            bucket, YEAR_START, YEAR_END, usage.UTC_ZONE, user_id=user_id
                        )
                        kolkata = usage.UsageQuery(
                            bucket, YEAR_START, YEAR_END, ZoneInfo("Asia/Kolkata"), user_id=user_id
                        )
                        samples, answers = timed(
                            session,
                            {
                                "rollups": (usage.summarize, query),
                                "raw_turns": (usage.summary_from_turns, query),
                                "kolkata": (usage.summarize, kolkata),
                            },
                            args.runs,
                        )
                        if answers["rollups"] != answers["raw_turns"]:
                            raise SystemExit(f"rollups and raw turns disagree for {name}")
                        if answers["kolkata"] != usage.summary_from_turns(session, kolkata):
                            raise SystemExit(f"rollups and raw turns disagree for {name} in Asia/Kolkata")
                        session.rollback()
                        figures[f"{name}_buckets"] = len(answers["rollups"].daily)
                        p50 = {key: percentile(values, 0.5) * 1000 for key, values in samples.items()}
                        p99 = {key: percentile(values, 0.99) * 1000 for key, values in samples.items()}
                        for key in ("rollups", "raw_turns"):
                            figures[f"{name}_{key}_p50_ms"] = p50[key]
                            figures[f"{name}_{key}_p99_ms"] = p99[key]
                        figures[f"{name}_ratio_p50_raw_over_rollups"] = p50["raw_turns"] / p50["rollups"]
                        figures[f"{name}_ratio_p99_raw_over_rollups"] = p99["raw_turns"] / p99["rollups"]
                        figures[f"{name}_kolkata_p50_ms"] = p50["kolkata"]
                        figures[f"{name}_kolkata_p99_ms"] = p99["kolkata"]
                        figures[f"{name}_ratio_p50_kolkata_over_utc"] = p50["kolkata"] / p50["rollups"]
                        print(
                            f"# {name}: rollups p50 {p50['rollups']:.1f} ms (Kolkata {p50['kolkata']:.1f}), "
                            f"raw p50 {p50['raw_turns']:.1f} ms",
                            flush=True,
                        )
                shapes = {
                    "all_month": usage.UsageQuery("month", YEAR_START, YEAR_END),
                    "kolkata_all_day": usage.UsageQuery(
                        "day", YEAR_START, YEAR_END, ZoneInfo("Asia/Kolkata")
                    ),
                    "all_month_one_model": usage.UsageQuery("month", YEAR_START, YEAR_END, model=MODELS[0]),
                    "user_month": usage.UsageQuery("month", YEAR_START, YEAR_END, user_id=one_user),
                    "user_day_one_model": usage.UsageQuery(
                        "day", YEAR_START, YEAR_END, user_id=one_user, model=MODELS[1]
                    ),
                    "export_by_user_day": usage.UsageQuery(
                        "day", YEAR_START, YEAR_END, group_by=usage.GroupBy.USER
                    ),
                }
                for shape, query in shapes.items():
                    plan = explain(session, query)
                    print(f"# EXPLAIN {shape}:\n#   " + "\n#   ".join(plan), flush=True)
                    figures[f"explain_{shape}"] = scans(plan)
                plan = explain(session, shapes["user_month"], usage._turns_statement)
                figures["explain_raw_user_month"] = scans(plan)
        finally:
            database.dispose()
        for months in [int(value) for value in args.export_months.split(",") if value]:
            exported = export_in_child(url, months)
            figures[f"export_{months}m_rows"] = exported["rows"]
            figures[f"export_{months}m_rows_per_s"] = exported["rows"] / exported["seconds"]
            figures[f"export_{months}m_peak_rss_mb"] = exported["peak_kb"] / 1024
            figures[f"export_{months}m_rss_growth_mb"] = (
                exported["peak_kb"] - exported["baseline_kb"]
            ) / 1024
            print(f"# export {months} months: {exported}", flush=True)
    figures["runs"] = args.runs
    report("usage", figures)


if __name__ == "__main__":
    main()
