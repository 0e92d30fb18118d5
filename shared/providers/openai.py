"""Any OpenAI-compatible server: ``POST {base_url}/chat/completions``.

Retries live here, inside one ``complete()`` call, for the failures a second
try usually fixes (timeouts, dropped connections, 408/409/429, 5xx): up to
``max_attempts`` attempts with exponential backoff and jitter, honouring
``Retry-After`` up to a cap. Everything else fails at once.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from shared.providers.base import (
    Completion,
    ProviderError,
    ProviderPermanentError,
    ProviderTransientError,
    ToolCall,
    tool_call_from_raw,
)
from shared.providers.tokens import count_message_tokens, count_tokens, count_tool_schema_tokens

logger = logging.getLogger(__name__)

# The statuses OpenAI's own SDK retries; other 4xx mean the request itself is wrong.
RETRYABLE_STATUSES = frozenset({408, 409, 429})
# An upstream error body may echo what we sent (OpenAI's 401 quotes part of the API key,
# others the prompt): it is logged, this much of it, and never put in a ProviderError,
# whose message a turn's `error.message` shows to users.
MAX_LOGGED_BODY_CHARS = 500


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _reported(usage: dict, field: str) -> int:
    value = usage.get(field)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _body_excerpt(response: httpx.Response) -> str:
    """The start of an error response's body, for the log."""
    try:
        text = response.text
    except Exception:  # an undecodable body is no reason to lose the status
        return "<undecodable body>"
    return text[:MAX_LOGGED_BODY_CHARS] + ("…" if len(text) > MAX_LOGGED_BODY_CHARS else "")


class OpenAIProvider:
    """Chat completions over HTTP with timeouts and bounded retries.

    ``timeout`` bounds each attempt (connect and each read); a call therefore
    takes at most about ``max_attempts * timeout`` plus the backoff sleeps.
    """

    name = "openai"
    supports_tools = True

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_attempts: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        retry_after_cap: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.retry_after_cap = retry_after_cap
        self._client: httpx.Client | None = None
        self._client_pid: int | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _http(self) -> httpx.Client:
        # Built on first use and per process: a pooled connection inherited across a
        # Celery prefork fork would be shared by two processes.
        with self._lock:
            if self._client is None or self._client_pid != os.getpid():
                self._client = httpx.Client(trust_env=False)
                self._client_pid = os.getpid()
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None and self._client_pid == os.getpid():
                self._client.close()
            self._client = None

    def complete(
        self,
        messages: list[dict],
        *,
        model: str,
        max_output_tokens: int,
        tools: list[dict] | None = None,
        timeout: float | None = None,
    ) -> Completion:
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_output_tokens}
        if tools:
            body["tools"] = tools
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempt_timeout = httpx.Timeout(self.timeout if timeout is None else timeout)

        for attempt in range(1, self.max_attempts + 1):
            try:
                response = self._http().post(self.url, json=body, headers=headers, timeout=attempt_timeout)
            except httpx.TimeoutException as exc:
                error: ProviderError = ProviderTransientError(
                    "provider_timeout", f"The model provider did not answer within {attempt_timeout.read} s."
                )
                cause: BaseException | None = exc
            except httpx.TransportError as exc:
                error = ProviderTransientError(
                    "provider_unavailable", f"Could not reach the model provider: {type(exc).__name__}."
                )
                cause = exc
            else:
                if response.is_success:
                    return self._parse(response, messages, tools, model)
                error = self._status_error(response)
                cause = None
                if not error.transient:
                    raise error

            if attempt == self.max_attempts:
                raise error from cause
            delay = self._delay(attempt, error.retry_after)
            logger.warning(
                "model call failed (%s), retrying in %.2f s (attempt %d of %d)",
                error.code,
                delay,
                attempt,
                self.max_attempts,
            )
            time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap)
        backoff = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        # Random jitter on top, so clients that failed together do not retry together.
        return backoff + random.uniform(0, self.backoff_base)

    @staticmethod
    def _status_error(response: httpx.Response) -> ProviderError:
        """The error for a non-2xx answer: the code's generic message only (see
        ``MAX_LOGGED_BODY_CHARS``); the status and the body's start go to the log."""
        status = response.status_code
        logger.warning("model provider answered HTTP %d: %r", status, _body_excerpt(response))
        if status == 429:
            return ProviderTransientError(
                "provider_rate_limited",
                status_code=status,
                retry_after=_parse_retry_after(response.headers.get("Retry-After")),
            )
        if status >= 500 or status in RETRYABLE_STATUSES:
            return ProviderTransientError(
                "provider_unavailable",
                status_code=status,
                retry_after=_parse_retry_after(response.headers.get("Retry-After")),
            )
        if 400 <= status < 500:
            return ProviderPermanentError("provider_rejected", status_code=status)
        return ProviderPermanentError("provider_bad_response", status_code=status)

    @staticmethod
    def _parse(
        response: httpx.Response, messages: list[dict], tools: list[dict] | None, model: str
    ) -> Completion:
        def bad(why: str) -> ProviderPermanentError:
            return ProviderPermanentError(
                "provider_bad_response",
                f"The model provider sent an invalid completion: {why}.",
                status_code=response.status_code,
            )

        try:
            payload = response.json()
        except ValueError:
            raise bad("the body is not JSON") from None
        if not isinstance(payload, dict):
            raise bad("the body is not a JSON object")
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise bad("no choices")
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise bad("choices[0].message is missing")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise bad("choices[0].message.content is not a string")

        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
        raw_calls = message.get("tool_calls") or []
        if not isinstance(raw_calls, list):
            raise bad("choices[0].message.tool_calls is not a list")
        tool_calls: list[ToolCall] = []
        for index, raw in enumerate(raw_calls):
            function = raw.get("function") if isinstance(raw, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(name, str) or not name:
                raise bad(f"tool_calls[{index}] has no function name")
            call_id = raw.get("id") if isinstance(raw.get("id"), str) and raw.get("id") else f"call_{index}"
            try:
                tool_calls.append(tool_call_from_raw(call_id, name, function.get("arguments")))
            except RecursionError:
                # Arguments nested past the parser's recursion limit: not a call anyone can
                # run, and not one to feed back (it would come again). The answer was still
                # produced, so the tokens it reports are billed with the failed turn.
                raise ProviderPermanentError(
                    "bad_model_output",
                    f"tool_calls[{index}] arguments are nested too deeply to parse",
                    status_code=response.status_code,
                    input_tokens=_reported(usage, "prompt_tokens"),
                    output_tokens=_reported(usage, "completion_tokens"),
                ) from None

        input_tokens = usage.get("prompt_tokens")
        output_tokens = usage.get("completion_tokens")
        # Servers that leave usage out still get billed: estimate with the offline rule.
        if not isinstance(input_tokens, int) or isinstance(input_tokens, bool) or input_tokens < 0:
            input_tokens = count_message_tokens(messages) + count_tool_schema_tokens(tools)
        if not isinstance(output_tokens, int) or isinstance(output_tokens, bool) or output_tokens < 0:
            emitted = (content or "") + "".join(call.name + call.raw_arguments for call in tool_calls)
            output_tokens = count_tokens(emitted)

        finish_reason = choice.get("finish_reason")
        return Completion(
            content=content,
            tool_calls=tool_calls,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            model=payload.get("model") if isinstance(payload.get("model"), str) else model,
            finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        )
