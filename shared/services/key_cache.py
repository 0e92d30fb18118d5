"""API keys already checked, remembered per web process: most requests authenticate
without a database round trip, and a revoke takes effect in every process at once
(a ``listened_cache.ListenedCache``: how it stays right when Redis goes away, and why a
lookup racing a revoke does not store).

- An entry maps a key's hash to its :class:`~shared.services.auth.Caller` for at most
  ``AUTH_CACHE_SECONDS``; only keys that authenticated are remembered (unknown keys
  always go to the database, so guessing cannot fill the cache), at most
  ``MAX_ENTRIES`` of them (least recently used out first).
- Revoking a key publishes its hash on ``tollgate:api-key-revoked`` after the revoke
  commits; every web process's listener drops the entry.
"""

from __future__ import annotations

from shared.services.listened_cache import ListenedCache, publish_change

CHANNEL = "tollgate:api-key-revoked"
MAX_ENTRIES = 10_000


def publish_revoked(redis_client, key_hash: str) -> None:
    """Tell every process's cache that the key is revoked."""
    publish_change(redis_client, CHANNEL, key_hash)


class KeyCache(ListenedCache):
    def __init__(self, redis_client, ttl_seconds: float) -> None:
        super().__init__(
            redis_client,
            CHANNEL,
            ttl_seconds=ttl_seconds,
            max_entries=MAX_ENTRIES,
            name="api-key-revoked-listener",
        )
