"""SQLAlchemy models, one module per aggregate. Importing this package registers them all."""

from shared.models.audit import AdminAuditEvent, SettingEntry
from shared.models.billing import Hold, LedgerEntry, ModelPrice, UsageRollup, Wallet
from shared.models.chat import ChatSession, Room, ToolCallEvent, Turn
from shared.models.files import UploadedFile
from shared.models.users import ApiKey, User

__all__ = [
    "AdminAuditEvent",
    "ApiKey",
    "ChatSession",
    "Hold",
    "LedgerEntry",
    "ModelPrice",
    "Room",
    "SettingEntry",
    "ToolCallEvent",
    "Turn",
    "UploadedFile",
    "UsageRollup",
    "User",
    "Wallet",
]
