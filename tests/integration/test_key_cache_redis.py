"""API keys checked once per web process (issue 12): later requests authenticate without
the database, and a revoke in one process is refused by every other at once, on real
Postgres and Redis. Two app instances stand for two web processes (each has its own
runtime, pool, cache and Redis listener)."""

from __future__ import annotations

import os
import time

import pytest
import redis as redis_lib
from sqlalchemy import event

from shared.services import auth
from web.app import create_app


def wait_subscribed(app, timeout: float = 5.0) -> None:
    cache = app.extensions["tollgate"].key_cache
    deadline = time.monotonic() + timeout
    while cache.generation() is None:
        assert time.monotonic() < deadline, "the key cache never subscribed"
        time.sleep(0.02)


@pytest.fixture
def two_processes(pg_app, pg_settings):
    """The session's app and a second instance of it: two web processes."""
    other = create_app(pg_settings)
    for app in (pg_app, other):
        wait_subscribed(app)
    yield pg_app, other
    other.extensions["tollgate"].close()


def statements_during(app, call) -> tuple[object, list[str]]:
    engine = app.extensions["tollgate"].db.engine
    seen: list[str] = []

    def on_statement(_conn, _cursor, statement, *_args):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", on_statement)
    try:
        return call(), seen
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)


def key_lookups(statements: list[str]) -> int:
    return sum("api_keys.key_hash" in statement for statement in statements)


def test_a_checked_key_authenticates_later_requests_without_the_database(pg_app, pg_user):
    wait_subscribed(pg_app)
    client = pg_app.test_client()
    first, first_statements = statements_during(
        pg_app, lambda: client.get("/api/v1/admin/settings", headers=pg_user.headers)
    )
    assert first.status_code == 403  # a user key on an admin path: checked, and refused
    assert key_lookups(first_statements) == 1 and len(first_statements) == 1
    again, statements = statements_during(
        pg_app, lambda: client.get("/api/v1/admin/settings", headers=pg_user.headers)
    )
    assert again.status_code == 403 and statements == []  # the role came from the cache
    me = client.get("/api/v1/auth/me", headers=pg_user.headers).get_json()
    assert me["id"] == pg_user.id and me["role"] == "user"


def test_a_revoke_in_one_process_is_refused_by_every_other_at_once(two_processes, pg_admin, pg_db):
    first, second = two_processes
    _, issued = auth.create_user(pg_db, "cached@example.com", "user")
    headers = {"Authorization": f"Bearer {issued.secret}"}
    for app in (first, second):  # both processes have the key cached
        client = app.test_client()
        assert client.get("/api/v1/auth/me", headers=headers).status_code == 200
        _, statements = statements_during(app, lambda c=client: c.get("/api/v1/wallet", headers=headers))
        assert statements and key_lookups(statements) == 0  # the key came from the cache

    revoked = first.test_client().delete(
        f"/api/v1/admin/api-keys/{issued.api_key.id}", headers=pg_admin.headers
    )
    assert revoked.status_code == 200 and revoked.get_json()["revoked_at"]
    refused_at = None
    started = time.monotonic()
    while time.monotonic() - started < 2:
        if second.test_client().get("/api/v1/auth/me", headers=headers).status_code == 401:
            refused_at = time.monotonic() - started
            break
    assert refused_at is not None and refused_at < 0.5, refused_at
    assert first.test_client().get("/api/v1/auth/me", headers=headers).status_code == 401


def test_a_cache_that_lost_redis_is_emptied_and_bypassed_until_it_listens_again(
    pg_app, pg_user, redis_server_url
):
    wait_subscribed(pg_app)
    cache = pg_app.extensions["tollgate"].key_cache
    client = pg_app.test_client()
    assert client.get("/api/v1/auth/me", headers=pg_user.headers).status_code == 200
    assert cache.lookup(auth.hash_key(pg_user.key)) is not None

    # Redis drops this process's subscribers (as a restart or a network cut would): a revoke
    # published now would be lost, so the cache must not serve what it holds.
    admin_client = redis_lib.Redis.from_url(redis_server_url)
    kill_own_subscribers(admin_client)
    deadline = time.monotonic() + 3
    while cache.lookup(auth.hash_key(pg_user.key)) is not None:
        assert time.monotonic() < deadline, "the cache kept serving after losing its subscription"
        time.sleep(0.01)
    wait_subscribed(pg_app)
    assert cache.lookup(auth.hash_key(pg_user.key)) is None  # emptied, not just paused
    _, statements = statements_during(pg_app, lambda: client.get("/api/v1/auth/me", headers=pg_user.headers))
    assert key_lookups(statements) == 1  # back to the database, then cached again
    assert cache.lookup(auth.hash_key(pg_user.key)) is not None


def kill_own_subscribers(admin_client) -> None:
    """``CLIENT KILL`` each pub/sub connection of this test process, and only those: the
    session's live Celery worker subscribes on the same Redis, and a prefork worker that
    loses its broker connection can die reconnecting (a Celery bug: "file descriptor is
    None" while it re-registers its children), which left later tests' turns queued."""
    own = _own_tcp_ports()
    killed = 0
    for client in admin_client.client_list(_type="pubsub"):
        if int(client["addr"].rsplit(":", 1)[1]) in own:
            admin_client.client_kill_filter(_id=client["id"])
            killed += 1
    assert killed, "no subscriber of this process was found"


def _own_tcp_ports() -> set[int]:
    """The local TCP ports of this process's sockets (/proc: socket inodes of our fds)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_lookup_that_raced_a_revoke_does_not_store_its_stale_answer(pg_app):
    wait_subscribed(pg_app)
    cache = pg_app.extensions["tollgate"].key_cache
    generation = cache.generation()
    cache._revoked("some-other-key-hash")  # an invalidation arrives while the lookup runs
    cache.store("raced-key-hash", object(), generation)
    assert cache.lookup("raced-key-hash") is None
    cache.store("raced-key-hash", marker := object(), cache.generation())
    assert cache.lookup("raced-key-hash") is marker
