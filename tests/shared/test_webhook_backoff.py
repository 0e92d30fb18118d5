"""The wait before a webhook delivery's next attempt: ``WEBHOOK_RETRY_BASE_SECONDS`` after
the first failure, doubling with each one, never more than an hour (docs/webhooks.md).
The whole schedule, against a receiver, up to ``failed``:
tests/integration/test_webhook_delivery_attempts_pg.py."""

import pytest

from shared.services.webhooks import MAX_BACKOFF_SECONDS, backoff_seconds


def test_the_wait_doubles_from_the_base_after_each_failed_attempt():
    assert [backoff_seconds(30, attempt) for attempt in range(1, 8)] == [30, 60, 120, 240, 480, 960, 1920]
    assert [backoff_seconds(0.5, attempt) for attempt in range(1, 5)] == [0.5, 1, 2, 4]


@pytest.mark.parametrize("attempt", [8, 9, 20, 200])
def test_the_wait_is_never_more_than_an_hour(attempt):
    assert MAX_BACKOFF_SECONDS == 3600
    assert backoff_seconds(30, attempt) == 3600


def test_a_base_above_the_cap_is_cut_to_it_and_a_first_attempt_waits_the_base():
    assert backoff_seconds(7200, 1) == 3600
    assert backoff_seconds(30, 0) == backoff_seconds(30, 1) == 30
