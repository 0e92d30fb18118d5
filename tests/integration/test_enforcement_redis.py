"""The enforcement override shared through Redis: every process sees a change on its next check,
it survives a Redis flush, and an unreachable Redis degrades to documented behaviour, never a 500."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import redis as redis_lib
from sqlalchemy import select

from shared.models import SettingEntry
from shared.runtime import Runtime
from shared.services import enforcement
from tests.integration.conftest import ROOT
from web.app import create_app

DEAD_REDIS = "redis://127.0.0.1:1/0"
SETTINGS_PATH = "/api/v1/admin/settings"
TOGGLE_PATH = "/api/v1/admin/settings/enforcement"

PROBE = """
import json, sys
from shared.runtime import Runtime
from shared.services import enforcement
from shared.settings import Settings
runtime = Runtime(Settings(database_url=sys.argv[1], redis_url=sys.argv[2]), role="probe")
state = enforcement.current_state(runtime)
print(json.dumps({"enabled": state.enabled, "source": state.source, "stale": state.stale}))
"""


def probe_in_subprocess(settings) -> dict:
    """A separate Python process with its own Runtime, as a Celery worker or gunicorn worker would be."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, settings.database_url, settings.redis_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def enforcement_of(client, admin) -> dict:
    response = client.get(SETTINGS_PATH, headers=admin.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["enforcement"]


def test_a_toggle_through_one_app_is_seen_by_another_app_and_another_process_on_the_next_check(
    pg_app, pg_settings, pg_admin
):
    first = pg_app.test_client()
    second_app = create_app(pg_settings)
    second = second_app.test_client()
    try:
        assert enforcement_of(second, pg_admin)["enabled"] is False
        assert probe_in_subprocess(pg_settings)["enabled"] is False

        response = first.patch(TOGGLE_PATH, json={"enabled": True}, headers=pg_admin.headers)
        assert response.status_code == 200
        seen = enforcement_of(second, pg_admin)
        assert (seen["enabled"], seen["source"], seen["updated_by"]) == (True, "override", pg_admin.id)
        assert probe_in_subprocess(pg_settings) == {"enabled": True, "source": "override", "stale": False}

        assert second.delete(TOGGLE_PATH, headers=pg_admin.headers).status_code == 200
        assert enforcement_of(first, pg_admin)["source"] == "default"
        assert probe_in_subprocess(pg_settings)["enabled"] is False
    finally:
        second_app.extensions["tollgate"].close()


def test_the_override_survives_a_redis_flush(pg_app, pg_settings, pg_admin):
    client = pg_app.test_client()
    client.patch(TOGGLE_PATH, json={"enabled": True}, headers=pg_admin.headers)
    app_redis = redis_lib.Redis.from_url(pg_settings.redis_url)
    app_redis.flushdb()
    assert app_redis.get(enforcement.REDIS_KEY) is None

    assert probe_in_subprocess(pg_settings)["enabled"] is True
    seen = enforcement_of(client, pg_admin)
    assert (seen["enabled"], seen["source"], seen["updated_by"]) == (True, "override", pg_admin.id)
    restored = json.loads(app_redis.get(enforcement.REDIS_KEY))
    assert (restored["override"], restored["version"]) == (True, 1)


def test_a_flushed_redis_without_any_override_falls_back_to_the_default_and_keeps_the_key(
    pg_app, pg_settings, pg_admin
):
    app_redis = redis_lib.Redis.from_url(pg_settings.redis_url)
    assert enforcement_of(pg_app.test_client(), pg_admin)["source"] == "default"
    stored = json.loads(app_redis.get(enforcement.REDIS_KEY))
    assert stored["override"] is None  # always present once initialised: missing means flushed


def test_with_redis_unreachable_settings_answer_200_from_the_database_copy_marked_stale(
    pg_app, pg_settings, pg_admin
):
    pg_app.test_client().patch(TOGGLE_PATH, json={"enabled": True}, headers=pg_admin.headers)
    cut_off = create_app(pg_settings.replace(redis_url=DEAD_REDIS))
    try:
        client = cut_off.test_client()
        response = client.get(SETTINGS_PATH, headers=pg_admin.headers)
        assert response.status_code == 200
        assert response.headers["X-Enforcement-Stale"] == "true"
        seen = response.get_json()["enforcement"]
        assert (seen["enabled"], seen["source"]) == (True, "override")
        runtime = cut_off.extensions["tollgate"]
        assert enforcement.is_enforced(runtime) is True
        assert enforcement.redis_status(runtime)["ok"] is False
        ready = client.get("/api/v1/health/ready", headers=pg_admin.headers)
        assert ready.status_code == 503 and "redis" in ready.get_json()["down"]
    finally:
        cut_off.extensions["tollgate"].close()


def test_with_redis_unreachable_a_toggle_is_refused_cleanly_and_changes_nothing(
    pg_app, pg_settings, pg_admin
):
    cut_off = create_app(pg_settings.replace(redis_url=DEAD_REDIS))
    try:
        client = cut_off.test_client()
        for method, kwargs in (("patch", {"json": {"enabled": True}}), ("delete", {})):
            response = getattr(client, method)(TOGGLE_PATH, headers=pg_admin.headers, **kwargs)
            assert response.status_code == 503
            body = response.get_json()
            assert body["error"] == "enforcement_store_unavailable"
            assert "nothing" in body["message"]
    finally:
        cut_off.extensions["tollgate"].close()
    with pg_app.extensions["tollgate"].db.session() as session:
        assert session.scalar(select(SettingEntry)) is None
    assert enforcement_of(pg_app.test_client(), pg_admin)["enabled"] is False


def test_a_process_that_loses_redis_keeps_the_last_state_it_saw(pg_app, pg_settings, pg_admin):
    client = pg_app.test_client()
    client.patch(TOGGLE_PATH, json={"enabled": True}, headers=pg_admin.headers)
    runtime = Runtime(pg_settings, role="worker")
    try:
        assert enforcement.current_state(runtime).enabled is True
        # Another process clears the override; then this process loses Redis before its next check.
        client.delete(TOGGLE_PATH, headers=pg_admin.headers)
        runtime.settings = pg_settings.replace(redis_url=DEAD_REDIS)
        runtime.__dict__.pop("redis", None)
        state = enforcement.current_state(runtime)
        assert (state.enabled, state.source, state.stale) == (True, "override", True)
        # Redis back: the very next check after the back-off sees the current state.
        runtime.settings = pg_settings
        runtime.__dict__.pop("redis", None)
        time.sleep(enforcement.RETRY_AFTER_FAILURE_SECONDS + 0.1)
        state = enforcement.current_state(runtime)
        assert (state.enabled, state.source, state.stale) == (False, "default", False)
    finally:
        runtime.close()


def test_racing_toggles_from_two_apps_leave_redis_at_the_databases_newest_version(
    pg_app, pg_settings, pg_admin
):
    other_app = create_app(pg_settings)
    clients = [pg_app.test_client(), other_app.test_client()]
    barrier = threading.Barrier(16)
    statuses: list[int] = []

    def toggle(i: int) -> None:
        barrier.wait(timeout=30)
        response = clients[i % 2].patch(TOGGLE_PATH, json={"enabled": bool(i % 3)}, headers=pg_admin.headers)
        statuses.append(response.status_code)

    threads = [threading.Thread(target=toggle, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert statuses == [200] * 16
        with pg_app.extensions["tollgate"].db.session() as session:
            row = session.get(SettingEntry, enforcement.SETTING_KEY)
            assert row.version == 16
            newest = row.value["override"]
        stored = json.loads(redis_lib.Redis.from_url(pg_settings.redis_url).get(enforcement.REDIS_KEY))
        assert (stored["version"], stored["override"]) == (16, newest)
    finally:
        other_app.extensions["tollgate"].close()


def test_the_sync_job_repairs_a_redis_that_went_back_to_an_older_version(pg_app, pg_settings, pg_admin):
    client = pg_app.test_client()
    client.patch(TOGGLE_PATH, json={"enabled": True}, headers=pg_admin.headers)
    client.patch(TOGGLE_PATH, json={"enabled": False}, headers=pg_admin.headers)
    app_redis = redis_lib.Redis.from_url(pg_settings.redis_url)
    # As if Redis restarted from a snapshot taken between the two writes.
    app_redis.set(enforcement.REDIS_KEY, json.dumps({"override": True, "version": 1, "updated_by": None}))
    runtime = pg_app.extensions["tollgate"]
    assert enforcement.is_enforced(runtime) is True
    assert enforcement.sync_to_redis(runtime) == {"pushed": True, "version": 2}
    assert enforcement.is_enforced(runtime) is False
    assert enforcement.sync_to_redis(runtime)["pushed"] is False


def test_an_unreadable_redis_value_is_replaced_from_the_database(pg_app, pg_settings, pg_admin):
    pg_app.test_client().patch(TOGGLE_PATH, json={"enabled": True}, headers=pg_admin.headers)
    app_redis = redis_lib.Redis.from_url(pg_settings.redis_url)
    app_redis.set(enforcement.REDIS_KEY, "not json")
    assert enforcement.is_enforced(pg_app.extensions["tollgate"]) is True
    assert json.loads(app_redis.get(enforcement.REDIS_KEY))["override"] is True
