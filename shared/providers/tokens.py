"""Deterministic token estimates.

Used by the offline model (its "real" counts), by the ``openai`` provider when a
server omits ``usage``, and by billing for the worst-case input estimate of a
hold. One rule everywhere — about four characters per token, like the
English-text average of OpenAI's tokenizers — so the estimate a hold is based on
and the count the offline model bills can be compared.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

CHARS_PER_TOKEN = 4
# Chat formats wrap every message in a few marker tokens (role, separators).
MESSAGE_OVERHEAD_TOKENS = 4
# ...and prime the assistant's reply with a few more, once per request.
REPLY_PRIMING_TOKENS = 3


def count_tokens(text: str | None) -> int:
    """Tokens in ``text``: ``ceil(len / 4)``, 0 for empty text, at least 1 otherwise."""
    if not text:
        return 0
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def content_text(content: Any) -> str:
    """The text of a message's ``content``: a string, ``None``, or a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return str(content)


def _tool_call_text(tool_calls: Iterable[Any]) -> str:
    pieces = []
    for call in tool_calls:
        if not isinstance(call, dict):
            continue
        function = call.get("function") or {}
        name = function.get("name") or ""
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments or {}, sort_keys=True)
        pieces.append(f"{name}{arguments}")
    return "".join(pieces)


def count_message_tokens(messages: list[dict]) -> int:
    """Tokens of a chat request's messages.

    Each message costs its content, its name, the function names and argument
    text of its tool calls, plus a fixed per-message overhead; a non-empty
    request adds the reply priming once.
    """
    if not messages:
        return 0
    # The same rule as count_tokens, inlined for the common message (string content, no
    # name, no tool calls): a turn's budget counts its context several times per call.
    total = REPLY_PRIMING_TOKENS + MESSAGE_OVERHEAD_TOKENS * len(messages)
    for message in messages:
        content = message.get("content")
        if type(content) is str:
            total += (len(content) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
        else:
            total += count_tokens(content_text(content))
        name = message.get("name")
        if name:
            total += count_tokens(name)
        tool_calls = message.get("tool_calls")
        if tool_calls:
            total += count_tokens(_tool_call_text(tool_calls))
    return total


def count_tool_schema_tokens(tools: list[dict] | None) -> int:
    """Tokens the tool schemas add to a request (their compact JSON text)."""
    if not tools:
        return 0
    return count_tokens(json.dumps(tools, sort_keys=True, separators=(",", ":")))


def truncate_to_tokens(text: str, max_tokens: int) -> tuple[str, bool]:
    """``text`` cut to at most ``max_tokens`` tokens, at a word boundary when one is near.

    :returns: the text and whether it was cut.
    """
    if count_tokens(text) <= max_tokens:
        return text, False
    limit = max(0, max_tokens) * CHARS_PER_TOKEN
    cut = text[:limit]
    space = cut.rfind(" ")
    if space >= limit * 3 // 4:
        cut = cut[:space]
    return cut.rstrip(), True
