"""API keys already checked, remembered per web process: most requests authenticate
without a database round trip, and a revoke takes effect in every process at once.

- An entry maps a key's hash to its :class:`~shared.services.auth.Caller` for at most
  ``AUTH_CACHE_SECONDS``; only keys that authenticated are remembered (unknown keys
  always go to the database, so guessing cannot fill the cache), at most
  ``MAX_ENTRIES`` of them (least recently used out first).
- Revoking a key publishes its hash on ``tollgate:api-key-revoked`` after the revoke
  commits; every web process's listener drops the entry.
- The cache serves only while its listener is subscribed: when Redis goes away it is
  emptied and bypassed until the subscription is back, so a revoke published meanwhile
  cannot be missed. A lookup that started before an invalidation arrived does not store
  its (possibly stale) answer (the ``generation`` check).
- Embedded mode (no Redis) has no cache: nothing would tell the other processes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from shared.services.pubsub import ChannelListener

log = logging.getLogger(__name__)

CHANNEL = "tollgate:api-key-revoked"
MAX_ENTRIES = 10_000


def publish_revoked(redis_client, key_hash: str) -> None:
    """Tell every process's cache that the key is revoked. A Redis that is down cannot
    lose this: each cache stops serving while its listener is not subscribed."""
    if redis_client is None:
        return
    try:
        redis_client.publish(CHANNEL, key_hash)
    except Exception:
        log.warning("could not publish a key revocation", exc_info=True)


class KeyCache:
    def __init__(self, redis_client, ttl_seconds: float) -> None:
        self.ttl_seconds = ttl_seconds
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, object]] = OrderedDict()
        self._generation = 0
        self._listener = ChannelListener(
            redis_client,
            CHANNEL,
            self._revoked,
            on_state=self._state_changed,
            name="api-key-revoked-listener",
        )

    def close(self) -> None:
        self._listener.close()

    def generation(self) -> int | None:
        """Taken before a database lookup and handed to :meth:`store`; ``None`` while the
        cache cannot serve (not subscribed yet, or Redis lost)."""
        self._listener.start(wait=0)
        if not self._listener.subscribed:
            return None
        return self._generation

    def lookup(self, key_hash: str):
        if not self._listener.subscribed:
            return None
        with self._lock:
            entry = self._entries.get(key_hash)
            if entry is None:
                return None
            stored_at, caller = entry
            if time.monotonic() - stored_at > self.ttl_seconds:
                del self._entries[key_hash]
                return None
            self._entries.move_to_end(key_hash)
            return caller

    def store(self, key_hash: str, caller, generation: int | None) -> None:
        with self._lock:
            if generation is None or generation != self._generation or not self._listener.subscribed:
                return  # an invalidation (or a lost subscription) happened since the lookup began
            self._entries[key_hash] = (time.monotonic(), caller)
            self._entries.move_to_end(key_hash)
            while len(self._entries) > MAX_ENTRIES:
                self._entries.popitem(last=False)

    def _revoked(self, key_hash: str) -> None:
        with self._lock:
            self._generation += 1
            self._entries.pop(key_hash, None)

    def _state_changed(self, _subscribed: bool) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()
