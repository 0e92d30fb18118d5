"""The OpenAI-compatible endpoint's rules (design §7): who calls, in which session, with
which request; each call is a turn through the same submit, worker, holds and ledger.

- **Who**: the bearer key of ``Authorization`` (a Tollgate API key), as everywhere.
- **Where**: the session named by ``X-Tollgate-Session`` (the caller's own, else 404), or
  the key's default session, created on its first call in a room "OpenAI API" and kept on
  the key (``api_keys.default_session_id``). Every call is then a turn of that session,
  visible through ``/api/v1``.
- **What**: the caller's ``messages`` are the whole context of the turn (the runner adds
  no room context, summary or tools); the last user message is the turn's ``content``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import InvalidInput, Unauthorized
from shared.models import ApiKey, ChatSession, Room, Turn
from shared.providers.tokens import content_text
from shared.services import auth, pricing
from shared.services.rooms import owned_session

DEFAULT_ROOM_NAME = "OpenAI API"
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
DEFAULT_MAX_TOKENS = 512
MAX_TOKENS_LIMIT = 8192
# The caller's whole conversation is the context: bounded, as a turn's content is.
MESSAGES_CHARS_FACTOR = 8
UNSUPPORTED = ("functions", "function_call", "n", "logprobs", "response_format")
# The one value of an unsupported parameter that asks for nothing (its default), typed:
# ``True == 1`` in Python, and ``logprobs: true`` must not pass for ``n: 1``.
UNSUPPORTED_DEFAULTS = {"n": (int, 1), "logprobs": (bool, False)}
MAX_TOOLS = 128


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    messages: list[dict]
    content: str
    max_tokens: int
    stream: bool
    include_usage: bool
    tools: list[dict] | None = None

    def turn_data(self) -> dict:
        return {
            "content": self.content,
            "model": self.model,
            "max_output_tokens": self.max_tokens,
            "messages": self.messages,
            "tools": self.tools,
        }


def caller(session: Session, secret: str | None, *, cache=None) -> tuple[auth.Caller, ApiKey]:
    """The caller and the key they called with (``cache``: the process's key cache).

    :raises Unauthorized: missing, unknown or revoked key."""
    who = auth.authenticate(session, secret, cache=cache)
    key = session.get(ApiKey, who.key_id)
    if key is None:  # pragma: no cover - keys are never deleted
        raise Unauthorized()
    return who, key


def chat_session(session: Session, user: auth.Caller, key: ApiKey, named: str | None) -> ChatSession:
    """The session this call is recorded in. Commits when it creates the key's default one.

    :raises NotFound: ``X-Tollgate-Session`` names no session of the caller's.
    """
    if named:
        return owned_session(session, user.id, named.strip())
    if key.default_session_id:
        chat = session.get(ChatSession, key.default_session_id)
        if chat is not None and chat.user_id == user.id:
            return chat
    # Locked so two first calls with one key make one default session.
    key = session.scalar(select(ApiKey).where(ApiKey.id == key.id).with_for_update())
    chat = session.get(ChatSession, key.default_session_id) if key.default_session_id else None
    if chat is None:
        room = Room(user_id=user.id, name=DEFAULT_ROOM_NAME)
        session.add(room)
        session.flush()
        chat = ChatSession(room_id=room.id, user_id=user.id, title=f"OpenAI API ({key.prefix}…)")
        session.add(chat)
        session.flush()
        key.default_session_id = chat.id
    session.commit()
    return chat


def _invalid(message: str, param: str | None = None, error: str = "invalid_request") -> InvalidInput:
    return InvalidInput(message, error=error, field=param)


def parse_request(body: object, *, max_turn_chars: int) -> CompletionRequest:
    """OpenAI's chat completion request, checked.

    :raises InvalidInput: the body is not a usable request (``invalid_request``), or asks
        for what this endpoint does not do (``unsupported_parameter``).
    """
    if not isinstance(body, dict):
        raise _invalid("The body must be a JSON object.")
    for name in UNSUPPORTED:
        value = body.get(name)
        if value is not None and (type(value), value) != UNSUPPORTED_DEFAULTS.get(name):
            raise _invalid(f"'{name}' is not supported by this endpoint.", name, "unsupported_parameter")
    tools = _tools(body.get("tools"), body.get("tool_choice"))
    model = body.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > 200:
        raise _invalid("'model' must be a model name.", "model")
    messages = _messages(body.get("messages"), max_turn_chars)
    content = _last_user_content(messages, max_turn_chars)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if (
        not isinstance(max_tokens, int)
        or isinstance(max_tokens, bool)
        or not 1 <= max_tokens <= MAX_TOKENS_LIMIT
    ):
        raise _invalid(f"'max_tokens' must be an integer in 1..{MAX_TOKENS_LIMIT}.", "max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("'stream' must be a boolean.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _invalid("'stream_options' must be an object.", "stream_options")
    return CompletionRequest(
        model=model.strip(),
        messages=messages,
        content=content,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        tools=tools,
    )


def _messages(raw_messages: object, max_turn_chars: int) -> list[dict]:
    """The conversation, each message normalized (:func:`_message`), within the size cap."""
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _invalid("'messages' must be a non-empty list.", "messages")
    messages = [_message(index, message) for index, message in enumerate(raw_messages)]
    total = sum(map(_chars, messages))
    if total > max_turn_chars * MESSAGES_CHARS_FACTOR:
        raise _invalid("The messages are too long.", "messages", "context_length_exceeded")
    return messages


def _chars(message: dict) -> int:
    """What a message weighs against the size cap: its text and its tool calls' JSON."""
    size = len(message["content"] or "")
    if "tool_calls" in message:
        size += len(json.dumps(message["tool_calls"]))
    return size


def _message(index: int, message: object) -> dict:
    """One message as the pipeline takes it: text content, ``developer`` as ``system``, an
    assistant's tool calls and a tool result's ``tool_call_id`` checked."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise _invalid(f"messages[{index}] needs a role among {sorted(ROLES)}.", "messages")
    raw = message.get("content")
    if raw is not None and not isinstance(raw, str | list):
        raise _invalid(f"messages[{index}].content must be a string or a list of parts.", "messages")
    text = content_text(raw) if raw is not None else ""
    if "\x00" in text:
        raise _invalid(f"messages[{index}].content holds a NUL character.", "messages")
    role = "system" if message["role"] == "developer" else message["role"]
    normalized: dict = {"role": role, "content": text}
    if role == "assistant" and message.get("tool_calls"):
        normalized["tool_calls"] = _message_tool_calls(message["tool_calls"], index)
        normalized["content"] = text or None
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id or len(call_id) > 200:
            raise _invalid(f"messages[{index}] (a tool result) needs its tool_call_id.", "messages")
        normalized["tool_call_id"] = call_id
    return normalized


def _last_user_content(messages: list[dict], max_turn_chars: int) -> str:
    """The turn's content: the last user message's, which must say something and fit a turn."""
    last_user = next((m for m in reversed(messages) if m["role"] == "user"), None)
    if last_user is None or not last_user["content"].strip():
        raise _invalid("The messages need a user message with content.", "messages")
    if len(last_user["content"]) > max_turn_chars:
        raise _invalid(f"The last user message is longer than {max_turn_chars} characters.", "messages")
    return last_user["content"]


def _tools(tools: object, tool_choice: object) -> list[dict] | None:
    """The caller's function tools, checked; offered to the model as they are.
    ``tool_choice``: ``auto`` (the default) or ``none`` (no tools offered); forcing a call
    is not supported."""
    if tool_choice not in (None, "auto", "none"):
        raise _invalid("'tool_choice' may be 'auto' or 'none' here.", "tool_choice", "unsupported_parameter")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise _invalid(f"'tools' must be a list of at most {MAX_TOOLS} function tools.", "tools")
    checked = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if (
            not isinstance(function, dict)
            or tool.get("type", "function") != "function"
            or not isinstance(name, str)
            or not 0 < len(name) <= 64
        ):
            raise _invalid(
                f"tools[{index}] must be {{'type': 'function', 'function': {{'name', …}}}}.", "tools"
            )
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _invalid(f"tools[{index}].function.parameters must be a JSON Schema object.", "tools")
        checked.append({"type": "function", "function": function})
    return None if tool_choice == "none" else checked


def _message_tool_calls(calls: object, index: int) -> list[dict]:
    if not isinstance(calls, list):
        raise _invalid(f"messages[{index}].tool_calls must be a list.", "messages")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(call.get("id"), str)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments", ""), str)
        ):
            raise _invalid(
                f"messages[{index}].tool_calls holds a call without id, name or arguments.", "messages"
            )
        out.append(
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": function["name"], "arguments": function.get("arguments", "")},
            }
        )
    return out


def list_models(session: Session) -> dict:
    """``GET /v1/models``: every priced model."""
    return {
        "object": "list",
        "data": [
            {
                "id": price.model,
                "object": "model",
                "created": int(price.effective_from.timestamp()),
                "owned_by": "tollgate",
            }
            for price in pricing.list_current_prices(session)
        ],
    }


# -- answers ------------------------------------------------------------------------------


def completion_id(turn_id: str) -> str:
    return f"chatcmpl-{turn_id}"


@dataclass(frozen=True)
class Answer:
    """What every chunk of one streamed answer repeats, read once from the turn."""

    turn_id: str
    created: int
    model: str
    max_output_tokens: int

    @classmethod
    def of(cls, turn: Turn) -> Answer:
        return cls(turn.id, int(turn.created_at.timestamp()), turn.model, turn.max_output_tokens)

    def finish_reason(self, output_tokens: int) -> str:
        # The turn keeps no finish reason: an answer that used its whole budget was cut.
        return "length" if output_tokens >= self.max_output_tokens else "stop"

    def chunk(self, delta: dict, finish: str | None = None) -> dict:
        return {
            "id": completion_id(self.turn_id),
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    def usage_chunk(self, input_tokens: int, output_tokens: int) -> dict:
        """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
        body = self.chunk({})
        body["choices"] = []
        body["usage"] = usage(input_tokens, output_tokens)
        return body


def usage(input_tokens: int, output_tokens: int) -> dict:
    return {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


def completion(turn: Turn) -> dict:
    """A finished turn as a ``chat.completion``."""
    answer = Answer.of(turn)
    message: dict = {"role": "assistant", "content": turn.reply or ""}
    finish = answer.finish_reason(turn.output_tokens)
    if turn.reply_tool_calls:
        message["content"] = turn.reply or None
        message["tool_calls"] = turn.reply_tool_calls
        finish = "tool_calls"
    return {
        "id": completion_id(turn.id),
        "object": "chat.completion",
        "created": answer.created,
        "model": turn.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": usage(turn.input_tokens, turn.output_tokens),
    }


# A failed turn's error code -> the HTTP status the endpoint answers with.
FAILURE_STATUS = {
    "insufficient_balance": 402,
    "hold_expired": 402,
    "budget_exhausted": 402,
    "turn_timeout": 504,
    "provider_timeout": 504,
    "provider_rate_limited": 503,
}


def failure_status(error_code: str | None) -> int:
    if error_code in FAILURE_STATUS:
        return FAILURE_STATUS[error_code]
    return 502 if (error_code or "").startswith("provider_") else 500
