"""``file_read(file_id | filename, offset, max_chars)``: a slice of a ready file's extracted text.

Only files of the context's room and user are visible; anything else, including
a file of another room or user, is "file not found" (never "forbidden", which
would confirm it exists). Offsets count characters of the extracted text.
"""

from __future__ import annotations

from sqlalchemy import func, select

from shared.db import is_uuid
from shared.models import FileStatus, ToolCallStatus, UploadedFile
from shared.tools.base import Tool, ToolContext, ToolError, ToolResult

DEFAULT_MAX_CHARS = 2000
MAX_CHARS_CAP = 20_000
MAX_OFFSET = 1_000_000_000  # far beyond any upload; keeps SQL substr() within int4
NOT_FOUND = "file not found"


def _find(ctx: ToolContext, file_id: str | None, filename: str | None) -> UploadedFile:
    in_scope = (UploadedFile.room_id == ctx.room_id, UploadedFile.user_id == ctx.user_id)
    if file_id is not None:
        wanted = file_id.strip().lower()
        found = (
            ctx.session.scalar(select(UploadedFile).where(UploadedFile.id == wanted, *in_scope))
            if is_uuid(wanted)
            else None
        )
    else:
        name = (filename or "").strip()
        candidates = list(
            ctx.session.scalars(
                select(UploadedFile).where(func.lower(UploadedFile.filename) == name.lower(), *in_scope)
            )
        )
        # The exact spelling first, then a ready file, then the newest.
        candidates.sort(
            key=lambda f: (f.filename == name, f.status == FileStatus.READY, f.created_at, f.id), reverse=True
        )
        found = candidates[0] if candidates else None
    if found is None:
        raise ToolError(NOT_FOUND)
    return found


def file_read(
    ctx: ToolContext,
    file_id: str | None = None,
    filename: str | None = None,
    offset: int = 0,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> ToolResult:
    """``max_chars`` characters of the file's text from ``offset``, with the total length and the
    offset to continue from (``next_offset`` is None at the end). ``file_id`` wins over ``filename``."""
    if file_id is None and filename is None:
        raise ToolError("give file_id or filename")
    stored = _find(ctx, file_id, filename)
    if stored.status == FileStatus.PENDING:
        raise ToolError(f'file "{stored.filename}" is not ready yet: its text is still being extracted')
    if stored.status != FileStatus.READY:
        raise ToolError(f'file "{stored.filename}" could not be read: {stored.error or "extraction failed"}')
    max_chars = min(max_chars, MAX_CHARS_CAP)
    # Slice in the database: a 10 MiB text is not loaded to return 2,000 characters of it.
    total, chunk = ctx.session.execute(
        select(
            func.length(func.coalesce(UploadedFile.text, "")),
            func.substr(func.coalesce(UploadedFile.text, ""), offset + 1, max_chars),
        ).where(UploadedFile.id == stored.id)
    ).one()
    total = int(total or 0)
    chunk = chunk or ""
    if offset > total:
        raise ToolError(f"offset {offset} is past the end of the file ({total} characters)")
    end = offset + len(chunk)
    next_offset = end if end < total else None
    position = f"next_offset={next_offset}" if next_offset is not None else "end of file"
    header = (
        f'file "{stored.filename}" (file_id={stored.id}), characters {offset}-{end} of {total} ({position}):'
    )
    return ToolResult(
        ToolCallStatus.OK,
        f"{header}\n{chunk}",
        {
            "file_id": stored.id,
            "filename": stored.filename,
            "offset": offset,
            "returned_chars": len(chunk),
            "total_chars": total,
            "next_offset": next_offset,
            "text": chunk,
        },
    )


FILE_READ_TOOL = Tool(
    name="file_read",
    description=(
        "Read the extracted text of a file uploaded to this room, a slice at a time. Give file_id "
        "(preferred) or filename. The result says the total length and the next_offset to continue from."
    ),
    parameters={
        "type": "object",
        "properties": {
            "file_id": {"type": "string", "maxLength": 64, "description": "The file's id."},
            "filename": {
                "type": "string",
                "minLength": 1,
                "maxLength": 255,
                "description": "The file's name, when its id is not known.",
            },
            "offset": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_OFFSET,
                "default": 0,
                "description": "Character offset to start from (a previous result's next_offset).",
            },
            "max_chars": {
                "type": "integer",
                "minimum": 1,
                "default": DEFAULT_MAX_CHARS,
                "description": f"How many characters to return (at most {MAX_CHARS_CAP}; more is treated as "
                f"{MAX_CHARS_CAP}).",
            },
        },
        "additionalProperties": False,
    },
    handler=file_read,
)
