"""/metrics in multiprocess mode: gunicorn's processes and the Celery worker add up.

Real parts: the Procfile's web line (gunicorn, two worker processes) and the live
``celery worker`` process, both on the session's settings, so they share one
metrics directory (``<var>/metrics``); Postgres; Redis as broker.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import httpx
import pytest
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families

from shared.metrics import KOMBU_PRIORITY_SEPARATOR, QueueDepthCollector
from tests.integration.conftest import ROOT, service_env
from tests.integration.test_procfile import expand, free_port, procfile

pytestmark = pytest.mark.usefixtures("live_worker")


@pytest.fixture
def web(pg_settings, pg_app, tmp_path):
    """``base_url`` of the Procfile's web process, sharing the live worker's metrics directory."""
    port = free_port()
    env = service_env(pg_settings, PORT=str(port), WEB_CONCURRENCY="2")
    log = open(tmp_path / "web.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        expand(procfile()["web"], env),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base_url}/api/v1/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError((tmp_path / "web.log").read_text()[-3000:])
            time.sleep(0.3)
        yield base_url
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
        log.close()


def scrape(base_url: str) -> dict:
    response = httpx.get(f"{base_url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_web_metrics_count_the_turns_the_celery_worker_ran(web, pg_user):
    headers = pg_user.headers
    room = httpx.post(f"{web}/api/v1/rooms", json={"name": "m"}, headers=headers).json()
    chat = httpx.post(f"{web}/api/v1/rooms/{room['id']}/sessions", json={}, headers=headers).json()
    before = scrape(web)

    response = httpx.post(
        f"{web}/api/v1/sessions/{chat['id']}/turns",
        json={"content": "search for the ledger"},
        headers=headers,
        timeout=60,
    )
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "completed"
    after = scrape(web)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # Recorded in the Celery worker's child process, read by a gunicorn process.
    assert delta("tollgate_turns_total", outcome="completed") == 1
    assert delta("tollgate_turn_duration_seconds_count", outcome="completed") == 1
    assert delta("tollgate_tool_calls_total", tool="search", status="ok") == 1
    route = "/api/v1/sessions/<string:session_id>/turns"
    assert delta("tollgate_http_requests_total", route=route, method="POST", status="201") == 1
    assert value(after, "tollgate_broker_up") == 1
    assert ("tollgate_queue_depth", frozenset({("queue", "turns")})) in after


def test_every_scrape_sees_the_requests_of_all_gunicorn_processes(web):
    counts = []
    for _ in range(8):
        samples = scrape(web)
        counts.append(
            value(samples, "tollgate_http_requests_total", route="/metrics", method="GET", status="200")
        )
    # A request is counted once answered; each scrape sees all earlier ones, whichever
    # gunicorn process answered them.
    assert counts == [counts[0] + n for n in range(8)]


def test_queue_depth_is_the_length_of_each_redis_queue_at_every_priority(pg_settings):
    client = redis_lib.Redis.from_url(pg_settings.broker_url)
    # Queue names no worker consumes, so the test owns them.
    busy, idle = f"depth-test-{uuid.uuid4().hex[:8]}", f"depth-test-{uuid.uuid4().hex[:8]}"
    keys = [busy, f"{busy}{KOMBU_PRIORITY_SEPARATOR}6"]
    try:
        client.lpush(keys[0], "a", "b", "c")
        client.lpush(keys[1], "d")
        families = {
            family.name: family
            for family in QueueDepthCollector(pg_settings, [busy, idle], lambda: client).collect()
        }
        assert [sample.value for sample in families["tollgate_broker_up"].samples] == [1]
        depths = {sample.labels["queue"]: sample.value for sample in families["tollgate_queue_depth"].samples}
        assert depths == {busy: 4, idle: 0}
    finally:
        client.delete(*keys)
        client.close()
