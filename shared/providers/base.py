"""The one interface every model provider implements (design §3 "Providers").

Messages and tools are OpenAI-format dicts whatever the provider: the turn
pipeline builds one conversation and any provider can answer it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

# Streaming hooks of ``complete()``: ``on_delta(text)`` receives each piece of the answer's
# text as it arrives; ``should_stop()`` is asked between pieces, and a true answer ends the
# call early with ``finish_reason == CANCELLED`` and the usage consumed so far.
OnDelta = Callable[[str], None]
ShouldStop = Callable[[], bool]
CANCELLED = "cancelled"


@dataclass(frozen=True)
class ToolCall:
    """A tool the model asked to run.

    When the model sent arguments that are not a JSON object, ``arguments`` is
    ``{}`` and ``parse_error`` says why; ``raw_arguments`` always holds what was sent.
    """

    id: str
    name: str
    arguments: dict
    raw_arguments: str
    parse_error: str | None = None

    def to_message(self) -> dict[str, Any]:
        """This call as an entry of an assistant message's ``tool_calls``."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.raw_arguments},
        }


@dataclass(frozen=True)
class Completion:
    """One model answer: text, tool calls, or both, with the tokens it used."""

    content: str | None
    tool_calls: list[ToolCall]
    input_tokens: int
    output_tokens: int
    model: str
    finish_reason: str | None
    # The token counts are our estimate (token rule), not the provider's own report.
    usage_estimated: bool = False

    @property
    def cancelled(self) -> bool:
        return self.finish_reason == CANCELLED

    def assistant_message(self) -> dict[str, Any]:
        """The answer as the assistant message to append to the conversation."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_message() for call in self.tool_calls]
        return message


_DEFAULT_MESSAGES = {
    "provider_timeout": "The model provider did not answer in time.",
    "provider_rate_limited": "The model provider is rate limiting requests.",
    "provider_unavailable": "The model provider is unavailable.",
    "provider_bad_response": "The model provider sent a response that is not a valid completion.",
    "provider_rejected": "The model provider rejected the request.",
    "bad_model_output": "The model returned output that could not be used.",
    "provider_stream_interrupted": "The model provider's stream broke off before the answer was complete.",
}


class ProviderError(Exception):
    """A model call failed. ``code`` is a stable snake_case value a turn's
    ``error.code`` can carry; ``transient`` says whether retrying later may help."""

    code: str = "provider_error"
    transient: bool = False

    def __init__(
        self,
        code: str | None = None,
        message: str | None = None,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        usage_estimated: bool = False,
    ) -> None:
        if code:
            self.code = code
        self.message = message or _DEFAULT_MESSAGES.get(self.code, "The model call failed.")
        self.status_code = status_code
        self.retry_after = retry_after
        # What the failed call still consumed (a completion that arrived but cannot be
        # used was paid for): the turn bills it.
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.usage_estimated = usage_estimated
        # args are the constructor's own arguments, so pickling and Celery's result
        # serialisation rebuild the same error rather than one with the message as code.
        super().__init__(self.code, self.message)

    def __str__(self) -> str:
        return self.message


class ProviderTransientError(ProviderError):
    """Timeout, connection error, 429 or 5xx: worth retrying later."""

    code = "provider_unavailable"
    transient = True


class ProviderPermanentError(ProviderError):
    """The request was refused (4xx) or the answer is unusable: retrying will not help."""

    code = "provider_rejected"
    transient = False


class Provider(Protocol):
    name: str
    supports_tools: bool

    def complete(
        self,
        messages: list[dict],
        *,
        model: str,
        max_output_tokens: int,
        tools: list[dict] | None = None,
        timeout: float | None = None,
        on_delta: OnDelta | None = None,
        should_stop: ShouldStop | None = None,
    ) -> Completion:
        """Answer the conversation; with ``on_delta``, streamed (see ``OnDelta``).

        :raises ProviderTransientError: the call may succeed if tried again later.
        :raises ProviderPermanentError: the call will not succeed as it stands.
        """
        ...


def tool_call_from_raw(call_id: str, name: str, raw_arguments: Any) -> ToolCall:
    """A ``ToolCall`` from arguments as a model sent them (a JSON string, or an
    already-decoded object from a lenient server)."""
    if isinstance(raw_arguments, dict):
        return ToolCall(call_id, name, raw_arguments, json.dumps(raw_arguments, sort_keys=True))
    raw = (
        raw_arguments
        if isinstance(raw_arguments, str)
        else ("" if raw_arguments is None else str(raw_arguments))
    )
    if not raw.strip():
        # Tools without parameters are often called with empty arguments.
        return ToolCall(call_id, name, {}, raw)
    try:
        decoded = json.loads(raw)
    except ValueError as exc:
        return ToolCall(call_id, name, {}, raw, parse_error=f"arguments are not valid JSON: {exc}")
    if not isinstance(decoded, dict):
        return ToolCall(call_id, name, {}, raw, parse_error="arguments are not a JSON object")
    return ToolCall(call_id, name, decoded, raw)
