from celery import shared_task

from shared.task_names import TaskName


@shared_task(name=TaskName.PING, acks_late=False, ignore_result=False)
def ping() -> str:
    """Round-trip check used by readiness probes and tests."""
    return "pong"
