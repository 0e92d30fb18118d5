"""Readiness: can this process serve? Database, migrations, Redis, broker."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import text

from shared.errors import ServiceUnavailable
from shared.migrations import code_migration_head
from shared.runtime import Runtime
from shared.task_names import TaskName

log = logging.getLogger(__name__)

# The ping holds the caller's web thread while it waits for a worker's answer.
WORKER_PING_TIMEOUT_SECONDS = 3.0


@dataclass
class Readiness:
    version: str
    checks: dict[str, dict] = field(default_factory=dict)

    @property
    def down(self) -> list[str]:
        return [name for name, check in self.checks.items() if not check["ok"]]

    @property
    def ready(self) -> bool:
        return not self.down


def _check_database(runtime: Runtime) -> tuple[dict, dict]:
    head = code_migration_head()
    try:
        with runtime.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            try:
                revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            except Exception:  # table missing: never migrated
                conn.rollback()
                revision = None
    except Exception as exc:
        log.warning("readiness: database down: %s", exc)
        return (
            {"ok": False, "detail": type(exc).__name__},
            {"ok": False, "code_head": head, "database_revision": None, "detail": "database down"},
        )
    migrations = {"ok": revision == head, "code_head": head, "database_revision": revision}
    if revision != head:
        migrations["detail"] = "database revision differs from the code's migration head"
    return {"ok": True}, migrations


def _check_redis(runtime: Runtime) -> dict:
    if runtime.redis is None:
        return {"ok": True, "detail": "not configured (embedded mode)"}
    try:
        runtime.redis.ping()
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "detail": type(exc).__name__}


def _check_broker(celery_app) -> dict:
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=1)
        return {"ok": True, "transport": celery_app.conf.broker_url.split(":", 1)[0]}
    except Exception as exc:
        return {"ok": False, "detail": type(exc).__name__}


def _check_worker(celery_app, timeout: float) -> dict:
    try:
        reply = celery_app.send_task(TaskName.PING, ignore_result=False).get(timeout=timeout)
        return {"ok": reply == "pong"}
    except Exception as exc:
        return {"ok": False, "detail": type(exc).__name__}


def readiness(
    runtime: Runtime, celery_app, *, check_worker: bool = False, with_details: bool = False
) -> Readiness:
    """Run every check (the worker ping only when asked: it waits on a worker).

    What is down is always logged; only ``with_details`` (an admin caller) puts it in
    the error, so anonymous callers learn nothing about the deployment but "not ready".

    :raises ServiceUnavailable: ``not_ready``; with details: the version, the
        ``checks`` and the names of what is ``down``.
    """
    result = Readiness(version=runtime.settings.code_version)
    result.checks["database"], result.checks["migrations"] = _check_database(runtime)
    result.checks["redis"] = _check_redis(runtime)
    result.checks["broker"] = _check_broker(celery_app)
    if check_worker:
        result.checks["worker"] = _check_worker(celery_app, timeout=WORKER_PING_TIMEOUT_SECONDS)
    if not result.ready:
        log.warning("readiness: not ready, down: %s", ", ".join(result.down))
        if not with_details:
            raise ServiceUnavailable("Not ready.", error="not_ready")
        raise ServiceUnavailable(
            f"Not ready: {', '.join(result.down)} down.",
            error="not_ready",
            version=result.version,
            checks=result.checks,
            down=result.down,
        )
    return result
