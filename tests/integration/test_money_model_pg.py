"""The money invariants under random interleavings, checked against a model (Hypothesis stateful).

Like TigerBeetle's simulator or Jepsen's bank test: a state machine takes random steps on
real Postgres and Redis — grants, adjustments, the enforcement switch, price changes, turn
submissions, claims, model calls, completions, provider failures, worker deaths, takeovers,
the hold-expiry job, summary refreshes — while a small Python model predicts every balance,
hold and charge. After every step the database must agree with the model and with the
ledger's own invariants (``tollgate ledger-check``); at the end every turn is driven to its
end and no credit stays reserved.

The turn pipeline is called in-process (``turns.submit`` and the ``turn_runner`` functions,
no Celery), so a step can stop a turn anywhere: claimed and never run (a dead worker),
run but not yet settled (a slow worker whose hold may expire meanwhile), run by two workers
(a takeover, then the "dead" one finishes after all). Time is moved by the test: a hold's
TTL running out and a dead worker's lapsed lease are UPDATEs of ``expires_at`` and
``lease_expires_at``, as in test_money_pg.py.

The rarest path, a charge limited by a hold that expired under a dead worker, is also taken
on purpose by the scripted scenarios at the end, so every run checks the model on it.

Size: ``TOLLGATE_MODEL_EXAMPLES`` (default 20) examples of at most ``TOLLGATE_MODEL_STEPS``
(default 25) steps; ``derandomize=True``, so a red run reproduces with the same command.
docs/testing.md ("Money model test") has the release-check command.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select, update

from shared.db import utcnow
from shared.errors import Conflict, InsufficientBalance
from shared.models import ChatSession, Hold, LedgerEntry, Room, Turn, Wallet
from shared.providers import OfflineProvider, ProviderError, ProviderPermanentError, ProviderTransientError
from shared.services import (
    billing,
    ledger_check,
    pricing,
    summaries,
    turn_budget,
    turn_context,
    turn_runner,
    turns,
)
from shared.services.turn_budget import BudgetExhausted, HoldPolicy
from shared.services.turn_runner import MAX_ATTEMPTS, Execution, RetryLater
from shared.tools.registry import build_registry
from tests.factories import make_actor, make_completed_turn
from tests.integration.conftest import empty_stores
from web.app import create_app

D = Decimal
ZERO = D("0")
MODEL = "offline-small"
ENDED = ("completed", "failed")
EXAMPLES = int(os.environ.get("TOLLGATE_MODEL_EXAMPLES", "20"))
STEPS = int(os.environ.get("TOLLGATE_MODEL_STEPS", "25"))

# What a turn asks, and how its provider behaves (``RecordingProvider``).
KINDS = {
    "plain": "What should the launch budget cover?",
    "tool": "search for the launch budget",  # a tool round, then the answer
    "fail": "[[offline:fail]] What should the launch budget cover?",  # refused, no tokens used
    "transient": "[[offline:transient]] What should the launch budget cover?",
    "late_fail": "search for the launch budget",  # tool round billed, then a permanent failure
    "late_transient": "search for the launch budget",  # tool round billed, then a transient one
}
# A turn's hold is about 0.004-0.02 (its max_output_tokens, context and price).
OPERATOR_ACTIONS = {
    "grant": ["0.01", "0.05", "0.005"],
    # "-available": claw back everything not reserved (leaves in-flight turns nothing spare).
    "adjust": ["-available", "0.004", "-0.001", "-0.004", "-0.01", "-0.05"],
    "enforcement": ["on", "off", "clear"],
    "price": [("0.001", "0.002"), ("0.002", "0.004"), ("0.003", "0.0015")],
}
# Chat 1's earlier turns: a batch has left the window, so its next turn or a refresh summarises.
HISTORY_TURNS = summaries.WINDOW_TURNS + summaries.SUMMARY_BATCH_TURNS
MAX_IN_FLIGHT = 4  # turns not yet ended; a client with more waits
# One to three turns: (chat session, kind, max_output_tokens).
BATCH = st.lists(
    st.tuples(st.sampled_from([0, 0, 1]), st.sampled_from(list(KINDS)), st.sampled_from([16, 128, 512])),
    min_size=1,
    max_size=3,
)
# What the run exercised (printed at the end; ``pytest -s`` shows it).
SEEN: Counter[str] = Counter()


def note(what: str) -> None:
    SEEN[what] += 1
    if currently_in_test_context():  # not in the scripted scenarios below
        event(what)


class RecordingProvider:
    """The offline model, failing the ``fail_on``-th chat call (not summary calls) when set,
    and remembering what it raised: the model of a provider that failed after tokens were used."""

    name = "offline"
    supports_tools = True

    def __init__(self, *, fail_on: int | None = None, transient: bool = False) -> None:
        self.offline = OfflineProvider()
        self.fail_on = fail_on
        self.transient = transient
        self.chat_calls = 0
        self.raised: ProviderError | None = None

    def complete(self, messages, **kwargs):
        if OfflineProvider._is_summary_request(messages):
            return self.offline.complete(messages, **kwargs)
        self.chat_calls += 1
        try:
            if self.fail_on is not None and self.chat_calls >= self.fail_on:
                error = ProviderTransientError if self.transient else ProviderPermanentError
                raise error(message="scripted failure after a billed round")
            return self.offline.complete(messages, **kwargs)
        except ProviderError as exc:
            self.raised = exc
            raise


def provider_for(kind: str) -> RecordingProvider:
    if kind == "late_fail":
        return RecordingProvider(fail_on=2)
    if kind == "late_transient":
        return RecordingProvider(fail_on=2, transient=True)
    return RecordingProvider()


@dataclass
class Attempt:
    """A worker that claimed a turn and called the model, and has not settled yet."""

    handle: Turn
    provider: RecordingProvider
    result: Execution
    error: Exception | None = None  # what the model call raised


@dataclass
class ModelTurn:
    label: str
    turn_id: str
    chat: int
    kind: str
    price: SimpleNamespace  # the version in force when it was submitted
    enforced: bool
    status: str = "queued"
    attempts: int = 0
    lease: str | None = None  # a running turn's lease: "live" (renewed) or "lapsed" (worker gone)
    hold_amount: Decimal | None = None
    hold_status: str | None = None
    hold_past_ttl: bool = False  # its expires_at has passed: only a live lease keeps it now
    # Set when the turn ends:
    error_code: str | None = None
    tokens: tuple[int, int] = (0, 0)
    cost: Decimal | None = None  # what it was charged (turn.cost)
    limited: bool = False  # charged less than its cost: the uncovered-charge path
    workers: list[Attempt] = field(default_factory=list)  # stalled workers (slow_worker)


class MoneyModel(RuleBasedStateMachine):
    """One user, one admin, fresh tables for every example, and two chat sessions: a new one
    (0) and a long one (1) whose rolling summary is due, so its turns' holds and runs include
    the summary call."""

    def __init__(self, app) -> None:
        super().__init__()
        self.app = app
        self.runtime = app.extensions["tollgate"]
        self.client = app.test_client()
        empty_stores(self.runtime.settings)
        with self.runtime.db.session() as session:
            self.admin = make_actor(session, "admin")
            self.user = make_actor(session, "user")
            room = Room(user_id=self.user.id, name="model")
            session.add(room)
            session.flush()
            self.chats = [ChatSession(room_id=room.id, user_id=self.user.id) for _ in range(2)]
            session.add_all(self.chats)
            session.commit()
            history = [
                make_completed_turn(
                    session, self.chats[1], seq, f"Earlier question {seq}.", "Earlier answer."
                )
                for seq in range(1, HISTORY_TURNS + 1)
            ]
            self.history_ids = {turn.id for turn in history}
            seeded = pricing.price_in_force(session, MODEL)  # the built-in price, as in production
            self.price = SimpleNamespace(input_per_1k=seeded.input_per_1k, output_per_1k=seeded.output_per_1k)
            session.commit()
        self.chat_ids = [chat.id for chat in self.chats]
        self.tools = build_registry()
        self.turns: dict[str, ModelTurn] = {}
        self.next_seq = [1, HISTORY_TURNS + 1]
        self.refused_in: tuple | None = None  # the state a submission was last refused in
        self.completed = [0, HISTORY_TURNS]  # a summary refresh is due past the window
        self.refresh_due = [False, True]
        self.balance = ZERO
        self.override: bool | None = None
        self.default_enforced = self.runtime.settings.billing_enforcement_enabled
        SEEN["examples"] += 1

    # -- the model -------------------------------------------------------------------------

    @property
    def enforcement_on(self) -> bool:
        return self.default_enforced if self.override is None else self.override

    @property
    def held(self) -> Decimal:
        return sum((t.hold_amount for t in self.turns.values() if t.hold_status == "active"), ZERO)

    @property
    def available(self) -> Decimal:
        return self.balance - self.held

    def state(self) -> tuple:
        """What decides whether a turn is admitted."""
        return (self.balance, self.held, self.enforcement_on, self.price)

    def unended(self) -> list[str]:
        return [label for label, t in self.turns.items() if t.status not in ENDED]

    def running(self) -> list[str]:
        return [label for label, t in self.turns.items() if t.status == "running"]

    def live_leases(self) -> list[str]:
        return [label for label, t in self.turns.items() if t.status == "running" and t.lease == "live"]

    def stalled_workers(self) -> list[tuple[str, int]]:
        return [(label, index) for label, t in self.turns.items() for index in range(len(t.workers))]

    def settle(self, turn: ModelTurn, input_tokens: int, output_tokens: int) -> None:
        """What billing must do when a turn ends having used these tokens (docs/billing.md)."""
        turn.tokens = (input_tokens, output_tokens)
        if not input_tokens and not output_tokens:
            if turn.hold_status == "active":
                turn.hold_status = "released"
            turn.cost = None
            return
        cost = pricing.cost_of(turn.price, input_tokens, output_tokens)
        if turn.hold_status == "active":
            # Design §4: the runner keeps an enforced turn within its hold; the charge is its cost.
            assert cost <= turn.hold_amount, f"{turn.label} cost {cost} > its hold {turn.hold_amount}"
            charged = cost
            turn.hold_status = "captured"
        elif turn.enforced:
            # The hold expired or was released while the worker was gone: charge only what is
            # still available, never more than the hold was (tollgate_uncovered_charge_micros).
            charged = min(cost, max(self.available, ZERO))
            if turn.hold_amount is not None:
                charged = min(charged, turn.hold_amount)
        else:
            charged = cost
        turn.cost = charged
        turn.limited = charged < cost
        if turn.limited:
            note("charge limited (hold gone, worker was dead)")
        self.balance -= charged

    def end(self, turn: ModelTurn, status: str, code: str | None, tokens: tuple[int, int]) -> None:
        note(f"turn ended: {status} {code or ''}".rstrip())
        if status == "completed":
            self.completed[turn.chat] += 1
            self.refresh_due[turn.chat] = True
        turn.status = status
        turn.error_code = code
        self.settle(turn, *tokens)

    def apply_claim(self, turn: ModelTurn, *, saved: tuple[int, int], required) -> str:
        """``turn_runner.claim``'s decision: ``skip``, ``ended`` (failed by the claim) or ``running``.

        ``saved``: the tokens saved on the turn before the claim (a claim that fails it bills
        them); ``required``: what a re-check would reserve. A claim's ``takeover`` flag only
        matters for rows without a lease, and every running turn here has one."""
        if turn.status in ENDED:
            return "skip"
        if turn.status == "running" and turn.lease == "live":
            return "skip"  # its worker is alive and renewing the lease: no takeover
        if turn.attempts >= MAX_ATTEMPTS:
            self.end(turn, "failed", "worker_lost", saved)
            return "ended"
        if turn.enforced:
            if turn.hold_status != "active":
                self.end(turn, "failed", "hold_expired", saved)
                return "ended"
        elif self.enforcement_on:
            # The worker's re-check of a turn admitted while enforcement was off.
            if self.available < required:
                self.end(turn, "failed", InsufficientBalance.error, saved)
                return "ended"
            turn.hold_amount, turn.hold_status, turn.enforced = required, "active", True
            note("re-check placed a hold")
        turn.status = "running"
        turn.attempts += 1
        turn.lease = "live"
        return "running"

    # -- reading the database --------------------------------------------------------------

    def row(self, turn: ModelTurn) -> Turn:
        with self.runtime.db.session() as session:
            return session.get(Turn, turn.turn_id)

    def saved_tokens(self, turn: ModelTurn) -> tuple[int, int]:
        row = self.row(turn)
        return row.input_tokens, row.output_tokens

    def worst_case(self, chat: int, seq: int, content: str, max_output_tokens: int, at=None) -> Decimal:
        """The hold admission must place for this turn: the sizing rule of docs/billing.md,
        over the context the runner would build now."""
        with self.runtime.db.session() as session:
            chat_row = session.get(ChatSession, self.chat_ids[chat])
            price = pricing.price_in_force(session, MODEL, at=at)
            amount = turn_budget.worst_case(
                price,
                HoldPolicy.from_settings(self.runtime.settings),
                turn_context.load(session, chat_row, seq),
                content,
                max_output_tokens,
                self.tools.schemas(),
            )
            session.rollback()
            return amount

    def recheck_amount(self, turn: ModelTurn) -> Decimal | None:
        """What a claim's re-check would reserve (only asked when one will happen)."""
        if turn.status in ENDED or turn.enforced or not self.enforcement_on:
            return None
        row = self.row(turn)
        return self.worst_case(turn.chat, row.seq, row.content, row.max_output_tokens, at=row.created_at)

    # -- rules: admin ----------------------------------------------------------------------

    @initialize(
        amount=st.sampled_from(["0.05", "0.1", "0.005"]),
        enforced=st.sampled_from([True, False]),
        batch=BATCH,
    )
    def start(self, amount, enforced, batch):
        """A wallet with some credit, the switch either way, and the first turns."""
        self.grant(amount)
        self.switch_enforcement("on" if enforced else "clear")
        self.submit(batch)

    @rule(action=st.sampled_from(list(OPERATOR_ACTIONS)), data=st.data())
    def operator(self, action, data):
        """A grant, a correction either way, the enforcement switch (``on``/``off`` override,
        ``clear``: back to the default) or a new price version."""
        value = data.draw(st.sampled_from(OPERATOR_ACTIONS[action]), label=action)
        if action == "grant":
            self.grant(value)
        elif action == "adjust":
            self.adjust(value)
        elif action == "enforcement":
            self.switch_enforcement(value)
        else:
            self.set_price(value)

    def grant(self, amount: str) -> None:
        with self.runtime.db.session() as session:
            billing.grant_credit(
                session,
                actor_id=self.admin.id,
                user_id=self.user.id,
                amount=D(amount),
                reason="model",
                idempotency_key=None,
            )
        self.balance += D(amount)

    def adjust(self, amount: str) -> None:
        """A negative adjustment may not take ``available`` below zero (409)."""
        if amount == "-available":
            amount = str(-self.available) if self.available > 0 else "-0.000001"
        value = D(amount)
        refused = value < 0 and self.available + value < 0
        try:
            with self.runtime.db.session() as session:
                billing.adjust_credit(
                    session,
                    actor_id=self.admin.id,
                    user_id=self.user.id,
                    amount=value,
                    reason="model correction",
                    idempotency_key=None,
                )
        except Conflict as exc:
            note("adjustment refused")
            assert refused, f"adjustment {amount} refused with available {self.available}: {exc}"
            return
        assert not refused, f"adjustment {amount} accepted with available {self.available}"
        self.balance += value

    def switch_enforcement(self, to: str) -> None:
        """Through the admin API, as an operator does (PATCH / DELETE)."""
        path = "/api/v1/admin/settings/enforcement"
        if to == "clear":
            response = self.client.delete(path, headers=self.admin.headers)
            self.override = None
        else:
            response = self.client.patch(path, json={"enabled": to == "on"}, headers=self.admin.headers)
            self.override = to == "on"
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["enabled"] is self.enforcement_on

    def set_price(self, price: tuple[str, str]) -> None:
        """A new version, effective now: turns already submitted keep the price of their time."""
        with self.runtime.db.session() as session:
            pricing.set_price(session, self.admin.id, MODEL, D(price[0]), D(price[1]))
        self.price = SimpleNamespace(input_per_1k=D(price[0]), output_per_1k=D(price[1]))

    # -- rules: turns ----------------------------------------------------------------------

    @precondition(lambda self: len(self.unended()) < MAX_IN_FLIGHT and self.state() != self.refused_in)
    @rule(batch=BATCH)
    def submit(self, batch):
        """A client sends one to three turns; after a 402 it waits for something to change."""
        for chat, kind, max_output_tokens in batch:
            self.submit_one(chat, kind, max_output_tokens)

    def submit_one(self, chat: int, kind: str, max_output_tokens: int) -> None:
        label = f"t{len(self.turns) + 1}"
        content = f"{KINDS[kind]} ({label})"
        enforced = self.enforcement_on
        required = None
        if enforced:
            required = self.worst_case(chat, self.next_seq[chat], content, max_output_tokens)
        data = {"content": content, "max_output_tokens": max_output_tokens}
        try:
            with self.runtime.db.session() as session:
                turn, created = turns.submit(
                    self.runtime, session, self.user.user, self.chat_ids[chat], data, None
                )
        except InsufficientBalance:
            note("submit refused: insufficient balance")
            self.refused_in = self.state()
            assert enforced and self.available < required, f"refused with available {self.available}"
            with self.runtime.db.session() as session:
                turn_count = session.scalar(select(func.count()).select_from(Turn))
                assert turn_count == len(self.turns) + HISTORY_TURNS
            return
        assert created
        note(f"submitted {kind} ({'enforced' if enforced else 'not enforced'})")
        assert not (enforced and self.available < required), f"admitted, available {self.available}"
        assert turn.seq == self.next_seq[chat] and turn.enforced is enforced
        self.next_seq[chat] += 1
        with self.runtime.db.session() as session:
            in_force = pricing.price_in_force(session, MODEL, at=turn.created_at)
            assert (in_force.input_per_1k, in_force.output_per_1k) == (
                self.price.input_per_1k,
                self.price.output_per_1k,
            )
            session.rollback()
        self.turns[label] = ModelTurn(
            label=label,
            turn_id=turn.id,
            chat=chat,
            kind=kind,
            price=self.price,
            enforced=enforced,
            hold_amount=required,
            hold_status="active" if enforced else None,
        )

    @precondition(lambda self: self.unended())
    @rule(data=st.data(), takeover=st.booleans())
    def claim(self, data, takeover):
        """A worker picks the turn up and dies before it calls the model (``takeover``: as a
        redelivered task passes it; a running turn is taken over only once its lease lapsed)."""
        self.claim_turn(data.draw(st.sampled_from(self.unended()), label="turn"), takeover)

    @precondition(lambda self: self.unended())
    @rule(data=st.data())
    def slow_worker(self, data):
        """A worker claims a turn and calls the model, then stalls before settling: ``finish``
        later (perhaps after its hold expired), or never (it died)."""
        label = data.draw(st.sampled_from(self.unended()), label="turn")
        self.stall(label, data.draw(st.booleans(), label="takeover"))

    def stall(self, label: str, takeover: bool) -> None:
        turn = self.turns[label]
        claimed = self.claim_turn(label, takeover)
        if claimed is None:
            return
        attempt = Attempt(handle=claimed.turn, provider=provider_for(turn.kind), result=Execution())
        try:
            turn_runner.execute(
                self.runtime,
                claimed.turn,
                attempt.provider,
                self.tools,
                attempt.result,
                hold_amount=claimed.hold_amount,
            )
        except (ProviderError, BudgetExhausted) as exc:
            attempt.error = exc
        note(f"{turn.kind}: {attempt.provider.chat_calls} model call(s)")
        turn.workers.append(attempt)

    def claim_turn(self, label: str, takeover: bool) -> turn_runner.Claimed | None:
        turn = self.turns[label]
        saved, required = self.saved_tokens(turn), self.recheck_amount(turn)
        claimed = turn_runner.claim(self.runtime, turn.turn_id, takeover=takeover)
        outcome = self.apply_claim(turn, saved=saved, required=required)
        assert (claimed is not None) == (outcome == "running"), (outcome, claimed)
        return claimed

    @precondition(lambda self: self.stalled_workers())
    @rule(data=st.data())
    def finish(self, data):
        """A stalled worker wakes up and settles: ``complete``, or ``fail`` with what the provider
        raised. Its turn may have been taken over, failed or even completed meanwhile."""
        self.wake(*data.draw(st.sampled_from(self.stalled_workers()), label="worker"))

    def wake(self, label: str, index: int = 0) -> None:
        turn = self.turns[label]
        attempt = turn.workers.pop(index)
        saved, result = self.saved_tokens(turn), attempt.result
        if attempt.error is None:
            done = turn_runner.complete(self.runtime, turn.turn_id, result)
            status, code, tokens = "completed", None, (result.input_tokens, result.output_tokens)
        else:
            code = attempt.error.code
            done = turn_runner.fail(self.runtime, turn.turn_id, code, execution=result)
            status = "failed"
            tokens = (max(saved[0], result.input_tokens), max(saved[1], result.output_tokens))
        assert done is (turn.status not in ENDED), f"{label} settled twice or not at all"
        if not done:
            note("a late worker's settle was refused")
        if done:
            self.end(turn, status, code, tokens)

    @precondition(lambda self: self.running())
    @rule(data=st.data())
    def worker_lost(self, data):
        """Recovery gives up on a running turn whose worker died: bill what it saved, release the rest."""
        turn = self.turns[data.draw(st.sampled_from(self.running()), label="turn")]
        saved = self.saved_tokens(turn)
        assert turn_runner.fail(self.runtime, turn.turn_id, "worker_lost")
        self.end(turn, "failed", "worker_lost", saved)

    @precondition(lambda self: self.unended())
    @rule(data=st.data(), takeover=st.booleans())
    def run_turn(self, data, takeover):
        """The whole task, as the worker runs it (``final_attempt``: no retry left after this one)."""
        label = data.draw(st.sampled_from(self.unended()), label="turn")
        self.run_whole(label, takeover, data.draw(st.booleans(), label="final_attempt"))

    def run_whole(self, label: str, takeover: bool, final_attempt: bool) -> None:
        turn = self.turns[label]
        saved, required = self.saved_tokens(turn), self.recheck_amount(turn)
        provider = provider_for(turn.kind)
        try:
            outcome = turn_runner.run_turn(
                self.runtime,
                turn.turn_id,
                provider=provider,
                tools=self.tools,
                takeover=takeover,
                final_attempt=final_attempt,
            )
        except RetryLater:
            outcome = "retry"
        claimed = self.apply_claim(turn, saved=saved, required=required)
        if claimed != "running":
            assert outcome == "skipped", (claimed, outcome)
            return
        note(f"{turn.kind}: {provider.chat_calls} model call(s)")
        row = self.row(turn)
        tokens = (row.input_tokens, row.output_tokens)
        assert tokens[0] >= saved[0] and tokens[1] >= saved[1], (tokens, saved)
        raised = provider.raised
        if outcome == "retry":
            note("transient failure: turn re-queued")
            assert isinstance(raised, ProviderTransientError) and not final_attempt
            assert row.status == "queued" and row.lease_expires_at is None
            turn.status, turn.lease = "queued", None
        elif outcome == "completed":
            assert raised is None
            self.end(turn, "completed", None, tokens)
        else:
            assert outcome == "failed", outcome
            # No provider error: only the budget may end a turn (anything else is a bug).
            code = raised.code if raised is not None else BudgetExhausted.code
            self.end(turn, "failed", code, tokens)

    @precondition(lambda self: self.live_leases())
    @rule(data=st.data())
    def worker_dies(self, data):
        """A running turn's worker dies: it stops renewing the turn's lease, which lapses (the
        clock is moved past it). A claim may now take the turn over; the dead worker's
        attempt may still wake up and try to settle (``finish``)."""
        self.lapse_lease(data.draw(st.sampled_from(self.live_leases()), label="turn"))

    def lapse_lease(self, label: str) -> None:
        turn = self.turns[label]
        with self.runtime.db.session() as session:
            session.execute(
                update(Turn)
                .where(Turn.id == turn.turn_id)
                .values(lease_expires_at=utcnow() - timedelta(seconds=1))
            )
            session.commit()
        turn.lease = "lapsed"

    @precondition(lambda self: self.held > 0)
    @rule(ttl_passed=st.booleans())
    def expire_holds(self, ttl_passed):
        """The beat job (``tollgate.expire_holds``). ``ttl_passed``: every active hold's TTL ran
        out (the clock is moved past their ``expires_at``; live workers renewed their leases
        meanwhile). A hold past its TTL survives only under a running turn with a live lease,
        and expires on a later run once that lease lapses (a claim does not renew the TTL)."""
        self.expire(ttl_passed)

    def expire(self, ttl_passed: bool) -> None:
        expected = 0
        with self.runtime.db.session() as session:
            if ttl_passed:
                session.execute(update(Hold).where(Hold.status == "active").values(expires_at=utcnow()))
                session.commit()
            for turn in self.turns.values():
                if turn.hold_status != "active":
                    continue
                turn.hold_past_ttl = turn.hold_past_ttl or ttl_passed
                if turn.hold_past_ttl and not (turn.status == "running" and turn.lease == "live"):
                    turn.hold_status = "expired"
                    expected += 1
            assert billing.expire_stale_holds(session) == expected
        if expected:
            note("holds expired")

    @precondition(lambda self: self.summary_chats())
    @rule(data=st.data())
    def refresh_summary(self, data):
        """A summary refresh (queue ``summaries``): a ``debit`` with no turn."""
        chat = data.draw(st.sampled_from(self.summary_chats()), label="chat")
        self.refresh_due[chat] = False
        before = self.entry_ids()
        available = self.available
        turn_runner.refresh_summary(self.runtime, self.chat_ids[chat], provider=OfflineProvider())
        with self.runtime.db.session() as session:
            new = [e for e in session.scalars(select(LedgerEntry)).all() if e.id not in before]
        assert len(new) <= 1 and all(e.kind == "debit" and e.turn_id is None for e in new), new
        charged = sum((-e.amount for e in new), ZERO)
        assert charged >= 0
        if new:
            note("summary refresh billed")
        if self.enforcement_on:
            assert charged <= max(available, ZERO), f"summary charged {charged}, available {available}"
        self.balance -= charged

    def summary_chats(self) -> list[int]:
        """Chats with a batch past the window and a turn completed since their last refresh."""
        return [
            chat
            for chat, done in enumerate(self.completed)
            if done >= summaries.WINDOW_TURNS + summaries.SUMMARY_BATCH_TURNS and self.refresh_due[chat]
        ]

    def entry_ids(self) -> set[str]:
        with self.runtime.db.session() as session:
            return set(session.scalars(select(LedgerEntry.id)).all())

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def books_agree_with_the_model(self):
        SEEN["steps"] += 1
        check_books(self)

    def teardown(self):
        if sys.exc_info()[0] is not None:
            return  # a step failed: report that, not a knock-on failure here
        # The workers still running turns stop; every turn is then driven to its end, as
        # recover_stuck_turns and the task's last retry would.
        for label in self.live_leases():
            self.lapse_lease(label)
        for label in self.unended():
            self.run_whole(label, takeover=True, final_attempt=True)
        check_books(self)
        assert not self.unended()
        with self.runtime.db.session() as session:
            assert session.scalar(select(func.count()).select_from(Hold).where(Hold.status == "active")) == 0
            wallet = session.scalar(select(Wallet).where(Wallet.user_id == self.user.id))
            assert wallet.held == 0


def check_books(machine: MoneyModel) -> None:
    """Every money invariant, from the database's point of view and against the model."""
    with machine.runtime.db.session() as session:
        assert ledger_check.find_mismatches(session) == []
        assert ledger_check.find_violations(session) == []

        wallet = session.scalar(select(Wallet).where(Wallet.user_id == machine.user.id))
        assert (wallet.balance, wallet.held) == (machine.balance, machine.held), "wallet != model"
        entries = session.scalars(
            select(LedgerEntry)
            .where(LedgerEntry.wallet_id == wallet.id)
            .order_by(LedgerEntry.created_at, LedgerEntry.id)
        ).all()
        assert sum((e.held_delta for e in entries), ZERO) == wallet.held
        running_balance = ZERO
        for entry in entries:  # balance_after is the running sum, entry by entry
            running_balance += entry.amount
            assert entry.balance_after == running_balance, entry.idempotency_key

        holds = {h.turn_id: h for h in session.scalars(select(Hold)).all()}
        rows = {t.id: t for t in session.scalars(select(Turn)).all() if t.id not in machine.history_ids}
        assert len(rows) == len(machine.turns)
        by_hold: dict[str, list[LedgerEntry]] = {}
        by_turn: dict[str, list[LedgerEntry]] = {}
        for entry in entries:
            if entry.hold_id is not None:
                by_hold.setdefault(entry.hold_id, []).append(entry)
            if entry.turn_id is not None:
                by_turn.setdefault(entry.turn_id, []).append(entry)

        for turn in machine.turns.values():
            row, hold = rows[turn.turn_id], holds.get(turn.turn_id)
            where = f"{turn.label} ({turn.kind})"
            assert (row.status, row.enforced, row.attempts) == (
                turn.status,
                turn.enforced,
                turn.attempts,
            ), where
            charges = [e for e in by_turn.get(turn.turn_id, []) if e.kind in ("capture", "debit")]
            assert len(charges) <= 1, f"{where} charged more than once"
            charged = sum((-e.amount for e in charges), ZERO)

            if turn.hold_amount is None:
                assert hold is None, where
            else:
                assert (hold.amount, hold.status) == (turn.hold_amount, turn.hold_status), where
                check_hold_entries(hold, by_hold.get(hold.id, []), where)

            if turn.status in ENDED:
                assert row.error_code == turn.error_code, (where, row.error_code)
                assert (row.input_tokens, row.output_tokens) == turn.tokens, where
                assert row.cost == turn.cost, (where, row.cost, turn.cost)
                assert charged == (row.cost or ZERO), f"{where} ledger charges {charged} != cost {row.cost}"
                assert hold is None or hold.status != "active", f"{where} ended with its hold active"
                if row.cost is not None and not turn.limited:
                    # turn.price is the version in force at its created_at (checked at submit).
                    assert row.cost == pricing.cost_of(turn.price, row.input_tokens, row.output_tokens), where
                if turn.enforced and hold is not None:
                    assert charged <= hold.amount, where
            else:
                assert not charges, f"{where} charged before it ended"
        session.rollback()


def check_hold_entries(hold: Hold, entries: list[LedgerEntry], where: str) -> None:
    """A hold resolves once: its ``hold`` entry, then nothing (active), a ``capture`` (and the
    ``release`` of the rest), a full ``release``, or an ``expiry`` — matching its status."""
    kinds = sorted(e.kind for e in entries)
    assert kinds.count("hold") == 1, (where, kinds)
    placed = next(e for e in entries if e.kind == "hold")
    assert (placed.amount, placed.held_delta) == (ZERO, hold.amount), where
    terminal = [e for e in entries if e.kind != "hold"]
    expected = {
        "active": [[]],
        "captured": [["capture"], ["capture", "release"]],
        "released": [["release"]],
        "expired": [["expiry"]],
    }[hold.status]
    assert sorted(e.kind for e in terminal) in expected, (where, hold.status, kinds)
    if terminal:
        assert sum((e.held_delta for e in terminal), ZERO) == -hold.amount, where
    for entry in terminal:
        if entry.kind == "capture":
            assert entry.amount == entry.held_delta <= 0, where
        else:
            assert entry.amount == 0, where


@pytest.fixture
def model_app(pg_settings):
    """The app with leases that never lapse on their own: the machine decides when a worker
    dies (``worker_dies``), so a slow step can never look like one."""
    app = create_app(pg_settings.replace(turn_lease_seconds=3600))
    yield app
    app.extensions["tollgate"].close()


def test_money_invariants_hold_under_random_interleavings(model_app):
    run_state_machine_as_test(
        lambda: MoneyModel(model_app),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=True,
            database=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    print("money model exercised:", dict(sorted(SEEN.items())))


@pytest.mark.parametrize("wakes_by", ["stalled worker completes", "takeover fails it"])
def test_a_charge_limited_by_an_expired_hold_is_what_the_model_predicts(model_app, wakes_by):
    """The rarest path of the machine, taken on purpose so every run checks the model's
    arithmetic for it: an enforced turn used tokens, its worker died, its hold expired, the
    credit went elsewhere (an admin clawed back everything available), and then the turn is
    settled: by its stalled worker completing after all, or by a takeover that fails it
    ``hold_expired`` billing the tool round an earlier attempt saved. Either way it is charged
    ``min(cost, available, hold)`` (here nothing), never below zero, counted as uncovered."""
    machine = MoneyModel(model_app)
    if wakes_by == "stalled worker completes":
        machine.start("0.05", True, [(0, "plain", 128)])
        machine.stall("t1", takeover=False)
        machine.lapse_lease("t1")
    else:
        machine.start("0.05", True, [(0, "late_transient", 128)])
        machine.run_whole("t1", takeover=False, final_attempt=False)  # tool round saved, re-queued
        assert machine.turns["t1"].status == "queued" and machine.saved_tokens(machine.turns["t1"]) > (0, 0)
    machine.expire(ttl_passed=True)
    machine.adjust("-available")
    check_books(machine)
    if wakes_by == "stalled worker completes":
        machine.wake("t1")
    else:
        machine.run_whole("t1", takeover=True, final_attempt=True)

    turn = machine.turns["t1"]
    assert turn.status in ENDED and turn.limited and turn.cost == 0, turn
    assert turn.tokens > (0, 0) and turn.hold_status == "expired"
    check_books(machine)
    machine.teardown()
