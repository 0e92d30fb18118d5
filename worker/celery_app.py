"""The Celery app: queues by purpose, routing, reliability settings, beat schedule.

``create_celery_app(settings)`` builds a configured app; ``worker/main.py`` is
the process entry point that calls it for the ``celery`` command line.
"""

from __future__ import annotations

from contextvars import Token

from celery import Celery
from celery.signals import before_task_publish, task_postrun, task_prerun, worker_process_init
from kombu import Queue

from shared.logging import request_id_var, sane_request_id
from shared.runtime import Runtime
from shared.settings import Settings
from shared.task_names import TaskName
from worker import broker

QUEUES = ("turns", "summaries", "files", "webhooks")
# Message header carrying the id of the HTTP request (or task) that sent a task.
REQUEST_ID_HEADER = "tollgate_request_id"

TASK_ROUTES = {
    TaskName.RUN_TURN: {"queue": "turns"},
    TaskName.REFRESH_SUMMARY: {"queue": "summaries"},
    TaskName.INGEST_FILE: {"queue": "files"},
    TaskName.EXPIRE_HOLDS: {"queue": "turns"},
    TaskName.SYNC_ENFORCEMENT: {"queue": "turns"},
    TaskName.RECOVER_STUCK_TURNS: {"queue": "turns"},
    TaskName.RECOVER_PENDING_FILES: {"queue": "files"},
    TaskName.DELIVER_WEBHOOK: {"queue": "webhooks"},
    TaskName.DISPATCH_WEBHOOKS: {"queue": "webhooks"},
}

TASK_MODULES = [
    "worker.tasks.system",
    "worker.tasks.turns",
    "worker.tasks.billing",
    "worker.tasks.files",
    "worker.tasks.webhooks",
]


def _broker_options(settings: Settings) -> dict:
    if settings.broker_url.startswith("filesystem"):
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            # Otherwise kombu puts its control exchange in ./control, wherever the process runs.
            "control_folder": str(folder / "control"),
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "data_folder_processed": str(folder / "processed"),
            "store_processed": False,
        }
    # No ack emulation: kombu's Redis transport otherwise writes each delivered message to an
    # "unacked" hash and index (a Redis round trip) and removes it on the ack (another), so
    # that a dead worker's messages come back after the visibility timeout. Every task here
    # is recovered from the database sooner than that timeout (an hour) would: the beat jobs
    # re-send a queued or lapsed turn within about 30 s, a pending file after 2 min and a
    # pending webhook delivery within 10 s, and a lost summary refresh is folded by the
    # session's next turn. A warm shutdown still puts back what was taken and not finished.
    # docs/architecture.md, "Reliability settings (Celery)".
    return {"ack_emulation": False}


class TollgateCelery(Celery):
    def send_task(self, name, args=None, kwargs=None, **options):
        # Fire and forget unless the caller will read the result (only `ping` does):
        # a result store that is down must not slow or fail an enqueue.
        options.setdefault("ignore_result", True)
        return super().send_task(name, args, kwargs, **options)


def create_celery_app(settings: Settings | None = None, *, role: str = "worker") -> Celery:
    settings = settings or Settings.from_env()
    app = TollgateCelery("tollgate", include=TASK_MODULES)
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        broker_transport_options=_broker_options(settings),
        broker_transport=broker.TRANSPORT if settings.broker_url.startswith("redis://") else None,
        broker_connection_retry_on_startup=True,
        # Publishing happens on the request path (POST turn, upload): with the broker down,
        # fail within about a second and let the beat recovery jobs re-send, instead of
        # holding the request for Celery's default ~20 s of retries.
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        broker_connection_timeout=2,
        # Results are only read for `ping`; ignoring them elsewhere keeps a down result
        # store off the request path (the Redis backend subscribes on every send).
        task_ignore_result=True,
        # One result backend per process, not one per thread: under gevent every greenlet is a
        # thread to Celery, which otherwise built a new Redis backend (and pool) for each task
        # run and each request that enqueued one. Redis clients and Celery's gevent result
        # drainer are safe to share between greenlets.
        result_backend_thread_safe=True,
        result_backend_transport_options={
            "retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
        },
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="turns",
        task_routes=TASK_ROUTES,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # A task is acknowledged only when it finished, and a worker that dies
        # mid-task gives it back: tasks are idempotent, so redelivery is safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A lost broker connection leaves running turns running: their outcome goes to
        # Postgres, not the broker, and a redelivered copy finds them finished.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_soft_time_limit=settings.task_soft_time_limit_seconds,
        task_time_limit=settings.task_soft_time_limit_seconds + 60,
        result_expires=24 * 3600,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_track_started=False,
        enable_utc=True,
        beat_schedule={
            # Every 10 s: a dead worker's turns are re-sent within TURN_LEASE_SECONDS + 10 s.
            "recover-stuck-turns": {"task": TaskName.RECOVER_STUCK_TURNS, "schedule": 10.0},
            "recover-pending-files": {"task": TaskName.RECOVER_PENDING_FILES, "schedule": 60.0},
            "expire-holds": {"task": TaskName.EXPIRE_HOLDS, "schedule": 60.0},
            "sync-enforcement": {"task": TaskName.SYNC_ENFORCEMENT, "schedule": 60.0},
            # Pending webhook deliveries whose send was lost, and retries, within 10 s.
            "dispatch-webhooks": {"task": TaskName.DISPATCH_WEBHOOKS, "schedule": 10.0},
        },
    )
    if settings.result_backend.startswith("db+sqlite"):
        settings.var_dir.mkdir(parents=True, exist_ok=True)
    app.tollgate = Runtime(settings, role=role)  # type: ignore[attr-defined]
    app.tollgate.send_task = app.send_task  # type: ignore[attr-defined]
    return app


@worker_process_init.connect
def _reset_connections(**_kwargs) -> None:
    from celery import current_app

    runtime = getattr(current_app, "tollgate", None)
    if runtime is not None:
        runtime.reset_after_fork()


# The request id follows the work: a task sent while handling a request (or while
# running a task that request caused) carries the id in a header, and the worker
# binds it for the task's log lines (docs/observability.md).
_bound_request_ids: dict[str, Token] = {}


@before_task_publish.connect
def _forward_request_id(headers=None, **_kwargs) -> None:
    request_id = request_id_var.get()
    if request_id and headers is not None:
        headers.setdefault(REQUEST_ID_HEADER, request_id)


@task_prerun.connect
def _bind_request_id(task_id=None, task=None, **_kwargs) -> None:
    request_id = sane_request_id(getattr(task.request, REQUEST_ID_HEADER, None))
    if request_id and task_id:
        _bound_request_ids[task_id] = request_id_var.set(request_id)


@task_postrun.connect
def _unbind_request_id(task_id=None, **_kwargs) -> None:
    token = _bound_request_ids.pop(task_id, None)
    if token is not None:
        try:
            request_id_var.reset(token)
        except ValueError:  # set in another context (should not happen): clear instead
            request_id_var.set(None)
