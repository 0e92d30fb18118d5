"""Rooms and chat sessions. Another user's room or session is reported as not found."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import is_uuid
from shared.errors import NotFound
from shared.models import ChatSession, Room
from shared.pagination import Listing


def owned_room(session: Session, user_id: str, room_id: str) -> Room:
    """:raises NotFound: unknown, malformed, or another user's room."""
    room = session.get(Room, room_id) if is_uuid(room_id) else None
    if room is None or room.user_id != user_id:
        raise NotFound("No such room.")
    return room


def owned_session(session: Session, user_id: str, chat_session_id: str) -> ChatSession:
    """:raises NotFound: unknown, malformed, or another user's session.

    (A turn's admission locks it with its price: ``turns._lock_session``.)"""
    if not is_uuid(chat_session_id):
        raise NotFound("No such session.")
    chat = session.get(ChatSession, chat_session_id)
    if chat is None or chat.user_id != user_id:
        raise NotFound("No such session.")
    return chat


def create_room(session: Session, user_id: str, name: str) -> Room:
    room = Room(user_id=user_id, name=name.strip())
    session.add(room)
    session.commit()
    return room


def list_rooms(session: Session, user_id: str) -> Listing:
    return Listing(
        session, select(Room).where(Room.user_id == user_id).order_by(Room.created_at.desc(), Room.id)
    )


def create_session(session: Session, user_id: str, room_id: str, title: str | None) -> ChatSession:
    room = owned_room(session, user_id, room_id)
    chat = ChatSession(room_id=room.id, user_id=user_id, title=title.strip() if title else None)
    session.add(chat)
    session.commit()
    return chat


def list_sessions(session: Session, user_id: str, room_id: str) -> Listing:
    room = owned_room(session, user_id, room_id)
    return Listing(
        session,
        select(ChatSession)
        .where(ChatSession.room_id == room.id)
        .order_by(ChatSession.created_at.desc(), ChatSession.id),
    )
