"""A per-process cache that every process empties of an entry at once when it changes: the
writer publishes the entry's key on a Redis channel after its commit, and each process's
listener (``pubsub.ChannelListener``) drops it. What the API-key cache
(shared/services/key_cache.py) and the price cache (shared/services/pricing.py) are.

- An entry lives at most ``ttl_seconds`` (a safety net, not the invalidation), at most
  ``max_entries`` of them (least recently used out first).
- The cache serves only while its listener is subscribed: when Redis goes away it is
  emptied and bypassed until the subscription is back, so a change published meanwhile
  cannot be missed. A database read that started before an invalidation arrived does not
  store its (possibly stale) answer: the caller takes :meth:`ListenedCache.generation`
  before its read and hands it to :meth:`ListenedCache.store`.
- ``EVERYTHING`` published empties every process's cache on that channel (data changed
  behind the writers' backs: a test emptying tables, an edit by hand in SQL).
- Embedded mode (no Redis) has no such cache: nothing would tell the other processes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from shared.services.pubsub import ChannelListener

log = logging.getLogger(__name__)

EVERYTHING = "*"


def publish_change(redis_client, channel: str, key: str) -> None:
    """Tell every process's cache on ``channel`` that ``key`` changed. A Redis that is down
    cannot lose this: each cache stops serving while its listener is not subscribed."""
    if redis_client is None:
        return
    try:
        redis_client.publish(channel, key)
    except Exception:
        log.warning("could not publish a change on %s", channel, exc_info=True)


class ListenedCache:
    def __init__(
        self, redis_client, channel: str, *, ttl_seconds: float, max_entries: int, name: str
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, object]] = OrderedDict()
        self._generation = 0
        self._listener = ChannelListener(
            redis_client, channel, self._changed, on_state=self._state_changed, name=name
        )

    def close(self) -> None:
        self._listener.close()

    def generation(self) -> int | None:
        """Taken before a database read and handed to :meth:`store`; ``None`` while the
        cache cannot serve (not subscribed yet, or Redis lost)."""
        self._listener.start(wait=0)
        if not self._listener.subscribed:
            return None
        return self._generation

    def lookup(self, key: str):
        if not self._listener.subscribed:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            stored_at, value = entry
            if time.monotonic() - stored_at > self.ttl_seconds:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    def store(self, key: str, value, generation: int | None) -> None:
        with self._lock:
            if generation is None or generation != self._generation or not self._listener.subscribed:
                return  # a change (or a lost subscription) happened since the read began
            self._entries[key] = (time.monotonic(), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def _changed(self, key: str) -> None:
        with self._lock:
            self._generation += 1
            if key == EVERYTHING:
                self._entries.clear()
            else:
                self._entries.pop(key, None)

    def _state_changed(self, _subscribed: bool) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()
