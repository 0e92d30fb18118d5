"""What a turn sends to the model: the context, built in one place.

Admission sizes the turn's hold from the same messages the runner will send
(``shared.services.turn_budget``), so the two cannot drift apart: system
prompt, the room's file list, the session summary, the turns still in the
window, then the new message.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from shared.models import FileStatus, UploadedFile
from shared.prompts import room_files_line
from shared.services import summaries

SYSTEM_PROMPT = (
    "You are Tollgate's assistant. Answer concisely. Use the `search` tool to look things up in "
    "the room's files and earlier turns, and `file_read` to read a file."
)
ROOM_FILES_LISTED = 50


@dataclass(frozen=True)
class TurnContext:
    """The session as a turn at ``before_seq`` sees it."""

    summary: str | None
    recent: list[summaries.TurnText]
    # Turns that left the window and that the summary does not cover yet: a summary call is due.
    missing: list[summaries.TurnText]
    files_line: str | None

    @property
    def summary_due(self) -> bool:
        return bool(self.missing)


def load(session: Session, chat: summaries.ChatContext, before_seq: int) -> TurnContext:
    """Read the context of the turn at ``before_seq``. Does not commit."""
    recent, missing = summaries.window(session, chat, before_seq)
    return TurnContext(
        summary=chat.summary,
        recent=recent,
        missing=missing,
        files_line=_room_files_line(session, chat.room_id),
    )


# Built once (read twice a turn: admission and run).
_ROOM_FILES = (
    select(UploadedFile.filename, UploadedFile.id)
    .where(UploadedFile.room_id == bindparam("room_id"), UploadedFile.status == FileStatus.READY)
    .order_by(UploadedFile.created_at.desc())
    .limit(ROOM_FILES_LISTED)
)


def _room_files_line(session: Session, room_id: str) -> str | None:
    files = session.execute(_ROOM_FILES, {"room_id": room_id}).all()
    return room_files_line(files) if files else None


def messages(
    context: TurnContext, content: str, *, summary: str | None, search_results: str | None = None
) -> list[dict]:
    """The conversation of the turn's first model call.

    ``summary`` is the summary text in force for this call (the stored one, or the
    one just generated); ``search_results`` the heuristic search's findings for
    providers that cannot call tools.
    """
    built: list[dict] = [{"role": "system", "content": SYSTEM_PROMPT}]
    if context.files_line:
        built.append({"role": "system", "content": context.files_line})
    if summary:
        built.append({"role": "system", "content": f"Conversation summary so far:\n{summary}"})
    for earlier in context.recent:
        built.append({"role": "user", "content": earlier.content})
        built.append({"role": "assistant", "content": earlier.reply or ""})
    if search_results is not None:
        built.append({"role": "system", "content": f"Search results:\n{search_results}"})
    built.append({"role": "user", "content": content})
    return built


def history_bounds(built: list[dict], context: TurnContext) -> tuple[int, int]:
    """``(first, end)``: the slice of ``built`` (from ``messages``) holding the earlier turns,
    the part a budget may drop, oldest pair first, to fit a call into what is left of a hold.
    Later appends (tool rounds) do not move it."""
    first = 0
    while first < len(built) and built[first]["role"] == "system":
        first += 1
    return first, first + 2 * len(context.recent)
