"""HTTP metrics hooks and ``GET /metrics`` (Prometheus text format).

``/metrics`` sits outside ``/api/v1`` and the OpenAPI spec: it is for the
scraper, not API clients. It needs no API key; set ``METRICS_TOKEN`` to require
``Authorization: Bearer <token>`` when the port is reachable from outside.
"""

from __future__ import annotations

import hmac
import time

from flask import Flask, Response, g, request

from shared import metrics
from shared.errors import Unauthorized
from web.auth import bearer_token
from web.context import runtime
from worker.celery_app import QUEUES


def init_app(app: Flask) -> None:
    # First of all before-request hooks, so the latency covers authentication too.
    app.before_request_funcs.setdefault(None, []).insert(0, _start_timer)
    app.after_request(_record_request)
    app.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _record_request(response):
    started = g.get("metrics_started")
    rule = request.url_rule
    metrics.http_request(
        rule.rule if rule is not None else None,
        request.method,
        response.status_code,
        time.perf_counter() - started if started is not None else None,
    )
    return response


def metrics_view():
    current = runtime()
    token = current.settings.metrics_token
    if token and not hmac.compare_digest((bearer_token() or "").encode(), token.encode()):
        raise Unauthorized("A valid metrics token is required (Authorization: Bearer <token>).")
    queue_depth = metrics.QueueDepthCollector(current.settings, QUEUES, lambda: current.broker_redis)
    return Response(metrics.exposition(queue_depth), mimetype=None, content_type=metrics.CONTENT_TYPE)
