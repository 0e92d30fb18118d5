"""Billing enforcement: effective state = the admin override if set, else ``BILLING_ENFORCEMENT_ENABLED``.

Where the override lives (design §4, decisions in ``docs/enforcement_rollout.md``):

- **Durable copy:** the ``settings`` row ``billing.enforcement_override``
  (``value = {"override": true|false|null}``, ``version`` +1 on every write).
- **Shared copy:** one Redis key, ``tollgate:enforcement``, holding
  ``{"override", "version", "updated_by", "updated_at"}``. Once initialised it
  is always present (``override`` may be null), so a *missing* key means Redis
  was restarted or flushed: the reader restores it from the DB and uses that.
- Every check is one ``GET`` of that key: no per-process cache, no pub/sub, so
  a change made by any process is seen by every other on its very next check.
- Writes go to the DB first (commit), then Redis via a compare-and-set on
  ``version``, so two racing admins can never leave the older value in Redis.
- **Redis unreachable:** a check uses the last state this process saw (or the
  DB copy if it saw none) and reports ``stale=True``; it never raises. After a
  failure the process waits ``RETRY_AFTER_FAILURE_SECONDS`` before trying
  Redis again, so a black-holed Redis costs one timeout per second, not one per
  request. A write (PATCH/DELETE) is refused with 503
  ``enforcement_store_unavailable`` and changes nothing, so processes can never
  disagree once Redis is back. The beat job ``tollgate.sync_enforcement``
  re-pushes the DB copy if Redis ever holds an older version (e.g. a Redis
  restored from an old snapshot, or a failure between the DB commit and the SET).
- **Embedded mode** (no Redis): the DB row is read on every check.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from redis.exceptions import RedisError
from sqlalchemy import create_engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from shared.db import utcnow
from shared.errors import ServiceUnavailable
from shared.models import SettingEntry, WebhookEventType
from shared.runtime import Runtime
from shared.services import audit, webhooks

log = logging.getLogger(__name__)

REDIS_KEY = "tollgate:enforcement"
SETTING_KEY = "billing.enforcement_override"
RETRY_AFTER_FAILURE_SECONDS = 1.0
WRITE_ATTEMPTS = 3

# Set the key only if it is missing or holds an older version: the newest write always wins.
_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, decoded = pcall(cjson.decode, current)
  if ok and type(decoded) == 'table' and tonumber(decoded['version'])
     and tonumber(decoded['version']) >= tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class EnforcementState:
    enabled: bool  # the effective state
    source: str  # "override" | "default"
    default_enabled: bool
    override: bool | None
    updated_by: str | None
    updated_at: datetime | None
    stale: bool = False  # Redis was unreachable: this is the last state this process saw
    version: int = 0


@dataclass(frozen=True)
class _Stored:
    """What the DB row and the Redis key hold."""

    override: bool | None = None
    version: int = 0
    updated_by: str | None = None
    updated_at: datetime | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "override": self.override,
                "version": self.version,
                "updated_by": self.updated_by,
                "updated_at": self.updated_at.isoformat() if self.updated_at else None,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> _Stored:
        data = json.loads(raw)
        override = data["override"]
        if override is not None and not isinstance(override, bool):
            raise ValueError(f"bad override {override!r}")
        updated_at = datetime.fromisoformat(data["updated_at"]) if data.get("updated_at") else None
        return cls(override, int(data["version"]), data.get("updated_by"), updated_at)


class ProcessMemory:
    """The last state this process saw, for when Redis is unreachable."""

    def __init__(self, _settings=None) -> None:
        self.lock = threading.Lock()
        self.last: _Stored | None = None
        self.failed_at: float | None = None
        self.last_error: str | None = None

    def seen(self, stored: _Stored) -> None:
        with self.lock:
            self.last = stored
            self.failed_at = None
            self.last_error = None

    def failed(self, exc: Exception) -> None:
        with self.lock:
            self.failed_at = time.monotonic()
            self.last_error = type(exc).__name__

    def backing_off(self) -> bool:
        failed_at = self.failed_at
        return failed_at is not None and time.monotonic() - failed_at < RETRY_AFTER_FAILURE_SECONDS


def _memory(runtime: Runtime) -> ProcessMemory:
    return runtime.enforcement_memory


# -- the durable copy ----------------------------------------------------------------------


def sqlite_reader(settings) -> sessionmaker:
    # The main SQLite engine opens every transaction with BEGIN IMMEDIATE. A check
    # made while the caller's own transaction holds that lock (turn admission does)
    # would wait on itself; this engine's plain SELECTs run without a transaction,
    # and WAL lets them read beside a writer.
    engine = create_engine(
        settings.runtime_database_url, connect_args={"timeout": 30, "check_same_thread": False}
    )
    return sessionmaker(engine, expire_on_commit=False)


def _reader(runtime: Runtime) -> sessionmaker:
    if runtime.db.dialect != "sqlite":
        return runtime.db.sessionmaker
    return runtime.sqlite_reader


def _from_row(row: SettingEntry | None) -> _Stored:
    if row is None:
        return _Stored()
    value = row.value if isinstance(row.value, dict) else {}
    override = value.get("override")
    return _Stored(
        override if isinstance(override, bool) else None, row.version or 0, row.updated_by, row.updated_at
    )


def _read_db(runtime: Runtime) -> _Stored:
    with _reader(runtime)() as session:
        stored = _from_row(session.get(SettingEntry, SETTING_KEY))
        session.rollback()
        return stored


# -- the shared copy -----------------------------------------------------------------------


def _push(client, stored: _Stored) -> bool:
    """Compare-and-set into Redis; True if Redis now holds this version."""
    return bool(client.eval(_COMPARE_AND_SET, 1, REDIS_KEY, stored.to_json(), stored.version))


def _state(runtime: Runtime, stored: _Stored, *, stale: bool) -> EnforcementState:
    default_enabled = runtime.settings.billing_enforcement_enabled
    enabled = default_enabled if stored.override is None else stored.override
    return EnforcementState(
        enabled=enabled,
        source="default" if stored.override is None else "override",
        default_enabled=default_enabled,
        override=stored.override,
        updated_by=stored.updated_by,
        updated_at=stored.updated_at,
        stale=stale,
        version=stored.version,
    )


def _fallback(runtime: Runtime, memory: ProcessMemory) -> EnforcementState:
    stored = memory.last
    if stored is None:
        try:
            stored = _read_db(runtime)
        except Exception:  # DB away too: the configured default is all that is left
            log.warning("enforcement: Redis and the database are unreachable; using the default")
            stored = _Stored()
    return _state(runtime, stored, stale=True)


def current_state(runtime: Runtime) -> EnforcementState:
    """The effective enforcement state, read fresh (one Redis GET) on every call. Never raises
    for Redis trouble: see the module docstring for the stale behaviour."""
    if runtime.redis is None:
        return _state(runtime, _read_db(runtime), stale=False)
    memory = _memory(runtime)
    if memory.backing_off():
        return _fallback(runtime, memory)
    try:
        raw = runtime.redis.get(REDIS_KEY)
        stored = None
        if raw is not None:
            try:
                stored = _Stored.from_json(raw)
            except (ValueError, KeyError, TypeError):
                log.warning("enforcement: unreadable Redis value %r; restoring from the database", raw)
                runtime.redis.delete(REDIS_KEY)
        if stored is None:
            # Missing key: Redis restarted or was flushed. Restore the durable copy.
            stored = _read_db(runtime)
            _push(runtime.redis, stored)
            log.info("enforcement: restored %s into Redis (version %d)", REDIS_KEY, stored.version)
    except RedisError as exc:
        if memory.failed_at is None:
            log.warning("enforcement: Redis unreachable (%s); using the last state seen", exc)
        memory.failed(exc)
        return _fallback(runtime, memory)
    memory.seen(stored)
    return _state(runtime, stored, stale=False)


def is_enforced(runtime: Runtime) -> bool:
    return current_state(runtime).enabled


# -- writes --------------------------------------------------------------------------------


def _write(session: Session, runtime: Runtime, *, actor_id: str, override: bool | None) -> EnforcementState:
    if runtime.redis is not None:
        try:
            runtime.redis.ping()
        except RedisError as exc:
            _memory(runtime).failed(exc)
            raise ServiceUnavailable(
                "Redis is unreachable, so the change could not reach every process; nothing was "
                "changed. Every process keeps the last state it saw. Retry when Redis is back.",
                error="enforcement_store_unavailable",
            ) from exc
    for attempt in range(WRITE_ATTEMPTS):
        try:
            row = session.scalar(
                select(SettingEntry)
                .where(SettingEntry.key == SETTING_KEY)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
            if row is None:
                row = SettingEntry(key=SETTING_KEY, version=0)
                session.add(row)
            row.value = {"override": override}
            row.version = (row.version or 0) + 1
            row.updated_by = actor_id
            row.updated_at = utcnow()
            audit.record(
                session,
                actor_id,
                "enforcement.override.set" if override is not None else "enforcement.override.clear",
                target_type="setting",
                target=SETTING_KEY,
                details={"override": override, "version": row.version},
            )
            webhooks.emit(
                session,
                WebhookEventType.ENFORCEMENT_CHANGED,
                {
                    "enabled": runtime.settings.billing_enforcement_enabled if override is None else override,
                    "override": override,
                    "default_enabled": runtime.settings.billing_enforcement_enabled,
                    "updated_by": actor_id,
                    "version": row.version,
                },
            )
            session.commit()
            break
        except IntegrityError:
            # Two first-ever writes raced to insert the row; the loser retries as an update.
            session.rollback()
            if attempt == WRITE_ATTEMPTS - 1:
                raise
    stored = _from_row(row)
    if runtime.redis is None:
        return _state(runtime, stored, stale=False)
    try:
        _push(runtime.redis, stored)
    except RedisError as exc:
        # The DB is authoritative; tollgate.sync_enforcement pushes it once Redis answers.
        log.warning("enforcement: saved version %d but could not update Redis: %s", stored.version, exc)
        _memory(runtime).failed(exc)
        return _state(runtime, stored, stale=True)
    _memory(runtime).seen(stored)
    return _state(runtime, stored, stale=False)


def set_override(session: Session, runtime: Runtime, *, actor_id: str, enabled: bool) -> EnforcementState:
    """Force enforcement on or off for every process; audited. Commits.

    :raises ServiceUnavailable: ``enforcement_store_unavailable`` when Redis is configured
        but unreachable (nothing changed).
    """
    return _write(session, runtime, actor_id=actor_id, override=bool(enabled))


def clear_override(session: Session, runtime: Runtime, *, actor_id: str) -> EnforcementState:
    """Back to ``BILLING_ENFORCEMENT_ENABLED``; audited. Commits. Idempotent.

    :raises ServiceUnavailable: as :func:`set_override`.
    """
    return _write(session, runtime, actor_id=actor_id, override=None)


def sync_to_redis(runtime: Runtime) -> dict:
    """Beat job: make sure Redis holds at least the DB's version of the override."""
    if runtime.redis is None:
        return {"pushed": False, "detail": "embedded mode"}
    stored = _read_db(runtime)
    try:
        pushed = _push(runtime.redis, stored)
    except RedisError as exc:
        return {"pushed": False, "detail": type(exc).__name__}
    if pushed:
        log.warning("enforcement: Redis was behind the database; pushed version %d", stored.version)
    return {"pushed": pushed, "version": stored.version}


# -- reads for operators -------------------------------------------------------------------


def redis_status(runtime: Runtime) -> dict:
    """For readiness: can this process read the shared override?"""
    if runtime.redis is None:
        return {"ok": True, "detail": "embedded mode: the override is read from the database"}
    try:
        runtime.redis.ping()
        return {"ok": True}
    except RedisError as exc:
        memory = _memory(runtime)
        return {
            "ok": False,
            "detail": type(exc).__name__,
            "enforcement": "using the last state this process saw" if memory.last else "using the DB copy",
        }


def settings_overview(runtime: Runtime) -> dict:
    """``AdminSettingsRead``: the enforcement state and the billing-related settings."""
    settings = runtime.settings
    return {
        "enforcement": current_state(runtime),
        "low_balance_threshold": settings.low_balance_threshold,
        "default_model": settings.default_model,
        "model_provider": settings.model_provider,
    }
