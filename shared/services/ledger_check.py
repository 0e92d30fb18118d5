"""The ledger's invariants, checkable at any time (``tollgate ledger-check``, design §4):

1. ``wallet.balance == sum(ledger.amount)`` for every wallet;
2. ``wallet.held == sum(active holds)`` for every wallet;
3. no ledger entry of a turn admitted under enforcement leaves ``balance_after < 0``
   — unless an unenforced charge (a turn or summary billed while enforcement was off,
   which may overdraw by design) landed in that wallet while the turn's hold was
   active, and so spent credit the hold had reserved;
4. no turn admitted under enforcement is charged (captures + debits) more than its hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import and_, exists, func, select
from sqlalchemy.orm import Session, aliased

from shared.models import Hold, HoldStatus, LedgerEntry, LedgerKind, Turn, Wallet


@dataclass(frozen=True)
class Mismatch:
    wallet_id: str
    user_id: str
    balance: Decimal
    ledger_sum: Decimal
    held: Decimal
    active_holds: Decimal


@dataclass(frozen=True)
class Violation:
    """An enforced turn's entry that breaks invariant 3 or 4."""

    rule: str  # "negative_balance" | "charged_over_hold"
    wallet_id: str
    turn_id: str
    detail: str


def find_mismatches(session: Session) -> list[Mismatch]:
    ledger = (
        select(LedgerEntry.wallet_id, func.coalesce(func.sum(LedgerEntry.amount), 0).label("total"))
        .group_by(LedgerEntry.wallet_id)
        .subquery()
    )
    holds = (
        select(Hold.wallet_id, func.coalesce(func.sum(Hold.amount), 0).label("total"))
        .where(Hold.status == HoldStatus.ACTIVE)
        .group_by(Hold.wallet_id)
        .subquery()
    )
    rows = session.execute(
        select(
            Wallet.id,
            Wallet.user_id,
            Wallet.balance,
            Wallet.held,
            func.coalesce(ledger.c.total, 0),
            func.coalesce(holds.c.total, 0),
        )
        .outerjoin(ledger, ledger.c.wallet_id == Wallet.id)
        .outerjoin(holds, holds.c.wallet_id == Wallet.id)
    ).all()
    mismatches = []
    for wallet_id, user_id, balance, held, ledger_sum, active in rows:
        ledger_sum, active = Decimal(ledger_sum), Decimal(active)
        if Decimal(balance) != ledger_sum or Decimal(held) != active:
            mismatches.append(Mismatch(wallet_id, user_id, balance, ledger_sum, held, active))
    return mismatches


def find_violations(session: Session) -> list[Violation]:
    """Invariants 3 and 4 over every turn admitted under enforcement (``turns.enforced``)."""
    violations: list[Violation] = []
    other = aliased(LedgerEntry)
    other_turn = aliased(Turn)
    # Charges not made under enforcement: a debit of an unenforced turn, or a summary debit.
    unenforced_charge = and_(
        other.wallet_id == LedgerEntry.wallet_id,
        other.kind == LedgerKind.DEBIT,
        other.amount < 0,
        other.created_at >= Hold.created_at,
        other.created_at <= LedgerEntry.created_at,
        (other.turn_id.is_(None))
        | exists().where(other_turn.id == other.turn_id, other_turn.enforced.is_(False)),
    )
    negative = session.execute(
        select(LedgerEntry.wallet_id, LedgerEntry.turn_id, LedgerEntry.kind, LedgerEntry.balance_after)
        .join(Turn, Turn.id == LedgerEntry.turn_id)
        .join(Hold, Hold.turn_id == Turn.id)
        .where(Turn.enforced.is_(True), LedgerEntry.balance_after < 0, ~exists().where(unenforced_charge))
    ).all()
    for wallet_id, turn_id, kind, balance_after in negative:
        violations.append(
            Violation("negative_balance", wallet_id, turn_id, f"{kind} left balance_after={balance_after}")
        )
    charged = (
        select(LedgerEntry.turn_id, func.sum(-LedgerEntry.amount).label("charged"))
        .where(LedgerEntry.kind.in_((LedgerKind.CAPTURE, LedgerKind.DEBIT)), LedgerEntry.turn_id.is_not(None))
        .group_by(LedgerEntry.turn_id)
        .subquery()
    )
    over = session.execute(
        select(Hold.wallet_id, Hold.turn_id, Hold.amount, charged.c.charged)
        .join(charged, charged.c.turn_id == Hold.turn_id)
        .join(Turn, Turn.id == Hold.turn_id)
        .where(Turn.enforced.is_(True), charged.c.charged > Hold.amount)
    ).all()
    for wallet_id, turn_id, hold_amount, total in over:
        violations.append(
            Violation("charged_over_hold", wallet_id, turn_id, f"charged {total} > hold {hold_amount}")
        )
    return violations
