from marshmallow import ValidationError, fields, post_load, validate

from shared.errors import InvalidInput
from shared.models import SpendPeriod
from shared.services.limits import (
    MAX_CONCURRENT_TURNS,
    MAX_REQUESTS_PER_MINUTE,
    MAX_SPEND_AMOUNT,
    Limits,
    SpendLimit,
)
from web.schemas.common import BaseSchema, Money, MoneyInput, PatternString, StrictInteger, zone_named
from web.schemas.users import WalletSummarySchema


class LimitInteger(StrictInteger):
    """A positive integer limit or null; anything else is 422 ``invalid_limit``."""

    def __init__(self, maximum: int, **kwargs):
        self.maximum = maximum
        super().__init__(
            allow_none=True, load_default=None, validate=validate.Range(min=1, max=maximum), **kwargs
        )

    def deserialize(self, value, attr=None, data=None, **kwargs):
        try:
            return super().deserialize(value, attr, data, **kwargs)
        except ValidationError:
            raise InvalidInput(
                f"{attr} must be an integer from 1 to {self.maximum}, or null.",
                error="invalid_limit",
                field=attr,
            ) from None


class SpendLimitInputSchema(BaseSchema):
    amount = MoneyInput(
        required=True,
        error="invalid_limit_amount",
        maximum=int(MAX_SPEND_AMOUNT),
        allow_zero=True,
        description='A decimal string such as "25.00" (at most 6 places) or an integer, 0 to 1e12; '
        "0 allows no spending.",
    )
    period = PatternString(
        required=True,
        pattern=r"^(day|week|month)$",
        error="invalid_period",
        message="period must be day, week or month.",
    )
    tz = fields.String(
        load_default="UTC",
        validate=validate.Length(max=64),
        metadata={"description": "IANA zone of the calendar (`invalid_timezone` otherwise); default UTC"},
    )


class SpendField(fields.Field):
    """``spend``: a SpendLimitInput object or null. Documented inline as a nullable object
    (apispec renders a nullable ``Nested`` as ``anyOf [ref, any object]``, which would
    document ``{}`` as valid)."""

    def __init__(self, **kwargs):
        inner = SpendLimitInputSchema()
        properties = {
            "amount": {
                "description": inner.fields["amount"].metadata["description"],
                "anyOf": inner.fields["amount"].metadata["anyOf"],
            },
            "period": {"type": "string", "pattern": inner.fields["period"].pattern},
            "tz": {
                "type": "string",
                "maxLength": 64,
                "default": "UTC",
                "pattern": r"^[^\x00]*$",
                "description": inner.fields["tz"].metadata["description"],
            },
        }
        kwargs["metadata"] = {
            "type": "object",
            "properties": properties,
            "required": ["amount", "period"],
            "additionalProperties": False,
            "description": "The spend cap, or null for none",
        }
        super().__init__(allow_none=True, load_default=None, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, dict):
            raise ValidationError("Must be an object or null.")
        return SpendLimitInputSchema().load(value)


class LimitsUpdateSchema(BaseSchema):
    """Loads to ``limits.Limits``, every value in its type."""

    spend = SpendField()
    requests_per_minute = LimitInteger(MAX_REQUESTS_PER_MINUTE)
    max_concurrent_turns = LimitInteger(MAX_CONCURRENT_TURNS)

    @post_load
    def _limits(self, data, **_kwargs) -> Limits:
        # The zone is checked last, after every field (as the service did), so a body with
        # several bad values keeps answering with the same code.
        spend = data.get("spend")
        return Limits(
            spend=SpendLimit(
                amount=spend["amount"], period=SpendPeriod(spend["period"]), tz=zone_named(spend["tz"]).key
            )
            if spend is not None
            else None,
            requests_per_minute=data.get("requests_per_minute"),
            max_concurrent_turns=data.get("max_concurrent_turns"),
        )


class SpendLimitSchema(BaseSchema):
    amount = Money(required=True)
    period = fields.String(required=True)
    tz = fields.String(required=True)
    spent = Money(required=True, metadata={"description": "Charged in the current period"})
    held = Money(required=True, metadata={"description": "Worst cases reserved by turns in flight"})
    period_start = fields.DateTime(required=True)
    resets_at = fields.DateTime(required=True)


class LimitsSchema(BaseSchema):
    subject_type = fields.String(required=True, metadata={"enum": ["user", "api_key"]})
    subject_id = fields.String(required=True)
    user_id = fields.String(required=True)
    spend = fields.Nested(SpendLimitSchema, required=True, allow_none=True)
    requests_per_minute = fields.Integer(required=True, allow_none=True)
    max_concurrent_turns = fields.Integer(required=True, allow_none=True)
    in_flight_turns = fields.Integer(required=True)
    requests_last_minute = fields.Integer(required=True)
    updated_by = fields.String(required=True, allow_none=True)
    updated_at = fields.DateTime(required=True, allow_none=True)


class WalletReadSchema(WalletSummarySchema):
    limits = fields.List(
        fields.Nested(LimitsSchema),
        required=True,
        metadata={"description": "The limits on the caller's user and on the key used for this call"},
    )
