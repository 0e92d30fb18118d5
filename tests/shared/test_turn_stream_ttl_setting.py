"""``TURN_STREAM_TTL_SECONDS``: how long a turn's stream outlives its last event, never
less than an hour (issue 14). The writers' own clamp, on real Redis:
tests/integration/test_turn_stream_expiry_redis.py."""

import pytest

from shared.settings import Settings, SettingsError


@pytest.mark.parametrize(("given", "expected"), [(None, 3600), ("1", 3600), ("3599", 3600), ("7200", 7200)])
def test_the_setting_is_at_least_an_hour(tmp_path, given, expected):
    env = {"TOLLGATE_VAR_DIR": str(tmp_path)}
    if given is not None:
        env["TURN_STREAM_TTL_SECONDS"] = given
    assert Settings.from_env(env).turn_stream_ttl_seconds == expected


def test_a_setting_that_is_not_a_number_is_refused(tmp_path):
    with pytest.raises(SettingsError):
        Settings.from_env({"TOLLGATE_VAR_DIR": str(tmp_path), "TURN_STREAM_TTL_SECONDS": "an hour"})
