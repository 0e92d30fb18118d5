"""Prometheus metrics: every series Tollgate exports, defined in this one module.

Names, labels and meanings are listed in ``docs/observability.md``. Code records
through the small functions below (``http_request``, ``turn_finished``, …); the
metric objects are built on first use, never at import.

**Multiprocess mode.** gunicorn runs several web processes and Celery forks
worker children, so each process writes its samples to its own memory-mapped
file in one directory (prometheus-client's multiprocess mode) and the web's
``/metrics`` adds up every file there: web workers *and* Celery workers on the
same host. The entry points (``web/wsgi.py``, ``worker/main.py``) call
``configure(settings)`` before the first sample; a process that never calls it
(tests, a shell) keeps its samples in memory and ``/metrics`` shows those.

**Queue depth** is not a sample but read at scrape time (``QueueDepthCollector``):
``LLEN`` of each Celery queue on a Redis broker, a count of message files on
the embedded filesystem broker.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from shared.settings import Settings

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
UNMATCHED_ROUTE = "unmatched"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The turn request waits up to TURN_WAIT_SECONDS (30 s by default) for the reply.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
TURN_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TOOL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# kombu's Redis transport keeps a queue's messages of priority p > 0 under "<queue>\x06\x16<p>".
KOMBU_PRIORITY_SEPARATOR = "\x06\x16"
KOMBU_PRIORITY_STEPS = (3, 6, 9)


@dataclass
class _Metrics:
    registry: CollectorRegistry
    http_requests: Counter
    http_duration: Histogram
    turns: Counter
    turn_duration: Histogram
    tool_calls: Counter
    tool_duration: Histogram
    enforcement_refusals: Counter
    summary_fallbacks: Counter
    uncovered_charges: Counter
    first_token: Histogram
    streams: Counter
    cancels: Counter
    resumes: Counter


def _build() -> _Metrics:
    registry = CollectorRegistry(auto_describe=True)
    return _Metrics(
        registry=registry,
        http_requests=Counter(
            "tollgate_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        ),
        http_duration=Histogram(
            "tollgate_http_request_duration_seconds",
            "Time from the first request hook to the response, by route template, method and status.",
            ["route", "method", "status"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        ),
        turns=Counter(
            "tollgate_turns",
            "Turns that reached a terminal state, by outcome (completed, failed, refused).",
            ["outcome"],
            registry=registry,
        ),
        turn_duration=Histogram(
            "tollgate_turn_duration_seconds",
            "Time from the turn's creation (queued) to its terminal state, retries and queueing included.",
            ["outcome"],
            buckets=TURN_BUCKETS,
            registry=registry,
        ),
        tool_calls=Counter(
            "tollgate_tool_calls",
            "Tool calls made for the model, by tool and result status (ok, error, timeout).",
            ["tool", "status"],
            registry=registry,
        ),
        tool_duration=Histogram(
            "tollgate_tool_call_duration_seconds",
            "Time a tool call took, validation included, by tool.",
            ["tool"],
            buckets=TOOL_BUCKETS,
            registry=registry,
        ),
        enforcement_refusals=Counter(
            "tollgate_enforcement_refusals",
            "Work refused for insufficient credit while enforcement was on, by stage "
            "(submit: POST turn answered 402; worker: the run-time re-check failed the turn; "
            "summary: a background summary was not billed nor stored).",
            ["stage"],
            registry=registry,
        ),
        summary_fallbacks=Counter(
            "tollgate_summary_fallbacks",
            "Turns whose summary came from the extractive fallback because the model call failed, by reason.",
            ["reason"],
            registry=registry,
        ),
        uncovered_charges=Counter(
            "tollgate_uncovered_charge_micros",
            "Cost of enforced work that was not charged because neither its hold nor the available "
            "credit covered it (a provider counting more tokens than estimated; a hold that expired "
            "under a dead worker), in micro-units of credit. Should stay at zero; see docs/billing.md.",
            registry=registry,
        ),
        first_token=Histogram(
            "tollgate_turn_first_token_seconds",
            "Time from a turn's creation to the first piece of its answer reaching its stream.",
            buckets=TURN_BUCKETS,
            registry=registry,
        ),
        streams=Counter(
            "tollgate_streamed_turns",
            "Event streams opened by clients, by API (turns: POST turns with stream or "
            "GET /turns/{id}/events; openai: /v1/chat/completions with stream).",
            ["api"],
            registry=registry,
        ),
        cancels=Counter(
            "tollgate_turn_cancels",
            "POST /turns/{id}/cancel requests that cancelled a turn, by the turn's state then "
            "(queued: ended at once; running: its worker stopped it).",
            ["state"],
            registry=registry,
        ),
        resumes=Counter(
            "tollgate_turn_stream_resumes",
            "Event streams re-attached with Last-Event-ID.",
            registry=registry,
        ),
    )


_lock = threading.Lock()
_metrics: _Metrics | None = None


def _get() -> _Metrics:
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _build()
    return _metrics


# -- process set-up ------------------------------------------------------------------------


def configure(settings: Settings) -> Path:
    """Put this process (and the processes it forks) in multiprocess mode on ``settings.metrics_dir``.

    Called by the process entry points before the first sample. The directory is
    created but never wiped here: web and worker start independently and would
    delete each other's live files. Returns the directory.
    """
    directory = settings.metrics_dir
    directory.mkdir(parents=True, exist_ok=True)
    # prometheus-client reads the directory from the environment when it opens a
    # process's file (also after a fork), so the variable is the interface.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    if not getattr(values.ValueClass, "_multiprocess", False):
        if _metrics is not None:
            raise RuntimeError("metrics.configure() must run before the first metric is recorded")
        # The value class is chosen when prometheus_client is imported; this
        # process may have imported it before its settings were known.
        values.ValueClass = values.MultiProcessValue()
    return directory


def multiprocess_dir() -> Path | None:
    """The directory this process writes its samples to, or ``None`` (in-memory samples)."""
    if not getattr(values.ValueClass, "_multiprocess", False):
        return None
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(directory) if directory else None


# -- recording -----------------------------------------------------------------------------


def http_request(route: str | None, method: str, status: int, seconds: float | None) -> None:
    """One answered request. ``route`` is the URL rule template (``None`` when nothing matched)."""
    m = _get()
    labels = (route or UNMATCHED_ROUTE, method if method in HTTP_METHODS else "other", str(status))
    m.http_requests.labels(*labels).inc()
    if seconds is not None:
        m.http_duration.labels(*labels).observe(max(seconds, 0.0))


def turn_finished(outcome: str, seconds: float | None) -> None:
    m = _get()
    m.turns.labels(outcome).inc()
    if seconds is not None:
        m.turn_duration.labels(outcome).observe(max(seconds, 0.0))


def first_token(seconds: float) -> None:
    _get().first_token.observe(max(seconds, 0.0))


def stream_opened(api: str) -> None:
    _get().streams.labels(api).inc()


def turn_cancelled(state: str) -> None:
    _get().cancels.labels(state).inc()


def stream_resumed() -> None:
    _get().resumes.inc()


def tool_called(tool: str, status: str, seconds: float) -> None:
    m = _get()
    m.tool_calls.labels(tool, status).inc()
    m.tool_duration.labels(tool).observe(max(seconds, 0.0))


def hold_overrun(amount: Decimal) -> None:
    """Enforced work cost ``amount`` more than its hold or the available credit covered."""
    _get().uncovered_charges.inc(int(amount * 1_000_000))


def enforcement_refused(stage: str) -> None:
    _get().enforcement_refusals.labels(stage).inc()


def summary_fell_back(reason: str) -> None:
    _get().summary_fallbacks.labels(reason).inc()


# -- exposition ----------------------------------------------------------------------------


class QueueDepthCollector:
    """``tollgate_queue_depth{queue}`` and ``tollgate_broker_up``, read at scrape time.

    Redis broker: ``LLEN`` of each queue's lists (all kombu priority levels); messages a
    worker has reserved but not finished are not counted. Filesystem broker: the message
    files waiting in the queue folder. Any other broker: nothing. When the broker
    cannot be read, ``tollgate_broker_up`` is 0 and no depth is reported (a made-up
    value would look like an empty queue).
    """

    def __init__(self, settings: Settings, queues: Iterable[str], redis_client: Callable[[], object]):
        self.settings = settings
        self.queues = tuple(queues)
        self.redis_client = redis_client

    def collect(self):
        transport = self.settings.broker_url.split(":", 1)[0]
        if transport in {"redis", "rediss"}:
            depths = self._redis_depths()
        elif transport == "filesystem":
            depths = self._filesystem_depths()
        else:
            return
        up = GaugeMetricFamily("tollgate_broker_up", "1 if /metrics could read the Celery broker, else 0.")
        up.add_metric([], 1 if depths is not None else 0)
        yield up
        if depths is None:
            return
        depth = GaugeMetricFamily(
            "tollgate_queue_depth", "Messages waiting in each Celery queue at scrape time.", labels=["queue"]
        )
        for queue, count in depths.items():
            depth.add_metric([queue], count)
        yield depth

    def _redis_depths(self) -> dict[str, int] | None:
        try:
            pipe = self.redis_client().pipeline(transaction=False)
            for queue in self.queues:
                pipe.llen(queue)
                for step in KOMBU_PRIORITY_STEPS:
                    pipe.llen(f"{queue}{KOMBU_PRIORITY_SEPARATOR}{step}")
            lengths = pipe.execute()
        except Exception as exc:  # a scrape must never fail because the broker is away
            log.warning("metrics: broker unreadable (%s)", type(exc).__name__)
            return None
        per_queue = 1 + len(KOMBU_PRIORITY_STEPS)
        return {
            queue: sum(lengths[i * per_queue : (i + 1) * per_queue]) for i, queue in enumerate(self.queues)
        }

    def _filesystem_depths(self) -> dict[str, int] | None:
        # kombu names a waiting message "<ms>_<uuid>.<queue>.msg".
        try:
            names = os.listdir(self.settings.broker_folder / "queue")
        except OSError:
            return None
        return {queue: sum(1 for name in names if name.endswith(f".{queue}.msg")) for queue in self.queues}


class _Sources:
    def __init__(self, *sources) -> None:
        self.sources = sources

    def collect(self):
        for source in self.sources:
            yield from source.collect()


def exposition(queue_depth: QueueDepthCollector | None = None) -> bytes:
    """The Prometheus text page: every process's samples (or this process's) plus queue depth."""
    directory = multiprocess_dir()
    samples = MultiProcessCollector(None, path=str(directory)) if directory else _get().registry
    sources = [samples] if queue_depth is None else [samples, queue_depth]
    return generate_latest(_Sources(*sources))
