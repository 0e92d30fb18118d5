"""The ledger invariant, checkable at any time:
``wallet.balance == sum(ledger.amount)`` and ``wallet.held == sum(active holds)``."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.models import Hold, LedgerEntry, Wallet


@dataclass(frozen=True)
class Mismatch:
    wallet_id: str
    user_id: str
    balance: Decimal
    ledger_sum: Decimal
    held: Decimal
    active_holds: Decimal


def find_mismatches(session: Session) -> list[Mismatch]:
    ledger = (
        select(LedgerEntry.wallet_id, func.coalesce(func.sum(LedgerEntry.amount), 0).label("total"))
        .group_by(LedgerEntry.wallet_id)
        .subquery()
    )
    holds = (
        select(Hold.wallet_id, func.coalesce(func.sum(Hold.amount), 0).label("total"))
        .where(Hold.status == "active")
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
