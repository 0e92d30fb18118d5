"""Wallet, ledger, grant and pricing schemas."""

from marshmallow import fields, validate

from web.schemas.common import BaseSchema, Money

AMOUNT_DOC = {
    "description": "A decimal string (or JSON number) > 0 with at most 6 decimal places, at most 1e12. "
    "Anything else is 422 `invalid_amount`.",
    "type": "string",
    "example": "25.00",
}
PRICE_DOC = {
    "description": "Credit per 1,000 tokens: a decimal string (or JSON number) >= 0 with at most 6 "
    "decimal places. Anything else is 422 `invalid_price`.",
    "type": "string",
    "example": "0.150000",
}


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
    # Raw on purpose: the service parses the amount so every bad amount gets one
    # stable error code (`invalid_amount`) instead of marshmallow's generic one.
    amount = fields.Raw(required=True, allow_none=True, metadata=AMOUNT_DOC)
    reason = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=500))


class AdjustmentCreateSchema(BaseSchema):
    amount = fields.Raw(
        required=True,
        allow_none=True,
        metadata={"description": 'Signed decimal string, e.g. "-2.50" or "5"; not zero, at most 6 places'},
    )
    reason = fields.String(required=True, validate=validate.Length(min=1, max=500))


class PriceUpdateSchema(BaseSchema):
    input_per_1k = fields.Raw(required=True, allow_none=True, metadata=PRICE_DOC)
    output_per_1k = fields.Raw(required=True, allow_none=True, metadata=PRICE_DOC)


class ModelPriceSchema(BaseSchema):
    id = fields.String(required=True)
    model = fields.String(required=True)
    input_per_1k = Money(required=True)
    output_per_1k = Money(required=True)
    effective_from = fields.DateTime(required=True)
    created_by = fields.String(required=True, metadata={"description": "The admin's id, or `system`"})
    created_at = fields.DateTime(required=True)
