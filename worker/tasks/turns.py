"""Thin tasks: load by id, call the turn runner."""

from contextlib import nullcontext

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from shared.db import is_database_unavailable
from shared.models import TurnStatus
from shared.services import turn_runner
from shared.task_names import TaskName

# Retries for a database outage (1, 2, 4 … 30 s apart: about 3 minutes in all); a longer
# outage leaves the turn to the recover_stuck_turns beat job.
DATABASE_RETRIES = 10


def _soft_time_limit(seconds: float | None):
    """Celery's gevent pool enforces only the hard time limit (a ``gevent.Timeout``, which no
    ``except Exception`` sees, so the turn would be left ``running``). Under gevent the soft
    limit is raised here instead, as the ``SoftTimeLimitExceeded`` the prefork pool sends."""
    try:
        from gevent import Timeout, monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return nullcontext()
    if not seconds or not monkey.is_module_patched("socket"):
        return nullcontext()
    return Timeout(seconds, SoftTimeLimitExceeded())


@shared_task(name=TaskName.RUN_TURN, bind=True, max_retries=3)
def run_turn(self, turn_id: str, takeover: bool = False, streamed: bool = False, held: bool = True) -> str:
    runtime = self.app.tollgate
    # A redelivered message means the worker that had it died (acks_late +
    # reject_on_worker_lost); its "running" status is stale.
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    try:
        with _soft_time_limit(self.soft_time_limit or self.app.conf.task_soft_time_limit):
            return turn_runner.run_turn(
                runtime,
                turn_id,
                provider=runtime.provider,
                tools=runtime.tools,
                takeover=takeover or redelivered,
                final_attempt=self.request.retries >= self.max_retries,
                after_complete=lambda turn: self.app.send_task(
                    TaskName.REFRESH_SUMMARY, args=[turn.session_id], kwargs={"model": turn.model}
                ),
                reraise=(SoftTimeLimitExceeded,),
                owner=self.request.id,
                streamed=streamed,
                held=held,
            )
    except turn_runner.RetryLater as exc:
        raise self.retry(countdown=exc.countdown, exc=exc) from exc
    except SoftTimeLimitExceeded:
        # Slow model rounds added up past the soft limit. Another run would likely do the
        # same, and a turn left "running" would wait for its lease to lapse and a takeover: end it.
        turn_runner.fail(runtime, turn_id, "turn_timeout")
        return TurnStatus.FAILED
    except Exception as exc:
        if not is_database_unavailable(exc):
            raise
        # The database went away mid-task (failover, a killed connection, a deadlock). Every
        # step is under the turn's row lock and billing is idempotent, so running the turn
        # again is safe; it may be "running" under this very attempt, hence the takeover.
        # Without this the turn would wait for recover_stuck_turns (a lease and a beat interval).
        raise self.retry(
            countdown=turn_runner.retry_countdown(1.0, self.request.retries + 1),
            kwargs={"takeover": True, "streamed": streamed, "held": held},
            max_retries=DATABASE_RETRIES,
            exc=exc,
        ) from exc


@shared_task(name=TaskName.REFRESH_SUMMARY, bind=True, max_retries=0)
def refresh_summary(self, session_id: str, model: str | None = None) -> bool:
    return turn_runner.refresh_summary(
        self.app.tollgate, session_id, provider=self.app.tollgate.provider, model=model
    )


@shared_task(name=TaskName.RECOVER_STUCK_TURNS, bind=True, acks_late=False)
def recover_stuck_turns(self) -> dict:
    return turn_runner.recover_stuck_turns(self.app.tollgate, self.app)
