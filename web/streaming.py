"""Server-Sent Events: a turn's stream relayed to the client (design §3 "Streaming").

The worker writes the stream (``shared.services.turn_events``); this module only reads
it and writes SSE. Events, each with an ``id:``:

- ``turn`` (id ``0``): the TurnRead as it stands when the client attaches from the start;
- ``delta`` ``{"text"}``, ``tool_call`` (the recorded call), ``reset`` ``{"attempt"}`` (a
  retried attempt starts its answer over: drop the deltas so far), ids from the stream;
- ``done`` (id ``done``): the final TurnRead (completed, failed or cancelled), last.

``: ping`` every 15 s while nothing happens. ``Last-Event-ID`` resumes right after that
event. Embedded mode (no Redis) is coarser: the tool calls (ids ``t1``, ``t2`` …) and the
whole reply as one ``delta`` (id ``r``) when the turn ends, then ``done``.

A client that goes away only stops this generator: the turn runs on in its worker.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator

from flask import Response

from shared.models import Turn
from shared.runtime import Runtime
from shared.services import turn_events, turns
from web.schemas.chat import ToolCallSchema, TurnSchema

START, DONE = "0", "done"
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_EMBEDDED_ID = re.compile(r"^(?:t(\d{1,6})|r)$")
_turn_schema = TurnSchema()
_tool_call_schema = ToolCallSchema()


def sse(event_id: str | None, event: str | None, data) -> str:
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append(f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}")
    return "\n".join(lines) + "\n\n"


PING = ": ping\n\n"


def event_stream(body: Iterator[str]) -> Response:
    return Response(
        body,
        status=200,
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def read_turn(runtime: Runtime, turn_id: str) -> dict:
    """The TurnRead (as the JSON API shows it) from a short session of its own: no
    connection is held while the stream waits."""
    with runtime.db.session() as session:
        turn = session.get(Turn, turn_id)
        body = _turn_schema.dump(turn)
        session.commit()
    return body


def is_finished(runtime: Runtime, turn_id: str) -> bool:
    with runtime.db.session() as session:
        status = session.get(Turn, turn_id).status
        session.commit()
    return status in turns.FINISHED


def turn_events_body(runtime: Runtime, turn_id: str, last_event_id: str | None) -> Iterator[str]:
    """The SSE text of a turn's events after ``last_event_id`` (``None``: from the start)."""
    last_event_id = (last_event_id or "").strip() or None
    if last_event_id == DONE:
        return
    if last_event_id is None or not (
        last_event_id == START or _STREAM_ID.match(last_event_id) or _EMBEDDED_ID.match(last_event_id)
    ):
        yield sse(START, "turn", read_turn(runtime, turn_id))
        last_event_id = START
    for item in relay(runtime, turn_id, last_event_id):
        yield PING if item is None else sse(*item)


def relay(runtime: Runtime, turn_id: str, after: str = START) -> Iterator[tuple[str, str, object] | None]:
    """A turn's events after id ``after`` as ``(id, event, data)``, ``None`` for a ping, the
    last one ``("done", "done", TurnRead)``."""
    if runtime.redis is None:
        yield from _embedded(runtime, turn_id, after)
        return
    cursor = after if _STREAM_ID.match(after) else START
    for item in turn_events.follow(runtime, turn_id, cursor, lambda: is_finished(runtime, turn_id)):
        if item is not None and item[1] == turn_events.TOOL_CALL:
            # The worker wrote the recorded row; the client sees TurnRead's tool_calls entry.
            item = (item[0], item[1], _tool_call_schema.dump(item[2]))
        yield item
    yield (DONE, "done", read_turn(runtime, turn_id))


def _embedded(runtime: Runtime, turn_id: str, after: str) -> Iterator[tuple[str, str, object] | None]:
    """No Redis: wait for the turn's end (re-reading the row, 20 ms growing to 250 ms), then
    its tool calls and its reply in one piece."""
    for _ in wait_polling(lambda: is_finished(runtime, turn_id)):
        yield None
    final = read_turn(runtime, turn_id)
    match = _EMBEDDED_ID.match(after)
    if after == "r":
        first_tool = len(final["tool_calls"]) + 1
    else:
        first_tool = int(match.group(1)) + 1 if match and match.group(1) else 1
    for index, call in enumerate(final["tool_calls"], start=1):
        if index >= first_tool:
            yield (f"t{index}", "tool_call", call)
    if after != "r" and final.get("reply"):
        yield ("r", "delta", {"text": final["reply"]})
    yield (DONE, "done", final)


def wait_polling(finished: Callable[[], bool]) -> Iterator[str]:
    """Yield ``: ping`` every ``PING_SECONDS`` until ``finished()`` (embedded mode)."""
    delay = 0.02
    last_ping = time.monotonic()
    while not finished():
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
        if time.monotonic() - last_ping >= turn_events.PING_SECONDS:
            last_ping = time.monotonic()
            yield PING
