"""Base schema and shared fields."""

from __future__ import annotations

from decimal import Decimal

from marshmallow import RAISE, Schema, ValidationError, fields, pre_load

from shared.db import MONEY_QUANT


def _has_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


class BaseSchema(Schema):
    """Every schema rejects unknown fields, and NUL characters anywhere in its input
    (Postgres text cannot hold them; they would otherwise fail at the database)."""

    class Meta:
        unknown = RAISE
        ordered = True

    @pre_load
    def _refuse_nul(self, data, **_kwargs):
        if isinstance(data, dict):
            bad = [str(key) for key, value in data.items() if _has_nul(key) or _has_nul(value)]
            if bad:
                raise ValidationError({key: ["NUL characters are not allowed."] for key in bad})
        return data


class Money(fields.Decimal):
    """A decimal string with exactly 6 places, never a float."""

    def __init__(self, **kwargs):
        super().__init__(places=6, as_string=True, allow_nan=False, **kwargs)

    def _serialize(self, value, attr, obj, **kwargs):
        if value is None:
            return None
        return format(Decimal(value).quantize(MONEY_QUANT), "f")


class ErrorSchema(BaseSchema):
    code = fields.Integer(required=True)
    status = fields.String(required=True)
    message = fields.String(required=True)
    error = fields.String(required=True, metadata={"description": "Stable snake_case machine code"})
    errors = fields.Dict(metadata={"description": "Per-location, per-field validation messages"})

    class Meta:
        unknown = RAISE
        ordered = True
        # Errors may carry extra detail fields (balance, required, ...).
        additional_properties = True


class StrictInteger(fields.Integer):
    """An integer that refuses strings, floats and booleans (``true`` is not ``1``)."""

    def __init__(self, **kwargs):
        super().__init__(strict=True, **kwargs)

    def _validated(self, value):
        if isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return super()._validated(value)
