"""What a turn sends to the model: the context, built in one place.

Admission sizes the turn's hold from the same messages the runner will send
(``shared.services.turn_budget``), so the two cannot drift apart: system
prompt, the room's file list, the session summary, the turns still in the
window, then the new message.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from sqlalchemy import Integer, bindparam, func, literal_column, null, select, union_all
from sqlalchemy.exc import NoResultFound
from sqlalchemy.orm import Session

from shared.models import ChatSession, FileStatus, UploadedFile
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


@dataclass(frozen=True)
class ChatRow:
    """What a context reads of its chat session (``summaries.ChatContext``)."""

    id: str
    room_id: str
    summary: str | None
    summary_through_seq: int


def load(session: Session, chat: summaries.ChatContext, before_seq: int) -> TurnContext:
    """Read the context of the turn at ``before_seq`` (one statement, a second only when
    ``summaries.window_of`` needs older turns). Does not commit."""
    rows = session.execute(
        _context_read(with_chat=False),
        {"session_id": chat.id, "before_seq": before_seq, "room_id": chat.room_id},
    ).all()
    return _context(session, chat, rows)


def load_with_chat(
    session: Session, session_id: str, room_id: str, before_seq: int
) -> tuple[ChatRow, TurnContext]:
    """:func:`load` for a turn whose chat session is not read yet: the session's row comes in
    the same statement (the worker's run; the admission has the row it locked).

    :raises NoResultFound: no such chat session.
    """
    rows = session.execute(
        _context_read(with_chat=True),
        {"session_id": session_id, "before_seq": before_seq, "room_id": room_id},
    ).all()
    if not rows or rows[0].source != _CHAT:
        raise NoResultFound(f"no chat session {session_id}")
    first = rows[0]
    chat = ChatRow(first.id, first.reply, first.content, first.seq)
    return chat, _context(session, chat, rows[1:])


def _context(session: Session, chat: summaries.ChatContext, rows) -> TurnContext:
    latest = [row for row in rows if row.source == _TURN]
    files = [(row.content, row.id) for row in rows if row.source == _FILE]
    recent, missing = summaries.window_of(session, chat, latest)
    return TurnContext(
        summary=chat.summary,
        recent=recent,
        missing=missing,
        files_line=room_files_line(files) if files else None,
    )


# The parts of one context read, told apart by ``source`` and kept in their order by ``ord``.
_CHAT, _TURN, _FILE = 0, 1, 2


@cache
def _context_read(*, with_chat: bool):
    """A context's reads as one ``UNION ALL`` (read twice a turn: admission and run), built
    once: the chat session's row (``with_chat``: id, summary_through_seq as ``seq``, summary
    as ``content``, room_id as ``reply``), ``summaries.LATEST`` (newest first) and the
    room's newest ready files (filename as ``content``). Each part keeps its own index and
    limit; ``ord`` keeps each part's order through the union."""
    latest = summaries.LATEST.subquery()
    files = (
        select(
            UploadedFile.id,
            UploadedFile.filename,
            func.row_number().over(order_by=UploadedFile.created_at.desc()).label("ord"),
        )
        .where(UploadedFile.room_id == bindparam("room_id"), UploadedFile.status == FileStatus.READY)
        .order_by(UploadedFile.created_at.desc())
        .limit(ROOM_FILES_LISTED)
        .subquery()
    )
    parts = [
        select(
            literal_column(str(_TURN), Integer).label("source"),
            (-latest.c.seq).label("ord"),
            latest.c.id,
            latest.c.seq,
            latest.c.content,
            latest.c.reply,
        ),
        select(
            literal_column(str(_FILE), Integer),
            files.c.ord,
            files.c.id,
            null(),
            files.c.filename,
            null(),
        ),
    ]
    if with_chat:
        parts.insert(
            0,
            select(
                literal_column(str(_CHAT), Integer).label("source"),
                literal_column("0", Integer).label("ord"),
                ChatSession.id,
                ChatSession.summary_through_seq.label("seq"),
                ChatSession.summary.label("content"),
                ChatSession.room_id.label("reply"),
            ).where(ChatSession.id == bindparam("session_id")),
        )
    read = union_all(*parts).subquery()
    return select(read).order_by(read.c.source, read.c.ord)


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
