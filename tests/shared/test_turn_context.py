"""A turn's context is read in one statement (shared/services/turn_context.py): the chat
session's row (for the worker), the window's newest turns and the room's newest ready files,
as a ``UNION ALL``. It must read exactly what the separate reads did. SQLite here; the same
checks run on Postgres in tests/integration/test_turn_context_pg.py."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.exc import NoResultFound

from shared.db import new_id, utcnow
from shared.models import ChatSession, FileStatus, Room, Turn, UploadedFile
from shared.prompts import room_files_line
from shared.services import summaries, turn_context
from tests.factories import make_completed_turn


def add_file(db, room, name: str, status: str, age_seconds: int) -> UploadedFile:
    uploaded = UploadedFile(
        room_id=room.id,
        user_id=room.user_id,
        filename=name,
        content_type="text/plain",
        size_bytes=1,
        sha256="0" * 64,
        data=b"x",
        status=status,
        created_at=utcnow() - timedelta(seconds=age_seconds),
    )
    db.add(uploaded)
    return uploaded


def separate_reads(db, chat, before_seq: int):
    """The context as it was read before: the window, then the room's files."""
    recent, missing = summaries.window(db, chat, before_seq)
    files = db.execute(
        select(UploadedFile.filename, UploadedFile.id)
        .where(UploadedFile.room_id == chat.room_id, UploadedFile.status == FileStatus.READY)
        .order_by(UploadedFile.created_at.desc())
        .limit(turn_context.ROOM_FILES_LISTED)
    ).all()
    return recent, missing, room_files_line(files) if files else None


def as_read(context: turn_context.TurnContext):
    def texts(turns):
        return [(t.id, t.seq, t.content, t.reply) for t in turns]

    return texts(context.recent), texts(context.missing), context.files_line


def check_context_reads(db, user_id: str) -> None:
    room = Room(user_id=user_id, name="context")
    other_room = Room(user_id=user_id, name="elsewhere")
    db.add_all([room, other_room])
    db.flush()
    chat = ChatSession(room_id=room.id, user_id=user_id, summary="Earlier talk.", summary_through_seq=2)
    other_chat = ChatSession(room_id=room.id, user_id=user_id)
    empty_chat = ChatSession(room_id=other_room.id, user_id=user_id)
    db.add_all([chat, other_chat, empty_chat])
    db.flush()
    last = summaries.WINDOW_TURNS + summaries.FOLD_IN_TURN_TURNS + 3
    for seq in range(1, last + 1):
        make_completed_turn(db, chat, seq, f"Question {seq}?", None if seq == 5 else f"Answer {seq}.")
    make_completed_turn(db, other_chat, 1, "Not this session's.", "No.")
    failed = db.scalar(select(Turn).where(Turn.session_id == chat.id, Turn.seq == 3))
    failed.status = "failed"
    for index in range(turn_context.ROOM_FILES_LISTED + 2):
        add_file(db, room, f"notes-{index}.md", FileStatus.READY, age_seconds=index)
    add_file(db, room, "pending.md", FileStatus.PENDING, age_seconds=0)
    add_file(db, other_room, "other-room.md", FileStatus.READY, age_seconds=0)
    db.commit()

    for before_seq in (1, 4, summaries.WINDOW_TURNS + 1, last - 1, last + 1):
        expected = separate_reads(db, chat, before_seq)
        assert as_read(turn_context.load(db, chat, before_seq)) == expected
        chat_row, context = turn_context.load_with_chat(db, chat.id, room.id, before_seq)
        assert chat_row == turn_context.ChatRow(chat.id, room.id, "Earlier talk.", 2)
        assert as_read(context) == expected
    newest = as_read(turn_context.load(db, chat, last + 1))
    assert newest[2].count("notes-") == turn_context.ROOM_FILES_LISTED
    assert "notes-0.md" in newest[2] and "notes-51.md" not in newest[2] and "pending" not in newest[2]

    chat_row, context = turn_context.load_with_chat(db, empty_chat.id, other_room.id, 1)
    assert chat_row == turn_context.ChatRow(empty_chat.id, other_room.id, None, 0)
    assert (context.recent, context.missing, context.summary) == ([], [], None)
    assert "other-room.md" in context.files_line
    with pytest.raises(NoResultFound):
        turn_context.load_with_chat(db, new_id(), room.id, 1)


def test_a_context_is_read_in_one_statement_as_the_separate_reads_read_it(db, user):
    check_context_reads(db, user.id)
