"""Rate and concurrency limits across two real web processes (issue 15): two gunicorn
servers started from the Procfile's ``web`` line, on one Postgres and one Redis, answer
the same user's turns alternately; the limits count across both, because they are counted
in the database, never in a process's memory. No worker takes these turns (a broker of
their own), so admitted turns stay in flight."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.conftest import ROOT, service_env, stop_process
from tests.integration.test_io_pools_pg import expand, io_settings, new_sessions  # noqa: F401
from tests.integration.test_limits_pg import get_limits, put_limits
from tests.integration.test_procfile import free_port, procfile

ASYNC = {"Prefer": "respond-async"}


@pytest.fixture
def two_web_processes(io_settings, tmp_path):  # noqa: F811
    started = []
    for n in range(2):
        port = free_port()
        env = service_env(io_settings, PORT=str(port), WEB_CONCURRENCY="1")
        log = open(tmp_path / f"web-{n}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            expand(procfile()["web"], env),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append((process, log, f"http://127.0.0.1:{port}/api/v1"))
    for process, _, base in started:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "a web process exited"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "a web process did not come up"
            time.sleep(0.3)
    yield [base for _, _, base in started]
    for process, log, _ in started:
        stop_process(process, timeout=20)
        log.close()


def race(bases: list[str], actor, sessions: list[str]) -> list[httpx.Response]:
    def submit(index: int) -> httpx.Response:
        base = bases[index % len(bases)]
        with httpx.Client(base_url=base, headers={**actor.headers, **ASYNC}, timeout=30) as client:
            return client.post(f"/sessions/{sessions[index]}/turns", json={"content": f"q{index}"})

    with ThreadPoolExecutor(len(sessions)) as pool:
        return list(pool.map(submit, range(len(sessions))))


def test_requests_per_minute_counts_across_two_gunicorn_processes(
    two_web_processes, pg_client, pg_admin, pg_user
):
    put_limits(pg_client, pg_admin, f"users/{pg_user.id}", {"requests_per_minute": 4})
    sessions = new_sessions(two_web_processes[0], pg_user, 10)
    responses = race(two_web_processes, pg_user, sessions)
    assert sorted(r.status_code for r in responses) == [202] * 4 + [429] * 6
    refused = [r for r in responses if r.status_code == 429]
    assert {r.json()["error"] for r in refused} == {"rate_limited"}
    assert all(1 <= int(r.headers["Retry-After"]) <= 60 for r in refused)
    # Each process saw 5 requests: a count per process would have admitted 8.
    assert get_limits(pg_client, pg_admin, f"users/{pg_user.id}")["requests_last_minute"] == 4


def test_max_concurrent_turns_counts_across_two_gunicorn_processes(
    two_web_processes, pg_client, pg_admin, pg_user
):
    put_limits(pg_client, pg_admin, f"users/{pg_user.id}", {"max_concurrent_turns": 3})
    sessions = new_sessions(two_web_processes[1], pg_user, 12)
    responses = race(two_web_processes, pg_user, sessions)
    assert sorted(r.status_code for r in responses) == [202] * 3 + [429] * 9
    refused = [r for r in responses if r.status_code == 429]
    assert {r.json()["error"] for r in refused} == {"too_many_concurrent_turns"}
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    # Each process saw 6 requests: a count per process would have admitted 6.
    assert get_limits(pg_client, pg_admin, f"users/{pg_user.id}")["in_flight_turns"] == 3
