"""How long the spend check's sums take on Postgres (docs/limits.md "Measured").

A user with a month of hourly usage rows for 3 models (2,232 rows) among 200 other
users with the same, plus a key with a month of quarter-hour key rollups (2,976 rows); times
``limits.spent`` (the sum admission runs under the limit lock) and ``limits.held``.

    .venv/bin/python bench/limits.py postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
from sqlalchemy import text

from shared.db import Database
from shared.migrations import migrate
from shared.models import ApiKeySpend, Limit, UsageHour
from shared.services import auth, limits
from shared.settings import Settings, normalize_database_url


def main(server: str) -> None:
    name = f"tollgate_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = normalize_database_url(server.rsplit("/", 1)[0] + f"/{name}")
    try:
        migrate(Settings(database_url=url))
        database = Database(url)
        start = datetime(2026, 12, 1, tzinfo=UTC)
        quarters = [start + timedelta(minutes=15 * n) for n in range(31 * 96)]
        with database.session() as session:
            users = [auth.create_user(session, f"u{n}@bench.test")[0] for n in range(201)]
            key_id = auth.list_keys(session, users[0].id)[0].id
            hours = [start + timedelta(hours=n) for n in range(31 * 24)]
            rows = [
                {
                    "scope": user.id,
                    "model": model,
                    "hour_start": hour,
                    "turns": 4,
                    "input_tokens": 40,
                    "output_tokens": 40,
                    "cost": Decimal("0.004"),
                    **{
                        f"{m}_to_{q}": v * q // 15
                        for q in (15, 30, 45)
                        for m, v in (("turns", 1), ("input_tokens", 10), ("output_tokens", 10))
                    },
                    **{f"cost_to_{q}": Decimal("0.001") * (q // 15) for q in (15, 30, 45)},
                }
                for user in users
                for model in ("m1", "m2", "m3")
                for hour in hours
            ]
            for i in range(0, len(rows), 20000):
                session.execute(UsageHour.__table__.insert(), rows[i : i + 20000])
            session.execute(
                ApiKeySpend.__table__.insert(),
                [
                    {
                        "id": str(uuid.uuid4()),
                        "api_key_id": key_id,
                        "period_start": q,
                        "cost": Decimal("0.001"),
                    }
                    for q in quarters
                ],
            )
            session.commit()
            session.execute(text("ANALYZE"))
            session.commit()
            now = datetime(2026, 12, 31, 12, tzinfo=UTC)
            for subject_type, subject_id in (("user", users[0].id), ("api_key", key_id)):
                row = Limit(
                    subject_type=subject_type,
                    subject_id=subject_id,
                    user_id=users[0].id,
                    spend_amount=Decimal(100),
                    spend_period="month",
                    spend_tz="Europe/Berlin",
                )
                lo, hi = limits.period_bounds("month", "Europe/Berlin", now)
                timings = []
                for _ in range(200):
                    began = time.perf_counter()
                    total = limits.spent(session, row, lo, hi)
                    limits.held(session, row)
                    timings.append((time.perf_counter() - began) * 1000)
                    session.commit()
                summed = len(rows) // 201 if subject_type == "user" else len(quarters)
                print(
                    f"{subject_type}: spent={total} over {summed}"
                    f" rows: median {statistics.median(timings):.2f} ms, p95 "
                    f"{sorted(timings)[int(len(timings) * 0.95)]:.2f} ms (spent + held)"
                )
        database.dispose()
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/postgres")
