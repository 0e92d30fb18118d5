"""Specifications both suites run, on SQLite (``tests/web``) and on Postgres
(``tests/integration``): money is exact to the last of its 6 places at 12 integer
digits, and ledger rows cannot be rewritten, whatever the dialect."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.models import LedgerEntry, Wallet
from shared.services import ledger_check
from tests.factories import Actor

TWELVE_DIGITS = "123456789012.345678"
ONE_MICRO_MORE = "123456789012.345679"


def grant_twelve_digits_and_read_them_back(client, admin: Actor, user: Actor, session: Session) -> None:
    """A 12-digit grant and a one-millionth grant, read back exactly from the API,
    the wallet row, the ledger rows and a SQL sum over them."""
    grants = f"/api/v1/admin/users/{user.id}/grants"
    first = client.post(grants, json={"amount": TWELVE_DIGITS, "reason": "big"}, headers=admin.headers)
    assert first.status_code == 201, first.get_json()
    assert first.get_json()["amount"] == first.get_json()["balance_after"] == TWELVE_DIGITS
    second = client.post(grants, json={"amount": "0.000001"}, headers=admin.headers)
    assert second.get_json()["balance_after"] == ONE_MICRO_MORE

    wallet = client.get("/api/v1/wallet", headers=user.headers).get_json()
    assert (wallet["balance"], wallet["held"], wallet["available"]) == (
        ONE_MICRO_MORE,
        "0.000000",
        ONE_MICRO_MORE,
    )
    for path, headers in (
        ("/api/v1/wallet/ledger", user.headers),
        (f"/api/v1/admin/users/{user.id}/ledger", admin.headers),
    ):
        ledger = client.get(path, headers=headers).get_json()
        assert [(e["amount"], e["balance_after"]) for e in ledger] == [
            ("0.000001", ONE_MICRO_MORE),
            (TWELVE_DIGITS, TWELVE_DIGITS),
        ]

    session.expire_all()
    row = session.scalar(select(Wallet).where(Wallet.user_id == user.id))
    assert row.balance == Decimal(ONE_MICRO_MORE)
    ledger_sum = session.scalar(select(func.sum(LedgerEntry.amount)).where(LedgerEntry.user_id == user.id))
    assert ledger_sum == Decimal(ONE_MICRO_MORE) and str(ledger_sum) == ONE_MICRO_MORE
    assert ledger_check.find_mismatches(session) == []


def ledger_rows_cannot_be_rewritten(session: Session, user: Actor) -> None:
    """Code that updates or deletes a ledger row (a bug) is refused by the database."""
    entry = session.scalar(select(LedgerEntry).where(LedgerEntry.user_id == user.id))
    assert entry is not None
    entry.amount = Decimal("0")
    with pytest.raises(IntegrityError, match="ledger_entries is append-only: UPDATE refused"):
        session.flush()
    session.rollback()
    session.delete(entry)
    with pytest.raises(IntegrityError, match="ledger_entries is append-only: DELETE refused"):
        session.flush()
    session.rollback()
    session.expire_all()
    assert session.get(LedgerEntry, entry.id).amount != Decimal("0")
