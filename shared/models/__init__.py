"""SQLAlchemy models, one module per aggregate. Importing this package registers them all."""

from shared.models.audit import AdminAuditEvent, SettingEntry
from shared.models.billing import (
    ALL_USERS,
    ALL_USERS_AT_30,
    ALL_USERS_SCOPES,
    SYSTEM_ACTOR,
    Hold,
    HoldStatus,
    LedgerEntry,
    LedgerKind,
    ModelPrice,
    UsageHour,
    Wallet,
)
from shared.models.chat import ChatSession, Room, ToolCallEvent, ToolCallStatus, Turn, TurnKind, TurnStatus
from shared.models.files import FileStatus, UploadedFile
from shared.models.limits import ApiKeySpend, Limit, LimitSubject, SpendPeriod
from shared.models.users import AdminSession, ApiKey, Role, User
from shared.models.webhooks import (
    DeliveryStatus,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
    WebhookEventType,
)

__all__ = [
    "ALL_USERS",
    "ALL_USERS_AT_30",
    "ALL_USERS_SCOPES",
    "SYSTEM_ACTOR",
    "ApiKeySpend",
    "DeliveryStatus",
    "Limit",
    "LimitSubject",
    "SpendPeriod",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookEvent",
    "WebhookEventType",
    "AdminAuditEvent",
    "AdminSession",
    "ApiKey",
    "ChatSession",
    "FileStatus",
    "Hold",
    "HoldStatus",
    "LedgerEntry",
    "LedgerKind",
    "ModelPrice",
    "Role",
    "Room",
    "SettingEntry",
    "ToolCallEvent",
    "ToolCallStatus",
    "Turn",
    "TurnKind",
    "TurnStatus",
    "UploadedFile",
    "UsageHour",
    "User",
    "Wallet",
]
