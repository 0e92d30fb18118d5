"""Usage summaries on a year of data: rollups (the service) against a plain GROUP BY over raw turns.

Loads one synthetic year (2025) into a fresh, migrated Postgres database with
server-side SQL only (``INSERT … SELECT generate_series``): 1,000 users, a room
and a session each, ``--turns`` completed turns (default 5,000,000) over 5
models, then builds the quarter-hour rollups from the turns with one
``INSERT … SELECT … GROUP BY`` (what ``billing.settle_turn`` maintains live).
Then, for month / week / day buckets over the whole year, for all users and for
one user, it times ``usage.summarize`` (rollups) and ``usage.summary_from_turns``
(plain ``GROUP BY date_trunc`` over the completed turns) ``--runs`` times each in
the same run, checks that both give the same answer, and reports p50/p99 and
the ratio turns/rollups.

Synthetic shape: each user works in bursts of 4 turns within one UTC hour (a
conversation), about 14 turns a day, 70% on their preferred model. Turn texts
are short (real turns carry KBs of content and reply, which only makes raw-turn
scans slower). For the load, the turns table's secondary indexes and the
full-text GIN index are dropped and the B-tree ones rebuilt afterwards (bulk-load
practice; the GIN index plays no part in usage queries and is not rebuilt).

    python bench/usage.py [--turns 5000000] [--runs 20]
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import psycopg
from _stack import fresh_database, percentile, report

from shared.cli import migrate
from shared.db import Database
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


ROLLUP_SQL = f"""
    INSERT INTO usage_rollups (id, user_id, model, period_start, turns, input_tokens, output_tokens, cost)
    SELECT {uuid_sql("row_number() OVER ()", 6)}, user_id, model, period_start, turns, tin, tout, cost
    FROM (
        SELECT user_id, model,
               date_bin('15 minutes', completed_at, timestamptz '2000-01-01 00:00:00+00') AS period_start,
               count(*) AS turns, sum(input_tokens) AS tin, sum(output_tokens) AS tout, sum(cost) AS cost
        FROM turns WHERE status = 'completed'
        GROUP BY 1, 2, 3
    ) periods
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
        step = time.perf_counter()
        conn.execute(ROLLUP_SQL)
        figures["build_rollups_s"] = time.perf_counter() - step
        conn.execute("VACUUM (ANALYZE) turns")
        conn.execute("VACUUM (ANALYZE) usage_rollups")
        figures["turns"] = conn.execute("SELECT count(*) FROM turns").fetchone()[0]
        figures["rollup_rows"] = conn.execute("SELECT count(*) FROM usage_rollups").fetchone()[0]
        figures["turns_mb"] = conn.execute("SELECT pg_total_relation_size('turns')").fetchone()[0] / 2**20
        figures["rollups_mb"] = (
            conn.execute("SELECT pg_total_relation_size('usage_rollups')").fetchone()[0] / 2**20
        )
        figures["one_user_id"] = conn.execute(f"SELECT {uuid_sql('7', 1)}").fetchone()[0]
    figures["load_total_s"] = time.perf_counter() - started
    return figures


def timed(function, session, query, runs: int) -> tuple[list[float], object]:
    result = function(session, query)  # warm-up, and the answer to compare
    session.rollback()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        function(session, query)
        samples.append(time.perf_counter() - started)
        session.rollback()
    return samples, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=5_000_000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
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
                        query = usage.UsageQuery(
                            bucket=bucket, start=YEAR_START, end=YEAR_END, tz="UTC", user_id=user_id
                        )
                        rollup_times, rollup_answer = timed(usage.summarize, session, query, args.runs)
                        turn_times, turn_answer = timed(usage.summary_from_turns, session, query, args.runs)
                        if rollup_answer != turn_answer:
                            raise SystemExit(f"rollups and raw turns disagree for {scope}/{bucket}")
                        name = f"{scope}_{bucket}"
                        figures[f"{name}_buckets"] = len(rollup_answer.daily)
                        figures[f"{name}_rollups_p50_ms"] = percentile(rollup_times, 0.5) * 1000
                        figures[f"{name}_rollups_p99_ms"] = percentile(rollup_times, 0.99) * 1000
                        figures[f"{name}_raw_turns_p50_ms"] = percentile(turn_times, 0.5) * 1000
                        figures[f"{name}_raw_turns_p99_ms"] = percentile(turn_times, 0.99) * 1000
                        figures[f"{name}_ratio_p50_raw_over_rollups"] = percentile(
                            turn_times, 0.5
                        ) / percentile(rollup_times, 0.5)
                        print(
                            f"# {name}: rollups p50 {figures[f'{name}_rollups_p50_ms']:.1f} ms, "
                            f"raw p50 {figures[f'{name}_raw_turns_p50_ms']:.1f} ms",
                            flush=True,
                        )
        finally:
            database.dispose()
    figures["runs"] = args.runs
    report("usage", figures)


if __name__ == "__main__":
    main()
