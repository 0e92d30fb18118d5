"""The request id follows a turn from the API into the Celery worker's JSON log lines.

Real parts: the web app on Postgres + Redis, a live ``celery worker`` process whose
stderr (JSON lines) goes to a log file the test reads.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

pytestmark = pytest.mark.usefixtures("live_worker")


@pytest.fixture
def chat(pg_client, pg_user):
    room = pg_client.post("/api/v1/rooms", json={"name": "ids"}, headers=pg_user.headers).get_json()
    return pg_client.post(f"/api/v1/rooms/{room['id']}/sessions", json={}, headers=pg_user.headers).get_json()


def worker_lines(live_worker, request_id: str, until, timeout: float = 30.0) -> list[dict]:
    """The worker's JSON log lines carrying ``request_id``, once ``until(lines)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        lines = []
        for raw in live_worker.log_path.read_text(errors="replace").splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # celery's own banner is not JSON
            if isinstance(line, dict) and line.get("request_id") == request_id:
                lines.append(line)
        if until(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def test_worker_log_lines_for_a_turn_carry_the_request_id_and_turn_id(pg_client, pg_user, chat, live_worker):
    request_id = f"it-{uuid.uuid4().hex[:12]}"
    response = pg_client.post(
        f"/api/v1/sessions/{chat['id']}/turns",
        json={"content": "search for ledger entries"},
        headers={**pg_user.headers, "X-Request-ID": request_id},
    )
    assert response.status_code == 201, response.get_json()
    assert response.headers["X-Request-ID"] == request_id
    turn = response.get_json()
    assert turn["status"] == "completed" and turn["tool_calls"]

    lines = worker_lines(
        live_worker, request_id, lambda found: any(x["message"] == "turn completed" for x in found)
    )
    messages = [line["message"] for line in lines]
    assert "turn running (attempt 1)" in messages and "turn completed" in messages
    assert {line["turn_id"] for line in lines if line["message"].startswith("turn ")} == {turn["id"]}


def test_a_generated_request_id_survives_the_tasks_retries(pg_client, pg_user, chat, live_worker):
    # No X-Request-ID sent: the app makes one; a transient failure retries the task
    # three times (the retry is re-sent by the worker, which forwards the id).
    response = pg_client.post(
        f"/api/v1/sessions/{chat['id']}/turns",
        json={"content": "unlucky [[offline:transient]]"},
        headers=pg_user.headers,
    )
    request_id = response.headers["X-Request-ID"]
    assert len(request_id) == 32
    turn_id = response.get_json()["id"]

    lines = worker_lines(
        live_worker, request_id, lambda found: any(x["message"].startswith("turn failed") for x in found)
    )
    attempts = {line["message"] for line in lines if line["message"].startswith("turn running")}
    assert attempts == {f"turn running (attempt {n})" for n in range(1, 5)}
    assert any(line["message"].startswith("turn failed") and line["turn_id"] == turn_id for line in lines)
