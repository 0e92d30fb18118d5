"""One typed settings object, read from the environment once.

Every process builds a ``Settings`` at start-up (``Settings.from_env()``) and
passes it down; nothing reads ``os.environ`` anywhere else, so tests build a
``Settings`` directly instead of patching the environment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VAR_DIR = PROJECT_ROOT / "var"


class SettingsError(ValueError):
    """A configuration value is malformed; raised at start-up, never per request."""


def _bool(raw: str, name: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise SettingsError(f"{name} must be a boolean, got {raw!r}")


def _decimal(raw: str, name: str) -> Decimal:
    try:
        return Decimal(raw)
    except InvalidOperation as exc:
        raise SettingsError(f"{name} must be a decimal number, got {raw!r}") from exc


def _int(raw: str, name: str) -> int:
    try:
        return int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc


class _Env:
    """Typed reads of the environment; each names its variable once (and in its error)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.environ.get(name, default)

    def __getitem__(self, name: str) -> str:
        return self.environ[name]

    def bool(self, name: str, default: str) -> bool:
        return _bool(self.environ.get(name, default), name)

    def decimal(self, name: str, default: str) -> Decimal:
        return _decimal(self.environ.get(name, default), name)

    def int(self, name: str, default: str) -> int:
        return _int(self.environ.get(name, default), name)

    def seconds(self, name: str, default: str) -> float:
        return float(self.decimal(name, default))


def normalize_database_url(url: str) -> str:
    """Accept URLs as providers hand them out and pick our driver.

    ``postgres://`` (Heroku style) and ``postgresql://`` both become
    ``postgresql+psycopg://`` so SQLAlchemy uses psycopg 3.
    """
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:***@{netloc[1]}"))


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: str
    database_pool_url: str | None = None
    # Connections per process: a pool of this many, plus this many more under bursts.
    database_pool_size: int = 10
    database_max_overflow: int = 10
    redis_url: str | None = None
    celery_broker_url: str | None = None
    celery_result_backend: str | None = None
    billing_enforcement_enabled: bool = False
    low_balance_threshold: Decimal = Decimal("1.00")
    model_provider: str = "offline"
    openai_base_url: str | None = None
    openai_api_key: str | None = None
    # Per attempt (connect and each read); a call makes up to 3 attempts.
    openai_timeout_seconds: float = 60.0
    default_model: str = "offline-small"
    turn_wait_seconds: float = 30.0
    # How long a web process may reuse an API key it checked (0: check every request).
    auth_cache_seconds: float = 60.0
    # The offline model's pause between the pieces of a streamed answer (0 in tests).
    offline_stream_delay_seconds: float = 0.02
    # How long a turn's stream of events (Redis) is kept after its last event.
    turn_stream_ttl_seconds: int = 3600
    # POST /turns/{id}/cancel waits this long for the worker to stop the turn.
    turn_cancel_wait_seconds: float = 5.0
    max_upload_bytes: int = 10 * 1024 * 1024
    max_turn_chars: int = 32_000
    # Extraction bounds per uploaded file (a PDF bomb must not fill the database or a worker).
    max_extracted_chars: int = 2_000_000
    extraction_time_limit_seconds: float = 30.0
    hold_ttl_seconds: int = 900
    # A task (a turn: every model round, tool and retry of one attempt) gets this long before
    # it is stopped (turn_timeout); the hard limit is 60 s later.
    task_soft_time_limit_seconds: int = 240
    # A running turn whose worker stopped renewing its lease this long ago is taken over.
    turn_lease_seconds: int = 20
    turn_retry_base_seconds: float = 2.0
    # Hold sizing (docs/billing.md "Holds that bound the turn"): model calls a hold funds
    # besides the summary call (the answer plus one tool round), the tokens tool results
    # may add between rounds, and the factor on input estimates for tokenizers that
    # count more than our four-characters-per-token rule.
    hold_model_rounds: int = 2
    hold_tool_result_tokens: int = 2048
    hold_token_margin: Decimal = Decimal("1.25")
    var_dir: Path = DEFAULT_VAR_DIR
    log_level: str = "INFO"
    code_version: str = "dev"
    # Where every process on this host writes its Prometheus samples (docs/observability.md).
    prometheus_multiproc_dir: Path | None = None
    # If set, GET /metrics needs "Authorization: Bearer <token>".
    metrics_token: str | None = None
    # Proxies in front of the web process whose X-Forwarded-For/Proto/Host/Port are
    # trusted (0: none). Behind a TLS-terminating proxy, 1 makes the console's cookie Secure.
    trusted_proxies: int = 0
    # Webhooks (docs/webhooks.md): deliver to private/loopback addresses (tests, on-prem
    # receivers); per-request timeout; first retry delay (doubling, at most 1 h); give up after.
    webhook_allow_private: bool = False
    webhook_timeout_seconds: float = 5.0
    webhook_retry_base_seconds: float = 30.0
    webhook_max_age_seconds: int = 24 * 3600

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _Env(os.environ if environ is None else environ)
        var_dir = Path(env.get("TOLLGATE_VAR_DIR") or DEFAULT_VAR_DIR)
        database_url = env.get("DATABASE_URL") or f"sqlite:///{var_dir / 'tollgate.sqlite'}"
        provider = env.get("MODEL_PROVIDER", "offline").strip().lower() or "offline"
        if provider not in {"offline", "openai"}:
            raise SettingsError(f"MODEL_PROVIDER must be 'offline' or 'openai', got {provider!r}")
        default_model = env.get("DEFAULT_MODEL") or (
            "offline-small" if provider == "offline" else "gpt-4o-mini"
        )
        return cls(
            database_url=normalize_database_url(database_url),
            database_pool_url=normalize_database_url(env["DATABASE_POOL_URL"])
            if env.get("DATABASE_POOL_URL")
            else None,
            database_pool_size=env.int("DATABASE_POOL_SIZE", "10"),
            database_max_overflow=env.int("DATABASE_MAX_OVERFLOW", "10"),
            redis_url=env.get("REDIS_URL") or None,
            celery_broker_url=env.get("CELERY_BROKER_URL") or None,
            celery_result_backend=env.get("CELERY_RESULT_BACKEND") or None,
            billing_enforcement_enabled=env.bool("BILLING_ENFORCEMENT_ENABLED", "false"),
            low_balance_threshold=env.decimal("LOW_BALANCE_THRESHOLD", "1.00"),
            model_provider=provider,
            openai_base_url=env.get("OPENAI_BASE_URL") or None,
            openai_api_key=env.get("OPENAI_API_KEY") or None,
            openai_timeout_seconds=env.seconds("OPENAI_TIMEOUT_SECONDS", "60"),
            default_model=default_model,
            turn_wait_seconds=env.seconds("TURN_WAIT_SECONDS", "30"),
            auth_cache_seconds=env.seconds("AUTH_CACHE_SECONDS", "60"),
            offline_stream_delay_seconds=env.seconds("OFFLINE_STREAM_DELAY_SECONDS", "0.02"),
            turn_stream_ttl_seconds=max(3600, env.int("TURN_STREAM_TTL_SECONDS", "3600")),
            turn_cancel_wait_seconds=env.seconds("TURN_CANCEL_WAIT_SECONDS", "5"),
            max_upload_bytes=env.int("MAX_UPLOAD_BYTES", str(10 * 1024 * 1024)),
            hold_ttl_seconds=env.int("HOLD_TTL_SECONDS", "900"),
            max_extracted_chars=env.int("MAX_EXTRACTED_CHARS", "2000000"),
            extraction_time_limit_seconds=env.seconds("EXTRACTION_TIME_LIMIT_SECONDS", "30"),
            turn_lease_seconds=env.int("TURN_LEASE_SECONDS", "20"),
            task_soft_time_limit_seconds=env.int("TASK_SOFT_TIME_LIMIT_SECONDS", "240"),
            turn_retry_base_seconds=env.seconds("TURN_RETRY_BASE_SECONDS", "2"),
            hold_model_rounds=env.int("HOLD_MODEL_ROUNDS", "2"),
            hold_tool_result_tokens=env.int("HOLD_TOOL_RESULT_TOKENS", "2048"),
            hold_token_margin=env.decimal("HOLD_TOKEN_MARGIN", "1.25"),
            var_dir=var_dir,
            log_level=env.get("LOG_LEVEL", "INFO").upper(),
            code_version=env.get("TOLLGATE_VERSION") or env.get("SOURCE_VERSION") or _code_version(),
            prometheus_multiproc_dir=Path(env["PROMETHEUS_MULTIPROC_DIR"])
            if env.get("PROMETHEUS_MULTIPROC_DIR")
            else None,
            metrics_token=env.get("METRICS_TOKEN") or None,
            trusted_proxies=env.int("TRUSTED_PROXIES", "0"),
            webhook_allow_private=env.bool("WEBHOOK_ALLOW_PRIVATE", "false"),
            webhook_timeout_seconds=env.seconds("WEBHOOK_TIMEOUT_SECONDS", "5"),
            webhook_retry_base_seconds=env.seconds("WEBHOOK_RETRY_BASE_SECONDS", "30"),
            webhook_max_age_seconds=env.int("WEBHOOK_MAX_AGE_SECONDS", "86400"),
        )

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)

    def process_env(self, **extra: str) -> dict[str, str]:
        """The environment a Procfile process (gunicorn, celery) needs to load these
        settings' connections and var dir: this process's environment without its own
        database, Redis, Celery, billing and model variables, plus ``extra``. Used by the
        integration tests and the benchmarks to start real processes."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("DATABASE_", "REDIS_", "CELERY_", "BILLING_", "MODEL_", "OPENAI_"))
        }
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url or "",
            CELERY_BROKER_URL=self.broker_url,
            CELERY_RESULT_BACKEND=self.result_backend,
            TOLLGATE_VAR_DIR=str(self.var_dir),
        )
        if self.database_pool_url:
            env["DATABASE_POOL_URL"] = self.database_pool_url
        env.update(extra)
        return env

    @property
    def embedded(self) -> bool:
        """No Redis configured: the zero-server mode (SQLite, filesystem broker)."""
        return self.redis_url is None

    @property
    def runtime_database_url(self) -> str:
        """The URL web and worker connect with: the pooled one first (design §1)."""
        return self.database_pool_url or self.database_url

    @property
    def runtime_url_is_pooled(self) -> bool:
        return self.database_pool_url is not None

    @property
    def broker_url(self) -> str:
        if self.celery_broker_url:
            return self.celery_broker_url
        if self.redis_url:
            return self.redis_url
        return "filesystem://"

    @property
    def result_backend(self) -> str:
        if self.celery_result_backend:
            return self.celery_result_backend
        if self.redis_url:
            return self.redis_url
        return f"db+sqlite:///{self.var_dir / 'celery-results.sqlite'}"

    @property
    def metrics_dir(self) -> Path:
        """The Prometheus multiprocess directory: ``PROMETHEUS_MULTIPROC_DIR`` or ``<var>/metrics``."""
        return self.prometheus_multiproc_dir or self.var_dir / "metrics"

    @property
    def broker_folder(self) -> Path:
        """Where the embedded (filesystem) broker keeps its messages."""
        return self.var_dir / "broker"


def _code_version() -> str:
    try:
        from importlib.metadata import version

        base = version("tollgate")
    except Exception:  # not installed as a distribution (e.g. run from a checkout)
        base = "0.0.0"
    head = PROJECT_ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            sha = (PROJECT_ROOT / ".git" / ref[5:]).read_text().strip()
        else:
            sha = ref
        return f"{base}+{sha[:12]}"
    except OSError:
        return base
