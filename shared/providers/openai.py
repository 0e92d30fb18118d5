"""Any OpenAI-compatible server: ``POST {base_url}/chat/completions``.

Retries live here, inside one ``complete()`` call, for the failures a second
try usually fixes (timeouts, dropped connections, 408/409/429, 5xx): up to
``max_attempts`` attempts with exponential backoff and jitter, honouring
``Retry-After`` up to a cap. Everything else fails at once.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from shared.providers.base import (
    CANCELLED,
    Completion,
    OnDelta,
    ProviderError,
    ProviderPermanentError,
    ProviderTransientError,
    ShouldStop,
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


# No cap on connections: a turn worker keeps hundreds of model calls in flight (its pool's
# concurrency bounds them), and httpx's default of 100 made the 101st wait for a free one, then
# fail with a pool timeout. Every connection a burst opened is kept alive for the next calls
# (the default kept 20: at 64 calls in flight, 44 were closed after each answer and opened
# again, a DNS look-up and a handshake each), until it idles for keepalive_expiry.
CONNECTION_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=30.0)
# Calls are spread over this many clients, each call to the one with the fewest in flight
# (the first among equals, so calls one at a time reuse one connection). httpcore's pool looks
# at each of its connections for each of them whenever a request starts or ends (quadratic):
# with 256 calls in flight on one client that was about a third of the turn worker's CPU, and
# a turn cost twice the CPU it costs at 64 (bench/peer.py, py-spy). Eight pools of a few dozen
# connections each do not.
CLIENT_SHARDS = 8


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
        self._clients: list[httpx.Client] = []
        self._clients_pid: int | None = None
        self._in_flight = [0] * CLIENT_SHARDS
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    @contextmanager
    def _http(self) -> Iterator[httpx.Client]:
        """The client for one call: the one with the fewest calls in flight (CLIENT_SHARDS)."""
        # Built on first use and per process: a pooled connection inherited across a
        # Celery prefork fork would be shared by two processes.
        with self._lock:
            if not self._clients or self._clients_pid != os.getpid():
                self._clients = [
                    httpx.Client(trust_env=False, limits=CONNECTION_LIMITS) for _ in range(CLIENT_SHARDS)
                ]
                self._clients_pid = os.getpid()
                self._in_flight = [0] * CLIENT_SHARDS
            index = min(range(CLIENT_SHARDS), key=self._in_flight.__getitem__)
            self._in_flight[index] += 1
            in_flight, client = self._in_flight, self._clients[index]
        try:
            yield client
        finally:
            with self._lock:
                in_flight[index] -= 1

    def close(self) -> None:
        with self._lock:
            if self._clients_pid == os.getpid():
                for client in self._clients:
                    client.close()
            self._clients = []

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
        body, headers = self._request(messages, model, max_output_tokens, tools, stream=on_delta is not None)
        attempt_timeout = httpx.Timeout(self.timeout if timeout is None else timeout)

        for attempt in range(1, self.max_attempts + 1):
            try:
                answer = self._send(
                    body, headers, attempt_timeout, messages, tools, model, on_delta, should_stop
                )
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
                if isinstance(answer, Completion):
                    return answer
                if answer.is_success:
                    return self._parse(answer, messages, tools, model)
                error = self._status_error(answer)
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

    def _request(
        self,
        messages: list[dict],
        model: str,
        max_output_tokens: int,
        tools: list[dict] | None,
        *,
        stream: bool,
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The body and headers of a chat completion call (streamed with usage when ``stream``)."""
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_output_tokens}
        if tools:
            body["tools"] = tools
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            headers["Accept"] = "text/event-stream"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return body, headers

    def _send(
        self,
        body: dict[str, Any],
        headers: dict[str, str],
        timeout: httpx.Timeout,
        messages: list[dict],
        tools: list[dict] | None,
        model: str,
        on_delta: OnDelta | None,
        should_stop: ShouldStop | None,
    ) -> Completion | httpx.Response:
        """One attempt: the completion when a stream answered (or a server that ignores
        ``stream`` answered in one piece), else the response for ``complete`` to judge."""
        if on_delta is None:
            with self._http() as client:
                return client.post(self.url, json=body, headers=headers, timeout=timeout)
        # Retried by ``complete`` only while nothing reached on_delta: a stream that broke
        # after its first piece raises ProviderPermanentError (stream_interrupted).
        streamed = _Stream(messages, tools, model, on_delta, should_stop)
        with (
            self._http() as client,
            client.stream("POST", self.url, json=body, headers=headers, timeout=timeout) as response,
        ):
            if response.is_success and _is_event_stream(response):
                return streamed.read(response)
            response.read()
            if response.is_success:
                # A server that ignores "stream": one JSON completion, one piece.
                completion = self._parse(response, messages, tools, model)
                if completion.content:
                    on_delta(completion.content)
                return completion
        return response

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
        choice, message, content = _first_choice(payload, bad)
        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
        tool_calls = _tool_calls(message, usage, bad, response.status_code)

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


def _first_choice(
    payload: dict, bad: Callable[[str], ProviderPermanentError]
) -> tuple[dict, dict, str | None]:
    """``choices[0]``, its message and the message's text content, checked."""
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
    return choice, message, content


def _tool_calls(
    message: dict, usage: dict, bad: Callable[[str], ProviderPermanentError], status_code: int
) -> list[ToolCall]:
    """The message's tool calls, each with a function name (ids made up where missing)."""
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
                status_code=status_code,
                input_tokens=_reported(usage, "prompt_tokens"),
                output_tokens=_reported(usage, "completion_tokens"),
            ) from None
    return tool_calls


def _is_event_stream(response: httpx.Response) -> bool:
    content_type = response.headers.get("content-type", "")
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def _estimated_usage(messages: list[dict], tools: list[dict] | None, emitted: str) -> tuple[int, int]:
    """The token rule's count of a call: what was sent, and what came back so far."""
    return count_message_tokens(messages) + count_tool_schema_tokens(tools), count_tokens(emitted)


class _Stream:
    """One streamed answer (``stream: true``, ``stream_options.include_usage``): the text
    pieces go to ``on_delta`` as they arrive, tool-call fragments are joined by index, and
    the usage is the last ``usage`` object seen (OpenAI sends it in a final chunk with no
    choices; servers that send running totals in every chunk work too)."""

    def __init__(self, messages, tools, model, on_delta: OnDelta, should_stop: ShouldStop | None) -> None:
        self.messages, self.tools, self.model = messages, tools, model
        self.on_delta, self.should_stop = on_delta, should_stop
        self.content = ""
        self.calls: dict[int, dict[str, str]] = {}
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.answered_model: str | None = None
        self.started = False  # a piece reached on_delta: the call can no longer be retried

    def read(self, response: httpx.Response) -> Completion:
        done = False
        try:
            lines = response.iter_lines()
            for line in lines:
                if not line.startswith("data:"):
                    continue  # comments (": ping"), event names, blank separators
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    # Read the body to its end (the chunked terminator follows at once), as
                    # the openai SDK does: a response closed unread closes its keep-alive
                    # connection, and the next call pays a new one (a DNS look-up in a
                    # thread under gevent, the TCP handshake).
                    for _ in lines:
                        pass
                    break
                self._chunk(data)
                if self.should_stop is not None and self.should_stop():
                    # Closing the response (the with-block) stops the upstream's generation.
                    return self._completion(CANCELLED)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            if not self.started:
                raise
            raise self._interrupted(f"the stream broke ({type(exc).__name__})") from None
        if not done and self.finish_reason is None and self.usage is None:
            if not self.started:
                raise ProviderTransientError(
                    "provider_unavailable", "The model provider closed the stream before answering."
                )
            raise self._interrupted("the stream ended before its last chunk")
        return self._completion(self.finish_reason)

    def _chunk(self, data: str) -> None:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise self._bad("a chunk is not JSON") from None
        if not isinstance(chunk, dict):
            raise self._bad("a chunk is not a JSON object")
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("model"), str):
            self.answered_model = chunk["model"]
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return  # the usage chunk has no choices
        choice = choices[0]
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        text = delta.get("content")
        if isinstance(text, str) and text:
            self.started = True
            self.content += text
            self.on_delta(text)
        for fragment in delta.get("tool_calls") or []:
            if not isinstance(fragment, dict):
                continue
            self.started = True
            index = fragment.get("index") if isinstance(fragment.get("index"), int) else len(self.calls)
            call = self.calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            if isinstance(fragment.get("id"), str):
                call["id"] = fragment["id"]
            function = fragment.get("function") if isinstance(fragment.get("function"), dict) else {}
            if isinstance(function.get("name"), str):
                call["name"] += function["name"]
            if isinstance(function.get("arguments"), str):
                call["arguments"] += function["arguments"]

    def _tool_calls(self) -> list[ToolCall]:
        calls = []
        for index in sorted(self.calls):
            raw = self.calls[index]
            if not raw["name"]:
                raise self._bad(f"tool_calls[{index}] has no function name")
            try:
                calls.append(tool_call_from_raw(raw["id"] or f"call_{index}", raw["name"], raw["arguments"]))
            except RecursionError:
                # As in _parse: not a call anyone can run; the answer arrived, its usage is billed.
                input_tokens, output_tokens, estimated = self._usage()
                raise ProviderPermanentError(
                    "bad_model_output",
                    f"tool_calls[{index}] arguments are nested too deeply to parse",
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                    usage_estimated=estimated,
                ) from None
        return calls

    def _emitted(self) -> str:
        return self.content + "".join(c["name"] + c["arguments"] for c in self.calls.values())

    def _usage(self) -> tuple[int, int, bool]:
        """``(input, output, estimated)``: the provider's report where it gave one."""
        usage = self.usage or {}
        estimated_input, estimated_output = _estimated_usage(self.messages, self.tools, self._emitted())
        input_tokens, output_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        estimated = False
        if not isinstance(input_tokens, int) or isinstance(input_tokens, bool) or input_tokens < 0:
            input_tokens, estimated = estimated_input, True
        if not isinstance(output_tokens, int) or isinstance(output_tokens, bool) or output_tokens < 0:
            output_tokens, estimated = estimated_output, True
        # A running total sent before the last piece may lag the text received: never bill
        # less than the text that arrived.
        if self.finish_reason is None and output_tokens < estimated_output:
            output_tokens, estimated = estimated_output, True
        return input_tokens, output_tokens, estimated

    def _completion(self, finish_reason: str | None) -> Completion:
        tool_calls = [] if finish_reason == CANCELLED else self._tool_calls()
        input_tokens, output_tokens, estimated = self._usage()
        return Completion(
            content=self.content if (self.content or finish_reason == CANCELLED) else None,
            tool_calls=tool_calls,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            model=self.answered_model or self.model,
            finish_reason=finish_reason,
            usage_estimated=estimated,
        )

    def _interrupted(self, why: str) -> ProviderPermanentError:
        input_tokens, output_tokens, estimated = self._usage()
        logger.warning("model stream interrupted: %s", why)
        return ProviderPermanentError(
            "provider_stream_interrupted",
            "The model provider's stream broke off before the answer was complete.",
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            usage_estimated=estimated,
        )

    def _bad(self, why: str) -> ProviderPermanentError:
        input_tokens, output_tokens, estimated = self._usage()
        return ProviderPermanentError(
            "provider_bad_response",
            f"The model provider sent an invalid stream: {why}.",
            input_tokens=input_tokens if self.started else 0,
            output_tokens=output_tokens if self.started else 0,
            usage_estimated=estimated,
        )
