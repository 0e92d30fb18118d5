"""What one process holds: its settings, its database and (lazily) its Redis client.

Built by the web app factory, the Celery app's setup and the CLI; never at import.
"""

from __future__ import annotations

import logging
import threading
from functools import cached_property

from shared.db import Database, utcnow
from shared.keyed_locks import KeyedLocks
from shared.providers import Provider, build_provider
from shared.settings import Settings, mask_url
from shared.tools.registry import ToolRegistry, build_registry

log = logging.getLogger(__name__)

# Redis calls on the request path must fail fast when Redis is away, so a dead
# Redis shows up as a degraded answer instead of a hung request.
REDIS_SOCKET_TIMEOUT = 0.5


class Runtime:
    def __init__(self, settings: Settings, *, role: str) -> None:
        self.settings = settings
        self.role = role
        self._lock = threading.Lock()
        self._db: Database | None = None
        self._sqlite_reader: tuple[int, object] | None = None
        # The clock limits read (spend periods, rate windows); tests inject another.
        self.clock = utcnow
        # How this process sends a Celery task (set by the web app and the Celery app):
        # the webhook outbox sends deliveries with it after a commit.
        self.send_task = None

    @property
    def db(self) -> Database:
        # Created on first use so a forked worker child builds its own pool.
        if self._db is None:
            with self._lock:
                if self._db is None:
                    database = Database.from_settings(self.settings, role=self.role)
                    from shared.services import webhooks

                    webhooks.install(self, database)
                    self._db = database
        return self._db

    @cached_property
    def redis(self):
        """A Redis client, or ``None`` in embedded mode."""
        if not self.settings.redis_url:
            return None
        import redis

        log.info("%s redis: %s", self.role, mask_url(self.settings.redis_url))
        return redis.Redis.from_url(
            self.settings.redis_url,
            socket_timeout=REDIS_SOCKET_TIMEOUT,
            socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
            health_check_interval=30,
        )

    @cached_property
    def turn_waiter(self):
        """Where web requests wait for a turn's end to be pushed (``None`` in embedded mode)."""
        if self.redis is None:
            return None
        from shared.services.turn_events import TurnWaiter

        return TurnWaiter(self.redis)

    @cached_property
    def key_cache(self):
        """API keys this process already checked (``None`` in embedded mode or when off)."""
        if self.redis is None or self.settings.auth_cache_seconds <= 0:
            return None
        from shared.services.key_cache import KeyCache

        return KeyCache(self.redis, self.settings.auth_cache_seconds)

    @cached_property
    def leases(self):
        """This process's heartbeat for the leases of the turns it runs."""
        from shared.services.leases import LeaseKeeper

        return LeaseKeeper(self)

    @cached_property
    def provider(self) -> Provider:
        """The model provider ``MODEL_PROVIDER`` names, built on first use (tests assign a fake).

        Building one has no I/O, so under gevent no other greenlet runs in between."""
        return build_provider(self.settings)

    @cached_property
    def tools(self) -> ToolRegistry:
        """The tool registry, built on first use: its schemas size holds, its tools run in turns."""
        return build_registry(self.settings)

    @cached_property
    def admissions(self) -> KeyedLocks:
        """Turn admissions in this process, one at a time per user (``turns.submit``)."""
        return KeyedLocks()

    @cached_property
    def enforcement_memory(self):
        """What this process last saw of the enforcement toggle (shared/services/enforcement.py)."""
        from shared.services.enforcement import ProcessMemory

        return ProcessMemory()

    @property
    def sqlite_reader(self):
        """Embedded mode: a sessionmaker whose reads run outside the main engine's
        ``BEGIN IMMEDIATE`` (shared/services/enforcement.py); rebuilt in a forked child,
        which must not reuse its parent's SQLite handles."""
        import os

        from shared.services.enforcement import sqlite_reader

        with self._lock:
            if self._sqlite_reader is None or self._sqlite_reader[0] != os.getpid():
                self._sqlite_reader = (os.getpid(), sqlite_reader(self.settings))
            return self._sqlite_reader[1]

    @cached_property
    def stream_redis(self):
        """A Redis client for blocking stream reads (shared/services/turn_events.py): the
        usual client fails fast, which a read blocked for seconds would trip."""
        from shared.services.turn_events import blocking_client

        return blocking_client(self.settings)

    @cached_property
    def broker_redis(self):
        """A client of the Celery broker's Redis, for the queue-depth metrics."""
        import redis

        return redis.Redis.from_url(
            self.settings.broker_url,
            socket_timeout=REDIS_SOCKET_TIMEOUT,
            socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
        )

    def reset_after_fork(self) -> None:
        """Drop connections inherited from a parent process."""
        if self._db is not None:
            self._db.engine.dispose(close=False)
            self._db = None
        for name in ("redis", "stream_redis", "broker_redis", "turn_waiter", "key_cache", "leases"):
            self.__dict__.pop(name, None)

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()
            self._db = None
        for name in ("turn_waiter", "key_cache", "leases"):
            component = self.__dict__.pop(name, None)
            if component is not None:
                component.close()
        for name in ("redis", "stream_redis", "broker_redis"):
            client = self.__dict__.pop(name, None)
            if client is not None:
                client.close()
