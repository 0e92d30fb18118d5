"""Running a turn in the worker: claim, context + summary, model and tools, settle.

A turn ends exactly once. Every state change happens under the turn's row
lock and checks the status first; billing is idempotent per turn. So a task
delivered twice, retried, or taken over from a dead worker may run the model
again but never completes, fails or bills the turn twice.

Every turn ends (design §3): whatever goes wrong while it runs — a provider
error, model output the pipeline cannot use, a bug — the turn ends ``failed``
with a stable code and the tokens the provider already consumed are billed.
Usage is saved on the turn row after every model call that more work follows,
so a retry or a takeover of a dead worker's turn still bills what the earlier
attempt used. Every call is checked against what is left of the hold first
(``shared.services.turn_budget``), so an enforced turn never costs more than
its hold.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from functools import cache, partial
from typing import NamedTuple

from sqlalchemy import and_, bindparam, delete, null, or_, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.attributes import set_committed_value

from shared import metrics
from shared.db import is_database_unavailable, new_id, utcnow
from shared.errors import Conflict, InsufficientBalance
from shared.logging import turn_id_var
from shared.models import (
    ChatSession,
    Hold,
    HoldStatus,
    ModelPrice,
    ToolCallEvent,
    ToolCallStatus,
    Turn,
    TurnKind,
    TurnStatus,
)
from shared.prompts import extract_search_query
from shared.providers import ProviderError, ProviderTransientError
from shared.runtime import Runtime
from shared.services import billing, enforcement, pricing, summaries, turn_context, turn_events
from shared.services.text import clean_json, clean_text
from shared.services.turn_budget import BudgetExhausted, HoldPolicy, TurnBudget
from shared.services.turn_columns import turn_columns, turn_values
from shared.services.turns import (
    FINISHED,
    owned_turn,
    place_turn_hold,
    pushed_read,
    wait_until_finished,
)
from shared.task_names import TaskName
from shared.tools.registry import ToolContext, ToolResult

log = logging.getLogger(__name__)

MAX_TOOL_ROUNDS = 3
TOOL_TIMEOUT_SECONDS = 10.0
MAX_ATTEMPTS = 5
# Above every turn's seq (an INTEGER): "before it" is the whole session.
MAX_SEQ = 2**31 - 1
# A running turn from before leases existed is presumed dead after this long.
LEGACY_STALE = timedelta(seconds=360)
EXCERPT_CHARS = 300

# What users read in a failed turn's ``error.message``; details (upstream bodies,
# tracebacks) go to the logs only.
ERROR_MESSAGES = {
    "bad_model_output": "The model returned output that could not be used.",
    "internal_error": "The turn failed because of an internal error.",
    "budget_exhausted": "The credit reserved for this turn ran out before the model could answer.",
    "turn_timeout": "The turn did not finish within the time limit.",
    "worker_lost": "The turn did not finish after repeated attempts.",
    "hold_expired": "The credit reserved for this turn expired before it ran.",
}


def error_message(code: str, fallback: str | None = None) -> str:
    """The user-facing message for a failure code."""
    if code in ERROR_MESSAGES:
        return ERROR_MESSAGES[code]
    return fallback or ProviderError(code).message


class RetryLater(Exception):
    """A transient failure: the turn went back to ``queued``; retry the task after ``countdown``."""

    def __init__(self, code: str, countdown: float) -> None:
        super().__init__(code)
        self.code = code
        self.countdown = countdown


@dataclass
class Execution:
    """One attempt's outcome so far; on failure, the usage in it is what gets billed.

    Token counts include what earlier attempts of the same turn used.
    """

    reply: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    summary_used_fallback: bool = False
    # Some of the usage is the token rule's estimate, not the provider's report.
    usage_estimated: bool = False
    # The turn was cancelled (POST /turns/{id}/cancel): ``reply`` is what was generated so far.
    cancelled: bool = False
    # A /v1 turn answered with calls of the caller's tools (OpenAI's ``tool_calls``).
    reply_tool_calls: list[dict] | None = None
    # This turn pushes the oldest turn of a full window out: a background summary refresh is due.
    summary_due_after: bool = False
    messages: list[dict] = field(default_factory=list)
    # Tool calls this attempt recorded (none: the end's push can carry the whole turn).
    tool_calls_recorded: int = 0
    # The turn's price, once read: the price in force at the turn's creation stays so, and
    # the settlement bills at the price the budget (and the hold) was sized with.
    price: ModelPrice | None = None

    def add(self, input_tokens: int, output_tokens: int, *, estimated: bool = False) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        if estimated and (input_tokens or output_tokens):
            self.usage_estimated = True


# Built once (twice a turn: claim and settle); see docs/architecture.md "The hot path, counted".
# NO KEY UPDATE: tool-call rows referencing the turn (KEY SHARE) are not blocked by it.
_LOCK_TURN = select(Turn).where(Turn.id == bindparam("turn_id")).with_for_update(key_share=True)


def _lock(session: Session, turn_id: str) -> Turn | None:
    return session.scalar(_LOCK_TURN, {"turn_id": turn_id})


def _lock_with_hold_statement():
    """The turn and its hold (if any) locked in one statement (``billing.turn_then_its_hold``),
    both returned as ORM rows (no hold: ``None`` on its side)."""
    locked_turn, locked_hold = billing.turn_then_its_hold(
        select(Turn.__table__), select(Hold.__table__), ("locked_turn", "locked_hold")
    )
    return (
        select(aliased(Turn, locked_turn), aliased(Hold, locked_hold))
        .select_from(locked_turn)
        .outerjoin(locked_hold, true())
    )


_LOCK_WITH_HOLD = _lock_with_hold_statement()


def _lock_with_hold(session: Session, turn_id: str) -> tuple[Turn | None, Hold | None]:
    """``_lock`` and the settlement's lock of the turn's hold, in one round trip."""
    row = session.execute(_LOCK_WITH_HOLD, {"turn_id": turn_id}).first()
    return (row[0], row[1]) if row is not None else (None, None)


def _end_locked(
    runtime: Runtime,
    session: Session,
    turn: Turn,
    *,
    status: str,
    input_tokens: int,
    output_tokens: int,
    now,
    price: ModelPrice | None = None,
    hold: billing.HoldArgument = billing.LOCK_IT,
    values: dict,
    guard: billing.SettleGuard | None = None,
) -> bool:
    """Bill what the turn used (nothing used: release its hold), at ``price`` (when the
    attempt read it already) or the price in force at the turn's creation, and write the
    turn's row ended ``status`` with the caller's ``values`` (reply, error…). Does not
    commit. ``hold``: the turn's hold when the caller locked it with the turn
    (``_lock_with_hold``). Returns whether it did: always, but with ``guard``.

    ``guard`` (Postgres, a charge): the caller took no lock; the settlement is one
    statement that checks the guard first (``billing.SettleGuard``), and nothing is written
    (False) when the turn or its hold is not as the guard says.

    The caller holds the turn's row lock and found it not finished (every caller checks
    ``FINISHED`` under the lock), and this is the one place a turn is settled: so no
    settle of it exists yet, and ``settle_turn`` does not look for one.

    The turn row is written once, after billing: a second UPDATE of a row this transaction
    already changed makes Postgres re-check its foreign keys (KEY SHARE on the session row).
    On Postgres a charge writes it in the wallet's statement (``billing.TurnRow``): one
    round trip fewer.
    """
    values = {
        **values,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "status": status,
        "completed_at": now,
        "updated_at": now,
    }
    if not (input_tokens or output_tokens):
        if guard is not None:
            return False
        billing.release_hold(session, turn_id=turn.id, reason=f"turn {status}", hold=hold)
        _write_turn(session, turn, {**values, "cost": None, "balance_after": None})
        return True
    price = price or pricing.price_in_force(session, turn.model, at=turn.created_at)
    threshold = runtime.settings.low_balance_threshold
    settled = billing.settle_turn(
        session,
        user_id=turn.user_id,
        turn_id=turn.id,
        model=turn.model,
        cost=pricing.cost_of(price, input_tokens, output_tokens),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        at=now,
        enforced=turn.enforced,
        completed=status == TurnStatus.COMPLETED,
        api_key_id=turn.api_key_id,
        hold=hold,
        unsettled=True,  # every caller locked the turn and found it not finished
        turn_row=billing.TurnRow(values, low_balance_below=threshold),
        guard=guard,
    )
    if settled is None:
        return False
    values.update(
        cost=settled.charged,
        balance_after=settled.balance_after,
        low_balance=settled.balance_after < threshold,
    )
    if settled.turn_written:
        for name, value in values.items():
            set_committed_value(turn, name, value)
    else:
        _write_turn(session, turn, values)
    return True


@cache
def _turn_update(names: tuple[str, ...]):
    """``UPDATE turns SET <names> WHERE id = :turn_id``, built once per set of columns."""
    table = Turn.__table__
    return update(table).where(table.c.id == bindparam("turn_id")).values(turn_columns(names))


def _write_turn(session: Session, turn: Turn, values: dict) -> None:
    """Write ``values`` to the locked turn's row with one prebuilt UPDATE, not the unit of
    work's flush, and tell the entity they are its committed values. Caller commits."""
    session.execute(
        _turn_update(tuple(sorted(values))),
        {"turn_id": turn.id, **turn_values(values)},
    )
    for name, value in values.items():
        set_committed_value(turn, name, value)


def _fail_locked(
    runtime: Runtime,
    session: Session,
    turn: Turn,
    code: str,
    message: str | None = None,
    execution: Execution | None = None,
) -> None:
    used_in = max(turn.input_tokens, execution.input_tokens if execution else 0)
    used_out = max(turn.output_tokens, execution.output_tokens if execution else 0)
    values = {"error_code": code, "error_message": clean_text(error_message(code, message))[:2000]}
    if execution is not None and execution.usage_estimated:
        values["usage_estimated"] = True
    _end_locked(
        runtime,
        session,
        turn,
        status=TurnStatus.FAILED,
        input_tokens=used_in,
        output_tokens=used_out,
        now=utcnow(),
        price=execution.price if execution else None,
        values=values,
    )


def _ended(runtime: Runtime, turn: Turn, *, no_tool_calls: bool = False) -> None:
    """Announce, count and log a turn whose terminal state was just committed.

    ``no_tool_calls``: the turn is known to have recorded none (this attempt recorded none,
    and it is the first), so its push carries it whole (``turns.pushed_read``).
    ``refused``: the worker's enforcement re-check failed it for insufficient credit.
    """
    turn_events.publish_ended(runtime, turn.id, pushed_read(turn) if no_tool_calls else None)
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


def fail(
    runtime: Runtime,
    turn_id: str,
    code: str,
    message: str | None = None,
    execution: Execution | None = None,
) -> bool:
    """Fail a turn that has not finished: bill the tokens it consumed (``execution``'s or
    those saved on the turn), release the rest of its hold. Returns whether it did."""
    with runtime.db.session() as session:
        turn = _lock(session, turn_id)
        if turn is None or turn.status in FINISHED:
            session.rollback()
            return False
        _fail_locked(runtime, session, turn, code, message, execution)
        session.commit()
        _ended(runtime, turn)
        return True


class Claimed(NamedTuple):
    turn: Turn
    # The active hold's amount when the claim read it (its budget needs no second read).
    hold_amount: Decimal | None = None
    # What the one-statement claim left (the turn running under this attempt's lease, its
    # hold active or none): the settlement checks it instead of locking (``complete``).
    guard: billing.SettleGuard | None = None
    # The price in force at the turn's creation, when the claim read it (its budget's).
    price: ModelPrice | None = None


def _claim_first_attempt_statement(held: bool):
    """The claim of a queued turn's first attempt as one statement (Postgres), the turn and
    its hold's amount and id and the turn's price returned; no row: the turn is in any
    other state, for the claim below.

    ``held``: an enforced turn whose hold is still active. The turn is locked first, then
    its hold, as the claim below and a cancel lock them, then the turn is written
    ``running``. Else an unenforced turn (the caller found enforcement off): the turn alone,
    its amount and id ``NULL``."""
    turns, holds = Turn.__table__, Hold.__table__
    queued = and_(
        turns.c.status == TurnStatus.QUEUED,
        turns.c.attempts == 0,
        turns.c.cancel_requested_at.is_(None),
        turns.c.enforced.is_(held),
    )
    if held:
        _, hold = billing.turn_then_its_hold(
            select(turns.c.id).where(queued),
            select(holds.c.turn_id, holds.c.amount, holds.c.id.label("hold_id")).where(
                holds.c.status == HoldStatus.ACTIVE
            ),
            ("queued_turn", "active_hold"),
        )
        which, amount, hold_id = turns.c.id == hold.c.turn_id, hold.c.amount, hold.c.hold_id
    else:
        # The UPDATE's own lock, its WHERE re-checked on the row as committed.
        which, amount, hold_id = queued, null().label("amount"), null().label("hold_id")
    now = bindparam("now", type_=turns.c.started_at.type)
    # A Core UPDATE loaded as ORM rows (aliased on its CTE): an ORM-enabled UPDATE …
    # RETURNING goes through the bulk-update machinery, which builds its statement's cache
    # key again on every execution (about a quarter of its CPU).
    claimed = (
        update(turns)
        .where(turns.c.id == bindparam("turn_id"), which)
        .values(
            status=TurnStatus.RUNNING,
            attempts=1,
            started_at=now,
            updated_at=now,
            lease_owner=bindparam("owner"),
            lease_expires_at=bindparam("lease_expires_at", type_=turns.c.lease_expires_at.type),
        )
        .returning(*turns.c, amount, hold_id)
        .cte("claimed_turn")
    )
    # The price in force at the turn's creation (pricing.price_in_force's read), for its
    # budget and its settlement: no read of its own. None (no version yet): read it then.
    prices = ModelPrice.__table__
    price = (
        select(prices)
        .where(prices.c.model == claimed.c.model, prices.c.effective_from <= claimed.c.created_at)
        .order_by(prices.c.effective_from.desc())
        .limit(1)
        .lateral("price_in_force")
    )
    return (
        select(aliased(Turn, claimed), claimed.c.amount, claimed.c.hold_id, aliased(ModelPrice, price))
        .select_from(claimed)
        .outerjoin(price, true())
    )


_CLAIM_QUEUED = {held: _claim_first_attempt_statement(held) for held in (True, False)}


def claim(
    runtime: Runtime, turn_id: str, *, takeover: bool, owner: str | None = None, held: bool = True
) -> Claimed | None:
    """Mark the turn ``running`` under a lease for this attempt (``owner``: the task id), or
    return ``None`` when there is nothing to do.

    A ``running`` turn is taken over only once its lease lapsed (its worker stopped renewing
    it: shared/services/leases.py) or by its own owner (a task retried after a database
    outage). ``takeover`` lets a redelivered or re-sent task take over a running turn that
    has no lease at all (rows from before leases existed).

    On Postgres, the usual case (a queued turn's first attempt: enforced with its hold
    active, or unenforced while enforcement is still off) is one autocommit statement
    (``_CLAIM_QUEUED``) instead of a transaction of three; every other case, and a miss,
    takes the path below. ``held``: the turn was admitted with a hold, as far as the caller
    knows (the task's message says when not). An unenforced turn checks the toggle first,
    as the path below does (design §4): found on, the path below places its hold.
    """
    now = utcnow()
    owner = owner or new_id()
    lease_expires_at = now + timedelta(seconds=runtime.settings.turn_lease_seconds)
    if runtime.db.dialect == "postgresql" and (held or not enforcement.is_enforced(runtime)):
        with runtime.db.session(reads_only=True) as session:
            row = session.execute(
                _CLAIM_QUEUED[held],
                {"turn_id": turn_id, "now": now, "owner": owner, "lease_expires_at": lease_expires_at},
            ).first()
            session.commit()
        if row is not None:
            log.info("turn running (attempt 1)")
            turn, amount, hold_id, price = row
            hold = None
            if hold_id is not None:
                hold = Hold(id=hold_id, turn_id=turn_id, amount=amount, status=HoldStatus.ACTIVE)
            guard = billing.SettleGuard(owner, hold, runtime.settings.low_balance_threshold)
            return Claimed(turn, amount, guard, price)
    with runtime.db.session() as session:
        turn = _lock(session, turn_id)
        if turn is None or turn.status in FINISHED:
            session.rollback()
            return None
        if turn.status == TurnStatus.RUNNING and not _may_take_over(turn, owner, takeover, now):
            session.rollback()  # another worker is on it
            return None
        if turn.cancel_requested_at is not None:
            # Cancelled while its worker was gone: bill what earlier attempts used.
            _cancel_locked(runtime, session, turn, None)
            session.commit()
            _ended(runtime, turn)
            return None
        if turn.attempts >= MAX_ATTEMPTS:
            _fail_locked(runtime, session, turn, "worker_lost")
            session.commit()
            _ended(runtime, turn)
            return None
        if not _admitted_now(runtime, session, turn):
            session.commit()
            _ended(runtime, turn)
            return None
        if turn.attempts:
            # A new attempt records its own tool calls.
            session.execute(delete(ToolCallEvent).where(ToolCallEvent.turn_id == turn.id))
        claimed = {
            "status": TurnStatus.RUNNING,
            "attempts": turn.attempts + 1,
            "started_at": now,
            "updated_at": now,
            "lease_owner": owner,
            "lease_expires_at": lease_expires_at,
        }
        _write_turn(session, turn, claimed)
        session.commit()
        log.info("turn running (attempt %d)", turn.attempts)
        return Claimed(turn)


def _may_take_over(turn: Turn, owner: str, takeover: bool, now) -> bool:
    if turn.lease_expires_at is None:
        return takeover or (turn.started_at is not None and turn.started_at < now - LEGACY_STALE)
    return turn.lease_expires_at <= now or turn.lease_owner == owner


def _admitted_now(runtime: Runtime, session: Session, turn: Turn) -> bool:
    """Re-check enforcement in the worker (design §4). Fails the turn and returns False if refused.

    An enforced turn's hold is confirmed under its row lock, so the expiry job and this
    claim cannot both win; the turn's lease keeps it from expiring while it runs.
    """
    if turn.enforced:
        if billing.confirm_hold(session, turn_id=turn.id):
            return True
        _fail_locked(runtime, session, turn, "hold_expired")
        return False
    if not enforcement.is_enforced(runtime):
        return True
    try:
        place_turn_hold(runtime, session, turn)
    except InsufficientBalance as exc:
        _fail_locked(runtime, session, turn, exc.error, exc.message)
        return False
    turn.enforced = True
    return True


def _excerpt(text: str) -> str:
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


def _record_tool_call(
    session: Session, turn: Turn, name: str, arguments: dict, result, duration_ms: int
) -> ToolCallEvent:
    event = ToolCallEvent(
        id=new_id(),
        turn_id=turn.id,
        room_id=turn.room_id,
        tool=clean_text(name)[:64],
        arguments=clean_json(arguments),
        status=result.status,
        duration_ms=duration_ms,
        result_excerpt=clean_text(_excerpt(result.content)),
    )
    session.add(event)
    session.commit()
    return event


def _call_tool(session, tools, turn: Turn, name: str, arguments: dict, parse_error: str | None, stream=None):
    started = time.monotonic()
    if parse_error:
        result = ToolResult(
            status=ToolCallStatus.ERROR, content=f"invalid arguments: {parse_error}", data=None
        )
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
    event = _record_tool_call(session, turn, name, arguments, result, int(elapsed * 1000))
    if stream is not None:
        stream.tool_call(event)
    return result


def _save_usage(session: Session, turn: Turn, result: Execution) -> None:
    """Keep the usage so far on the running turn, for a retry or takeover to bill. Commits.

    Only while this attempt still owns the turn's lease: a stalled attempt that lost the
    turn to a takeover must not overwrite the usage the new attempt has saved."""
    session.execute(
        update(Turn)
        .where(Turn.id == turn.id, Turn.status == TurnStatus.RUNNING, Turn.lease_owner == turn.lease_owner)
        .values(
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            usage_estimated=result.usage_estimated,
        )
    )
    session.commit()


def budget_for(
    runtime: Runtime,
    session: Session,
    turn: Turn,
    *,
    hold_amount: Decimal | None = None,
    price: ModelPrice | None = None,
) -> TurnBudget:
    """The budget of this attempt: the turn's active hold (none: unbounded), at the turn's
    price, less what earlier attempts used. ``hold_amount`` and ``price``: the hold's amount
    and the turn's price when the caller read them already (the claim's), else they are
    read here."""
    price = price or pricing.price_in_force(session, turn.model, at=turn.created_at)
    reserved = None
    if turn.enforced:
        reserved = hold_amount if hold_amount is not None else billing.reserved_for(session, turn.id)
    return TurnBudget(
        price,
        HoldPolicy.from_settings(runtime.settings),
        reserved,
        spent_input_tokens=turn.input_tokens,
        spent_output_tokens=turn.output_tokens,
    )


def execute(
    runtime: Runtime,
    turn: Turn,
    provider,
    tools,
    result: Execution | None = None,
    stream=None,
    *,
    hold_amount: Decimal | None = None,
    price: ModelPrice | None = None,
) -> Execution:
    """Build the context, refresh the summary if due, run the model with tools.
    ``hold_amount`` and ``price``: the turn's hold's amount and its price, when its claim
    read them (``budget_for``).

    ``result`` is filled as the turn goes, so a caller catching an exception still
    knows what was used. ``stream`` (a ``turn_events.TurnPublisher``) receives the answer's
    pieces and tool calls, and says when the turn was cancelled: checked before every
    model call and between the pieces of one; a cancelled turn returns with
    ``result.cancelled`` and the partial reply.

    :raises ProviderError: from the turn's own model call (summary failures fall back).
    :raises BudgetExhausted: what is left of the hold cannot pay for the next call.
    """
    result = result if result is not None else Execution()
    result.input_tokens, result.output_tokens = turn.input_tokens, turn.output_tokens
    result.usage_estimated = turn.usage_estimated
    if turn.request_messages is not None:
        return _execute_messages(runtime, turn, provider, result, stream, hold_amount, price)

    def cancelled_now() -> bool:
        if stream is not None and stream.should_stop(now=True):
            result.cancelled = True
        return result.cancelled

    # No transaction stays open across a model call: each read block ends with a
    # commit (Postgres: no idle-in-transaction; SQLite: no write lock held).
    with runtime.db.session() as session:
        runtime.db.reads_without_transaction(session)
        chat, context = turn_context.load_with_chat(session, turn.session_id, turn.room_id, turn.seq)
        result.summary_due_after = summaries.due_after(context.recent)
        budget = budget_for(runtime, session, turn, hold_amount=hold_amount, price=price)
        result.price = budget.price
        session.commit()

        summary_text = context.summary
        if context.summary_due and not cancelled_now():
            summary_text = _refresh_summary(session, provider, turn, chat.id, context, budget, result)

        search_results = None
        if not provider.supports_tools:
            query = extract_search_query(turn.content)
            if query:
                found = _call_tool(session, tools, turn, "search", {"query": query[:500]}, None)
                result.tool_calls_recorded += 1
                search_results = found.content
        messages = turn_context.messages(
            context, turn.content, summary=summary_text, search_results=search_results
        )
        history = turn_context.history_bounds(messages, context)
        _run_model_with_tools(
            session, provider, tools, turn, messages, history, budget, result, stream, cancelled_now
        )
    result.messages = messages
    return result


def _refresh_summary(
    session: Session, provider, turn: Turn, chat_id: str, context, budget: TurnBudget, result: Execution
) -> str:
    """Fold the turns that left the window into the session's summary (a model call when
    what is left of the hold allows it, else the extractive fallback); count and save its
    tokens and store it. Returns the new summary's text."""
    answer = budget.call_cost(turn_context.messages(context, turn.content, summary=context.summary), None, 1)
    if budget.allows_summary(summaries.request_messages(context.summary, context.missing), answer):
        summary = summaries.fold_turns(
            provider, turn.model, context.summary, context.missing, allow_fallback=True
        )
    else:
        summary = summaries.fallback(context.summary, context.missing, "budget")
    result.summary_used_fallback = summary.used_fallback
    result.add(summary.input_tokens, summary.output_tokens)
    budget.record(summary.input_tokens, summary.output_tokens)
    if summary.input_tokens or summary.output_tokens:
        _save_usage(session, turn, result)
    summaries.store(session, chat_id, summary)
    return summary.text


def _run_model_with_tools(
    session: Session,
    provider,
    tools,
    turn: Turn,
    messages: list[dict],
    history,
    budget: TurnBudget,
    result: Execution,
    stream,
    cancelled_now: Callable[[], bool],
) -> None:
    """Call the model, run the tools it asks for and call it again with their results, for
    at most ``MAX_TOOL_ROUNDS`` rounds (the last one offers no tools), each call fitted to
    what is left of the hold. Appends to ``messages``; the answer goes to ``result.reply``."""
    tool_schemas = tools.schemas() if provider.supports_tools else None
    max_output = turn.max_output_tokens
    on_delta = stream.delta if stream is not None else None
    should_stop = stream.should_stop if stream is not None else None
    for round_number in range(MAX_TOOL_ROUNDS + 1):
        if cancelled_now():
            break
        offer_tools = tool_schemas if round_number < MAX_TOOL_ROUNDS else None
        if offer_tools and not budget.allows_tool_round(messages, offer_tools, max_output):
            offer_tools = None  # the hold pays for an answer, not another tool round
        send, call_max_output = budget.fit(messages, offer_tools, max_output, history)
        completion = provider.complete(
            send,
            model=turn.model,
            max_output_tokens=call_max_output,
            tools=offer_tools,
            on_delta=on_delta,
            should_stop=should_stop,
        )
        if stream is not None:
            stream.flush()
        result.add(completion.input_tokens, completion.output_tokens, estimated=completion.usage_estimated)
        budget.record(
            completion.input_tokens,
            completion.output_tokens,
            estimated_input=budget.estimate_input(send, offer_tools),
        )
        if completion.cancelled:
            result.cancelled = True
            result.reply = clean_text(completion.content or "")
            break
        if not completion.tool_calls or offer_tools is None:
            result.reply = clean_text(completion.content or "")
            break
        _save_usage(session, turn, result)
        messages.append(completion.assistant_message())
        for call in completion.tool_calls:
            found = _call_tool(session, tools, turn, call.name, call.arguments, call.parse_error, stream)
            result.tool_calls_recorded += 1
            messages.append({"role": "tool", "tool_call_id": call.id, "content": found.content})


def _execute_messages(
    runtime: Runtime,
    turn: Turn,
    provider,
    result: Execution,
    stream,
    hold_amount: Decimal | None,
    price: ModelPrice | None,
) -> Execution:
    """A /v1/chat/completions turn: the caller's messages are the whole context (no room
    context or summary), one model call offered the caller's own tools (Tollgate runs
    none: the calls go back to the caller), trimmed to the hold like any other."""
    with runtime.db.session() as session:
        runtime.db.reads_without_transaction(session)
        budget = budget_for(runtime, session, turn, hold_amount=hold_amount, price=price)
        result.price = budget.price
        session.commit()
    messages = list(turn.request_messages or [])
    if stream is not None and stream.should_stop(now=True):
        result.cancelled = True
        return result
    tools = turn.request_tools or None
    send, call_max_output = budget.fit(messages, tools, turn.max_output_tokens, (0, 0))
    completion = provider.complete(
        send,
        model=turn.model,
        max_output_tokens=call_max_output,
        tools=tools,
        on_delta=stream.delta if stream is not None else None,
        should_stop=stream.should_stop if stream is not None else None,
    )
    if stream is not None:
        stream.flush()
    result.add(completion.input_tokens, completion.output_tokens, estimated=completion.usage_estimated)
    result.cancelled = completion.cancelled
    result.reply = clean_text(completion.content or "")
    if completion.tool_calls and not completion.cancelled:
        result.reply_tool_calls = [clean_json(call.to_message()) for call in completion.tool_calls]
    result.messages = messages
    return result


def _cancel_locked(runtime: Runtime, session: Session, turn: Turn, result: Execution | None) -> None:
    """End the turn ``cancelled``: bill the tokens consumed so far (this attempt's and those
    saved by earlier ones) through the same settlement as any turn, release the rest."""
    used_in = max(turn.input_tokens, result.input_tokens if result else 0)
    used_out = max(turn.output_tokens, result.output_tokens if result else 0)
    values = {"error_code": None, "error_message": None}
    if result is not None:
        values["reply"] = result.reply or None
        values["summary_used_fallback"] = result.summary_used_fallback
        values["usage_estimated"] = turn.usage_estimated or result.usage_estimated
    _end_locked(
        runtime,
        session,
        turn,
        status=TurnStatus.CANCELLED,
        input_tokens=used_in,
        output_tokens=used_out,
        now=utcnow(),
        price=result.price if result else None,
        values=values,
    )


def finish_cancelled(runtime: Runtime, turn_id: str, result: Execution) -> bool:
    """End a running turn its worker stopped because it was cancelled. Returns False if it
    had already ended."""
    with runtime.db.session() as session:
        turn = _lock(session, turn_id)
        if turn is None or turn.status in FINISHED:
            session.rollback()
            return False
        _cancel_locked(runtime, session, turn, result)
        session.commit()
        _ended(runtime, turn)
        return True


def cancel(runtime: Runtime, session: Session, user_id: str, turn_id: str) -> Turn:
    """Cancel a turn (POST /turns/{id}/cancel); idempotent for a cancelled turn.

    A queued turn ends ``cancelled`` at once (tokens an earlier attempt used are billed,
    the rest of the hold released; its task will find it finished). A running turn gets
    its cancel request (the row's ``cancel_requested_at`` and the Redis flag); its worker
    stops at the next piece of the answer or the next round, bills what was consumed
    through the same settlement as any turn and releases the rest. Waits up to
    ``TURN_CANCEL_WAIT_SECONDS`` for that and returns the turn as it then stands.

    :raises NotFound: unknown or another user's turn.
    :raises Conflict: ``turn_finished``: it completed or failed before the cancel.
    """
    turn = owned_turn(session, user_id, turn_id)
    session.commit()
    turn = _lock(session, turn.id)
    if turn.status == TurnStatus.CANCELLED:
        session.commit()
        return turn
    if turn.status in FINISHED:
        session.rollback()
        raise Conflict(f"The turn already {turn.status}.", error="turn_finished", turn_status=turn.status)
    if turn.status == TurnStatus.QUEUED:
        _cancel_locked(runtime, session, turn, None)
        session.commit()
        _ended(runtime, turn)
        metrics.turn_cancelled(TurnStatus.QUEUED)
        return turn
    first_request = turn.cancel_requested_at is None
    if first_request:
        turn.cancel_requested_at = turn.updated_at = utcnow()
    session.commit()
    turn_events.request_cancel(runtime, turn.id)
    if first_request:
        metrics.turn_cancelled(TurnStatus.RUNNING)
    return wait_until_finished(runtime, session, turn, runtime.settings.turn_cancel_wait_seconds)


def complete(runtime: Runtime, turn_id: str, result: Execution, claimed: Claimed | None = None) -> bool:
    """Price, bill and store the reply in one transaction. Returns False if the turn had already ended.

    ``claimed``: this attempt's claim. When it left a ``guard`` (Postgres), the settlement
    is first tried as one autocommit statement that checks it (``billing.SettleGuard``):
    no BEGIN, lock or COMMIT round trips; the turn as the claim returned it is the one
    ended. Anything else (the guard no longer holds, nothing to charge) takes the locked
    transaction below."""

    def end(session: Session, turn: Turn, **locked) -> bool:
        return _end_locked(
            runtime,
            session,
            turn,
            status=TurnStatus.COMPLETED,
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            now=utcnow(),
            price=result.price,
            values={
                "reply": result.reply,
                "reply_tool_calls": result.reply_tool_calls,
                "summary_used_fallback": result.summary_used_fallback,
                "usage_estimated": result.usage_estimated,
                "error_code": None,
                "error_message": None,
            },
            **locked,
        )

    no_tool_calls = not result.tool_calls_recorded
    if claimed is not None and claimed.guard is not None and runtime.db.dialect == "postgresql":
        with runtime.db.session(reads_only=True) as session:
            ended = end(session, claimed.turn, guard=claimed.guard)
            session.commit()
        if ended:
            _ended(runtime, claimed.turn, no_tool_calls=no_tool_calls)
            return True
    with runtime.db.session() as session:
        turn, hold = _lock_with_hold(session, turn_id)
        if turn is None or turn.status in FINISHED:
            session.rollback()
            return False
        end(session, turn, hold=hold)
        session.commit()
        _ended(runtime, turn, no_tool_calls=turn.attempts == 1 and no_tool_calls)
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
    reraise: tuple[type[BaseException], ...] = (),
    owner: str | None = None,
    streamed: bool = True,
    held: bool = True,
) -> str:
    """Run one turn to its end. Returns the outcome: ``completed``, ``failed``, ``cancelled``
    or ``skipped``.

    ``after_complete(turn)`` runs once the completion committed and a summary refresh is due.
    ``reraise``: exceptions the caller handles itself (the task's time limit).
    ``owner``: the attempt's lease owner (the task id; a fresh id when not given). The
    process's heartbeat renews the turn's lease while it runs. ``streamed``: its client asked
    to stream it (the stream's pieces go out at once: ``turn_events.TurnPublisher``).
    ``held``: the turn was admitted with a hold, as far as its message says (``claim``).

    :raises RetryLater: a transient provider failure with retries left; the turn is ``queued`` again.
    :raises: a database outage (``shared.db.is_database_unavailable``), for the task to retry;
        every other exception ends the turn ``failed``.
    """
    token = turn_id_var.set(turn_id)
    try:
        claimed = claim(runtime, turn_id, takeover=takeover, owner=owner, held=held)
        if claimed is None:
            return "skipped"
        with runtime.leases.holding(turn_id, claimed.turn.lease_owner):
            return _run_claimed(
                runtime, claimed, provider, tools, final_attempt, after_complete, reraise, streamed
            )
    finally:
        turn_id_var.reset(token)


def _run_claimed(
    runtime: Runtime, claimed: Claimed, provider, tools, final_attempt, after_complete, reraise, streamed
) -> str:
    """``run_turn`` after a successful claim, under the turn's lease."""
    turn = claimed.turn
    turn_id = turn.id
    result = Execution()
    stream = _publisher(runtime, turn, streamed)
    if turn.attempts > 1:
        stream.reset(turn.attempts)
    try:
        execute(
            runtime,
            turn,
            provider,
            tools,
            result,
            stream,
            hold_amount=claimed.hold_amount,
            price=claimed.price,
        )
    except ProviderTransientError as exc:
        log.warning("model call failed: %s (%s)", exc.code, exc.message)
        result.add(exc.input_tokens, exc.output_tokens, estimated=exc.usage_estimated)
        if final_attempt:
            fail(runtime, turn_id, exc.code, execution=result)
            return TurnStatus.FAILED
        _requeue(runtime, turn_id, result)
        raise RetryLater(
            exc.code, retry_countdown(runtime.settings.turn_retry_base_seconds, turn.attempts)
        ) from exc
    except ProviderError as exc:
        log.warning("model call failed: %s (%s)", exc.code, exc.message)
        result.add(exc.input_tokens, exc.output_tokens, estimated=exc.usage_estimated)
        fail(runtime, turn_id, exc.code, execution=result)
        return TurnStatus.FAILED
    except BudgetExhausted as exc:
        fail(runtime, turn_id, exc.code, execution=result)
        return TurnStatus.FAILED
    except Exception as exc:
        if isinstance(exc, reraise) or is_database_unavailable(exc):
            raise
        _fail_unexpected(runtime, turn_id, exc, result)
        return TurnStatus.FAILED
    try:
        if result.cancelled:
            return TurnStatus.CANCELLED if finish_cancelled(runtime, turn_id, result) else "skipped"
        if not complete(runtime, turn_id, result, claimed):
            return "skipped"
    except Exception as exc:
        if isinstance(exc, reraise) or is_database_unavailable(exc):
            raise
        _fail_unexpected(runtime, turn_id, exc, result)
        return TurnStatus.FAILED
    if after_complete is not None and result.summary_due_after:
        after_complete(turn)
    return TurnStatus.COMPLETED


def _publisher(runtime: Runtime, turn: Turn, live: bool) -> turn_events.TurnPublisher:
    created_at = turn.created_at

    def cancel_requested() -> bool:
        with runtime.db.session() as session:
            requested = session.scalar(select(Turn.cancel_requested_at).where(Turn.id == turn.id))
            session.commit()
        return requested is not None

    def first_delta() -> None:
        if created_at is not None:
            metrics.first_token((utcnow() - created_at).total_seconds())

    return turn_events.TurnPublisher(
        runtime, turn.id, cancel_requested=cancel_requested, on_first_delta=first_delta, live=live
    )


def _fail_unexpected(runtime: Runtime, turn_id: str, exc: Exception, result: Execution) -> None:
    """Model output the pipeline could not handle (e.g. arguments nested past the recursion
    limit, a value the database refuses) or a bug: end the turn, billing what it used."""
    code = (
        "bad_model_output" if isinstance(exc, RecursionError | ValueError | TypeError) else "internal_error"
    )
    log.exception("turn failed unexpectedly (%s)", code)
    fail(runtime, turn_id, code, execution=result)


def _requeue(runtime: Runtime, turn_id: str, result: Execution) -> None:
    with runtime.db.session() as session:
        turn = _lock(session, turn_id)
        if turn is not None and turn.status == TurnStatus.RUNNING:
            turn.status = TurnStatus.QUEUED
            turn.lease_owner = turn.lease_expires_at = None
            turn.input_tokens, turn.output_tokens = result.input_tokens, result.output_tokens
            turn.usage_estimated = result.usage_estimated
            turn.updated_at = utcnow()
        session.commit()


def refresh_summary(runtime: Runtime, chat_session_id: str, *, provider, model: str | None = None) -> bool:
    """Fold turns that left the window into the summary ahead of the next turn.

    ``model``: the one the turn that sent the refresh ran on (its task message carries it);
    ``None``: the session's latest turn's.

    Model tokens are billed to the session's user. Failures leave the summary as
    it is (the next turn falls back). With enforcement on, the call is made only
    when the wallet's available credit covers its worst case, and the charge never
    takes available credit below zero.
    """
    with runtime.db.session() as session:
        runtime.db.reads_without_transaction(session)
        chat = session.get(ChatSession, chat_session_id)
        if chat is None:
            return False
        if model is None:
            model = session.scalar(
                select(Turn.model)
                .where(Turn.session_id == chat.id, Turn.kind == TurnKind.CHAT)
                .order_by(Turn.seq.desc())
                .limit(1)
            )
        if model is None:
            return False
        _, missing = summaries.window(session, chat, MAX_SEQ, fold_at=summaries.SUMMARY_BATCH_TURNS)
        if not missing:
            return False
        price = pricing.price_in_force(session, model)
        enforced = enforcement.is_enforced(runtime)
        if enforced:
            worst = TurnBudget(price, HoldPolicy.from_settings(runtime.settings), None).call_cost(
                summaries.request_messages(chat.summary, missing), None, summaries.SUMMARY_MAX_OUTPUT_TOKENS
            )
            if not billing.covers(session, user_id=chat.user_id, amount=worst):
                session.rollback()
                metrics.enforcement_refused("summary")
                return False
        session.commit()
        try:
            summary = summaries.fold_turns(provider, model, chat.summary, missing, allow_fallback=False)
        except ProviderError as exc:
            log.info("refresh_summary skipped: %s", exc.code)
            return False
        charge = partial(
            billing.record_summary_usage,
            session,
            user_id=chat.user_id,
            chat_session_id=chat.id,
            through_seq=summary.through_seq,
            model=model,
            input_tokens=summary.input_tokens,
            output_tokens=summary.output_tokens,
            enforce=enforced,
            price=price,
        )
        try:
            charged = None
            if runtime.db.dialect == "postgresql":
                # Most often one statement in autocommit does it (no BEGIN, look-up or
                # COMMIT); anything it does not cover is charged in a transaction below.
                runtime.db.reads_without_transaction(session)
                charged = charge(events_at=runtime.settings.low_balance_threshold)
                session.commit()
            if charged is None:
                charge()
        except IntegrityError:
            session.rollback()  # a concurrent refresh billed (and stores) this same summary
            return False
        # Committed before the summary is stored, in a transaction of its own: the store
        # locks the chat session's row, which an admission locks before the wallet, so
        # holding the wallet while waiting for it would deadlock with one.
        session.commit()
        if summary.used_fallback:
            return False  # the model answered nothing usable; the next turn tries again
        # The store is one UPDATE: in autocommit it costs no BEGIN and COMMIT round trips.
        runtime.db.reads_without_transaction(session)
        return summaries.store(session, chat.id, summary)


def _lapsed(now):
    """A running turn's lease has lapsed (or, from before leases, it started long ago)."""
    return or_(
        Turn.lease_expires_at < now,
        and_(Turn.lease_expires_at.is_(None), Turn.started_at < now - LEGACY_STALE),
    )


def recover_stuck_turns(runtime: Runtime, celery_app, *, queued_grace_seconds: float = 30.0) -> dict:
    """Beat job: re-send turns whose task was lost (queued too long) or whose worker died
    (running with a lapsed lease). Safe because ``run_turn`` is idempotent and a claim
    takes over only a lapsed lease."""
    now = utcnow()
    counts = {"queued": 0, "running": 0}
    with runtime.db.session() as session:
        queued = session.scalars(
            select(Turn.id).where(
                Turn.status == TurnStatus.QUEUED,
                Turn.updated_at < now - timedelta(seconds=queued_grace_seconds),
            )
        ).all()
        stale = session.scalars(select(Turn.id).where(Turn.status == TurnStatus.RUNNING, _lapsed(now))).all()
    for turn_id in queued:
        celery_app.send_task(TaskName.RUN_TURN, args=[turn_id])
        counts["queued"] += 1
    if queued:
        # Restart the grace period so a turn waiting in a long queue is not re-sent every run.
        with runtime.db.session() as session:
            session.execute(
                update(Turn)
                .where(Turn.id.in_(queued), Turn.status == TurnStatus.QUEUED)
                .values(updated_at=now)
            )
            session.commit()
    for turn_id in stale:
        # The re-sent task owns the lease from now: it alone may take the turn over, and the
        # turn is not re-sent again before that lease lapses too.
        task_id = new_id()
        with runtime.db.session() as session:
            handed = session.execute(
                update(Turn)
                .where(Turn.id == turn_id, Turn.status == TurnStatus.RUNNING, _lapsed(now))
                .values(
                    lease_owner=task_id,
                    lease_expires_at=now + timedelta(seconds=runtime.settings.turn_lease_seconds),
                )
            ).rowcount
            session.commit()
        if handed:
            celery_app.send_task(
                TaskName.RUN_TURN, args=[turn_id], kwargs={"takeover": True}, task_id=task_id
            )
            counts["running"] += 1
    if queued or stale:
        log.warning("recover_stuck_turns re-sent %s", json.dumps(counts))
    return counts
