"""Rolling session summaries, with a deterministic extractive fallback.

Context for a turn = the session summary + the last ``WINDOW_TURNS`` completed
turns, plus the turns that have left the window but that the summary does not
cover yet (``seq > summary_through_seq``) while there are fewer than
``FOLD_IN_TURN_TURNS`` of them.

Once ``SUMMARY_BATCH_TURNS`` have left, the turn that completes that batch sends
a background refresh (queue ``summaries``) that folds them into a new summary by
one model call, while the next turn goes on with them verbatim: no turn waits on
a summary call that a refresh is already making. Only when the refresh fell a
whole batch behind (it failed, or is still running) does a turn fold the uncovered
turns itself, before its own call; if that call fails or times out, an extractive
summary built from the turns' own sentences is used instead and the turn reports
``summary_used_fallback``.

Folding in batches makes one summary call per ``SUMMARY_BATCH_TURNS`` turns
instead of one per turn once a session is past its window: a quarter of the
model calls (and of their cost to the user) for a context that keeps a few more
turns verbatim.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Protocol

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from shared import metrics
from shared.db import utcnow
from shared.models import ChatSession, Turn, TurnKind, TurnStatus
from shared.prompts import SUMMARY_PROMPT
from shared.providers import ProviderError

log = logging.getLogger(__name__)

WINDOW_TURNS = 6
# Turns that left the window are summarised this many at a time (see the module docstring).
SUMMARY_BATCH_TURNS = 4
# A turn folds the uncovered turns itself only once this many left the window: the refresh
# sent a batch earlier has not stored its summary (see the module docstring).
FOLD_IN_TURN_TURNS = 2 * SUMMARY_BATCH_TURNS
SUMMARY_MAX_OUTPUT_TOKENS = 256
SUMMARY_TIMEOUT_SECONDS = 20.0
SUMMARY_MAX_CHARS = 2000


class ChatContext(Protocol):
    """What a context reads of its chat session: a ``ChatSession`` or a row of these columns."""

    id: str
    room_id: str
    summary: str | None
    summary_through_seq: int


class TurnText(Protocol):
    """What a context and a summary use of a completed turn (a row of ``window``'s reads)."""

    id: str
    seq: int
    content: str
    reply: str | None


@dataclass(frozen=True)
class SummaryResult:
    text: str
    through_seq: int
    used_fallback: bool
    input_tokens: int = 0
    output_tokens: int = 0


# The window's reads, built once (twice a turn: admission and run): the session's completed
# chat turns, what a context and a summary use of them, not their thirty-odd columns, as
# rows (``turn.seq``, ``turn.content``…) rather than ORM entities: nothing writes them.
_COMPLETED = select(Turn.id, Turn.seq, Turn.content, Turn.reply).where(
    Turn.session_id == bindparam("session_id"),
    Turn.kind == TurnKind.CHAT,
    Turn.status == TurnStatus.COMPLETED,
    Turn.seq < bindparam("before_seq"),
)
# The newest of them, newest first: ``window`` reads them, and a turn's context reads them
# with its other parts in one statement (``turn_context``), then hands them to ``window_of``.
LATEST = _COMPLETED.order_by(Turn.seq.desc()).limit(WINDOW_TURNS + FOLD_IN_TURN_TURNS - 1)
_UNCOVERED = _COMPLETED.where(Turn.seq > bindparam("after_seq")).order_by(Turn.seq)


def window(
    session: Session, chat: ChatContext, before_seq: int, *, fold_at: int = FOLD_IN_TURN_TURNS
) -> tuple[list[TurnText], list[TurnText]]:
    """``(recent, missing)`` for the turn at ``before_seq``.

    ``recent``: the completed turns sent verbatim: the last ``WINDOW_TURNS``, preceded
    by the uncovered ones (``seq > summary_through_seq``) that left the window while
    they are fewer than ``fold_at``. ``missing``: once there are that many uncovered
    turns before the window, all of them (a summary call is due) and ``recent`` is the
    window alone. A turn's context folds at ``FOLD_IN_TURN_TURNS``; the background
    refresh at ``SUMMARY_BATCH_TURNS``.

    One bounded read; a second, only of the uncovered turns, when they may not all be in
    the first. Never the session's whole history.
    """
    latest = session.execute(LATEST, {"session_id": chat.id, "before_seq": before_seq}).all()
    return window_of(session, chat, latest, fold_at=fold_at)


def window_of(
    session: Session, chat: ChatContext, latest: list[TurnText], *, fold_at: int = FOLD_IN_TURN_TURNS
) -> tuple[list[TurnText], list[TurnText]]:
    """``window`` once ``LATEST`` was read (``latest``: its rows, newest first)."""
    latest = list(reversed(latest))
    in_window, before = latest[-WINDOW_TURNS:], latest[:-WINDOW_TURNS]
    uncovered = [turn for turn in before if turn.seq > chat.summary_through_seq]
    if len(uncovered) == FOLD_IN_TURN_TURNS - 1:
        # Every turn read before the window is uncovered: older ones may be too.
        uncovered = session.execute(
            _UNCOVERED,
            {"session_id": chat.id, "after_seq": chat.summary_through_seq, "before_seq": in_window[0].seq},
        ).all()
    if len(uncovered) < fold_at:
        return list(uncovered) + in_window, []
    return in_window, list(uncovered)


def due_after(recent: list[TurnText]) -> bool:
    """Once the turn whose context held ``recent`` completes, a batch will just have left
    the window uncovered: the moment to send the background refresh that folds it. Once per
    batch: the turns after it, while that refresh runs (a 1 s model is still folding when
    the next turn completes), must not send another that would fold the same turns again
    (a second call, billed); if the refresh fails, the turn that finds two batches
    uncovered folds them itself."""
    return len(recent) + 1 == WINDOW_TURNS + SUMMARY_BATCH_TURNS


def _first_sentence(text: str | None, limit: int = 160) -> str:
    text = " ".join((text or "").split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = match.group(1) if match else text
    return sentence if len(sentence) <= limit else sentence[: limit - 1].rstrip() + "…"


def extractive_summary(prior: str | None, turns: list[TurnText]) -> str:
    """Deterministic: the prior summary plus the first sentence of each side of each turn,
    keeping the most recent ``SUMMARY_MAX_CHARS`` characters."""
    lines = [prior.strip()] if prior and prior.strip() else []
    for turn in turns:
        lines.append(f"[{turn.seq}] User: {_first_sentence(turn.content)}")
        if turn.reply:
            lines.append(f"[{turn.seq}] Assistant: {_first_sentence(turn.reply)}")
    text = "\n".join(lines)
    if len(text) > SUMMARY_MAX_CHARS:
        text = "…" + text[-(SUMMARY_MAX_CHARS - 1) :]
    return text


def _transcript(turns: list[TurnText]) -> str:
    return "\n".join(f"User: {turn.content}\nAssistant: {turn.reply or ''}" for turn in turns)


def request_messages(prior: str | None, turns: list[TurnText]) -> list[dict]:
    """The summary call's conversation (what it sends, so what a hold must cover)."""
    return [
        {"role": "system", "content": SUMMARY_PROMPT},
        {
            "role": "user",
            "content": (f"Summary so far:\n{prior}\n\n" if prior else "")
            + "New turns:\n"
            + _transcript(turns),
        },
    ]


def fallback(prior: str | None, turns: list[TurnText], reason: str) -> SummaryResult:
    """The extractive summary, free of model calls."""
    metrics.summary_fell_back(reason)
    return SummaryResult(text=extractive_summary(prior, turns), through_seq=turns[-1].seq, used_fallback=True)


def fold_turns(
    provider, model: str, prior: str | None, turns: list[TurnText], *, allow_fallback: bool
) -> SummaryResult:
    """Fold ``turns`` into ``prior`` with a model call.

    An empty answer still used tokens: the result is the extractive fallback
    (``used_fallback``) carrying the tokens the call consumed, so they are billed.

    :raises ProviderError: the call failed and ``allow_fallback`` is false.
    """
    try:
        completion = provider.complete(
            request_messages(prior, turns),
            model=model,
            max_output_tokens=SUMMARY_MAX_OUTPUT_TOKENS,
            timeout=SUMMARY_TIMEOUT_SECONDS,
        )
    except ProviderError as exc:
        if not allow_fallback:
            raise
        log.warning("summary generation failed (%s); using the extractive fallback", exc.code)
        return fallback(prior, turns, "provider_error")
    text = (completion.content or "").strip()
    if not text:
        log.warning("summary generation returned nothing; using the extractive fallback")
        return replace(
            fallback(prior, turns, "empty_summary"),
            input_tokens=completion.input_tokens,
            output_tokens=completion.output_tokens,
        )
    return SummaryResult(
        text=text[:SUMMARY_MAX_CHARS],
        through_seq=turns[-1].seq,
        used_fallback=False,
        input_tokens=completion.input_tokens,
        output_tokens=completion.output_tokens,
    )


def store(session: Session, chat_session_id: str, result: SummaryResult) -> bool:
    """Save a summary unless a newer one is already stored (turn and refresh may race). Commits."""
    stored = session.execute(
        update(ChatSession)
        .where(ChatSession.id == chat_session_id, ChatSession.summary_through_seq < result.through_seq)
        .values(summary=result.text, summary_through_seq=result.through_seq, summary_updated_at=utcnow())
    ).rowcount
    session.commit()
    return bool(stored)
