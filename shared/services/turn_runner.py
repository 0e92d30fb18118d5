"""Running a turn in the worker: claim, context + summary, model and tools, settle.

A turn ends exactly once. Every state change happens under the turn's row
lock and checks the status first; billing is idempotent per turn. So a task
delivered twice, retried, or taken over from a dead worker may run the model
again but never completes, fails or bills the turn twice.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from shared import metrics
from shared.db import utcnow
from shared.errors import InsufficientBalance
from shared.logging import turn_id_var
from shared.models import ChatSession, Hold, ToolCallEvent, Turn, UploadedFile
from shared.providers import (
    ProviderError,
    ProviderPermanentError,
    ProviderTransientError,
    extract_search_query,
    room_files_line,
)
from shared.runtime import Runtime
from shared.services import billing, enforcement, pricing, summaries
from shared.services.turns import FINISHED, worst_case_cost
from shared.tools.registry import ToolContext

log = logging.getLogger(__name__)

MAX_TOOL_ROUNDS = 3
TOOL_TIMEOUT_SECONDS = 10.0
MAX_ATTEMPTS = 5
EXCERPT_CHARS = 300
ROOM_FILES_LISTED = 50
SYSTEM_PROMPT = (
    "You are Tollgate's assistant. Answer concisely. Use the `search` tool to look things up in "
    "the room's files and earlier turns, and `file_read` to read a file."
)


class RetryLater(Exception):
    """A transient failure: the turn went back to ``queued``; retry the task after ``countdown``."""

    def __init__(self, code: str, countdown: float) -> None:
        super().__init__(code)
        self.code = code
        self.countdown = countdown


@dataclass
class Execution:
    reply: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    summary_used_fallback: bool = False
    messages: list[dict] = field(default_factory=list)


def _lock(session: Session, turn_id: str) -> Turn | None:
    return session.scalar(select(Turn).where(Turn.id == turn_id).with_for_update())


def _fail_locked(session: Session, turn: Turn, code: str, message: str) -> None:
    billing.release_hold(session, turn_id=turn.id, reason=code)
    turn.status = "failed"
    turn.error_code = code
    turn.error_message = message[:2000]
    turn.completed_at = turn.updated_at = utcnow()


def _ended(turn: Turn) -> None:
    """Count and log a turn whose terminal state was just committed.

    ``refused``: the worker's enforcement re-check failed it for insufficient credit.
    """
    outcome = "refused" if turn.error_code == InsufficientBalance.error else turn.status
    seconds = None
    if turn.completed_at is not None and turn.created_at is not None:
        seconds = (turn.completed_at - turn.created_at).total_seconds()
    metrics.turn_finished(outcome, seconds)
    if outcome == "refused":
        metrics.enforcement_refused("worker")
    if turn.error_code:
        log.info("turn %s: %s", outcome, turn.error_code)
    else:
        log.info("turn %s", outcome)


def fail(runtime: Runtime, turn_id: str, code: str, message: str) -> bool:
    """Fail a turn that has not finished, releasing its hold. Returns whether it did."""
    with runtime.db.session() as session:
        turn = _lock(session, turn_id)
        if turn is None or turn.status in FINISHED:
            session.rollback()
            return False
        _fail_locked(session, turn, code, message)
        session.commit()
        _ended(turn)
        return True


def claim(runtime: Runtime, turn_id: str, *, takeover: bool) -> Turn | None:
    """Mark the turn ``running`` for this attempt, or return ``None`` when there is nothing to do.

    ``takeover``: the task was redelivered (its previous run died) or re-sent by
    ``recover_stuck_turns``, so a ``running`` status is stale and may be taken over.
    """
    now = utcnow()
    with runtime.db.session() as session:
        turn = _lock(session, turn_id)
        if turn is None or turn.status in FINISHED:
            session.rollback()
            return None
        stale_before = now - timedelta(seconds=runtime.settings.turn_stale_seconds)
        if turn.status == "running" and not takeover and turn.started_at and turn.started_at > stale_before:
            session.rollback()  # another worker is on it
            return None
        if turn.attempts >= MAX_ATTEMPTS:
            _fail_locked(session, turn, "worker_lost", "The turn did not finish after repeated attempts.")
            session.commit()
            _ended(turn)
            return None
        if not _admitted_now(runtime, session, turn):
            session.commit()
            _ended(turn)
            return None
        turn.status = "running"
        turn.attempts += 1
        turn.started_at = turn.updated_at = now
        # A new attempt records its own tool calls.
        session.execute(delete(ToolCallEvent).where(ToolCallEvent.turn_id == turn.id))
        session.commit()
        log.info("turn running (attempt %d)", turn.attempts)
        return turn


def _admitted_now(runtime: Runtime, session: Session, turn: Turn) -> bool:
    """Re-check enforcement in the worker (design §4). Fails the turn and returns False if refused."""
    if turn.enforced:
        hold = session.scalar(select(Hold).where(Hold.turn_id == turn.id))
        if hold is not None and hold.status != "active":
            _fail_locked(
                session, turn, "hold_expired", "The credit reserved for this turn expired before it ran."
            )
            return False
        return True
    if not enforcement.is_enforced(runtime):
        return True
    price = pricing.price_in_force(session, turn.model)
    try:
        billing.place_hold(
            session,
            user_id=turn.user_id,
            turn_id=turn.id,
            amount=worst_case_cost(price, turn.content, turn.max_output_tokens),
            ttl_seconds=runtime.settings.hold_ttl_seconds,
        )
    except InsufficientBalance as exc:
        _fail_locked(session, turn, exc.error, exc.message)
        return False
    turn.enforced = True
    return True


def _room_files_line(session: Session, room_id: str) -> str | None:
    files = session.execute(
        select(UploadedFile.filename, UploadedFile.id)
        .where(UploadedFile.room_id == room_id, UploadedFile.status == "ready")
        .order_by(UploadedFile.created_at.desc())
        .limit(ROOM_FILES_LISTED)
    ).all()
    if not files:
        return None
    return room_files_line(files)


def _excerpt(text: str) -> str:
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


def _record_tool_call(
    session: Session, turn: Turn, name: str, arguments: dict, result, duration_ms: int
) -> None:
    session.add(
        ToolCallEvent(
            turn_id=turn.id,
            room_id=turn.room_id,
            tool=name[:64],
            arguments=arguments,
            status=result.status,
            duration_ms=duration_ms,
            result_excerpt=_excerpt(result.content),
        )
    )
    session.commit()


def _call_tool(session, tools, turn: Turn, name: str, arguments: dict, parse_error: str | None):
    started = time.monotonic()
    if parse_error:
        from shared.tools.registry import ToolResult

        result = ToolResult(status="error", content=f"invalid arguments: {parse_error}", data=None)
    else:
        ctx = ToolContext(
            session=session,
            user_id=turn.user_id,
            room_id=turn.room_id,
            chat_session_id=turn.session_id,
            before_seq=turn.seq,
        )
        result = tools.call(name, arguments, ctx, timeout=TOOL_TIMEOUT_SECONDS)
    elapsed = time.monotonic() - started
    # The model may name any tool: unknown names share one label, so the series stay few.
    metrics.tool_called(name if name in tools.names() else "unknown", result.status, elapsed)
    _record_tool_call(session, turn, name, arguments, result, int(elapsed * 1000))
    return result


def execute(runtime: Runtime, turn: Turn, provider, tools) -> Execution:
    """Build the context, refresh the summary if needed, run the model with tools.

    :raises ProviderError: from the turn's own model call (summary failures fall back).
    """
    result = Execution()
    # No transaction stays open across a model call: each read block ends with a
    # commit (Postgres: no idle-in-transaction; SQLite: no write lock held).
    with runtime.db.session() as session:
        chat = session.get(ChatSession, turn.session_id)
        recent, evicted = summaries.window(session, chat.id, turn.seq)
        missing = summaries.uncovered(chat, evicted)
        summary_text = chat.summary
        session.commit()
        if missing:
            summary = summaries.summarize(provider, turn.model, chat.summary, missing, allow_fallback=True)
            summaries.store(session, chat.id, summary)
            summary_text = summary.text
            result.summary_used_fallback = summary.used_fallback
            result.input_tokens += summary.input_tokens
            result.output_tokens += summary.output_tokens

        messages: list[dict] = [{"role": "system", "content": SYSTEM_PROMPT}]
        files_line = _room_files_line(session, turn.room_id)
        session.commit()
        if files_line:
            messages.append({"role": "system", "content": files_line})
        if summary_text:
            messages.append({"role": "system", "content": f"Conversation summary so far:\n{summary_text}"})
        for earlier in recent:
            messages.append({"role": "user", "content": earlier.content})
            messages.append({"role": "assistant", "content": earlier.reply or ""})
        if not provider.supports_tools:
            query = extract_search_query(turn.content)
            if query:
                found = _call_tool(session, tools, turn, "search", {"query": query[:500]}, None)
                messages.append({"role": "system", "content": f"Search results:\n{found.content}"})
        messages.append({"role": "user", "content": turn.content})
        tool_schemas = tools.schemas() if provider.supports_tools else None

        for round_number in range(MAX_TOOL_ROUNDS + 1):
            offer_tools = tool_schemas if round_number < MAX_TOOL_ROUNDS else None
            completion = provider.complete(
                messages, model=turn.model, max_output_tokens=turn.max_output_tokens, tools=offer_tools
            )
            result.input_tokens += completion.input_tokens
            result.output_tokens += completion.output_tokens
            if not completion.tool_calls or offer_tools is None:
                result.reply = completion.content or ""
                break
            messages.append(
                {
                    "role": "assistant",
                    "content": completion.content,
                    "tool_calls": [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": call.raw_arguments},
                        }
                        for call in completion.tool_calls
                    ],
                }
            )
            for call in completion.tool_calls:
                found = _call_tool(session, tools, turn, call.name, call.arguments, call.parse_error)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": found.content})
    result.messages = messages
    return result


def complete(runtime: Runtime, turn_id: str, result: Execution) -> bool:
    """Price, bill and store the reply in one transaction. Returns False if the turn had already ended."""
    with runtime.db.session() as session:
        turn = _lock(session, turn_id)
        if turn is None or turn.status in FINISHED:
            session.rollback()
            return False
        now = utcnow()
        price = pricing.price_in_force(session, turn.model, at=turn.started_at or now)
        cost = pricing.cost_of(price, result.input_tokens, result.output_tokens)
        balance_after = billing.settle_turn(
            session,
            user_id=turn.user_id,
            turn_id=turn.id,
            model=turn.model,
            cost=cost,
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            at=now,
        )
        hold = session.scalar(select(Hold).where(Hold.turn_id == turn.id))
        # A captured hold caps the charge at what admission reserved (docs/billing.md);
        # a released or expired hold means the full cost was debited.
        turn.cost = min(cost, hold.amount) if hold is not None and hold.status == "captured" else cost
        turn.balance_after = balance_after
        turn.low_balance = balance_after < runtime.settings.low_balance_threshold
        turn.reply = result.reply
        turn.input_tokens = result.input_tokens
        turn.output_tokens = result.output_tokens
        turn.summary_used_fallback = result.summary_used_fallback
        turn.status = "completed"
        turn.error_code = turn.error_message = None
        turn.completed_at = turn.updated_at = now
        session.commit()
        _ended(turn)
        return True


def retry_countdown(base_seconds: float, attempt: int) -> float:
    """Exponential backoff between task retries, capped at 30 s."""
    return min(base_seconds * (2 ** max(attempt - 1, 0)), 30.0)


def run_turn(
    runtime: Runtime,
    turn_id: str,
    *,
    provider,
    tools,
    takeover: bool,
    final_attempt: bool,
    after_complete=None,
) -> str:
    """Run one turn to its end. Returns the outcome: ``completed``, ``failed`` or ``skipped``.

    ``after_complete(turn)`` runs once the completion committed (e.g. to queue the summary refresh).

    :raises RetryLater: a transient provider failure with retries left; the turn is ``queued`` again.
    """
    token = turn_id_var.set(turn_id)
    try:
        turn = claim(runtime, turn_id, takeover=takeover)
        if turn is None:
            return "skipped"
        try:
            result = execute(runtime, turn, provider, tools)
        except ProviderTransientError as exc:
            if final_attempt:
                fail(runtime, turn_id, exc.code, str(exc))
                return "failed"
            _requeue(runtime, turn_id)
            raise RetryLater(
                exc.code, retry_countdown(runtime.settings.turn_retry_base_seconds, turn.attempts)
            ) from exc
        except (ProviderPermanentError, ProviderError) as exc:
            fail(runtime, turn_id, exc.code, str(exc))
            return "failed"
        if not complete(runtime, turn_id, result):
            return "skipped"
        if after_complete is not None:
            after_complete(turn)
        return "completed"
    finally:
        turn_id_var.reset(token)


def _requeue(runtime: Runtime, turn_id: str) -> None:
    with runtime.db.session() as session:
        turn = _lock(session, turn_id)
        if turn is not None and turn.status == "running":
            turn.status = "queued"
            turn.updated_at = utcnow()
        session.commit()


def refresh_summary(runtime: Runtime, chat_session_id: str, *, provider) -> bool:
    """Fold turns that left the window into the summary ahead of the next turn.

    Model tokens are billed to the session's user. Failures leave the summary as
    it is (the next turn falls back); with enforcement on, a wallet that cannot
    cover the summary is not charged and the summary waits for the next turn.
    """
    with runtime.db.session() as session:
        chat = session.get(ChatSession, chat_session_id)
        if chat is None:
            return False
        latest = session.scalar(
            select(Turn)
            .where(Turn.session_id == chat.id, Turn.kind == "chat")
            .order_by(Turn.seq.desc())
            .limit(1)
        )
        if latest is None:
            return False
        _, evicted = summaries.window(session, chat.id, latest.seq + 1)
        missing = summaries.uncovered(chat, evicted)
        if not missing:
            return False
        model = latest.model
        try:
            summary = summaries.summarize(provider, model, chat.summary, missing, allow_fallback=False)
        except ProviderError as exc:
            log.info("refresh_summary skipped: %s", exc)
            return False
        if not billing.record_summary_usage(
            session,
            user_id=chat.user_id,
            chat_session_id=chat.id,
            through_seq=summary.through_seq,
            model=model,
            input_tokens=summary.input_tokens,
            output_tokens=summary.output_tokens,
            enforce=enforcement.is_enforced(runtime),
        ):
            session.rollback()  # enforcement on and the wallet cannot cover the summary
            metrics.enforcement_refused("summary")
            return False
        session.commit()
        return summaries.store(session, chat.id, summary)


def recover_stuck_turns(runtime: Runtime, celery_app, *, queued_grace_seconds: float = 30.0) -> dict:
    """Beat job: re-send turns whose task was lost (queued too long) or whose worker died
    (running past the stale limit). Safe because ``run_turn`` is idempotent."""
    now = utcnow()
    counts = {"queued": 0, "running": 0}
    with runtime.db.session() as session:
        queued = session.scalars(
            select(Turn.id).where(
                Turn.status == "queued", Turn.updated_at < now - timedelta(seconds=queued_grace_seconds)
            )
        ).all()
        stale = session.scalars(
            select(Turn.id).where(
                Turn.status == "running",
                Turn.started_at < now - timedelta(seconds=runtime.settings.turn_stale_seconds),
            )
        ).all()
    for turn_id in queued:
        celery_app.send_task("tollgate.run_turn", args=[turn_id])
        counts["queued"] += 1
    if queued:
        # Restart the grace period so a turn waiting in a long queue is not re-sent every run.
        with runtime.db.session() as session:
            session.execute(
                update(Turn).where(Turn.id.in_(queued), Turn.status == "queued").values(updated_at=now)
            )
            session.commit()
    for turn_id in stale:
        celery_app.send_task("tollgate.run_turn", args=[turn_id], kwargs={"takeover": True})
        counts["running"] += 1
    if queued or stale:
        log.warning("recover_stuck_turns re-sent %s", json.dumps(counts))
    return counts
