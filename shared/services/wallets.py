"""Read-side of wallets (the ledger's one writer is ``services/billing.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import NotFound
from shared.models import Wallet


@dataclass(frozen=True)
class WalletSummary:
    balance: Decimal
    held: Decimal
    available: Decimal
    low_balance: bool


def summary_of(wallet: Wallet, low_balance_threshold: Decimal) -> WalletSummary:
    return WalletSummary(
        balance=wallet.balance,
        held=wallet.held,
        available=wallet.balance - wallet.held,
        low_balance=wallet.balance < low_balance_threshold,
    )


def wallet_summary(session: Session, user_id: str, low_balance_threshold: Decimal) -> WalletSummary:
    """:raises NotFound: the user has no wallet."""
    wallet = session.scalar(select(Wallet).where(Wallet.user_id == user_id))
    if wallet is None:
        raise NotFound("No wallet for this user.")
    return summary_of(wallet, low_balance_threshold)
