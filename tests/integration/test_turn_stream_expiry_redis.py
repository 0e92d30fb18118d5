"""A turn's Redis Stream (and its cancel flag) expire ``TURN_STREAM_TTL_SECONDS`` after the
last write, never less than an hour (issue 14: "trimmed/expired after >= 1 h"). The
setting is clamped when read from the environment (tests/shared/test_turn_stream_ttl_setting.py)
and the writers clamp it again, so Settings built in code cannot make a stream vanish
before a client could resume it."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest
import redis as redis_lib

from shared.models import ToolCallEvent
from shared.services import turn_events
from shared.services.turn_events import TurnPublisher


@pytest.fixture
def client(redis_server_url):
    client = redis_lib.Redis.from_url(redis_server_url, socket_timeout=2)
    yield client
    client.close()


@pytest.mark.parametrize(("configured", "expected"), [(60, 3600), (7200, 7200)])
def test_every_write_to_a_turns_stream_sets_its_expiry_to_at_least_an_hour(client, configured, expected):
    runtime = SimpleNamespace(redis=client, settings=SimpleNamespace(turn_stream_ttl_seconds=configured))
    turn_id = f"ttl-{uuid.uuid4().hex}"
    stream, flag = turn_events.stream_key(turn_id), turn_events.cancel_key(turn_id)
    try:
        publisher = TurnPublisher(runtime, turn_id)
        publisher.delta("first piece")
        assert expected - 5 < client.ttl(stream) <= expected
        client.expire(stream, 10)  # a later write moves the expiry out again
        publisher.tool_call(ToolCallEvent(id="call-1", turn_id=turn_id, tool="search", arguments={}))
        assert expected - 5 < client.ttl(stream) <= expected
        turn_events.request_cancel(runtime, turn_id)
        assert expected - 5 < client.ttl(flag) <= expected
        client.expire(stream, 10)
        turn_events.publish_ended(runtime, turn_id)
        assert expected - 5 < client.ttl(stream) <= expected
        assert [entry[1] for entry in turn_events._read(client, stream, "0", block=None)] == [
            "delta",
            "tool_call",
            "end",
        ]
    finally:
        client.delete(stream, flag)
