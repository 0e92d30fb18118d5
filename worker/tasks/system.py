from celery import shared_task


@shared_task(name="tollgate.ping", acks_late=False, ignore_result=False)
def ping() -> str:
    """Round-trip check used by readiness probes and tests."""
    return "pong"
