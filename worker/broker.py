"""Celery's Redis transport, with one Redis client per channel instead of one per call.

kombu's Redis channel builds a new ``redis.Redis`` for every publish and every
acknowledgement (``Channel.conn_or_acquire``), and redis-py copies its ~170 response
callbacks into each new client: measured, about a third of the turn worker's Redis CPU
(three clients a turn) and one per enqueue in the web. A ``redis.Redis`` is only a handle
on the channel's connection pool (each command borrows a pooled connection), so one per
channel serves every greenlet or thread; pipelines are still made per use.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import cached_property

from kombu.transport import redis as kombu_redis

# What `broker_transport` names for a redis:// broker URL (worker/celery_app.py).
TRANSPORT = "worker.broker:Transport"


class Channel(kombu_redis.Channel):
    @cached_property
    def _shared_client(self):
        return self._create_client()

    @contextmanager
    def conn_or_acquire(self, client=None):
        yield client or self._shared_client


class Transport(kombu_redis.Transport):
    Channel = Channel
