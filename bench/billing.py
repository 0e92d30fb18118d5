"""Debits/second on one hot wallet (32 concurrent) through billing.settle_turn, beside the
same SQL transaction driven by pgbench in the same run; and the latency the enforcement
check adds per request (p50/p99), beside a bare Redis GET.

    python bench/billing.py [--debits 3200] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

from _stack import bench_settings, fresh_database, percentile, report

from shared.db import utcnow
from shared.migrations import migrate
from shared.runtime import Runtime
from shared.services import auth, billing, enforcement

# pgbench (simple protocol) substitutes :wallet and :user textually; their values carry the quotes.
PGBENCH_SCRIPT_TEMPLATE = """
\\set amount random(1, 1000)
BEGIN;
SELECT balance FROM wallets WHERE id = :wallet FOR UPDATE;
INSERT INTO ledger_entries (id, wallet_id, user_id, kind, amount, held_delta, balance_after, turn_id,
    idempotency_key, initiated_by, created_at)
  SELECT gen_random_uuid()::text, :wallet, :user, 'debit', -(:amount / 1000000.0), 0,
         balance - :amount / 1000000.0, gen_random_uuid()::text, 'pgbench:' || gen_random_uuid()::text,
         'system', now()
  FROM wallets WHERE id = :wallet;
UPDATE wallets SET balance = balance - :amount / 1000000.0, updated_at = now() WHERE id = :wallet;
{USAGE_UPSERT}
END;
"""
# billing.record_usage: the user's and the all-users row of the UTC hour, then the all-users
# row of the hour from :30, each with the prefixes for its first 15/30/45 minutes, in one
# multi-row upsert.
_AMOUNTS = {"turns": "1", "input_tokens": "100", "output_tokens": "50", "cost": "(:amount / 1000000.0)"}
_COLUMNS = [*_AMOUNTS, *[f"{measure}_to_{split}" for split in (15, 30, 45) for measure in _AMOUNTS]]
_VALUES = [
    *_AMOUNTS.values(),
    *[f"(m < {split})::int * {value}" for split in (15, 30, 45) for value in _AMOUNTS.values()],
]
USAGE_UPSERT = (
    f"INSERT INTO usage_hours (scope, hour_start, model, {', '.join(_COLUMNS)})\n"
    "  SELECT scope, date_trunc('hour', now() - shift, 'UTC') + shift, 'offline-small',\n"
    f"         {', '.join(_VALUES)}\n"
    "  FROM (VALUES (:user, interval '0'), ('*', interval '0'), ('*30', interval '30 minutes'))\n"
    "         AS scopes (scope, shift),\n"
    "       LATERAL (SELECT extract(minute FROM (now() - shift) AT TIME ZONE 'UTC')::int AS m) AS minute\n"
    "  ON CONFLICT (scope, hour_start, model) DO UPDATE SET "
    + ", ".join(f"{column} = usage_hours.{column} + EXCLUDED.{column}" for column in _COLUMNS)
    + ";"
)
PGBENCH_SCRIPT = PGBENCH_SCRIPT_TEMPLATE.replace("{USAGE_UPSERT}", USAGE_UPSERT)


def pgbench_binary() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))
    if not found:
        raise SystemExit("pgbench not found (Debian package postgresql)")
    return found[-1]


def measure_service(runtime: Runtime, user_id: str, total: int, concurrency: int) -> float:
    def one(_):
        with runtime.db.session() as session:
            billing.settle_turn(
                session,
                user_id=user_id,
                turn_id=str(uuid.uuid4()),
                model="offline-small",
                cost=Decimal("0.000500"),
                input_tokens=100,
                output_tokens=50,
                at=utcnow(),
                enforced=False,
            )
            session.commit()

    for _ in range(20):
        one(None)  # warm-up: connections and the price row
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(total)))
    return total / (time.perf_counter() - started)


def measure_pgbench(url: str, wallet_id: str, user_id: str, total: int, concurrency: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(PGBENCH_SCRIPT)
    plain = url.replace("+psycopg", "")
    result = subprocess.run(
        [
            pgbench_binary(),
            "-n",
            "-f",
            script.name,
            "-c",
            str(concurrency),
            "-j",
            "2",
            "-t",
            str(max(total // concurrency, 1)),
            "-D",
            f"wallet='{wallet_id}'",
            "-D",
            f"user='{user_id}'",
            plain,
        ],
        capture_output=True,
        text=True,
    )
    os.unlink(script.name)
    if result.returncode != 0:
        raise SystemExit(f"pgbench failed: {result.stderr[-2000:]}")
    match = re.search(r"tps = ([0-9.]+)", result.stdout)
    return float(match.group(1))


def measure_enforcement_check(runtime: Runtime, calls: int) -> dict:
    enforcement.current_state(runtime)
    check, bare = [], []
    for _ in range(calls):
        started = time.perf_counter()
        enforcement.current_state(runtime)
        check.append(time.perf_counter() - started)
        started = time.perf_counter()
        runtime.redis.get("bench:nothing")
        bare.append(time.perf_counter() - started)
    return {
        "check_p50_ms": percentile(check, 0.5) * 1000,
        "check_p99_ms": percentile(check, 0.99) * 1000,
        "redis_get_p50_ms": percentile(bare, 0.5) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--debits", type=int, default=3200)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with fresh_database() as url:
        settings = bench_settings(url)
        migrate(settings)
        runtime = Runtime(settings, role="bench")
        with runtime.db.session() as session:
            user, _ = auth.create_user(session, "hot@example.com", "user")
            wallet_id = user.wallet.id
        service_rate = measure_service(runtime, user.id, args.debits, args.concurrency)
        pgbench_rate = measure_pgbench(url, wallet_id, user.id, args.debits, args.concurrency)
        latency = measure_enforcement_check(runtime, 2000)
        runtime.close()
    report(
        "billing",
        {
            "hot_wallet_debits_per_s": service_rate,
            "pgbench_same_txn_per_s": pgbench_rate,
            "ratio_service_to_pgbench": service_rate / pgbench_rate,
            "enforcement_check_p50_ms": latency["check_p50_ms"],
            "enforcement_check_p99_ms": latency["check_p99_ms"],
            "bare_redis_get_p50_ms": latency["redis_get_p50_ms"],
            "concurrency": args.concurrency,
        },
    )


if __name__ == "__main__":
    main()
