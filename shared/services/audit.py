"""Admin audit events. Written inside the caller's transaction, so an action
and its audit record commit together or not at all."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import AdminAuditEvent


def record(
    session: Session,
    actor_id: str,
    action: str,
    *,
    target_type: str | None = None,
    target: str | None = None,
    details: dict[str, Any] | None = None,
) -> AdminAuditEvent:
    event = AdminAuditEvent(
        actor_id=actor_id,
        action=action,
        target_type=target_type,
        target=target,
        details=details or {},
    )
    session.add(event)
    return event


def list_events(session: Session):
    """Newest first, as a select the caller paginates."""
    return select(AdminAuditEvent).order_by(AdminAuditEvent.created_at.desc(), AdminAuditEvent.id.desc())
