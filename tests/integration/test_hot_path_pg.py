"""The hot path's database work, counted (issue 12, docs/architecture.md "The hot path,
counted"): pool checkouts, SQL statements and transactions of a turn's admission, of its run
in the worker, and of the cheap reads, on Postgres with enforcement on (the caller's API key
already checked once, as for any client past its first request). Not timed: a count
that grows past the documented budget is a regression someone has to explain (or the budget
and the docs move together)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from psycopg import _queries as psycopg_queries
from sqlalchemy import event

from shared.providers import OfflineProvider
from shared.services import turn_runner
from shared.tools.registry import build_registry
from tests.integration.test_enforced_turns_pg import enforced, grant, new_chat  # noqa: F401 - fixture
from tests.integration.test_io_pools_pg import io_settings  # noqa: F401 - fixture
from tests.integration.test_key_cache_redis import wait_subscribed
from web.app import create_app

# path: (checkouts, statements, commits) at most; docs/architecture.md carries the same table.
BUDGET = {
    "admission": (1, 4, 1),
    "run_turn": (3, 3, 3),
    # Enforcement off: no context read to size a hold, no hold, no hold to lock.
    "admission_unenforced": (1, 1, 1),
    "run_turn_unenforced": (3, 3, 3),
    "get_turn": (1, 1, 0),
    "get_turn_again": (0, 0, 0),  # a finished turn, read before by this process
    "get_wallet": (1, 2, 0),
}


@dataclass
class Counts:
    checkouts: int = 0
    statements: int = 0
    commits: int = 0
    sql: list = field(default_factory=list, repr=False)

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.checkouts, self.statements, self.commits)


@contextmanager
def counting(engine):
    counts = Counts()

    def on_checkout(*_args):
        counts.checkouts += 1

    def on_statement(_conn, _cursor, statement, *_args):
        counts.statements += 1
        counts.sql.append(" ".join(statement.split())[:160])

    def on_commit(*_args):
        counts.commits += 1

    listeners = [
        (engine.pool, "checkout", on_checkout),
        (engine, "before_cursor_execute", on_statement),
        (engine, "commit", on_commit),
    ]
    for target, name, listener in listeners:
        event.listen(target, name, listener)
    try:
        yield counts
    finally:
        for target, name, listener in listeners:
            event.remove(target, name, listener)


def within(path: str, counts: Counts) -> None:
    checkouts, statements, commits = BUDGET[path]
    assert counts.checkouts <= checkouts, f"{path}: {counts}"
    if counts.statements > statements:
        print("\n".join(counts.sql))
    assert counts.statements <= statements, f"{path}: {counts}"
    assert counts.commits <= commits, f"{path}: {counts}"


@pytest.fixture(params=["enforced", "unenforced"])
def funded_chat(request, pg_client, pg_admin, pg_user):
    """A chat whose user has credit, with enforcement on (every turn held) or left off."""
    if request.param == "enforced":
        request.getfixturevalue("enforced")
    grant(pg_client, pg_admin, pg_user.id, "10")
    return request.param == "enforced", new_chat(pg_client, pg_user)


@pytest.fixture
def quiet_app(pg_app, io_settings):  # noqa: F811
    """The app on a broker no worker listens to: the session's live worker must not run the
    turn this test runs in-process (it would, and the count would be of a skipped run)."""
    app = create_app(io_settings)
    yield app
    app.extensions["tollgate"].close()


def test_a_turn_and_the_cheap_reads_stay_within_their_round_trip_budget(
    quiet_app, pg_user, funded_chat, monkeypatch
):
    pg_app, pg_client = quiet_app, quiet_app.test_client()
    # Statements psycopg parses again on every execution (too long for its cache by default:
    # shared/db.py raises the limits); none on a turn's path.
    uncached = []
    parse = psycopg_queries._query2pg_nocache
    monkeypatch.setattr(
        psycopg_queries,
        "_query2pg_nocache",
        lambda query, *a: uncached.append(query[:80]) or parse(query, *a),
    )
    held, chat = funded_chat
    suffix = "" if held else "_unenforced"
    runtime = pg_app.extensions["tollgate"]
    engine = runtime.db.engine
    provider, tools = OfflineProvider(), build_registry()

    def one_turn(content: str) -> dict[str, Counts]:
        with counting(engine) as admission:
            response = pg_client.post(
                f"/api/v1/sessions/{chat['id']}/turns",
                json={"content": content},
                headers={**pg_user.headers, "Prefer": "respond-async"},
            )
        assert response.status_code == 202, response.get_json()
        turn_id = response.get_json()["id"]
        with counting(engine) as run:
            outcome = turn_runner.run_turn(
                runtime,
                turn_id,
                provider=provider,
                tools=tools,
                takeover=False,
                final_attempt=False,
                held=held,  # as the task's message says
            )
        assert outcome == "completed"
        with counting(engine) as get_turn:
            assert pg_client.get(f"/api/v1/turns/{turn_id}", headers=pg_user.headers).status_code == 200
        with counting(engine) as get_turn_again:
            assert pg_client.get(f"/api/v1/turns/{turn_id}", headers=pg_user.headers).status_code == 200
        with counting(engine) as get_wallet:
            assert pg_client.get("/api/v1/wallet", headers=pg_user.headers).status_code == 200
        return {
            f"admission{suffix}": admission,
            f"run_turn{suffix}": run,
            "get_turn": get_turn,
            "get_turn_again": get_turn_again,
            "get_wallet": get_wallet,
        }

    one_turn("Warm up: the first turn seeds the price and fills caches.")
    wait_subscribed(pg_app)  # the API-key cache serves once its revoke listener is up
    # The second turn of a session is the common case: a history to read, a price in force.
    uncached.clear()
    counted = one_turn("What is the capital of France?")
    assert uncached == []
    for path, counts in counted.items():
        within(path, counts)
    print({path: counts.as_tuple() for path, counts in counted.items()})
