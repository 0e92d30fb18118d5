"""Billing housekeeping on beat: expire stale holds, keep Redis's enforcement copy current."""

from celery import shared_task

from shared.services import billing, enforcement
from shared.task_names import TaskName


@shared_task(name=TaskName.EXPIRE_HOLDS, bind=True, acks_late=False)
def expire_holds(self) -> int:
    """Expire active holds past their ``expires_at`` (no failure path leaks reserved credit),
    except under turns still running on a live lease."""
    with self.app.tollgate.db.session() as session:
        return billing.expire_stale_holds(session)


@shared_task(name=TaskName.SYNC_ENFORCEMENT, bind=True, acks_late=False)
def sync_enforcement(self) -> dict:
    """Push the DB's enforcement override into Redis if Redis holds an older version."""
    return enforcement.sync_to_redis(self.app.tollgate)
