"""Wallet, ledger, grant and pricing schemas."""

import re

from marshmallow import fields, validate

from shared.errors import InvalidInput
from shared.services import pricing
from shared.services.pricing import MAX_MODEL_NAME
from web.schemas.common import BaseSchema, Money, MoneyInput, NonBlankString

AMOUNT_DOC = (
    "A decimal string (no exponent, no leading zeros, at most 6 decimal places; trailing zeros "
    "beyond are fine) or a JSON integer, > 0 and at most 1e12. JSON floats and anything else are "
    "422 `invalid_amount`."
)
PRICE_DOC = (
    "Credit per 1,000 tokens: a decimal string (at most 6 decimal places) or a JSON integer, "
    ">= 0 and at most 1e6. JSON floats and anything else are 422 `invalid_price`."
)
# Model names as the pricing path accepts them: segments of letters, digits and ._:@+-,
# joined by single slashes ("acme/chat-large", "meta-llama/Llama-3.1-8B:free").
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*(?:/[A-Za-z0-9][A-Za-z0-9._:@+-]*)*$"
MODEL_PATH_PARAMETER = {
    "in": "path",
    "name": "model",
    "required": True,
    "description": f"Model name, at most {MAX_MODEL_NAME} characters; anything else is 422 `invalid_model`.",
    "schema": {"type": "string", "maxLength": MAX_MODEL_NAME, "pattern": MODEL_NAME_PATTERN},
}
# The service's limits, as the integers MoneyInput documents them with.
MAX_AMOUNT = int(pricing.MAX_AMOUNT)
MAX_PRICE_PER_1K = int(pricing.MAX_PRICE_PER_1K)


class LedgerEntrySchema(BaseSchema):
    id = fields.String(required=True)
    kind = fields.String(
        required=True,
        metadata={"description": "grant | adjustment | hold | capture | release | expiry | debit"},
    )
    amount = Money(required=True, metadata={"description": "Change to the balance"})
    held_delta = Money(required=True, metadata={"description": "Change to the reserved (held) amount"})
    balance_after = Money(required=True)
    turn_id = fields.String(allow_none=True)
    idempotency_key = fields.String(required=True)
    initiated_by = fields.String(required=True, metadata={"description": "A user id, or `system`"})
    reason = fields.String(allow_none=True)
    created_at = fields.DateTime(required=True)


class GrantCreateSchema(BaseSchema):
    # Every bad amount gets one stable error code (`invalid_amount`), not marshmallow's generic one.
    amount = MoneyInput(required=True, error="invalid_amount", maximum=MAX_AMOUNT, description=AMOUNT_DOC)
    reason = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=500))


class AdjustmentCreateSchema(BaseSchema):
    amount = MoneyInput(
        required=True,
        error="invalid_amount",
        maximum=MAX_AMOUNT,
        signed=True,
        description='Signed: a decimal string such as "-2.50" or "5", or a JSON integer; not zero, '
        "at most 6 decimal places, magnitude at most 1e12.",
    )
    reason = NonBlankString(
        required=True,
        error="reason_required",
        message="An adjustment needs a reason.",
        validate=validate.Length(min=1, max=500),
    )


def checked_model_name(model: str) -> str:
    """The pricing path's model name. :raises InvalidInput: ``invalid_model``."""
    if len(model) > MAX_MODEL_NAME or not re.fullmatch(MODEL_NAME_PATTERN, model):
        raise InvalidInput(
            f"model must be at most {MAX_MODEL_NAME} letters, digits or ._:@+- in segments joined by '/'.",
            error="invalid_model",
            field="model",
        )
    return model


class PriceUpdateSchema(BaseSchema):
    input_per_1k = MoneyInput(
        required=True, error="invalid_price", maximum=MAX_PRICE_PER_1K, allow_zero=True, description=PRICE_DOC
    )
    output_per_1k = MoneyInput(
        required=True, error="invalid_price", maximum=MAX_PRICE_PER_1K, allow_zero=True, description=PRICE_DOC
    )


class ModelPriceSchema(BaseSchema):
    id = fields.String(required=True)
    model = fields.String(required=True)
    input_per_1k = Money(required=True)
    output_per_1k = Money(required=True)
    effective_from = fields.DateTime(required=True)
    created_by = fields.String(required=True, metadata={"description": "The admin's id, or `system`"})
    created_at = fields.DateTime(required=True)
