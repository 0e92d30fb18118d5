"""Small helpers that create what tests need through the real services."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from sqlalchemy.orm import Session

from shared.models import User
from shared.services import auth

_counter = itertools.count(1)


@dataclass
class Actor:
    user: User
    key: str

    @property
    def id(self) -> str:
        return self.user.id

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_actor(session: Session, role: str = "user", email: str | None = None) -> Actor:
    email = email or f"{role}{next(_counter)}@example.test"
    user, issued = auth.create_user(session, email, role)
    return Actor(user=user, key=issued.secret)


def make_completed_turn(db: Session, chat, seq: int, content: str, reply: str | None = None, *, commit=True):
    """A completed turn row in ``chat`` (a ChatSession), as the turn runner leaves one;
    ``commit=False``: written (flushed) in ``db``'s open transaction, not committed."""
    from shared.models import Turn

    turn = Turn(
        session_id=chat.id,
        room_id=chat.room_id,
        user_id=chat.user_id,
        seq=seq,
        status="completed",
        content=content,
        reply=reply,
        model="offline-small",
        max_output_tokens=256,
    )
    db.add(turn)
    if commit:
        db.commit()
    else:
        db.flush()
    return turn
