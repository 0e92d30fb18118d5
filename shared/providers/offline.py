"""The offline model: deterministic answers without a network or a model server.

A product feature, not a test double: the embedded mode runs on it, demos run
on it, and the whole turn pipeline (tools, summaries, billing, failures) can be
exercised with it. Same input, same output, every time; token counts follow
``shared.providers.tokens``.

What it does, in order (docs/providers.md has the user-facing version):

1. A summary request (a system message starting with ``Summarize the
   conversation``) gets a short extractive summary of the text it was given.
2. Otherwise failure-injection markers in the last user message apply
   (``[[offline:sleep=S]]``, ``[[offline:fail]]``, ``[[offline:transient]]``).
3. With tools offered and no tool results since the last user message, obvious
   asks become tool calls: ``search for X`` / ``search: X`` → ``search``; a
   file named from the ``Room files:`` system line → ``file_read``.
4. With tool results present, the reply quotes short excerpts of them.
5. Otherwise an echo-style reply of realistic length.

The formats it recognises (summary request, room files line, search ask, markers)
are the pipeline's, defined in ``shared/prompts.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from typing import Any

from shared.prompts import OFFLINE_MARKER, extract_search_query, is_summary_instruction, room_files_in
from shared.providers.base import (
    CANCELLED,
    Completion,
    OnDelta,
    ProviderPermanentError,
    ProviderTransientError,
    ShouldStop,
    ToolCall,
)
from shared.providers.tokens import (
    content_text,
    count_message_tokens,
    count_tokens,
    count_tool_schema_tokens,
    truncate_to_tokens,
)

MAX_SLEEP_SECONDS = 30.0
MAX_FILE_READ_CALLS = 3
SUMMARY_MAX_CHARS = 800

_SLEEP = re.compile(r"\[\[offline:sleep=(\d+(?:\.\d+)?)\]\]", re.IGNORECASE)
_SLEEP_SUMMARY = re.compile(r"\[\[offline:sleep-summary=(\d+(?:\.\d+)?)\]\]", re.IGNORECASE)
_FAIL = re.compile(r"\[\[offline:fail\]\]", re.IGNORECASE)
_TRANSIENT = re.compile(r"\[\[offline:transient\]\]", re.IGNORECASE)
_FAIL_SUMMARY = re.compile(r"\[\[offline:fail-summary\]\]", re.IGNORECASE)
_SLOW = re.compile(r"\[\[offline:slow=(\d+(?:\.\d+)?)\]\]", re.IGNORECASE)
# A streamed answer goes out in pieces of this many words (a word keeps its trailing space).
STREAM_WORDS_PER_DELTA = 3
_STREAM_PIECE = re.compile(r"\S+\s*|\s+")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{3,}")
_STOPWORDS = frozenset(
    "about after again also because been before being between could does doing down during each from "
    "have having here into just more most other over please same should some such than that their "
    "them then there these they this those through tell under until very want were what when where "
    "which while will with would your yours".split()
)
_ELABORATIONS = (
    "The short answer depends on the details you have at hand, so here is the general picture first.",
    "Taken step by step, the question breaks down into a few parts that can be answered one at a time.",
    "A useful way to look at it is to separate what is known from what still needs checking.",
    "In practice the simplest approach that fits the constraints is usually the right starting point.",
    "It is worth keeping the trade-offs in mind: speed, cost and accuracy rarely all improve together.",
    "If anything here does not match your situation, add the missing detail and ask again.",
    'Uploaded files and earlier turns can be searched by asking to "search for" a topic.',
    "This reply comes from the offline model, which answers deterministically without a network.",
)


def _parse_room_files(messages: list[dict]) -> list[tuple[str, str]]:
    files: list[tuple[str, str]] = []
    for message in messages:
        if message.get("role") != "system":
            continue
        for line in content_text(message.get("content")).splitlines():
            files.extend(room_files_in(line))
    return files


def _named_files(text: str, files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Files whose name appears in ``text`` as a whole name (``a.txt`` is not found in ``data.txt``)."""
    named = []
    seen_ids = set()
    for name, file_id in files:
        pattern = r"(?<![\w./-])" + re.escape(name) + r"(?![\w-])"
        if file_id not in seen_ids and re.search(pattern, text, re.IGNORECASE):
            named.append((name, file_id))
            seen_ids.add(file_id)
    return named[:MAX_FILE_READ_CALLS]


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _excerpt(text: str, limit: int) -> str:
    text = _collapse(text)
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip() + "…"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.?!])(?:\s|$)", text)
    return match.group(1) if match else text


class OfflineProvider:
    """Deterministic, network-free model. See the module docstring for its rules."""

    name = "offline"
    supports_tools = True

    def __init__(self, *, stream_delay: float = 0.0) -> None:
        # Seconds between the pieces of a streamed answer: a realistic pace for demos,
        # 0 in tests. ``[[offline:slow=S]]`` in the last user message overrides it.
        self.stream_delay = stream_delay

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
        completion = self._complete(messages, model, max_output_tokens, tools, timeout)
        if on_delta is None or not completion.content:
            return completion
        return self._stream(completion, messages, on_delta, should_stop)

    def _stream(
        self, completion: Completion, messages: list[dict], on_delta: OnDelta, should_stop: ShouldStop | None
    ) -> Completion:
        """Hand the answer out a few words at a time; stopped early, the answer is what was sent
        and the output tokens are counted on it (the offline rule is exact, not an estimate)."""
        slow = _SLOW.search(self._last_user(messages)[1])
        delay = float(slow.group(1)) if slow else self.stream_delay
        words = _STREAM_PIECE.findall(completion.content or "")
        sent = ""
        for start in range(0, len(words), STREAM_WORDS_PER_DELTA):
            if should_stop is not None and should_stop():
                return dataclasses.replace(
                    completion, content=sent, output_tokens=count_tokens(sent), finish_reason=CANCELLED
                )
            if start and delay > 0:
                time.sleep(min(delay, MAX_SLEEP_SECONDS))
            piece = "".join(words[start : start + STREAM_WORDS_PER_DELTA])
            on_delta(piece)
            sent += piece
        return completion

    def _complete(
        self,
        messages: list[dict],
        model: str,
        max_output_tokens: int,
        tools: list[dict] | None,
        timeout: float | None,
    ) -> Completion:
        if max_output_tokens < 1:
            raise ProviderPermanentError(
                "provider_rejected", f"max_output_tokens must be at least 1, got {max_output_tokens}."
            )
        input_tokens = count_message_tokens(messages) + count_tool_schema_tokens(tools)

        if self._is_summary_request(messages):
            content, truncated = self._summarize(messages, max_output_tokens, timeout)
            return self._text(content, truncated, input_tokens, model)

        last_user_index, last_user_text = self._last_user(messages)
        self._apply_markers(last_user_text, timeout)

        tool_results = [m for m in messages[last_user_index + 1 :] if m.get("role") == "tool"]
        if tool_results:
            content, truncated = truncate_to_tokens(
                self._answer_from_tools(messages, last_user_index, last_user_text), max_output_tokens
            )
            return self._text(content, truncated, input_tokens, model)

        if tools:
            calls = self._tool_calls(messages, last_user_text, {self._tool_name(t) for t in tools})
            if calls:
                emitted = "".join(call.name + call.raw_arguments for call in calls)
                return Completion(
                    content=None,
                    tool_calls=calls,
                    input_tokens=input_tokens,
                    output_tokens=count_tokens(emitted),
                    model=model,
                    finish_reason="tool_calls",
                )

        content, truncated = truncate_to_tokens(self._echo(last_user_text), max_output_tokens)
        return self._text(content, truncated, input_tokens, model)

    # -- helpers -----------------------------------------------------------------------

    @staticmethod
    def _text(content: str, truncated: bool, input_tokens: int, model: str) -> Completion:
        return Completion(
            content=content,
            tool_calls=[],
            input_tokens=input_tokens,
            output_tokens=count_tokens(content),
            model=model,
            finish_reason="length" if truncated else "stop",
        )

    @staticmethod
    def _tool_name(tool: dict) -> str | None:
        function = tool.get("function") if isinstance(tool, dict) else None
        return function.get("name") if isinstance(function, dict) else None

    @staticmethod
    def _last_user(messages: list[dict]) -> tuple[int, str]:
        for index in range(len(messages) - 1, -1, -1):
            if messages[index].get("role") == "user":
                return index, content_text(messages[index].get("content"))
        return -1, ""

    @staticmethod
    def _is_summary_request(messages: list[dict]) -> bool:
        return any(
            m.get("role") == "system" and is_summary_instruction(content_text(m.get("content")))
            for m in messages
        )

    def _wait(self, seconds: float, timeout: float | None) -> None:
        """Sleep ``seconds`` (capped); past the caller's ``timeout``, fail as a real call would."""
        seconds = min(seconds, MAX_SLEEP_SECONDS)
        if timeout is not None and seconds > timeout:
            time.sleep(max(0.0, timeout))
            raise ProviderTransientError("provider_timeout")
        time.sleep(seconds)

    def _apply_markers(self, text: str, timeout: float | None) -> None:
        sleep = _SLEEP.search(text)
        if sleep:
            self._wait(float(sleep.group(1)), timeout)
        if _FAIL.search(text):
            raise ProviderPermanentError(
                "provider_rejected", "The offline model refused the request ([[offline:fail]])."
            )
        if _TRANSIENT.search(text):
            raise ProviderTransientError(
                "provider_unavailable", "The offline model is unavailable ([[offline:transient]])."
            )

    def _tool_calls(self, messages: list[dict], text: str, offered: set[str | None]) -> list[ToolCall]:
        wanted: list[tuple[str, dict[str, Any]]] = []
        if "search" in offered:
            query = extract_search_query(text)
            if query:
                wanted.append(("search", {"query": query}))
        if "file_read" in offered:
            for _name, file_id in _named_files(text, _parse_room_files(messages)):
                wanted.append(("file_read", {"file_id": file_id}))
        # Ids are stable for the same conversation and distinct within one answer.
        conversation = _digest(json.dumps(messages, sort_keys=True, default=str))
        calls = []
        for index, (name, arguments) in enumerate(wanted):
            raw = json.dumps(arguments, sort_keys=True)
            call_id = "call_" + _digest(conversation, str(index), name, raw)[:16]
            calls.append(ToolCall(id=call_id, name=name, arguments=arguments, raw_arguments=raw))
        return calls

    @staticmethod
    def _answer_from_tools(messages: list[dict], last_user_index: int, question: str) -> str:
        names: dict[str, str] = {}
        for message in messages[last_user_index + 1 :]:
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict):
                    names[call.get("id", "")] = (call.get("function") or {}).get("name") or "tool"
        lines = ["Here is what I found:"]
        for message in messages[last_user_index + 1 :]:
            if message.get("role") != "tool":
                continue
            name = names.get(message.get("tool_call_id") or "", "tool")
            result = content_text(message.get("content")).strip()
            excerpt = _excerpt(result, 160) if result else "(no result)"
            lines.append(f'- {name}: "{excerpt}"')
        asked = _excerpt(OFFLINE_MARKER.sub("", question), 120)
        if asked:
            lines.append(f'That is what the room\'s files and earlier turns say about "{asked}".')
        return "\n".join(lines)

    @staticmethod
    def _echo(text: str) -> str:
        text = _collapse(OFFLINE_MARKER.sub("", text))
        if not text:
            return "Hello! This is the offline model. Ask a question and I will answer it."
        digest = _digest(text)
        # Longer questions get longer answers, as with a real model: 2 to 5 sentences.
        count = min(len(_ELABORATIONS), 2 + len(text) // 200)
        start = int(digest[:8], 16) % len(_ELABORATIONS)
        sentences = [_ELABORATIONS[(start + i) % len(_ELABORATIONS)] for i in range(count)]
        keywords = []
        for word in _WORD.findall(text.lower()):
            if word not in _STOPWORDS and word not in keywords:
                keywords.append(word)
        parts = [f'You asked: "{_excerpt(text, 400)}"', *sentences]
        if keywords:
            parts.append("Key points: " + ", ".join(keywords[:8]) + ".")
        return " ".join(parts)

    def _summarize(
        self, messages: list[dict], max_output_tokens: int, timeout: float | None
    ) -> tuple[str, bool]:
        source: list[str] = []
        for message in messages:
            text = content_text(message.get("content"))
            if message.get("role") == "system" and is_summary_instruction(text):
                # The instruction's first line is the ask; anything after it is material.
                text = text.lstrip().partition("\n")[2]
            source.append(text)
        whole = "\n".join(source)
        # Only summary markers apply here: the transcript being summarised may quote
        # markers from earlier turns, which must not fail or stall the summary.
        sleep = _SLEEP_SUMMARY.search(whole)
        if sleep:
            self._wait(float(sleep.group(1)), timeout)
        if _FAIL_SUMMARY.search(whole):
            raise ProviderTransientError(
                "provider_unavailable", "The offline model could not summarise ([[offline:fail-summary]])."
            )
        points: list[str] = []
        for line in OFFLINE_MARKER.sub("", whole).splitlines():
            # A prior summary's points (joined by " / ") carry forward one by one, without
            # nesting "Summary: Summary: ..."; headings such as "New turns:" carry nothing.
            for part in _collapse(line).removeprefix("Summary: ").split(" / "):
                point = _excerpt(_first_sentence(part.strip()), 120)
                if point and not point.endswith(":") and point not in points:
                    points.append(point)
        if not points:
            return "Summary: nothing has been discussed yet.", False
        # A rolling summary keeps the newest points when they do not all fit.
        budget = min(SUMMARY_MAX_CHARS, max_output_tokens * 4) - len("Summary: ")
        kept: list[str] = []
        for point in reversed(points):
            if kept and sum(len(p) + 3 for p in kept) + len(point) > budget:
                break
            kept.insert(0, point)
        summary = "Summary: " + " / ".join(kept)
        return truncate_to_tokens(summary, max_output_tokens)
