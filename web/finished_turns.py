"""``GET /turns/{id}`` of a finished turn, answered from memory after its first read.

A turn that has finished (completed, failed or cancelled) never changes again: every
later write to a turn is guarded by ``status = running`` (or ``queued``), and turns,
their tool calls, sessions and rooms are never deleted. So the JSON body of a finished
turn's first read is its body for good, and each web process keeps the bodies it has
read, least recently used out first, up to ``MAX_BYTES`` of them. A hit costs no database
round trip and no serialisation: the read costs about what an authenticated read of
settings does (docs/architecture.md, "Finished turns from memory").

- Only what the database said was finished is kept; a queued or running turn is read
  from the database on every request, as before.
- The owner is kept beside the body: another user's key gets the database's answer, a 404.
- Nothing needs telling the other processes: there is nothing to invalidate.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from flask import Response, current_app

from shared.services import turns
from web.context import current_user, db
from web.schemas.chat import TurnSchema

MAX_BYTES = 16 * 1024 * 1024
# A larger body (a long reply) is still answered, only not kept: it would push out many.
MAX_BODY_BYTES = 256 * 1024

_TURN_SCHEMA = TurnSchema()


class FinishedTurns:
    """Turn id -> (owner's user id, JSON body), bounded by the bodies' total size."""

    def __init__(self, max_bytes: int = MAX_BYTES, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.max_bytes = max_bytes
        self.max_body_bytes = max_body_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._size = 0

    def body(self, turn_id: str, user_id: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(turn_id)
            if entry is None or entry[0] != user_id:
                return None
            self._entries.move_to_end(turn_id)
            return entry[1]

    def keep(self, turn_id: str, user_id: str, body: bytes) -> None:
        if len(body) > self.max_body_bytes:
            return
        with self._lock:
            if turn_id in self._entries:
                return
            self._entries[turn_id] = (user_id, body)
            self._size += len(body)
            while self._size > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._size -= len(dropped)


def init_app(app) -> None:
    app.extensions["finished_turns"] = FinishedTurns()


def read(turn_id: str) -> Response | turns.TurnRead:
    """The caller's turn: a finished one's kept body when this process has read it before,
    else :func:`turns.read_turn` (a finished turn's body is kept for next time).

    :raises NotFound: unknown, malformed, or another user's turn."""
    kept: FinishedTurns = current_app.extensions["finished_turns"]
    user_id = current_user().id
    if (body := kept.body(turn_id, user_id)) is not None:
        return current_app.response_class(body, mimetype=current_app.json.mimetype)
    turn = turns.read_turn(db(), user_id, turn_id)
    if turn.status not in turns.FINISHED:
        return turn
    response = current_app.json.response(_TURN_SCHEMA.dump(turn))
    kept.keep(turn.id, user_id, response.get_data())
    return response
