"""A turn's end, pushed: the worker publishes it, a web request waiting on the turn wakes up.

Design §3 / style rule 13: a waiting request is *told* a turn ended, it does not
poll the database. The worker publishes the turn id on the Redis channel
``tollgate:turn-ended`` right after the turn's terminal state commits. Each web
process runs one subscriber (a daemon thread — a greenlet under gunicorn's
gevent worker) that wakes the requests waiting on that id.

Redis pub/sub is at-most-once (a message published while the subscriber
reconnects is lost), so a waiter also re-reads the turn row every
``SAFETY_POLL_SECONDS``: a lost message costs at most that much latency, never
a wrong answer. Embedded mode (no Redis) polls the row, as it always did.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from shared.services.pubsub import ChannelListener

log = logging.getLogger(__name__)

CHANNEL = "tollgate:turn-ended"
SAFETY_POLL_SECONDS = 2.0


def publish_ended(runtime, turn_id: str) -> None:
    """Tell waiting requests that ``turn_id`` reached its terminal state. Best effort:
    a Redis failure only delays them to their next safety re-read."""
    if runtime.redis is None:
        return
    try:
        runtime.redis.publish(CHANNEL, turn_id)
    except Exception:
        log.warning("could not publish the end of turn %s", turn_id, exc_info=True)


class TurnWaiter:
    """One per web process: a Redis subscriber fanning turn ends out to waiting requests."""

    def __init__(self, redis_client) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, list[threading.Event]] = {}
        self._listener = ChannelListener(redis_client, CHANNEL, self._wake, name="turn-ended-listener")

    def close(self) -> None:
        """Stop the subscriber (within about a second)."""
        self._listener.close()

    def wait(self, turn_id: str, timeout: float, finished: Callable[[], bool]) -> bool:
        """Block until ``finished()`` is true or ``timeout`` passes; returns ``finished()``'s
        last answer. ``finished`` reads the turn (a database query): it runs once after
        subscribing, on each push for this turn, and every ``SAFETY_POLL_SECONDS``."""
        # The first waiter gives the subscription a moment, so its push is not published
        # before anyone listens; the safety re-read covers a slower start.
        self._listener.start()
        event = threading.Event()
        with self._lock:
            self._waiting.setdefault(turn_id, []).append(event)
        try:
            deadline = time.monotonic() + timeout
            while True:
                # Registered before this read, so an end published after it is not missed.
                if finished():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                event.wait(min(remaining, SAFETY_POLL_SECONDS))
                event.clear()
        finally:
            with self._lock:
                events = self._waiting.get(turn_id, [])
                if event in events:
                    events.remove(event)
                if not events:
                    self._waiting.pop(turn_id, None)

    def _wake(self, turn_id: str) -> None:
        with self._lock:
            events = list(self._waiting.get(turn_id, ()))
        for event in events:
            event.set()
