"""Model prices: versioned by ``effective_from``; a turn is priced at the version in force when it ran.

The offline model is priced out of the box: its built-in price (:func:`builtin_price`,
a fixed id, ``effective_from`` 2000-01-01 so it is "in force" for any moment a turn could
have run) is inserted when a turn first needs it (``price_in_force``, inside the turn's
transaction); reads that list prices (``GET /admin/pricing``, ``GET /v1/models``, the
console) show the same row without writing it. An admin's ``PUT /admin/pricing/{model}``
adds a newer version on top.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from sqlalchemy import and_, bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db import MONEY_QUANT, dialect_insert, utcnow
from shared.errors import InvalidInput
from shared.models import SYSTEM_ACTOR, ModelPrice
from shared.services import audit

log = logging.getLogger(__name__)

OFFLINE_MODELS = {"offline-small": (Decimal("0.001000"), Decimal("0.002000"))}
# Seeded defaults take effect "since always", so a turn started at any time finds them.
SEED_EFFECTIVE_FROM = datetime(2000, 1, 1, tzinfo=UTC)
MAX_MODEL_NAME = 200  # characters; the edge checks names against it
MAX_PRICE_PER_1K = Decimal("1000000")
TOKENS_PER_UNIT = Decimal(1000)
MAX_AMOUNT = Decimal("1000000000000")  # 1e12: far below NUMERIC(20,6)'s 14 integer digits
_BUILTIN_PRICE_IDS = uuid.UUID("6f1d3c52-3f0e-4f7a-9a53-1c7e0d2b8a41")  # uuid5 namespace


def check_money(
    value: Decimal,
    *,
    field: str,
    error: str,
    allow_zero: bool = False,
    maximum: Decimal = MAX_AMOUNT,
) -> Decimal:
    """A money amount's domain rules; the edge has already parsed it (``shared.money``).

    Refuses NaN/Infinity, negatives, zero (unless ``allow_zero``), more than 6 decimal
    places and values above ``maximum``; never rounds. Returns the value with 6 places.

    :raises InvalidInput: with the given ``error`` code and ``field``.
    """

    def refuse(why: str) -> InvalidInput:
        return InvalidInput(f"{field} {why}", error=error, field=field)

    if not value.is_finite():
        raise refuse("must be a finite number.")
    if value < 0 or (value == 0 and not allow_zero):
        raise refuse("must be greater than zero." if not allow_zero else "must not be negative.")
    if value > maximum:  # first: quantizing a huge exponent would overflow the context
        raise refuse(f"must be at most {maximum}.")
    if value != value.quantize(MONEY_QUANT, rounding=ROUND_HALF_UP):
        raise refuse("must have at most 6 decimal places.")
    return value.quantize(MONEY_QUANT) + 0


# Built once: read twice a turn (admission and run). The admission reads it as a subquery of
# the statement that locks the chat session (``turns._LOCK_SESSION``).
LATEST = (
    select(ModelPrice)
    .where(ModelPrice.model == bindparam("model"), ModelPrice.effective_from <= bindparam("at"))
    .order_by(ModelPrice.effective_from.desc())
    .limit(1)
)


def _latest(session: Session, model: str, at: datetime) -> ModelPrice | None:
    return session.scalar(LATEST, {"model": model, "at": at})


def builtin_price(model: str) -> ModelPrice:
    """The built-in price of an ``OFFLINE_MODELS`` model, as its row is written (not added to
    any session): its id and times are fixed, so a read shows what the row will hold."""
    input_per_1k, output_per_1k = OFFLINE_MODELS[model]
    return ModelPrice(
        id=str(uuid.uuid5(_BUILTIN_PRICE_IDS, model)),
        model=model,
        input_per_1k=input_per_1k,
        output_per_1k=output_per_1k,
        effective_from=SEED_EFFECTIVE_FROM,
        created_by=SYSTEM_ACTOR,
        created_at=SEED_EFFECTIVE_FROM,
    )


def _seed_default(session: Session, model: str) -> None:
    """Insert the built-in price unless a concurrent seeder's row is there already (its id
    and ``(model, effective_from)`` are the same): one statement, no savepoint, so it runs
    in the caller's transaction or where the caller reads without one."""
    row = builtin_price(model)
    values = {column.key: getattr(row, column.key) for column in ModelPrice.__table__.columns}
    insert = dialect_insert(session.get_bind().dialect.name, ModelPrice.__table__)
    session.execute(insert.values(values).on_conflict_do_nothing())


def price_in_force(session: Session, model: str, at: datetime | None = None) -> ModelPrice:
    """The price version in force for ``model`` at ``at`` (default: now). Does not commit.

    :raises InvalidInput: ``model_not_priced`` when no version is in force.
    """
    at = at or utcnow()
    price = _latest(session, model, at)
    if price is None and model in OFFLINE_MODELS:
        _seed_default(session, model)
        price = _latest(session, model, at)
    if price is None:
        raise InvalidInput(
            f"Model {model!r} has no price; an admin must set one first.",
            error="model_not_priced",
            field="model",
            model=model,
        )
    return price


def cost_of(price: ModelPrice, input_tokens: int, output_tokens: int) -> Decimal:
    """``(input × input_per_1k + output × output_per_1k) / 1000``, 6 places, half-up."""
    raw = (Decimal(input_tokens) * price.input_per_1k + Decimal(output_tokens) * price.output_per_1k) / (
        TOKENS_PER_UNIT
    )
    return raw.quantize(MONEY_QUANT, rounding=ROUND_HALF_UP)


def set_price(
    session: Session, actor_id: str, model: str, input_per_1k: Decimal, output_per_1k: Decimal
) -> ModelPrice:
    """Add a new price version for ``model``, effective now; history is kept. Commits.

    Prices are non-negative, at most 6 decimal places, at most ``MAX_PRICE_PER_1K``.

    ``model`` is a checked name (``web.schemas.billing.checked_model_name``, at the edge).

    :raises InvalidInput: ``invalid_price``.
    """
    prices = {
        name: check_money(value, field=name, error="invalid_price", allow_zero=True, maximum=MAX_PRICE_PER_1K)
        for name, value in (("input_per_1k", input_per_1k), ("output_per_1k", output_per_1k))
    }
    now = utcnow()
    newest = session.scalar(select(func.max(ModelPrice.effective_from)).where(ModelPrice.model == model))
    # Versions stay strictly ordered even for two PUTs within one clock tick.
    effective_from = max(now, newest + timedelta(microseconds=1)) if newest else now
    price = ModelPrice(model=model, effective_from=effective_from, created_by=actor_id, **prices)
    session.add(price)
    audit.record(
        session,
        actor_id,
        "price.set",
        target_type="model",
        target=model,
        details={key: format(value, "f") for key, value in prices.items()},
    )
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise InvalidInput(
            "Another price for this model was set at the same instant; retry.", error="price_conflict"
        ) from exc
    return price


def list_current_prices(session: Session) -> list[ModelPrice]:
    """The version in force now for every priced model, by model name; a built-in model not
    priced in the database yet is listed with its :func:`builtin_price`. Writes nothing."""
    now = utcnow()
    newest = (
        select(ModelPrice.model, func.max(ModelPrice.effective_from).label("effective_from"))
        .where(ModelPrice.effective_from <= now)
        .group_by(ModelPrice.model)
        .subquery()
    )
    current = list(
        session.scalars(
            select(ModelPrice)
            .join(
                newest,
                and_(
                    ModelPrice.model == newest.c.model, ModelPrice.effective_from == newest.c.effective_from
                ),
            )
            .order_by(ModelPrice.model)
        )
    )
    unstored = OFFLINE_MODELS.keys() - {price.model for price in current}
    if not unstored:
        return current
    return sorted([*current, *map(builtin_price, unstored)], key=lambda price: price.model)
