"""A turn's events, pushed: its stream of deltas (a Redis Stream per turn) and its end.

**Streams** (design §3 "Streaming"). The worker appends each piece of a turn's answer
(``delta``), each recorded tool call (``tool_call``) and, on a retried attempt, a ``reset``
to the Redis Stream ``tollgate:turn:{id}:events``; the end of the turn appends ``end``. Ids
are Redis's own (ordered), so a client that lost its connection re-attaches after the last
id it saw. The key expires ``TURN_STREAM_TTL_SECONDS`` (≥ 1 h) after its last event. The
web only reads (:func:`follow`); generation never waits for a reader. Deltas that arrive
within ``COALESCE_SECONDS`` of the last append go out together (at most ~20 appends a second
per turn), the first one at once (time to first token). A cancel request is a key the
worker reads in the same round trip as an append, or at most every
``CANCEL_CHECK_SECONDS`` while nothing is appended; embedded mode (no Redis) reads the
turn row's ``cancel_requested_at`` instead, once a second.

**Ends.**

Design §3 / style rule 13: a waiting request is *told* a turn ended, it does not
poll the database. The worker publishes the turn id on the Redis channel
``tollgate:turn-ended`` right after the turn's terminal state commits. Each web
process runs one subscriber (a daemon thread — a greenlet under gunicorn's
gevent worker) that wakes the requests waiting on that id. A completed turn
that recorded no tool calls carries itself in the push (the id, a space, its
TurnRead as JSON), so the request it wakes answers without reading it again.

Redis pub/sub is at-most-once (a message published while the subscriber
reconnects is lost), so a waiter also re-reads the turn row every
``SAFETY_POLL_SECONDS``: a lost message costs at most that much latency, never
a wrong answer. Embedded mode (no Redis) polls the row, as it always did.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator

from shared.models import ToolCallEvent
from shared.services.pubsub import ChannelListener

log = logging.getLogger(__name__)

CHANNEL = "tollgate:turn-ended"
SAFETY_POLL_SECONDS = 2.0
COALESCE_SECONDS = 0.05
# A turn nobody asked to stream (a sync or async POST): readers may still attach, and get
# its pieces this far apart; the first piece waits too.
QUIET_COALESCE_SECONDS = 0.5
CANCEL_CHECK_SECONDS = 0.25
EMBEDDED_CANCEL_CHECK_SECONDS = 1.0
# A reader blocked on a stream wakes at least this often (the SSE ``: ping``).
PING_SECONDS = 15.0
READ_BATCH = 500
# Event names in the stream. ``end`` is internal: it wakes readers, who then read the turn.
DELTA, TOOL_CALL, RESET, END = "delta", "tool_call", "reset", "end"


def stream_key(turn_id: str) -> str:
    return f"tollgate:turn:{turn_id}:events"


def cancel_key(turn_id: str) -> str:
    return f"tollgate:turn:{turn_id}:cancel"


def _ttl(runtime) -> int:
    return max(3600, int(runtime.settings.turn_stream_ttl_seconds))


def publish_ended(runtime, turn_id: str, read: str | None = None) -> None:
    """Tell waiting requests and stream readers that ``turn_id`` reached its terminal state
    (one round trip: the stream's ``end`` and the pub/sub push). ``read``: the finished
    turn as a waiting request answers it (``turns.pushed_read``), carried in the push after
    the id and a space. Best effort: a Redis failure only delays them to their next safety
    re-read."""
    if runtime.redis is None:
        return
    try:
        pipe = runtime.redis.pipeline(transaction=False)
        pipe.xadd(stream_key(turn_id), {"event": END, "data": "{}"})
        pipe.expire(stream_key(turn_id), _ttl(runtime))
        pipe.publish(CHANNEL, turn_id if read is None else f"{turn_id} {read}")
        pipe.execute()
    except Exception:
        log.warning("could not publish the end of turn %s", turn_id, exc_info=True)


def request_cancel(runtime, turn_id: str) -> None:
    """Raise the turn's cancel flag for its worker (the database row carries it too)."""
    if runtime.redis is None:
        return
    try:
        runtime.redis.set(cancel_key(turn_id), "1", ex=_ttl(runtime))
    except Exception:
        # The worker still sees the row's cancel_requested_at between rounds.
        log.warning("could not raise the cancel flag of turn %s", turn_id, exc_info=True)


class TurnPublisher:
    """The worker's side of one attempt's stream: ``delta`` / ``tool_call`` / ``reset``
    appends and the cancel check (``should_stop``), passed to the provider as its hooks.

    Publishing is best effort: a Redis failure loses stream events (readers still get the
    final TurnRead in ``done``), never the turn.
    """

    def __init__(
        self, runtime, turn_id: str, *, cancel_requested=None, on_first_delta=None, live: bool = True
    ) -> None:
        """``live``: a client asked to stream this turn: its first piece goes out at once and
        the rest every ``COALESCE_SECONDS``; otherwise every ``QUIET_COALESCE_SECONDS``."""
        self.runtime = runtime
        self.turn_id = turn_id
        self.redis = runtime.redis
        # Embedded mode: () -> bool, reads the turn row's cancel request.
        self._cancel_requested = cancel_requested
        self._on_first_delta = on_first_delta
        self._buffer: list[str] = []
        self._last_flush = 0.0
        self._last_check = time.monotonic()
        self._cancelled = False
        self._live = live
        self._coalesce = COALESCE_SECONDS if live else QUIET_COALESCE_SECONDS
        self.deltas = 0

    # -- appends ---------------------------------------------------------------------

    def delta(self, text: str) -> None:
        if not text:
            return
        self.deltas += 1
        if self.deltas == 1 and self._on_first_delta is not None:
            self._on_first_delta()
        self._buffer.append(text)
        if self.deltas == 1:
            if self._live:
                self.flush()
            else:
                self._last_flush = time.monotonic()  # the quiet interval starts now
        elif time.monotonic() - self._last_flush >= self._coalesce:
            self.flush()

    def tool_call(self, event: ToolCallEvent) -> None:
        """The recorded call, as its row holds it: readers show it through their own
        schema (the web: ``ToolCallSchema``, as in TurnRead)."""
        self.flush()
        self._append(
            TOOL_CALL, {column.key: getattr(event, column.key) for column in event.__table__.columns}
        )

    def reset(self, attempt: int) -> None:
        """A new attempt starts over: readers drop the deltas they have (``reset`` event)."""
        self._append(RESET, {"attempt": attempt})

    def flush(self) -> None:
        if not self._buffer:
            return
        text, self._buffer = "".join(self._buffer), []
        self._append(DELTA, {"text": text})

    def _append(self, event: str, data: dict) -> None:
        self._last_flush = time.monotonic()
        if self.redis is None:
            return
        key = stream_key(self.turn_id)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(key, {"event": event, "data": json.dumps(data, default=str)})
            pipe.expire(key, _ttl(self.runtime))
            pipe.exists(cancel_key(self.turn_id))
            *_, cancel = pipe.execute()
            self._last_check = time.monotonic()
            self._cancelled = self._cancelled or bool(cancel)
        except Exception:
            log.warning("could not append %s to the stream of turn %s", event, self.turn_id, exc_info=True)

    # -- cancel ----------------------------------------------------------------------

    def should_stop(self, *, now: bool = False) -> bool:
        """Has the turn been cancelled? Cheap enough to ask after every chunk: the flag is
        read at most every ``CANCEL_CHECK_SECONDS`` (and with every append). Embedded mode
        reads the row at most once a second, or at once with ``now`` (between rounds)."""
        if self._cancelled:
            return True
        if self.redis is not None:
            if time.monotonic() - self._last_check < CANCEL_CHECK_SECONDS:
                return False
            self._last_check = time.monotonic()
            try:
                self._cancelled = bool(self.redis.exists(cancel_key(self.turn_id)))
                return self._cancelled
            except Exception:
                log.warning("could not read the cancel flag of turn %s", self.turn_id, exc_info=True)
        elif not now and time.monotonic() - self._last_check < EMBEDDED_CANCEL_CHECK_SECONDS:
            return False
        self._last_check = time.monotonic()
        if self._cancel_requested is not None:
            self._cancelled = bool(self._cancel_requested())
        return self._cancelled


def blocking_client(settings):
    """A client for blocking stream reads: the process's usual client fails fast (0.5 s
    socket timeout), which a read blocked for ``PING_SECONDS`` would trip."""
    import redis

    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=PING_SECONDS + 10,
        socket_connect_timeout=2,
        health_check_interval=30,
    )


def follow(runtime, turn_id: str, after: str, finished: Callable[[], bool]) -> Iterator[tuple | None]:
    """A turn's stream events after id ``after`` (``"0"``: from the start), as
    ``(id, event, data)``, until the turn has finished and every event before its end was
    read; ``None`` each time ``PING_SECONDS`` pass without one. Redis mode only.

    The worker appends every event before it commits the turn's end, so once ``finished()``
    (a read of the turn row) is true, one more read of the stream has them all.
    """
    client = runtime.stream_redis
    key = stream_key(turn_id)
    cursor = after
    # The database is read when the reader attaches, when the stream says the turn ended,
    # and after each quiet PING_SECONDS (a lost ``end``): never per delta.
    check = True
    while not (check and finished()):
        check = False
        entries = _read(client, key, cursor, block=int(PING_SECONDS * 1000))
        if not entries:
            if finished():
                break
            yield None
            continue
        for entry in entries:
            cursor = entry[0]
            if entry[1] == END:
                check = True
            else:
                yield entry
    for entry in _read(client, key, cursor, block=None, drain=True):
        if entry[1] != END:
            yield entry


def _read(client, key: str, cursor: str, *, block: int | None, drain: bool = False) -> list[tuple]:
    out: list[tuple] = []
    while True:
        answer = client.xread({key: cursor}, count=READ_BATCH, block=block)
        batch = answer[0][1] if answer else []
        for raw_id, fields in batch:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            event = fields.get(b"event", fields.get("event", b""))
            data = fields.get(b"data", fields.get("data", b"{}"))
            event = event.decode() if isinstance(event, bytes) else event
            data = data.decode() if isinstance(data, bytes) else data
            out.append((entry_id, event, json.loads(data)))
            cursor = entry_id
        if not drain or len(batch) < READ_BATCH:
            return out


class TurnWaiter:
    """One per web process: a Redis subscriber fanning turn ends out to waiting requests."""

    def __init__(self, redis_client) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, list[threading.Event]] = {}
        # The finished turn a push carried, for its waiters (dropped with the last of them).
        self._pushed: dict[str, str] = {}
        self._listener = ChannelListener(redis_client, CHANNEL, self._wake, name="turn-ended-listener")

    def close(self) -> None:
        """Stop the subscriber (within about a second)."""
        self._listener.close()

    def wait(
        self,
        turn_id: str,
        timeout: float,
        finished: Callable[[], bool],
        *,
        start: Callable[[], object] | None = None,
        pushed: Callable[[str], bool] | None = None,
    ) -> bool:
        """Block until ``finished()`` is true or ``timeout`` passes; returns ``finished()``'s
        last answer. ``finished`` reads the turn (a database query): it runs on each push
        for this turn, every ``SAFETY_POLL_SECONDS``, and once at first — unless ``start``
        (what sets the turn going: its task's enqueue) runs here, after this wait is
        registered with a live subscription, so its end cannot come unheard. ``pushed``
        takes the place of ``finished`` when a push carried the finished turn (its body)."""
        # The first waiter gives the subscription a moment, so its push is not published
        # before anyone listens; the safety re-read covers a slower start.
        self._listener.start()
        event = threading.Event()
        with self._lock:
            self._waiting.setdefault(turn_id, []).append(event)
        heard_from_start = start is not None and self._listener.subscribed
        if start is not None:
            start()
        try:
            deadline = time.monotonic() + timeout
            while True:
                # Registered before this read, so an end published after it is not missed.
                if heard_from_start:
                    heard_from_start = False
                elif finished():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                event.wait(min(remaining, SAFETY_POLL_SECONDS))
                event.clear()
                body = self._pushed.get(turn_id) if pushed is not None else None
                if body is not None and pushed(body):
                    return True
        finally:
            with self._lock:
                events = self._waiting.get(turn_id, [])
                if event in events:
                    events.remove(event)
                if not events:
                    self._waiting.pop(turn_id, None)
                    self._pushed.pop(turn_id, None)

    def _wake(self, message: str) -> None:
        turn_id, _, body = message.partition(" ")
        with self._lock:
            events = list(self._waiting.get(turn_id, ()))
            if events and body:
                self._pushed[turn_id] = body
        for event in events:
            event.set()
