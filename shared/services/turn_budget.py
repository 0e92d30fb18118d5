"""What a turn may spend: the size of its hold, and the runner's budget against it.

Invariant (design §4, docs/billing.md): **actual cost <= hold, and the charge is
the actual cost.** Two halves keep it:

- ``worst_case`` sizes the hold at admission from the context the runner will
  build (``shared.services.turn_context``): the summary call when one is due,
  then ``HOLD_MODEL_ROUNDS`` model calls, each with the full context, the tool
  schemas, what earlier rounds added (their output and ``HOLD_TOOL_RESULT_TOKENS``
  of tool results) and the turn's output budget.
- ``TurnBudget`` checks every model call against what is left of the hold before
  it is made: a tool round only when the answer after it is still covered; a
  summary call only when it and the answer fit (else the free extractive
  fallback); and a call that does not fit is trimmed — oldest earlier turns
  first, then tool results, then the output budget. A call that cannot be made to
  fit is not made (``BudgetExhausted``).

Input tokens are estimated with the same rule the offline model bills by
(``shared.providers.tokens``) times ``HOLD_TOKEN_MARGIN``, for real tokenizers
that count more tokens per character. Checks use exact (unrounded) amounts and
keep one micro-unit for the final half-up rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

from shared.db import MONEY_QUANT
from shared.models import ModelPrice
from shared.providers.tokens import count_message_tokens, count_tool_schema_tokens
from shared.services import summaries, turn_context
from shared.services.turn_context import TurnContext
from shared.settings import Settings

TOKENS_PER_UNIT = Decimal(1000)
# What an assistant message carrying tool calls adds besides its output tokens.
TOOL_ROUND_OVERHEAD_TOKENS = 16
# Tool results are cut to this many characters, at the least, before the output budget is lowered.
MIN_TOOL_RESULT_CHARS = 200


class BudgetExhausted(Exception):
    """What is left of the hold cannot pay for the next model call, even trimmed."""

    code = "budget_exhausted"


@dataclass(frozen=True)
class HoldPolicy:
    rounds: int
    tool_result_tokens: int
    margin: Decimal

    @classmethod
    def from_settings(cls, settings: Settings) -> HoldPolicy:
        return cls(
            rounds=max(1, settings.hold_model_rounds),
            tool_result_tokens=max(0, settings.hold_tool_result_tokens),
            margin=max(Decimal(1), settings.hold_token_margin),
        )

    def input_tokens(self, messages: list[dict], tools: list[dict] | None = None) -> int:
        """The input estimate of one call, margin included."""
        counted = count_message_tokens(messages) + count_tool_schema_tokens(tools)
        return math.ceil(counted * self.margin)


def _exact_cost(price: ModelPrice, input_tokens: int, output_tokens: int) -> Decimal:
    return (Decimal(input_tokens) * price.input_per_1k + Decimal(output_tokens) * price.output_per_1k) / (
        TOKENS_PER_UNIT
    )


def worst_case(
    price: ModelPrice,
    policy: HoldPolicy,
    context: TurnContext,
    content: str,
    max_output_tokens: int,
    tool_schemas: list[dict] | None,
) -> Decimal:
    """The hold a turn needs: every call it may make at admission's view of the session,
    rounded up to a micro-unit."""
    input_tokens = output_tokens = 0
    summary = context.summary
    if context.summary_due:
        input_tokens += policy.input_tokens(summaries.request_messages(context.summary, context.missing))
        output_tokens += summaries.SUMMARY_MAX_OUTPUT_TOKENS
        # The call's context then holds the new summary, at most this long.
        summary = "x" * max(len(summary or ""), summaries.SUMMARY_MAX_CHARS)
    first_call = policy.input_tokens(turn_context.messages(context, content, summary=summary), tool_schemas)
    growth = math.ceil(
        (policy.tool_result_tokens + max_output_tokens + TOOL_ROUND_OVERHEAD_TOKENS) * policy.margin
    )
    for round_number in range(policy.rounds):
        input_tokens += first_call + round_number * growth
        output_tokens += max_output_tokens
    return _exact_cost(price, input_tokens, output_tokens).quantize(MONEY_QUANT, rounding=ROUND_CEILING)


def worst_case_messages(
    price: ModelPrice,
    policy: HoldPolicy,
    messages: list[dict],
    max_output_tokens: int,
    tools: list[dict] | None = None,
) -> Decimal:
    """The hold of a turn that is one call on the caller's own messages and tools
    (/v1/chat/completions)."""
    cost = _exact_cost(price, policy.input_tokens(messages, tools), max_output_tokens)
    return cost.quantize(MONEY_QUANT, rounding=ROUND_CEILING)


class TurnBudget:
    """One run of a turn against its hold (``reserved``; ``None``: not enforced, no bound).

    ``spent_*`` start at what earlier attempts of the turn already used (billed with it).
    """

    def __init__(
        self,
        price: ModelPrice,
        policy: HoldPolicy,
        reserved: Decimal | None,
        *,
        spent_input_tokens: int = 0,
        spent_output_tokens: int = 0,
    ) -> None:
        self.price = price
        self.policy = policy
        self.reserved = reserved
        self.input_tokens = spent_input_tokens
        self.output_tokens = spent_output_tokens
        # Raised when the provider counts more input tokens than estimated, so the
        # rest of the turn is checked with the provider's own ratio.
        self.scale = Decimal(1)

    @property
    def bounded(self) -> bool:
        return self.reserved is not None

    def record(self, input_tokens: int, output_tokens: int, *, estimated_input: int | None = None) -> None:
        """Count a call's usage; ``estimated_input`` (our estimate for that call) calibrates later ones."""
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        if estimated_input and input_tokens > estimated_input:
            self.scale = max(self.scale, Decimal(input_tokens) / Decimal(estimated_input))

    def estimate_input(self, messages: list[dict], tools: list[dict] | None = None) -> int:
        return math.ceil(self.policy.input_tokens(messages, tools) * self.scale)

    def _left(self) -> Decimal:
        # One micro-unit stays back for the half-up rounding of the final charge.
        assert self.reserved is not None
        return self.reserved - MONEY_QUANT - _exact_cost(self.price, self.input_tokens, self.output_tokens)

    def call_cost(self, messages: list[dict], tools: list[dict] | None, max_output_tokens: int) -> Decimal:
        return _exact_cost(self.price, self.estimate_input(messages, tools), max_output_tokens)

    def covers(self, *costs: Decimal) -> bool:
        return not self.bounded or sum(costs, Decimal(0)) <= self._left()

    def allows_summary(self, summary_messages: list[dict], answer_cost: Decimal) -> bool:
        """A summary call is made only if the answer after it is still covered."""
        summary_cost = _exact_cost(
            self.price, self.estimate_input(summary_messages), summaries.SUMMARY_MAX_OUTPUT_TOKENS
        )
        return self.covers(summary_cost, answer_cost)

    def allows_tool_round(self, messages: list[dict], tools: list[dict], max_output_tokens: int) -> bool:
        """Offer tools only if this call and the answer after the tool results both fit."""
        this_call = self.call_cost(messages, tools, max_output_tokens)
        growth = self.policy.tool_result_tokens + max_output_tokens + TOOL_ROUND_OVERHEAD_TOKENS
        answer = _exact_cost(
            self.price,
            self.estimate_input(messages) + math.ceil(growth * self.policy.margin * self.scale),
            max_output_tokens,
        )
        return self.covers(this_call, answer)

    def fit(
        self,
        messages: list[dict],
        tools: list[dict] | None,
        max_output_tokens: int,
        history: tuple[int, int],
    ) -> tuple[list[dict], int]:
        """The call as it may be made: ``(messages, max_output_tokens)``, trimmed to what is left.

        ``history`` is the ``(first, end)`` slice of earlier turns in ``messages``.

        :raises BudgetExhausted: not even one output token fits.
        """
        if not self.bounded or self.covers(self.call_cost(messages, tools, max_output_tokens)):
            return messages, max_output_tokens
        trimmed = list(messages)
        first, end = history
        while end - first >= 2:
            del trimmed[first : first + 2]
            end -= 2
            if self.covers(self.call_cost(trimmed, tools, max_output_tokens)):
                return trimmed, max_output_tokens
        trimmed = self._shrink_tool_results(trimmed, tools, max_output_tokens)
        if self.covers(self.call_cost(trimmed, tools, max_output_tokens)):
            return trimmed, max_output_tokens
        output_tokens = self._affordable_output(trimmed, tools, max_output_tokens)
        if output_tokens < 1:
            raise BudgetExhausted()
        return trimmed, output_tokens

    def _shrink_tool_results(
        self, messages: list[dict], tools: list[dict] | None, max_output_tokens: int
    ) -> list[dict]:
        shrunk = list(messages)
        while not self.covers(self.call_cost(shrunk, tools, max_output_tokens)):
            longest = max(
                (i for i, m in enumerate(shrunk) if m.get("role") == "tool"),
                key=lambda i: len(shrunk[i].get("content") or ""),
                default=None,
            )
            if longest is None:
                break
            text = shrunk[longest].get("content") or ""
            if len(text) <= MIN_TOOL_RESULT_CHARS:
                break
            keep = max(MIN_TOOL_RESULT_CHARS, len(text) // 2)
            shrunk[longest] = {**shrunk[longest], "content": text[:keep] + " …[cut to fit the turn's budget]"}
        return shrunk

    def _affordable_output(self, messages: list[dict], tools: list[dict] | None, wanted: int) -> int:
        left = self._left() - self.call_cost(messages, tools, 0)
        if left < 0:
            return 0
        if self.price.output_per_1k <= 0:
            return wanted
        return min(wanted, int(left * TOKENS_PER_UNIT / self.price.output_per_1k))
