"""Submitting turns: validation, the enforcement gate, idempotency, enqueue, wait.

Crash safety: the turn row (and its hold, when enforcement is on) commit in
one transaction *before* the task is sent. A crash after the commit leaves a
``queued`` turn without a task; ``recover_stuck_turns`` (beat) re-sends it. A
crash before the commit leaves nothing. ``run_turn`` is idempotent, so a task
sent twice still runs and bills the turn once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import Any, get_args, get_type_hints

from sqlalchemy import bindparam, func, insert, select, true
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, joinedload, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from shared import metrics
from shared.db import is_uuid, utcnow
from shared.errors import IdempotencyConflict, InsufficientBalance, InvalidInput, NotFound, SpendLimitReached
from shared.models import ChatSession, Hold, ModelPrice, ToolCallEvent, Turn, TurnKind, TurnStatus, User
from shared.pagination import Listing
from shared.runtime import Runtime
from shared.services import billing, enforcement, limits, pricing, turn_budget, turn_context
from shared.services.rooms import owned_session
from shared.services.turn_columns import turn_columns, turn_values
from shared.task_names import TaskName

log = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT_TOKENS = 512
MAX_IDEMPOTENCY_KEY_LENGTH = 255
FINISHED = (TurnStatus.COMPLETED, TurnStatus.FAILED, TurnStatus.CANCELLED)


@dataclass(frozen=True)
class SubmitOutcome:
    turn: Turn
    finished: bool


def _request_hash(chat_session_id: str, data: dict) -> str:
    fields = {
        "session_id": chat_session_id,
        "content": data.get("content"),
        "model": data.get("model"),
        "max_output_tokens": data.get("max_output_tokens"),
    }
    if data.get("messages") is not None:  # a /v1/chat/completions turn
        fields["messages"] = data["messages"]
        fields["tools"] = data.get("tools")
    canonical = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def turn_worst_case(runtime: Runtime, session: Session, turn: Turn, price=None) -> Decimal:
    """The worst case of ``turn`` (``turn_budget``, over the context the runner will build)
    — the one place a turn's hold (and its spend-limit reserve) is sized."""
    price = price or pricing.price_in_force(session, turn.model, at=turn.created_at)
    policy = turn_budget.HoldPolicy.from_settings(runtime.settings)
    if turn.request_messages is not None:
        # A /v1 turn: one call on the caller's messages, no room context, summary or tools.
        return turn_budget.worst_case_messages(
            price, policy, turn.request_messages, turn.max_output_tokens, turn.request_tools
        )
    chat = session.get(ChatSession, turn.session_id)
    return turn_budget.worst_case(
        price,
        policy,
        turn_context.load(session, chat, turn.seq),
        turn.content,
        turn.max_output_tokens,
        runtime.tools.schemas(),
    )


def place_turn_hold(
    runtime: Runtime, session: Session, turn: Turn, price=None, amount=None, *, new_turn: bool = False
) -> Hold:
    """Reserve the worst case of ``turn`` (:func:`turn_worst_case`, unless the caller sized
    it already as ``amount``), at admission and at the worker's re-check. Does not commit.
    ``new_turn``: the turn was created in this transaction, so it has no hold to look for.

    :raises InsufficientBalance: ``available`` does not cover it.
    """
    if amount is None:
        amount = turn_worst_case(runtime, session, turn, price)
    return billing.place_hold(
        session,
        user_id=turn.user_id,
        turn_id=turn.id,
        amount=amount,
        ttl_seconds=runtime.settings.hold_ttl_seconds,
        new_turn=new_turn,
    )


def _fields(runtime: Runtime, data: dict) -> tuple[str, str, int]:
    """``(content, model, max_output_tokens)`` asked, with their defaults; not checked yet
    (:func:`_invalid`)."""
    model = data.get("model") or runtime.settings.default_model
    return data["content"], model, data.get("max_output_tokens") or DEFAULT_MAX_OUTPUT_TOKENS


def _invalid(runtime: Runtime, content: str) -> InvalidInput | None:
    """What is wrong with ``content``, to raise; ``None`` when nothing is."""
    if not content or not content.strip():
        return InvalidInput("content must not be blank.", error="empty_content", field="content")
    limit = runtime.settings.max_turn_chars
    if len(content) > limit:
        return InvalidInput(
            f"content is longer than {limit} characters.", error="content_too_long", field="content"
        )
    return None


def _existing_for_key(session: Session, user_id: str, key: str, request_hash: str) -> Turn | None:
    turn = session.scalar(select(Turn).where(Turn.user_id == user_id, Turn.idempotency_key == key))
    if turn is not None and turn.request_hash != request_hash:
        raise IdempotencyConflict()
    return turn


def _check_idempotency_key(key: str | None) -> None:
    """:raises InvalidInput: ``invalid_idempotency_key``: empty, too long or unprintable."""
    if key is not None and (not key or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH or not key.isprintable()):
        raise InvalidInput(
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_LENGTH} printable characters.",
            error="invalid_idempotency_key",
        )


# The session's next seq, read inside the INSERT that takes it (see _add_turn).
_NEXT_SEQ = (
    select(func.coalesce(func.max(Turn.seq), 0) + 1)
    .where(Turn.session_id == bindparam("next_seq_of"))
    .scalar_subquery()
)


@cache
def _insert_turn(names: tuple[str, ...]):
    """``INSERT INTO turns (<names>, session_id, seq) … RETURNING *``, built once per set of
    columns (the others take their defaults), loaded as a ``Turn``. A Core INSERT under
    ``from_statement``: the ORM-enabled ``insert(Turn)`` went through the bulk-insert
    machinery, which builds a new statement and its cache key on every execution (about
    0.4 ms of CPU an admission)."""
    table = Turn.__table__
    columns = turn_columns((*names, "session_id"))
    inserted = insert(table).values({**columns, "seq": _NEXT_SEQ}).returning(*table.c)
    return select(Turn).from_statement(inserted)


# The admission's first statement: the chat session locked (NO KEY UPDATE, see _add_turn) if
# it is the caller's, with the price in force for the model asked and whether any spend or
# rate limit applies, one round trip for what were three. A price subquery, not a LATERAL
# join: it does not depend on the session (and SQLite has no LATERAL).
_PRICE_ASKED = aliased(ModelPrice, pricing.LATEST.subquery("price_asked"))
_LOCK_SESSION = (
    select(ChatSession, _PRICE_ASKED, limits.ANY_APPLIES)
    .outerjoin(_PRICE_ASKED, true())
    .where(ChatSession.id == bindparam("chat_session_id"), ChatSession.user_id == bindparam("user_id"))
    .with_for_update(key_share=True, of=ChatSession)
    .execution_options(populate_existing=True)
)


def _lock_session(
    session: Session, user_id: str, chat_session_id: str, model: str, api_key_id: str | None
) -> tuple[ChatSession, ModelPrice | None, bool]:
    """``(chat, price, limited)`` of :data:`_LOCK_SESSION`: the chat session, locked for the
    transaction; the price in force now for ``model`` (``None``: none, or a built-in price
    not seeded yet, for :func:`pricing.price_in_force` to settle); whether
    :func:`limits.admit` has rows to check.

    :raises NotFound: unknown, malformed, or another user's session."""
    if not is_uuid(chat_session_id):
        raise NotFound("No such session.")
    row = session.execute(
        _LOCK_SESSION,
        {
            "chat_session_id": chat_session_id,
            "user_id": user_id,
            "model": model,
            "at": utcnow(),
            "api_key_id": api_key_id,
        },
    ).first()
    if row is None:
        raise NotFound("No such session.")
    return row[0], row[1], bool(row[2])


@cache
def _insert_turn_at_once(names: tuple[str, ...]):
    """The whole admission of a turn without a hold, as one statement (:func:`_admit_at_once`):
    ``INSERT INTO turns (<names>, session_id, room_id, seq) SELECT … FROM sessions WHERE``
    the session is the caller's, a price is in force for the model, no limit applies and the
    Idempotency-Key is new ``FOR NO KEY UPDATE OF sessions RETURNING *``; no row when any of
    them is not so. Built once per set of columns."""
    table = Turn.__table__
    columns = turn_columns(names)
    priced = pricing.LATEST.exists()  # its :model and :at, the turn's model and now
    replayed = (
        select(Turn.id)
        .where(Turn.user_id == columns["user_id"], Turn.idempotency_key == columns["idempotency_key"])
        .exists()
    )
    chosen = (
        select(*columns.values(), ChatSession.id, ChatSession.room_id, _NEXT_SEQ)
        .where(
            ChatSession.id == bindparam("next_seq_of"),
            ChatSession.user_id == columns["user_id"],
            priced,
            ~limits.ANY_APPLIES,
            ~replayed,
        )
        # The chat session's lock, as the locked way takes it, for this statement: a turn
        # the locked way admits meanwhile is committed before this one's row is written.
        .with_for_update(key_share=True, of=ChatSession)
    )
    inserted = (
        insert(table)
        .from_select([*names, "session_id", "room_id", "seq"], chosen, include_defaults=True)
        .returning(*table.c)
    )
    return select(Turn).from_statement(inserted)


def _admit_at_once(session: Session, values: dict, chat_session_id: str) -> Turn | None:
    """A turn without a hold (enforcement off), admitted by one autocommit statement
    (:func:`_insert_turn_at_once`): no BEGIN, no COMMIT, and no lock held past the statement.

    It locks the chat session's row as the locked way does, for the statement alone. Its
    ``seq`` is the session's highest + 1 as the statement's snapshot saw it, which is taken
    before the lock is granted: when a turn of the same session was admitted while this
    statement waited for the lock, its seq is taken, and the statement fails on
    ``(session_id, seq)``. (The reverse cannot happen: the locked way reads the highest seq
    after its lock is granted, so after this statement committed.) ``None`` then, and
    whenever the statement wrote nothing (another user's or no session, no price in force
    yet, a limit applies, a replayed key): the locked transaction admits (or refuses, or
    finds) the turn as it always did, with its errors in their order."""
    # limits.ANY_APPLIES and pricing.LATEST name theirs by their own parameters.
    named = {"user_id": values["user_id"], "api_key_id": values["api_key_id"], "model": values["model"]}
    try:
        turn = session.scalar(
            _insert_turn_at_once(tuple(sorted(values))),
            turn_values(values) | named | {"next_seq_of": chat_session_id, "at": utcnow()},
        )
    except IntegrityError:
        session.rollback()
        return None
    except Exception:
        session.rollback()
        raise
    session.commit()  # ends the autocommit block: nothing is left to commit
    if turn is not None:
        set_committed_value(turn, "tool_calls", [])
    return turn


def _add_turn(session: Session, values: dict, chat: ChatSession) -> Turn:
    """Insert a turn of ``values`` as the session's next ``seq`` and return it (persistent in
    ``session``); ``chat``'s row is locked (:func:`_lock_session`): seq allocation is
    serialised per session.

    One statement: ``INSERT … VALUES (…, (SELECT max(seq) + 1 …)) RETURNING *`` (it was a read
    of the max, then the unit of work's flush). Its subquery runs after the lock was granted,
    so it sees every turn committed before.

    NO KEY UPDATE, not UPDATE: the lock must not block the foreign-key checks (KEY SHARE) of
    other transactions writing this session's turns, or a worker settling a turn (turn ->
    wallet) and this request (session -> wallet) could deadlock.
    """
    turn = session.scalar(
        _insert_turn(tuple(sorted(values))),
        turn_values({**values, "session_id": chat.id}) | {"next_seq_of": chat.id},
    )
    # A new turn has no tool calls: its response needs no query to say so.
    set_committed_value(turn, "tool_calls", [])
    return turn


def submit(
    runtime: Runtime,
    session: Session,
    user: User,
    chat_session_id: str,
    data: dict,
    key: str | None,
    *,
    api_key_id: str | None = None,
) -> tuple[Turn, bool]:
    """Create (or, for a replayed Idempotency-Key, find) a turn; returns ``(turn, created)``.

    :raises NotFound: unknown or another user's session.
    :raises InvalidInput: blank/oversize content (``empty_content``, ``content_too_long``),
        unpriced model (``model_not_priced``), over-long idempotency key.
    :raises IdempotencyConflict: the key was used with another body.
    :raises InsufficientBalance: enforcement is on and ``available`` does not cover the worst case.
    :raises SpendLimitReached: a spend limit of the user or ``api_key_id`` does not cover it
        (whatever the enforcement toggle; shared/services/limits.py).
    :raises TooManyRequests: ``rate_limited`` or ``too_many_concurrent_turns``.

    A process admits one turn of a user at a time (``Runtime.admissions``): a burst of one
    user's requests waits here, holding no database connection, instead of in Postgres on
    the user's wallet row with a pool connection each (256 clients of one user emptied the
    web's pool that way, and requests failed after the pool's 30 s timeout).
    """
    _check_idempotency_key(key)
    user_id = user.id  # (a user expired in ``session`` is read again now, not after the commit)
    session.commit()  # only reads came before (the caller's key): wait without a connection
    with runtime.admissions.holding(user_id):
        return _admit(runtime, session, user, chat_session_id, data, key, api_key_id)


def _admit(
    runtime: Runtime,
    session: Session,
    user: User,
    chat_session_id: str,
    data: dict,
    key: str | None,
    api_key_id: str | None,
) -> tuple[Turn, bool]:
    """``submit`` once it is this user's turn in the process.

    With enforcement off on Postgres, one statement admits the turn most often
    (:func:`_admit_at_once`); what it does not cover goes the locked way below."""
    content, model, max_output_tokens = _fields(runtime, data)
    enforced = enforcement.is_enforced(runtime)
    values = {
        "user_id": user.id,
        "status": TurnStatus.QUEUED,
        "content": content,
        "model": model,
        "max_output_tokens": max_output_tokens,
        "enforced": enforced,
        "idempotency_key": key,
        "request_hash": _request_hash(chat_session_id, data),
        "api_key_id": api_key_id,
        "request_messages": data.get("messages"),
        "request_tools": data.get("tools"),
    }
    invalid = _invalid(runtime, content)
    if not enforced and invalid is None and runtime.db.dialect == "postgresql" and is_uuid(chat_session_id):
        runtime.db.reads_without_transaction(session)
        turn = _admit_at_once(session, values, chat_session_id)
        if turn is not None:
            return turn, True
    chat, price, limited = _lock_session(session, user.id, chat_session_id, model, api_key_id)
    if key is not None:
        existing = _existing_for_key(session, user.id, key, values["request_hash"])
        if existing is not None:
            return existing, False
    if invalid is not None:
        raise invalid
    # Unpriced: refused before anything is written. A built-in model's price not seeded yet
    # is seeded here, once.
    price = price or pricing.price_in_force(session, model)
    try:
        turn = _add_turn(session, values | {"room_id": chat.room_id}, chat)
        reserve = None
        if limited:
            reserve = limits.admit(
                session, turn, lambda: turn_worst_case(runtime, session, turn, price), now=runtime.clock()
            )
        if enforced:
            try:
                place_turn_hold(runtime, session, turn, price, amount=reserve, new_turn=True)
            except InsufficientBalance:
                metrics.enforcement_refused("submit")
                raise
        session.commit()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key committed first.
        session.rollback()
        if key is None:
            raise
        existing = _existing_for_key(session, user.id, key, values["request_hash"])
        if existing is None:
            raise
        return existing, False
    except SpendLimitReached as exc:
        session.rollback()
        limits.note_refusal(session, exc)
        raise
    except Exception:
        session.rollback()
        raise
    return turn, True


def run_starter(celery_app, turn: Turn, *, created: bool, streamed: bool) -> Callable[[], bool] | None:
    """What sends a just-created turn's ``run_turn`` (:func:`enqueue_run`), for the caller to
    call once the turn is committed (or a waiter hands it over); ``None`` for a replayed
    Idempotency-Key, whose turn was sent by its first request."""
    if not created:
        return None
    turn_id, held = turn.id, turn.enforced
    return lambda: enqueue_run(celery_app, turn_id, streamed=streamed, held=held)


def enqueue_run(celery_app, turn_id: str, *, streamed: bool = False, held: bool = True) -> bool:
    """Send ``run_turn``; a broker outage is logged, not raised (the beat job re-sends).
    ``streamed``: the client asked to stream the turn (its pieces go out at once). ``held``:
    the turn was admitted with a hold (enforced); the worker's one-statement claim of a
    turn without one is another statement, tried only while enforcement is still off
    (``turn_runner.claim``)."""
    kwargs = {}
    if streamed:
        kwargs["streamed"] = True
    if not held:
        kwargs["held"] = False
    try:
        celery_app.send_task(TaskName.RUN_TURN, args=[turn_id], kwargs=kwargs or None)
        return True
    except Exception:
        log.warning("could not enqueue run_turn for %s; recover_stuck_turns will", turn_id, exc_info=True)
        return False


def _reread(runtime: Runtime, turn: Turn, read) -> Turn | TurnRead:
    """The turn as committed now, read by ``read`` (:func:`read_turn` or :func:`owned_turn`),
    without a transaction on Postgres (``Database.session(reads_only=True)``)."""
    with runtime.db.session(reads_only=True) as session:
        return read(session, turn.user_id, turn.id)


def wait_until_finished(
    runtime: Runtime, session: Session, turn: Turn, timeout: float, *, start=None, entity: bool = False
) -> Turn | TurnRead:
    """Wait until the turn ends or ``timeout`` passes, holding no database connection while
    waiting; returns the turn as last read: ``turn`` itself, or as ``GET /turns/{id}`` reads
    it (a :class:`TurnRead`: one Core statement, no ORM entity), or with ``entity`` as a
    ``Turn`` (for what a TurnRead does not hold, e.g. a /v1 reply's tool calls). With
    Redis the worker's push wakes the wait (``turn_events``), and a push that carries the
    finished turn (:func:`pushed_read`) answers it without a read; embedded mode re-reads
    the row, 20 ms apart growing to 250 ms.
    ``start`` (the turn's enqueue) runs once the wait is set up, so the end of a turn that
    ran at once is not missed and needs no read before it."""
    if turn.status in FINISHED:
        if start is not None:
            start()
        return turn
    session.commit()  # no transaction (and no pooled connection) held while waiting
    latest = turn

    def finished() -> bool:
        nonlocal latest
        latest = _reread(runtime, turn, owned_turn if entity else read_turn)
        return latest.status in FINISHED

    def pushed(body: str) -> bool:
        nonlocal latest
        latest = read_from_push(body)
        return latest.status in FINISHED

    waiter = runtime.turn_waiter
    if waiter is not None:
        waiter.wait(turn.id, timeout, finished, start=start, pushed=None if entity else pushed)
        return latest
    if start is not None:
        start()
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not finished() and time.monotonic() < deadline:
        time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
        delay = min(delay * 1.5, 0.25)
    return latest


def submit_and_wait(
    runtime: Runtime,
    session: Session,
    user: User,
    chat_session_id: str,
    data: dict,
    key: str | None,
    *,
    celery_app,
    wait: bool = True,
    streamed: bool = False,
    api_key_id: str | None = None,
) -> SubmitOutcome:
    turn, created = submit(runtime, session, user, chat_session_id, data, key, api_key_id=api_key_id)
    start = run_starter(celery_app, turn, created=created, streamed=streamed)
    if wait and runtime.settings.turn_wait_seconds > 0:
        turn = wait_until_finished(runtime, session, turn, runtime.settings.turn_wait_seconds, start=start)
    elif start is not None:
        start()
    return SubmitOutcome(turn=turn, finished=turn.status in FINISHED)


@dataclass(frozen=True, slots=True)
class ToolCallRead:
    """A recorded tool call as a TurnRead lists it: these columns of ``tool_call_events``."""

    id: str
    tool: str
    arguments: dict[str, Any]
    status: str
    duration_ms: int
    result_excerpt: str | None


@dataclass(frozen=True, slots=True)
class TurnRead:
    """A turn as ``GET /turns/{id}`` shows it: these columns of ``turns`` (each field is the
    column of that name) and its tool calls. The response schema dumps it as it dumps a
    ``Turn``; tests/web/test_turn_read.py holds the two dumps equal."""

    id: str
    session_id: str
    room_id: str
    seq: int
    status: str
    content: str
    reply: str | None
    model: str
    input_tokens: int
    output_tokens: int
    cost: Decimal | None
    balance_after: Decimal | None
    low_balance: bool
    summary_used_fallback: bool
    error_code: str | None
    error_message: str | None
    usage_estimated: bool
    created_at: datetime
    completed_at: datetime | None
    tool_calls: list[ToolCallRead]


@cache
def _turn_read_statement():
    """One statement: the turn's columns beside each of its tool calls' (a LEFT JOIN, in the
    relationship's order), Core columns only, so no ORM entity is built for a read."""
    turns, calls = Turn.__table__, ToolCallEvent.__table__
    turn_columns = [turns.c[field.name] for field in fields(TurnRead) if field.name != "tool_calls"]
    call_columns = [calls.c[field.name].label(f"tool_call_{field.name}") for field in fields(ToolCallRead)]
    return (
        select(*turn_columns, *call_columns)
        .select_from(turns.outerjoin(calls, calls.c.turn_id == turns.c.id))
        .where(turns.c.id == bindparam("turn_id"), turns.c.user_id == bindparam("user_id"))
        # In the relationship's order; its columns are ORM-annotated, these plain ones are not.
        .order_by(*(calls.c[column.name] for column in Turn.tool_calls.property.order_by))
    ), len(turn_columns)


def _read_fields_of(kind: type) -> tuple[str, ...]:
    """The TurnRead fields annotated ``kind`` (or ``kind | None``)."""
    return tuple(
        name for name, hint in get_type_hints(TurnRead).items() if hint is kind or kind in get_args(hint)
    )


# What a push carries besides JSON's own types (read_from_push turns them back), taken from
# TurnRead's annotations so that a field added there is carried back as its type too.
_PUSHED_DECIMALS = _read_fields_of(Decimal)
_PUSHED_DATETIMES = _read_fields_of(datetime)


def pushed_read(turn: Turn) -> str:
    """A finished turn that recorded no tool calls, as its end's push carries it (JSON): the
    TurnRead that :func:`read_turn` would read once its end committed, so a waiting request
    answers without reading it again. The worker builds it from the row it just wrote."""
    values: dict[str, Any] = {}
    for item in fields(TurnRead):
        if item.name != "tool_calls":
            value = getattr(turn, item.name)
            values[item.name] = str(value) if isinstance(value, Decimal | datetime) else value
    return json.dumps(values, separators=(",", ":"))


def read_from_push(body: str) -> TurnRead:
    """The TurnRead a push carried (:func:`pushed_read`)."""
    values = json.loads(body)
    for name in _PUSHED_DECIMALS:
        if values[name] is not None:
            values[name] = Decimal(values[name])
    for name in _PUSHED_DATETIMES:
        if values[name] is not None:
            values[name] = datetime.fromisoformat(values[name])
    return TurnRead(**values, tool_calls=[])


def read_turn(session: Session, user_id: str, turn_id: str) -> TurnRead:
    """The caller's turn with its tool calls, in one statement (``GET /turns/{id}``).

    :raises NotFound: unknown, malformed, or another user's turn."""
    statement, width = _turn_read_statement()
    rows = []
    if is_uuid(turn_id):
        rows = session.execute(statement, {"turn_id": turn_id, "user_id": user_id}).all()
    if not rows:
        raise NotFound("No such turn.")
    tool_calls = [ToolCallRead(*row[width:]) for row in rows if row[width] is not None]
    return TurnRead(*rows[0][:width], tool_calls=tool_calls)


def owned_turn(session: Session, user_id: str, turn_id: str) -> Turn:
    """The turn with its tool calls, in one query (a TurnRead lists them).

    :raises NotFound: unknown, malformed, or another user's turn."""
    turn = session.get(Turn, turn_id, options=[joinedload(Turn.tool_calls)]) if is_uuid(turn_id) else None
    if turn is None or turn.user_id != user_id:
        raise NotFound("No such turn.")
    return turn


def list_turns(session: Session, user_id: str, chat_session_id: str) -> Listing:
    chat = owned_session(session, user_id, chat_session_id)
    return Listing(
        session,
        select(Turn)
        .where(Turn.session_id == chat.id, Turn.kind == TurnKind.CHAT)
        .order_by(Turn.seq)
        .options(selectinload(Turn.tool_calls)),
    )
