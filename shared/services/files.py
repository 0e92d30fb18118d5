"""Uploads: accept, store (bytes in the database), list, download, delete; text extraction.

Uploads are owner-only: another user's room or file is reported as not found.
The declared ``Content-Type`` of an upload is not trusted: the type comes from
the filename's extension and is verified against the bytes (a ``.pdf`` must be
a PDF, text types must be UTF-8), then stored as our canonical type.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
import unicodedata
from datetime import timedelta
from enum import StrEnum
from typing import Protocol

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.orm import Session, undefer

from shared.db import is_uuid, utcnow
from shared.errors import FileTooLarge, InvalidInput, NotFound, UnsupportedMediaType
from shared.models import FileStatus, UploadedFile
from shared.pagination import Listing
from shared.services.rooms import owned_room
from shared.task_names import TaskName

log = logging.getLogger(__name__)

# Extension -> the content type stored and served back.
CONTENT_TYPES = {
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".json": "application/json",
    ".pdf": "application/pdf",
}
MAX_FILENAME_CHARS = 255
# Longer "extensions" are not kept whole when a long name is truncated.
MAX_KEPT_EXTENSION_CHARS = 16
# Readers accept the PDF header anywhere in the first KiB (ISO 32000 implementation note).
PDF_HEADER_WINDOW = 1024
MAX_ERROR_CHARS = 500
# Pending files: re-sent after this long (the enqueue after the commit may have been lost) ...
INGEST_RESEND_AFTER = timedelta(minutes=2)
# ... and given up on after this long (a file that kills its worker must not loop forever).
INGEST_GIVE_UP_AFTER = timedelta(hours=1)
# Extracted text is stored and searched, and a small upload can expand enormously: a 13 KB
# PDF whose 8 pages share one 5 MB content stream gave 38.9 M characters in 13.5 s.
# Past this many characters extraction stops and the file fails (MAX_EXTRACTED_CHARS).
MAX_EXTRACTED_CHARS = 2_000_000
# Per file, checked between pages and between a page's operators
# (EXTRACTION_TIME_LIMIT_SECONDS). One operation that never returns (a huge content
# stream being parsed) is left to the files task's Celery soft time limit.
EXTRACTION_TIME_LIMIT_SECONDS = 30.0

_PATH_SEPARATORS = re.compile(r"[/\\]")
_RESERVED_CHARS = re.compile(r'[<>:"|?*]')
_DROPPED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


class ExtractionFailure(StrEnum):
    """Why a file ended ``failed``: the stable code that starts its ``error``."""

    UNSUPPORTED_TYPE = "unsupported_type"
    NOT_UTF8 = "not_utf8"
    PDF_ENCRYPTED = "pdf_encrypted"
    PDF_UNREADABLE = "pdf_unreadable"
    NO_TEXT = "no_text"
    TOO_LARGE = "too_large_when_extracted"
    TIMEOUT = "extraction_timeout"
    ABANDONED = "extraction_abandoned"


class ExtractionError(Exception):
    """The file's text could not be extracted. ``str()`` is what the file's ``error``
    stores: ``"<code>: <reason>"``, a stable code then a reason for people."""

    def __init__(self, code: ExtractionFailure, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class _ExtractionStopped(BaseException):
    """Raised from inside pypdf's callbacks to stop an extraction. A ``BaseException``
    because pypdf catches ``Exception`` around parts of a page (form XObjects, among
    others) and would carry on past the limit."""

    def __init__(self, failure: ExtractionError) -> None:
        super().__init__(str(failure))
        self.failure = failure


class _Budget:
    """The characters and the time one file's extraction may still use."""

    def __init__(self, max_chars: int, time_limit_seconds: float) -> None:
        self.max_chars = max_chars
        self.time_limit_seconds = time_limit_seconds
        self.deadline = time.monotonic() + time_limit_seconds
        self.used_chars = 0

    def spend(self, chars: int) -> None:
        """:raises _ExtractionStopped: past ``max_chars``."""
        self.used_chars += chars
        if self.used_chars > self.max_chars:
            raise _ExtractionStopped(too_large(self.max_chars))

    def check_time(self) -> None:
        """:raises _ExtractionStopped: past the deadline."""
        if time.monotonic() >= self.deadline:
            raise _ExtractionStopped(timed_out(self.time_limit_seconds))


def too_large(max_chars: int) -> ExtractionError:
    return ExtractionError(
        ExtractionFailure.TOO_LARGE, f"the extracted text is longer than {max_chars:,} characters"
    )


def timed_out(time_limit_seconds: float | None = None) -> ExtractionError:
    limit = f" ({time_limit_seconds:g} s)" if time_limit_seconds is not None else ""
    return ExtractionError(ExtractionFailure.TIMEOUT, f"text extraction took longer than allowed{limit}")


class IncomingFile(Protocol):
    """What an upload looks like to the service (werkzeug's ``FileStorage`` is one)."""

    filename: str | None

    def read(self, size: int = -1, /) -> bytes: ...


def sanitize_filename(raw: str | None) -> str:
    """A safe display/download name: the basename, without control or format characters
    (e.g. the right-to-left override used to disguise extensions), without characters
    that are reserved on common filesystems, at most 255 characters with the extension kept.

    :raises InvalidInput: ``invalid_filename`` when nothing usable is left.
    """
    name = unicodedata.normalize("NFC", raw or "")
    name = _PATH_SEPARATORS.split(name)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch) not in _DROPPED_CATEGORIES)
    name = _RESERVED_CHARS.sub("_", name)
    name = " ".join(name.split()).strip(" .")
    if len(name) > MAX_FILENAME_CHARS:
        stem, extension = os.path.splitext(name)
        if len(extension) > MAX_KEPT_EXTENSION_CHARS:
            stem, extension = name, ""
        name = stem[: MAX_FILENAME_CHARS - len(extension)].rstrip(" .") + extension
    if not name:
        raise InvalidInput(
            "The filename is empty once path parts and control characters are removed.",
            error="invalid_filename",
        )
    return name


def _sniff(extension: str, data: bytes) -> None:
    """:raises UnsupportedMediaType: the bytes are not what the extension says."""
    if extension == ".pdf":
        if b"%PDF-" not in data[:PDF_HEADER_WINDOW]:
            raise UnsupportedMediaType("The file is named .pdf but is not a PDF.")
        return
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsupportedMediaType(
            f"{extension} files must be UTF-8 text; this one is not (byte {exc.start})."
        ) from exc
    if "\x00" in decoded:
        raise UnsupportedMediaType(f"{extension} files must be text; this one holds binary data.")


def upload(
    session: Session, user_id: str, room_id: str, incoming: IncomingFile | None, *, max_bytes: int
) -> UploadedFile:
    """Store an upload as a ``pending`` file of the room.

    :raises NotFound: unknown or another user's room.
    :raises InvalidInput: ``file_required``, ``empty_file``, ``invalid_filename``.
    :raises FileTooLarge: more than ``max_bytes``.
    :raises UnsupportedMediaType: extension not allowed, or bytes that do not match it.
    """
    room = owned_room(session, user_id, room_id)
    if incoming is None:
        raise InvalidInput("Send the file as the multipart form field `file`.", error="file_required")
    data = incoming.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(max_bytes=max_bytes)
    if not data:
        raise InvalidInput("The file is empty.", error="empty_file")
    filename = sanitize_filename(incoming.filename)
    extension = os.path.splitext(filename)[1].lower()
    if extension not in CONTENT_TYPES:
        raise UnsupportedMediaType(allowed=sorted(CONTENT_TYPES))
    _sniff(extension, data)
    stored = UploadedFile(
        room_id=room.id,
        user_id=user_id,
        filename=filename,
        content_type=CONTENT_TYPES[extension],
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        data=data,
        status=FileStatus.PENDING,
    )
    session.add(stored)
    session.commit()
    return stored


def enqueue_ingest(celery_app, file_id: str) -> bool:
    """Send ``ingest_file``; a broker outage is logged, not raised (the beat job re-sends)."""
    try:
        celery_app.send_task(TaskName.INGEST_FILE, args=[file_id])
        return True
    except Exception:
        log.warning(
            "could not enqueue ingest_file for %s; recover_pending_files will", file_id, exc_info=True
        )
        return False


def upload_and_enqueue(
    session: Session,
    user_id: str,
    room_id: str,
    incoming: IncomingFile | None,
    *,
    max_bytes: int,
    celery_app,
) -> UploadedFile:
    """``upload``, then (after its commit) enqueue the text extraction."""
    stored = upload(session, user_id, room_id, incoming, max_bytes=max_bytes)
    enqueue_ingest(celery_app, stored.id)
    return stored


def list_files(session: Session, user_id: str, room_id: str) -> Listing:
    """A room's files, newest first. :raises NotFound: unknown or another user's room."""
    room = owned_room(session, user_id, room_id)
    return Listing(
        session,
        select(UploadedFile)
        .where(UploadedFile.room_id == room.id)
        .order_by(UploadedFile.created_at.desc(), UploadedFile.id),
    )


def owned_file(session: Session, user_id: str, file_id: str, *, with_data: bool = False) -> UploadedFile:
    """:raises NotFound: unknown, malformed, or another user's file."""
    if not is_uuid(file_id):
        raise NotFound("No such file.")
    statement = select(UploadedFile).where(UploadedFile.id == file_id, UploadedFile.user_id == user_id)
    if with_data:
        statement = statement.options(undefer(UploadedFile.data))
    stored = session.scalar(statement)
    if stored is None:
        raise NotFound("No such file.")
    return stored


def file_content(session: Session, user_id: str, file_id: str) -> UploadedFile:
    """The file with its original bytes loaded. :raises NotFound:"""
    return owned_file(session, user_id, file_id, with_data=True)


def delete_file(session: Session, user_id: str, file_id: str) -> None:
    """Delete the file and its extracted text; tools stop seeing it at once.

    :raises NotFound: unknown, already deleted, or another user's file.
    """
    stored = owned_file(session, user_id, file_id)
    session.delete(stored)
    session.commit()


# -- extraction ---------------------------------------------------------------------------


def _kind(content_type: str) -> str:
    main = content_type.split(";", 1)[0].strip().lower()
    if main == "application/pdf":
        return "pdf"
    if main == "application/json":
        return "json"
    if main in {"text/plain", "text/markdown", "text/csv"}:
        return "text"
    raise ExtractionError(ExtractionFailure.UNSUPPORTED_TYPE, f"no text extractor for {main}")


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ExtractionError(ExtractionFailure.NOT_UTF8, "the file is not valid UTF-8 text") from exc


def _pdf_text(data: bytes, budget: _Budget) -> str:
    from pypdf import PdfReader

    # pypdf calls these for every operator and every piece of text it finds, so a page
    # is stopped part-way, as soon as the text passes the budget or time runs out.
    def before_operator(*_args) -> None:
        budget.check_time()

    def on_text(text, *_args) -> None:
        budget.spend(len(text))

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ExtractionError(ExtractionFailure.PDF_ENCRYPTED, "the PDF is encrypted with a password")
        pages = []
        for page in reader.pages:
            budget.check_time()
            page_text = page.extract_text(visitor_operand_before=before_operator, visitor_text=on_text)
            pages.append((page_text or "").strip())
    except (ExtractionError, SoftTimeLimitExceeded):
        raise
    except Exception as exc:  # pypdf raises many types on malformed input
        raise ExtractionError(
            ExtractionFailure.PDF_UNREADABLE, f"could not read the PDF ({type(exc).__name__}: {exc})"
        ) from exc
    text = "\n\n".join(page for page in pages if page)
    if not text.strip():
        raise ExtractionError(
            ExtractionFailure.NO_TEXT, "the PDF has no extractable text (scanned pages are not OCR'd)"
        )
    return text


def extract_text(
    content_type: str,
    data: bytes,
    *,
    max_chars: int = MAX_EXTRACTED_CHARS,
    time_limit_seconds: float = EXTRACTION_TIME_LIMIT_SECONDS,
) -> str:
    """The searchable text of a file, at most ``max_chars`` characters.

    txt/md/csv: the UTF-8 text as is; json: pretty-printed (2-space indent) when it
    parses, else the raw text; pdf: each page's text, pages separated by a blank line.

    :raises ExtractionError: with the code and reason to store on the file;
        ``too_large_when_extracted`` past ``max_chars`` (a PDF stops there, part-way
        through a page), ``extraction_timeout`` past ``time_limit_seconds``.
    """
    budget = _Budget(max_chars, time_limit_seconds)
    try:
        kind = _kind(content_type)
        if kind == "pdf":
            text = _pdf_text(data, budget)
        else:
            text = _decode(data)
            if kind == "json":
                try:
                    text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
                except (ValueError, RecursionError):
                    pass  # not valid JSON: still text worth searching
    except _ExtractionStopped as stopped:
        raise stopped.failure from None
    # Postgres text cannot hold NUL characters.
    text = text.replace("\x00", "")
    # pypdf's callbacks see most of a PDF's text, not its line breaks; the text stored is what counts.
    if len(text) > max_chars:
        raise too_large(max_chars)
    return text


def ingest(
    session: Session,
    file_id: str,
    *,
    max_chars: int = MAX_EXTRACTED_CHARS,
    time_limit_seconds: float = EXTRACTION_TIME_LIMIT_SECONDS,
) -> str | None:
    """Extract a pending file's text: ``pending -> ready`` or ``failed`` with the reason
    (``"<code>: <reason>"``, see :class:`ExtractionFailure`).

    The stored text is at most ``max_chars`` characters: past that the file fails with
    ``too_large_when_extracted`` and no text. Past ``time_limit_seconds``, or when the
    worker's soft time limit interrupts it, the file fails with ``extraction_timeout``.

    Idempotent: a file that is already ready or failed is left alone and its status
    returned; two concurrent runs extract twice but only the first write lands.
    Returns ``None`` for an unknown (e.g. deleted) file. No transaction is held
    while extracting. Database errors propagate (the task retries).
    """
    stored = (
        session.scalar(
            select(UploadedFile).where(UploadedFile.id == file_id).options(undefer(UploadedFile.data))
        )
        if is_uuid(file_id)
        else None
    )
    if stored is None or stored.status != FileStatus.PENDING:
        session.rollback()
        return None if stored is None else stored.status
    content_type, data = stored.content_type, stored.data
    session.rollback()  # end the read before the (possibly slow) extraction

    try:
        text = extract_text(content_type, data, max_chars=max_chars, time_limit_seconds=time_limit_seconds)
        values = {"status": FileStatus.READY, "text": text, "error": None, "ready_at": utcnow()}
    except (ExtractionError, SoftTimeLimitExceeded) as exc:
        failure = exc if isinstance(exc, ExtractionError) else timed_out()
        log.info("file %s failed extraction: %s", file_id, failure)
        values = {"status": FileStatus.FAILED, "text": None, "error": str(failure)[:MAX_ERROR_CHARS]}

    result = session.execute(
        update(UploadedFile)
        .where(UploadedFile.id == file_id, UploadedFile.status == FileStatus.PENDING)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if result.rowcount:
        return values["status"]
    # Deleted meanwhile, or another run finished first.
    return session.scalar(select(UploadedFile.status).where(UploadedFile.id == file_id))


def recover_pending_files(session: Session, celery_app) -> dict[str, int]:
    """Beat job: re-send ``ingest_file`` for files pending longer than ``INGEST_RESEND_AFTER``
    (their enqueue was lost) and fail those pending longer than ``INGEST_GIVE_UP_AFTER``."""
    now = utcnow()
    gave_up = session.execute(
        update(UploadedFile)
        .where(
            UploadedFile.status == FileStatus.PENDING, UploadedFile.created_at < now - INGEST_GIVE_UP_AFTER
        )
        .values(
            status=FileStatus.FAILED,
            error=f"{ExtractionFailure.ABANDONED}: text extraction did not complete in time",
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    stale = list(
        session.scalars(
            select(UploadedFile.id)
            .where(
                UploadedFile.status == FileStatus.PENDING, UploadedFile.created_at < now - INGEST_RESEND_AFTER
            )
            .order_by(UploadedFile.created_at)
            .limit(500)
        )
    )
    session.rollback()
    resent = sum(enqueue_ingest(celery_app, file_id) for file_id in stale)
    return {"resent": resent, "failed": gave_up}
