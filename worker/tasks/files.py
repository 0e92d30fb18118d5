"""Thin file tasks: load by id, call the files service."""

from celery import shared_task
from sqlalchemy.exc import OperationalError

from shared.services import files
from shared.task_names import TaskName


@shared_task(
    name=TaskName.INGEST_FILE,
    bind=True,
    max_retries=5,
    # The service stops at its own limit (EXTRACTION_TIME_LIMIT_SECONDS, default 30 s),
    # checked between a PDF's operators. These catch one operation that never returns:
    # the soft limit fails the file with `extraction_timeout`; the hard one kills the
    # process (redelivered; the hourly give-up ends a file that always does that).
    soft_time_limit=120,
    time_limit=150,
)
def ingest_file(self, file_id: str) -> str | None:
    """Extract a file's text; a ready or failed file is left alone. Returns the file's status."""
    settings = self.app.tollgate.settings
    try:
        with self.app.tollgate.db.session() as session:
            return files.ingest(
                session,
                file_id,
                max_chars=settings.max_extracted_chars,
                time_limit_seconds=settings.extraction_time_limit_seconds,
            )
    except OperationalError as exc:  # the database went away: try again later
        raise self.retry(countdown=2 ** (self.request.retries + 1), exc=exc) from exc


@shared_task(name=TaskName.RECOVER_PENDING_FILES, bind=True, acks_late=False)
def recover_pending_files(self) -> dict:
    with self.app.tollgate.db.session() as session:
        return files.recover_pending_files(session, self.app)
