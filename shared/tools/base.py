"""The types every tool shares: its context, its result, its declaration."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from shared.models import ToolCallStatus


@dataclass
class ToolContext:
    """Who is asking and what they may see. Tools never look outside this scope."""

    session: Session
    user_id: str
    room_id: str
    chat_session_id: str
    # Turns of the chat session with ``seq < before_seq`` are searchable (None: all of them).
    before_seq: int | None


@dataclass
class ToolResult:
    status: ToolCallStatus
    content: str  # what the model sees
    data: dict[str, Any] | None = None


class ToolError(Exception):
    """An expected failure a tool reports to the model (``status="error"``), e.g. "file not found"."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema of type "object"
    handler: Callable[..., ToolResult]  # handler(ctx, **validated_arguments)

    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": copy.deepcopy(self.parameters),
            },
        }
