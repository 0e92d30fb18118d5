"""Per-key locks (shared/keyed_locks.py): one holder per key, other keys never wait, and a
key is forgotten once nobody holds or waits for it."""

import threading
import time

from shared.keyed_locks import KeyedLocks


def test_holders_of_one_key_take_turns_and_other_keys_do_not_wait():
    locks = KeyedLocks()
    inside: list[str] = []
    most = {"a": 0}
    other_done = threading.Event()

    def hold(key: str) -> None:
        with locks.holding(key):
            inside.append(key)
            most[key] = max(most.get(key, 0), inside.count(key))
            time.sleep(0.05)
            inside.remove(key)

    with locks.holding("a"):
        threads = [threading.Thread(target=hold, args=("a",)) for _ in range(5)]
        for thread in threads:
            thread.start()
        other = threading.Thread(target=lambda: (hold("b"), other_done.set()))
        other.start()
        assert other_done.wait(2), "a key that nobody holds waited on another key"
        assert "a" not in inside  # still ours: nobody else got in
    for thread in threads:
        thread.join(5)
    assert most["a"] == 1
    assert len(locks) == 0


def test_a_key_is_released_when_its_holder_raises():
    locks = KeyedLocks()
    try:
        with locks.holding("a"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert len(locks) == 0
    with locks.holding("a"):
        assert len(locks) == 1
