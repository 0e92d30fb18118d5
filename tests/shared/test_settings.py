from decimal import Decimal

import pytest

from shared.settings import Settings, SettingsError, mask_url, normalize_database_url


def test_defaults_are_the_embedded_mode(tmp_path):
    settings = Settings.from_env({"TOLLGATE_VAR_DIR": str(tmp_path)})
    assert settings.embedded
    assert settings.database_url == f"sqlite:///{tmp_path / 'tollgate.sqlite'}"
    assert settings.broker_url == "filesystem://"
    assert settings.result_backend.startswith("db+sqlite:///")
    assert settings.billing_enforcement_enabled is False
    assert settings.low_balance_threshold == Decimal("1.00")
    assert settings.model_provider == "offline"
    assert settings.turn_wait_seconds == 30
    assert settings.max_upload_bytes == 10 * 1024 * 1024


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"),
        ("postgresql://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_database_urls_are_accepted_as_providers_hand_them_out(given, expected):
    assert normalize_database_url(given) == expected


def test_web_and_worker_prefer_the_pooled_url_and_alembic_uses_the_direct_one():
    settings = Settings.from_env(
        {"DATABASE_URL": "postgres://u:secret@db/app", "DATABASE_POOL_URL": "postgres://u:secret@bouncer/app"}
    )
    assert settings.runtime_database_url == "postgresql+psycopg://u:secret@bouncer/app"
    assert settings.runtime_url_is_pooled
    assert settings.database_url == "postgresql+psycopg://u:secret@db/app"


def test_without_a_pooled_url_the_direct_url_is_used_everywhere():
    settings = Settings.from_env({"DATABASE_URL": "postgres://u@db/app"})
    assert settings.runtime_database_url == settings.database_url
    assert not settings.runtime_url_is_pooled


def test_redis_url_drives_broker_and_results_unless_set_apart():
    settings = Settings.from_env({"REDIS_URL": "redis://r:6379/0"})
    assert not settings.embedded
    assert settings.broker_url == settings.result_backend == "redis://r:6379/0"
    apart = Settings.from_env(
        {
            "REDIS_URL": "redis://r/0",
            "CELERY_BROKER_URL": "amqp://b//",
            "CELERY_RESULT_BACKEND": "redis://r/2",
        }
    )
    assert apart.broker_url == "amqp://b//"
    assert apart.result_backend == "redis://r/2"


def test_passwords_are_masked_in_logged_urls():
    assert (
        mask_url("postgresql+psycopg://user:s3cret@db:5432/app")
        == "postgresql+psycopg://user:***@db:5432/app"
    )
    assert mask_url("sqlite:///var/x.sqlite") == "sqlite:///var/x.sqlite"
    assert "s3cret" not in mask_url("redis://:s3cret@r:6379/0")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BILLING_ENFORCEMENT_ENABLED", "maybe"),
        ("LOW_BALANCE_THRESHOLD", "one"),
        ("MAX_UPLOAD_BYTES", "10MB"),
        ("MODEL_PROVIDER", "llama"),
    ],
)
def test_malformed_values_fail_at_start_up_with_the_variable_named(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_enforcement_default_reads_common_boolean_spellings():
    assert Settings.from_env({"BILLING_ENFORCEMENT_ENABLED": "true"}).billing_enforcement_enabled
    assert Settings.from_env({"BILLING_ENFORCEMENT_ENABLED": "1"}).billing_enforcement_enabled
    assert not Settings.from_env({"BILLING_ENFORCEMENT_ENABLED": "off"}).billing_enforcement_enabled


def test_process_env_carries_the_connections_and_drops_this_process_own(monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_PROVIDER", "openai")
    monkeypatch.setenv("DATABASE_POOL_URL", "postgresql://elsewhere/db")
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://db/x",
            "REDIS_URL": "redis://r:6379/3",
            "TOLLGATE_VAR_DIR": str(tmp_path),
        }
    )
    env = settings.process_env(LOG_LEVEL="WARNING")
    assert Settings.from_env(env).database_url == settings.database_url
    assert (env["REDIS_URL"], env["TOLLGATE_VAR_DIR"], env["LOG_LEVEL"]) == (
        "redis://r:6379/3",
        str(tmp_path),
        "WARNING",
    )
    assert "MODEL_PROVIDER" not in env and "DATABASE_POOL_URL" not in env
