"""Thin file tasks: load by id, call the files service."""

from celery import shared_task
from sqlalchemy.exc import OperationalError

from shared.services import files


@shared_task(
    name="tollgate.ingest_file",
    bind=True,
    max_retries=5,
    # Below the app-wide limits: a PDF that takes minutes is failed, not left to block the queue.
    soft_time_limit=120,
    time_limit=150,
)
def ingest_file(self, file_id: str) -> str | None:
    """Extract a file's text; a ready or failed file is left alone. Returns the file's status."""
    try:
        with self.app.tollgate.db.session() as session:
            return files.ingest(session, file_id)
    except OperationalError as exc:  # the database went away: try again later
        raise self.retry(countdown=2 ** (self.request.retries + 1), exc=exc) from exc


@shared_task(name="tollgate.recover_pending_files", bind=True, acks_late=False)
def recover_pending_files(self) -> dict:
    with self.app.tollgate.db.session() as session:
        return files.recover_pending_files(session, self.app)
