"""Through a real PgBouncer in transaction mode (issue 12, seed F64): the web and the turn
worker connect with ``DATABASE_POOL_URL``, PgBouncer hands each transaction whichever of its
few server connections is free, and everything still holds.

``make test`` starts the PgBouncer (scripts/test_services.py, Debian's ``pgbouncer``) with a
server pool of 4 per database. 40 turns waiting on a slow model at once through 4 server
connections prove that no turn keeps a transaction open across its model call: one that did
would hold a server connection for the whole wait, and at most 4 model calls could be in
flight.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
import redis as redis_lib

from shared.services import pricing
from shared.settings import normalize_database_url
from tests.integration.faults import assert_each_turn_billed_once, query
from tests.integration.test_enforced_turns_pg import enforced  # noqa: F401 - fixture (funded_slow_model's)
from tests.integration.test_faults_pg import assert_ledger_check_passes
from tests.integration.test_io_pools_pg import (  # noqa: F401 - fixtures used by name
    SLOW_MODEL,
    funded_slow_model,
    io_env,
    new_sessions,
    turn_worker,
    upstream,
    web,
)

pytest_plugins = ["tests.fakes.openai_server"]


@pytest.fixture(scope="session")
def pgbouncer_server_url() -> str:
    url = os.environ.get("TEST_PGBOUNCER_URL")
    if not url:
        raise RuntimeError("TEST_PGBOUNCER_URL is not set: run the suite with `make test`")
    return url


def _admin_url(bouncer_url: str) -> str:
    return urlsplit(bouncer_url)._replace(path="/pgbouncer").geturl()


def pgbouncer_show(bouncer_url: str, what: str) -> list[dict]:
    """``SHOW <what>`` on PgBouncer's admin console (simple protocol, autocommit)."""
    with psycopg.connect(_admin_url(bouncer_url), autocommit=True, prepare_threshold=None) as conn:
        cursor = conn.execute(f"SHOW {what}")
        names = [column.name for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


@pytest.fixture(scope="session")
def pgbouncer_pool_size(pgbouncer_server_url) -> int:
    config = {row["key"]: row["value"] for row in pgbouncer_show(pgbouncer_server_url, "CONFIG")}
    assert config["pool_mode"] == "transaction", "the tests need PgBouncer in transaction mode"
    return int(config["default_pool_size"])


@pytest.fixture
def io_settings(pg_settings, pgbouncer_server_url):
    """The session's database reached through PgBouncer (DATABASE_POOL_URL), with a broker
    of its own so the session's live worker does not take these turns."""
    database = urlsplit(pg_settings.database_url).path
    pooled = urlsplit(pgbouncer_server_url)._replace(path=database).geturl()
    app_db = int(urlsplit(pg_settings.redis_url).path.strip("/") or 15)
    broker = urlsplit(pg_settings.redis_url)._replace(path=f"/{app_db - 2}").geturl()
    redis_lib.Redis.from_url(broker).flushdb()
    return pg_settings.replace(
        database_pool_url=normalize_database_url(pooled),
        celery_broker_url=broker,
        celery_result_backend=broker,
    )


class ServerConnectionWatch:
    """Samples PgBouncer's pool for one database in a thread: the most server connections it
    ever had open, and the most clients it ever had waiting for one."""

    def __init__(self, bouncer_url: str, database: str):
        self.bouncer_url, self.database = bouncer_url, database
        self.peak_servers = self.peak_waiting = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pool in pgbouncer_show(self.bouncer_url, "POOLS"):
                if pool["database"] != self.database:
                    continue
                servers = sum(pool[k] for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))
                self.peak_servers = max(self.peak_servers, servers)
                self.peak_waiting = max(self.peak_waiting, pool["cl_waiting"])
                self.samples += 1
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def test_40_sync_turns_keep_their_model_calls_in_flight_through_4_server_connections(
    io_settings,
    pgbouncer_server_url,
    pgbouncer_pool_size,
    web,  # noqa: F811
    turn_worker,  # noqa: F811
    upstream,  # noqa: F811
    funded_slow_model,  # noqa: F811
    pg_user,
):
    """The web's admission and the gevent worker's claim, context, settle and lease renewals
    all go through PgBouncer: 40 concurrent sync turns on a model that answers after 8 s all
    have their model call in flight at once, complete, and are billed once, while PgBouncer
    never opens more than its pool of server connections for the database."""
    turn_worker()
    clients = 40
    sessions = new_sessions(web, pg_user, clients)
    database = urlsplit(io_settings.database_url).path.strip("/")

    def sync_turn(index: int) -> httpx.Response:
        with httpx.Client(base_url=web, headers=pg_user.headers, timeout=90) as client:
            return client.post(
                f"/sessions/{sessions[index]}/turns",
                json={"content": f"pooled question {index}", "model": SLOW_MODEL, "max_output_tokens": 32},
            )

    with ServerConnectionWatch(pgbouncer_server_url, database) as watch:
        with ThreadPoolExecutor(clients) as pool:
            responses = list(pool.map(sync_turn, range(clients)))
    assert [r.status_code for r in responses] == [201] * clients, [r.text for r in responses[:3]]
    assert {r.json()["status"] for r in responses} == {"completed"}
    assert upstream.peak_in_flight == clients
    assert watch.samples > 0
    assert 0 < watch.peak_servers <= pgbouncer_pool_size
    assert_each_turn_billed_once(io_settings, [r.json()["id"] for r in responses])
    assert query(io_settings, "SELECT count(*) FROM holds WHERE status = 'active'") == [(0,)]
    assert_ledger_check_passes(io_settings)


def test_concurrent_admissions_through_pgbouncer_never_overdraw_the_wallet(
    io_settings,
    pg_client,
    pg_admin,
    pg_user,
    web,  # noqa: F811
    turn_worker,  # noqa: F811
    upstream,  # noqa: F811
):
    """32 clients race for a wallet that covers a few turns' holds, through PgBouncer: the
    wallet row lock and the hold are taken inside one transaction, so they share one server
    connection even in transaction mode; no more is held than the wallet has, refusals leave
    nothing behind, and after the turns finish the wallet never went below zero."""
    turn_worker()
    with pg_client.application.extensions["tollgate"].db.session() as session:
        pricing.set_price(session, pg_admin.id, SLOW_MODEL, Decimal("0.001000"), Decimal("0.002000"))
    # Longer than the race takes on a loaded machine: no admitted turn may end (and free its
    # hold for a later one) before the last request is answered.
    upstream.latency_by_model[SLOW_MODEL] = 6.0
    assert (
        pg_client.patch(
            "/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers
        ).status_code
        == 200
    )
    sessions = new_sessions(web, pg_user, 32)

    def submit(index: int) -> httpx.Response:
        headers = {**pg_user.headers, "Prefer": "respond-async"}
        with httpx.Client(base_url=web, headers=headers, timeout=60) as client:
            return client.post(
                f"/sessions/{sessions[index]}/turns",
                json={"content": f"race {index}", "model": SLOW_MODEL, "max_output_tokens": 32},
            )

    # The empty wallet's refusal names one turn's worst case: fund about three and a half.
    required = Decimal(submit(0).json()["required"])
    grant = (required * Decimal("3.5")).quantize(Decimal("0.000001"))
    assert (
        pg_client.post(
            f"/api/v1/admin/users/{pg_user.id}/grants", json={"amount": str(grant)}, headers=pg_admin.headers
        ).status_code
        == 201
    )
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(submit, range(32)))
    admitted = [r.json()["id"] for r in responses if r.status_code == 202]
    refused = [r.json() for r in responses if r.status_code == 402]
    assert len(admitted) + len(refused) == 32, [r.status_code for r in responses]
    assert 1 <= len(admitted) <= 3 and refused
    assert {body["error"] for body in refused} == {"insufficient_balance"}
    # While the admitted turns wait on the model, their holds fit inside the wallet.
    ((held, balance),) = query(
        io_settings, "SELECT held, balance FROM wallets WHERE user_id = %s", pg_user.id
    )
    assert Decimal(0) < held <= balance
    assert query(io_settings, "SELECT count(*) FROM turns") == [(len(admitted),)]

    deadline = time.monotonic() + 60
    while query(io_settings, "SELECT count(*) FROM turns WHERE status NOT IN ('completed', 'failed')")[0][0]:
        assert time.monotonic() < deadline, "turns did not finish"
        time.sleep(0.2)
    assert_each_turn_billed_once(io_settings, admitted)
    ((held, balance),) = query(
        io_settings, "SELECT held, balance FROM wallets WHERE user_id = %s", pg_user.id
    )
    assert held == 0 and balance >= 0
    assert_ledger_check_passes(io_settings)
