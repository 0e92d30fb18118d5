"""One Redis channel, listened to by one daemon thread per process (a greenlet under
gevent), with reconnection: what the turn-end push and the API-key cache both use.

Redis pub/sub is at-most-once: a message published while the listener reconnects is
lost. Users of a listener learn of every loss and every (re)subscription through
``on_state`` and decide what a gap costs them (a re-read, a cache flush).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 1.0


class ChannelListener:
    def __init__(
        self,
        redis_client,
        channel: str,
        on_message: Callable[[str], None],
        *,
        on_state: Callable[[bool], None] | None = None,
        name: str,
    ) -> None:
        self._redis = redis_client
        self.channel = channel
        self._on_message = on_message
        self._on_state = on_state or (lambda _subscribed: None)
        self._name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._subscribed = threading.Event()
        self._closed = threading.Event()

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    def start(self, wait: float = 0.5) -> None:
        """Start listening (once; again if the thread died), waiting up to ``wait`` seconds
        for the subscription so that a message published right after is not missed."""
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._listen, name=self._name, daemon=True)
                    self._thread.start()
        self._subscribed.wait(wait)

    def close(self) -> None:
        """Stop listening (within about a second)."""
        self._closed.set()

    def _set_subscribed(self, subscribed: bool) -> None:
        if subscribed == self._subscribed.is_set():
            return
        if subscribed:
            self._subscribed.set()
        else:
            self._subscribed.clear()
        self._on_state(subscribed)

    def _listen(self) -> None:
        while not self._closed.is_set():
            pubsub = None
            try:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self._set_subscribed(True)
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        data = message["data"]
                        self._on_message(data.decode() if isinstance(data, bytes) else str(data))
            except Exception:
                self._set_subscribed(False)
                if self._closed.is_set():
                    return
                log.warning("%s lost Redis; retrying", self._name, exc_info=True)
                self._closed.wait(RECONNECT_SECONDS)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass
        self._set_subscribed(False)
