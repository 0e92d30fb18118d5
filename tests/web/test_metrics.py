"""GET /metrics and request ids on the SQLite app, without a worker.

This process never calls ``metrics.configure``, so its samples stay in memory and
/metrics shows them; the samples are process-wide, so tests compare before/after.
Multiprocess aggregation (gunicorn + Celery worker) is tested in
tests/integration/test_metrics_pg.py.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.logging import JsonFormatter
from shared.providers import OfflineProvider, build_provider
from shared.runtime import Runtime
from shared.services import summaries, turn_runner
from shared.tools.registry import build_registry
from web.app import create_app


def scrape(client, **headers) -> dict:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/plain"
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def names(samples: dict) -> set[str]:
    return {name for name, _ in samples}


@pytest.fixture
def chat(client, user):
    room = client.post("/api/v1/rooms", json={"name": "metrics"}, headers=user.headers).get_json()
    return client.post(f"/api/v1/rooms/{room['id']}/sessions", json={}, headers=user.headers).get_json()


def submit(client, actor, chat, content, **headers):
    return client.post(
        f"/api/v1/sessions/{chat['id']}/turns",
        json={"content": content},
        headers={**actor.headers, **headers},
    )


def run_inline(app, turn_id, settings=None):
    """What the worker's run_turn task does, in this process."""
    runtime = app.extensions["tollgate"] if settings is None else Runtime(settings, role="worker")
    try:
        return turn_runner.run_turn(
            runtime,
            turn_id,
            provider=build_provider(runtime.settings),
            tools=build_registry(),
            takeover=False,
            final_attempt=True,
        )
    finally:
        if settings is not None:
            runtime.close()


def test_metrics_is_prometheus_text_served_without_an_api_key_and_outside_the_spec(client):
    samples = scrape(client)
    assert "tollgate_broker_up" in names(samples)
    spec = client.get("/api/v1/openapi.json").get_json()
    assert not any(path.startswith("/metrics") for path in spec["paths"])


def test_requests_are_counted_by_route_template_never_by_raw_path(client, user):
    before = scrape(client)
    raw_id = str(uuid.uuid4())
    assert client.get(f"/api/v1/turns/{raw_id}", headers=user.headers).status_code == 404
    assert client.get(f"/api/v1/turns/{raw_id}", headers=user.headers).status_code == 404
    assert client.get(f"/no/such/{raw_id}").status_code == 404
    assert client.open("/api/v1/rooms", method="BREW").status_code == 405
    after = scrape(client)

    route = "/api/v1/turns/<string:turn_id>"
    labels = {"route": route, "method": "GET", "status": "404"}
    assert value(after, "tollgate_http_requests_total", **labels) == (
        value(before, "tollgate_http_requests_total", **labels) + 2
    )
    assert value(after, "tollgate_http_request_duration_seconds_count", **labels) == (
        value(before, "tollgate_http_request_duration_seconds_count", **labels) + 2
    )
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    assert value(after, "tollgate_http_requests_total", **unmatched) == (
        value(before, "tollgate_http_requests_total", **unmatched) + 1
    )
    odd_method = {"route": "unmatched", "method": "other", "status": "405"}
    assert value(after, "tollgate_http_requests_total", **odd_method) == (
        value(before, "tollgate_http_requests_total", **odd_method) + 1
    )
    label_values = {v for _, labels in after for _, v in labels}
    assert not any(raw_id in v for v in label_values)
    assert "BREW" not in label_values


def test_a_metrics_token_when_set_is_required(settings):
    app = create_app(settings.replace(metrics_token="scrape-secret"))
    try:
        client = app.test_client()
        refused = client.get("/metrics")
        assert refused.status_code == 401
        assert refused.get_json()["error"] == "unauthorized"
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert "tollgate_broker_up" in names(scrape(client, Authorization="Bearer scrape-secret"))
    finally:
        app.extensions["tollgate"].close()


def test_embedded_queue_depth_counts_waiting_message_files(client, user, chat):
    before = scrape(client)
    assert value(before, "tollgate_broker_up") == 1
    assert submit(client, user, chat, "one").status_code == 202
    assert submit(client, user, chat, "two").status_code == 202
    after = scrape(client)
    assert (
        value(after, "tollgate_queue_depth", queue="turns")
        == value(before, "tollgate_queue_depth", queue="turns") + 2
    )
    assert ("tollgate_queue_depth", frozenset({("queue", "files")})) in after


def test_an_unreachable_redis_broker_is_reported_not_raised(settings):
    app = create_app(settings.replace(redis_url="redis://127.0.0.1:1/0"))
    try:
        samples = scrape(app.test_client())
        assert value(samples, "tollgate_broker_up") == 0
        assert "tollgate_queue_depth" not in names(samples)
    finally:
        app.extensions["tollgate"].close()


def test_turn_outcomes_latency_and_tool_calls_are_counted(app, client, user, chat):
    before = scrape(client)
    searched = submit(client, user, chat, "search for quarterly budget").get_json()
    failed = submit(client, user, chat, "this one breaks [[offline:fail]]").get_json()
    assert run_inline(app, searched["id"]) == "completed"
    assert run_inline(app, failed["id"]) == "failed"
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("tollgate_turns_total", outcome="completed") == 1
    assert delta("tollgate_turns_total", outcome="failed") == 1
    assert delta("tollgate_turn_duration_seconds_count", outcome="completed") == 1
    assert delta("tollgate_tool_calls_total", tool="search", status="ok") == 1
    assert delta("tollgate_tool_call_duration_seconds_count", tool="search") == 1


def test_a_tool_the_model_invents_is_counted_under_one_label(client):
    before = scrape(client)
    tools = build_registry()
    turn = SimpleNamespace(id="t", user_id="u", room_id="r", session_id="s", seq=1)
    session = SimpleNamespace(add=lambda _row: None, commit=lambda: None)
    turn_runner._call_tool(session, tools, turn, "rm_rf_" + uuid.uuid4().hex, {}, None)
    after = scrape(client)
    assert value(after, "tollgate_tool_calls_total", tool="unknown", status="error") == (
        value(before, "tollgate_tool_calls_total", tool="unknown", status="error") + 1
    )


def test_refusals_for_insufficient_credit_are_counted_at_submit_and_in_the_worker(
    settings, app, client, user, chat, db
):
    before = scrape(client)
    queued = submit(client, user, chat, "accepted while enforcement is off").get_json()

    enforced_settings = settings.replace(billing_enforcement_enabled=True)
    enforced_app = create_app(enforced_settings)
    try:
        enforced_client = enforced_app.test_client()
        refused = submit(enforced_client, user, chat, "the wallet is empty")
        assert refused.status_code == 402
        assert refused.get_json()["error"] == "insufficient_balance"
        # Enforcement came on while the turn waited: the worker's re-check refuses it.
        assert run_inline(app, queued["id"], settings=enforced_settings) == "skipped"
    finally:
        enforced_app.extensions["tollgate"].close()
    turn = client.get(f"/api/v1/turns/{queued['id']}", headers=user.headers).get_json()
    assert (turn["status"], turn["error"]["code"]) == ("failed", "insufficient_balance")
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("tollgate_enforcement_refusals_total", stage="submit") == 1
    assert delta("tollgate_enforcement_refusals_total", stage="worker") == 1
    assert delta("tollgate_turns_total", outcome="refused") == 1
    assert delta("tollgate_turns_total", outcome="failed") == 0


def test_summary_fallbacks_are_counted(client):
    before = scrape(client)
    turns = [SimpleNamespace(seq=1, content="Gamma. [[offline:fail-summary]]", reply="Sure.")]
    result = summaries.fold_turns(OfflineProvider(), "offline-small", None, turns, allow_fallback=True)
    assert result.used_fallback
    after = scrape(client)
    assert value(after, "tollgate_summary_fallbacks_total", reason="provider_error") == (
        value(before, "tollgate_summary_fallbacks_total", reason="provider_error") + 1
    )


# -- request ids -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123", True),
        ("0f8fad5b-d9cb-469f-a165-70867728950e", True),
        ("svc:edge.42_a", True),
        ("has space", False),
        ('quote"d', False),
        ("-leading-dash", False),
        ("x" * 65, False),
        ("ünïcode", False),
    ],
)
def test_a_sane_incoming_request_id_is_kept_and_anything_else_replaced(client, sent, kept):
    echoed = client.get("/api/v1/health", headers={"X-Request-ID": sent}).headers["X-Request-ID"]
    if kept:
        assert echoed == sent
    else:
        assert echoed != sent and len(echoed) == 32 and all(c in "0123456789abcdef" for c in echoed)


def test_log_lines_written_while_handling_a_request_carry_its_id(settings):
    app = create_app(settings)
    probe_log = logging.getLogger("tests.request_id_probe")

    def probe():
        probe_log.warning("inside the request")
        return ""

    app.add_url_rule("/probe", "probe", probe)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    probe_log.addHandler(handler)
    try:
        response = app.test_client().get("/probe", headers={"X-Request-ID": "probe-req-1"})
        probe_log.warning("after the request")
    finally:
        probe_log.removeHandler(handler)
        app.extensions["tollgate"].close()
    inside, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert response.headers["X-Request-ID"] == "probe-req-1"
    assert inside["message"] == "inside the request" and inside["request_id"] == "probe-req-1"
    assert "request_id" not in after


def test_tasks_a_request_sends_carry_its_request_id(settings, client, user, chat):
    response = submit(client, user, chat, "hello", **{"X-Request-ID": "turn-req-7"})
    assert response.status_code == 202
    turn_id = response.get_json()["id"]
    messages = [
        json.loads(path.read_text()) for path in (settings.broker_folder / "queue").glob("*.turns.msg")
    ]
    sent = [m for m in messages if m["headers"].get("argsrepr", "").find(turn_id) >= 0]
    assert len(sent) == 1
    assert sent[0]["headers"]["tollgate_request_id"] == "turn-req-7"


def test_tool_threads_log_with_the_callers_ids(db):
    from shared.logging import request_id_var, turn_id_var
    from shared.tools.base import Tool, ToolContext

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    tool_log = logging.getLogger("shared.tools.registry")
    tool_log.addHandler(handler)

    def explode(ctx):
        raise RuntimeError("boom")

    registry = build_registry()
    registry.register(
        Tool(name="explode", description="fails", parameters={"type": "object"}, handler=explode)
    )
    ctx = ToolContext(session=db, user_id="u", room_id="r", chat_session_id="s", before_seq=1)
    request_token, turn_token = request_id_var.set("tool-req"), turn_id_var.set("tool-turn")
    try:
        assert registry.call("explode", {}, ctx, timeout=5).status == "error"
    finally:
        request_id_var.reset(request_token)
        turn_id_var.reset(turn_token)
        tool_log.removeHandler(handler)
    line = json.loads(stream.getvalue().splitlines()[0])
    assert (line["request_id"], line["turn_id"]) == ("tool-req", "tool-turn")


def test_the_metrics_directory_defaults_under_var_and_follows_the_environment(tmp_path):
    from pathlib import Path

    from shared.settings import Settings

    assert Settings.from_env({"TOLLGATE_VAR_DIR": str(tmp_path)}).metrics_dir == tmp_path / "metrics"
    chosen = Settings.from_env({"TOLLGATE_VAR_DIR": str(tmp_path), "PROMETHEUS_MULTIPROC_DIR": "/run/tg"})
    assert chosen.metrics_dir == Path("/run/tg")
    assert Settings.from_env({"METRICS_TOKEN": "t"}).metrics_token == "t"
    assert Settings.from_env({}).metrics_token is None
