"""The name of every Celery task, in one place.

Tasks are declared with these names (``worker/tasks``), routed and scheduled by
them (``worker/celery_app.py``) and sent by them from services, which do not
import the worker (``send_task``). A name is part of the wire format: messages
already in a queue carry it, so renaming one is a migration, not a refactor.
"""

from __future__ import annotations

from enum import StrEnum


class TaskName(StrEnum):
    PING = "tollgate.ping"
    RUN_TURN = "tollgate.run_turn"
    REFRESH_SUMMARY = "tollgate.refresh_summary"
    RECOVER_STUCK_TURNS = "tollgate.recover_stuck_turns"
    EXPIRE_HOLDS = "tollgate.expire_holds"
    SYNC_ENFORCEMENT = "tollgate.sync_enforcement"
    INGEST_FILE = "tollgate.ingest_file"
    RECOVER_PENDING_FILES = "tollgate.recover_pending_files"
    DELIVER_WEBHOOK = "tollgate.deliver_webhook"
    DISPATCH_WEBHOOKS = "tollgate.dispatch_webhooks"
