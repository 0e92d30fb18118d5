"""A turn's end is pushed through real Redis: a waiting request wakes on the publish,
without re-reading the turn in between; a lost push costs one safety re-read."""

from __future__ import annotations

import threading
import time

import pytest
import redis as redis_lib

from shared.services import turn_events
from shared.services.turn_events import TurnWaiter
from shared.settings import Settings


class FakeRuntime:
    """What ``publish_ended`` reads of a runtime: its Redis client and settings."""

    def __init__(self, client):
        self.redis = client
        self.settings = Settings.from_env({})


@pytest.fixture
def waiters():
    made: list[TurnWaiter] = []
    yield made
    for waiter in made:
        waiter.close()
    time.sleep(1.1)  # their subscribers notice within a second


@pytest.fixture
def client(redis_server_url):
    client = redis_lib.Redis.from_url(redis_server_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    yield client
    client.close()


def test_a_waiter_wakes_on_the_push_and_reads_the_turn_only_then(client, monkeypatch, waiters):
    monkeypatch.setattr(turn_events, "SAFETY_POLL_SECONDS", 60.0)
    waiter = TurnWaiter(client)
    waiters.append(waiter)
    done = threading.Event()
    reads = []

    def finished():
        reads.append(time.monotonic())
        return done.is_set()

    def end_later():
        time.sleep(0.3)
        done.set()
        turn_events.publish_ended(FakeRuntime(client), "turn-1")

    threading.Thread(target=end_later).start()
    started = time.monotonic()
    assert waiter.wait("turn-1", timeout=30, finished=finished) is True
    assert time.monotonic() - started < 5  # woken by the push, not by the deadline
    # One read after subscribing, one on the push: no polling in between.
    assert len(reads) == 2


def test_a_push_for_another_turn_does_not_end_the_wait(client, monkeypatch, waiters):
    monkeypatch.setattr(turn_events, "SAFETY_POLL_SECONDS", 60.0)
    waiter = TurnWaiter(client)
    waiters.append(waiter)
    reads = []

    def other_turn_ends():
        time.sleep(0.3)
        turn_events.publish_ended(FakeRuntime(client), "turn-other")

    threading.Thread(target=other_turn_ends).start()
    assert waiter.wait("turn-2", timeout=1.0, finished=lambda: reads.append(1) and False) is False
    assert len(reads) == 2  # the first read and the one at the deadline


def test_a_lost_push_is_caught_by_the_safety_reread(client, monkeypatch, waiters):
    monkeypatch.setattr(turn_events, "SAFETY_POLL_SECONDS", 0.2)
    waiter = TurnWaiter(client)
    waiters.append(waiter)
    done = threading.Event()
    threading.Timer(0.3, done.set).start()  # ends without publishing
    assert waiter.wait("turn-3", timeout=10, finished=done.is_set) is True


def test_many_waiters_in_one_process_share_one_subscription(client, monkeypatch, waiters):
    monkeypatch.setattr(turn_events, "SAFETY_POLL_SECONDS", 60.0)
    # Pub/sub channels span Redis's databases: count only the subscription made here.
    others = client.pubsub_numsub(turn_events.CHANNEL)[0][1]
    waiter = TurnWaiter(client)
    waiters.append(waiter)
    ended: set[str] = set()
    results = {}

    def wait(n):
        results[n] = waiter.wait(f"turn-{n}", timeout=30, finished=lambda: f"turn-{n}" in ended)

    threads = [threading.Thread(target=wait, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    for n in range(50):
        ended.add(f"turn-{n}")
        turn_events.publish_ended(FakeRuntime(client), f"turn-{n}")
    started = time.monotonic()
    for thread in threads:
        thread.join(10)
    assert time.monotonic() - started < 5  # the pushes woke them, not their deadlines
    assert results == {n: True for n in range(50)}
    subscribers = client.pubsub_numsub(turn_events.CHANNEL)[0][1]
    assert subscribers == others + 1


def test_a_wait_that_starts_the_turn_itself_reads_nothing_before_the_push(client, monkeypatch, waiters):
    # The sync POST: the wait is registered, then ``start`` enqueues the turn. Even a turn
    # that ends at once (its push published inside ``start``) is heard, and the only read
    # is the one the push asks for.
    monkeypatch.setattr(turn_events, "SAFETY_POLL_SECONDS", 60.0)
    waiter = TurnWaiter(client)
    waiters.append(waiter)
    waiter.wait("warm-up", timeout=0.01, finished=lambda: False)  # subscribed from now on
    reads = []

    def start():
        turn_events.publish_ended(FakeRuntime(client), "turn-at-once")

    def finished():
        reads.append(1)
        return True

    started = time.monotonic()
    assert waiter.wait("turn-at-once", timeout=30, finished=finished, start=start) is True
    assert time.monotonic() - started < 5
    assert reads == [1]


def stream_events(client, turn_id):
    return [fields[b"event"].decode() for _id, fields in client.xrange(turn_events.stream_key(turn_id))]


def test_a_live_stream_sends_its_first_piece_at_once_a_quiet_one_batches(client, monkeypatch):
    monkeypatch.setattr(turn_events, "QUIET_COALESCE_SECONDS", 0.3)
    runtime = FakeRuntime(client)
    live = turn_events.TurnPublisher(runtime, "live-turn", live=True)
    quiet = turn_events.TurnPublisher(runtime, "quiet-turn", live=False)
    try:
        for publisher in (live, quiet):
            publisher.delta("Hello")
            publisher.delta(", world")
        assert stream_events(client, "live-turn") == ["delta"]  # the first piece, at once
        assert stream_events(client, "quiet-turn") == []  # nobody asked to stream: it waits
        time.sleep(0.35)
        quiet.delta("!")  # its interval passed: everything so far, in one entry
        assert stream_events(client, "quiet-turn") == ["delta"]
        data = client.xrange(turn_events.stream_key("quiet-turn"))[0][1][b"data"]
        assert b"Hello, world!" in data
    finally:
        client.delete(turn_events.stream_key("live-turn"), turn_events.stream_key("quiet-turn"))
