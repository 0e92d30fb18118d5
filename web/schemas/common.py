"""Base schema and shared fields."""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from marshmallow import INCLUDE, RAISE, Schema, ValidationError, fields, pre_load

from shared.db import MONEY_QUANT
from shared.errors import InvalidInput
from shared.money import amount_pattern, parse_amount
from shared.services.usage import query_error


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
        # Mapping, not dict: query strings arrive as webargs' MultiDictProxy.
        if isinstance(data, Mapping):
            bad = [str(key) for key, value in data.items() if _has_nul(key) or _has_nul(value)]
            if bad:
                raise ValidationError({key: ["NUL characters are not allowed."] for key in bad})
        return data


MONEY_DOC = {"type": "string", "format": "decimal", "pattern": r"^-?\d+\.\d{6}$", "example": "12.500000"}


class Money(fields.Decimal):
    """A decimal string with exactly 6 places, never a float (documented as such: a plain
    ``fields.Decimal`` would be documented as a JSON number)."""

    def __init__(self, **kwargs):
        kwargs["metadata"] = {**MONEY_DOC, **kwargs.get("metadata", {})}
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
        # Only ever dumped. Errors carry extra detail fields (balance, required, down, ...),
        # which INCLUDE documents as `additionalProperties: true`.
        unknown = INCLUDE
        ordered = True


class StrictInteger(fields.Integer):
    """An integer that refuses strings, floats and booleans (``true`` is not ``1``)."""

    def __init__(self, **kwargs):
        super().__init__(strict=True, **kwargs)

    def _validated(self, value):
        if isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return super()._validated(value)


# Python's ``str.strip()`` whitespace, spelled out: ECMA's ``\s`` (the spec's regex dialect)
# and Python's ``\s`` disagree on a few characters, and the services strip with Python's.
WHITESPACE_CLASS = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_BLANK = f"[^{WHITESPACE_CLASS}]"
# Documented form: no NUL (BaseSchema refuses it) and at least one non-whitespace character.
NON_BLANK_PATTERN = rf"^[^\x00]*[^\x00{WHITESPACE_CLASS}][^\x00]*$"


class NonBlankString(fields.String):
    """A string with at least one non-whitespace character; documented as a ``pattern``
    so the spec admits exactly what the service (which strips) accepts. A blank value is
    422 with ``error`` when given (the service's own code), else a field validation error."""

    default_error_messages = {"blank": "Must not be blank."}

    def __init__(self, *, error: str | None = None, message: str = "Must not be blank.", **kwargs):
        self.error_code, self.message = error, message
        kwargs["metadata"] = {"pattern": NON_BLANK_PATTERN, **kwargs.get("metadata", {})}
        super().__init__(**kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        # "" is left to the Length validator, as before.
        if text and not re.search(NOT_BLANK, text):
            if self.error_code:
                raise InvalidInput(self.message, error=self.error_code, field=attr)
            raise self.make_error("blank")
        return text


class MoneyInput(fields.Field):
    """A money amount in a request: a decimal string (at most 6 places) or a JSON integer,
    deserialized to a ``Decimal`` (``shared.money.parse_amount``).

    JSON floats are refused (money is never a float). The documented schema is exactly
    what is accepted; anything else is 422 with the stable ``error`` code given. Services
    receive the ``Decimal`` and check only their domain rules.
    """

    def __init__(
        self,
        *,
        error: str,
        maximum: int,
        allow_zero: bool = False,
        signed: bool = False,
        description: str = "",
        **kwargs,
    ):
        self.error_code = error
        self.maximum = maximum
        self.allow_zero = allow_zero
        self.signed = signed
        pattern = amount_pattern(maximum, allow_zero=allow_zero, signed=signed)
        integer_ranges = [{"type": "integer", "minimum": 0 if allow_zero else 1, "maximum": maximum}]
        if signed:
            integer_ranges.append({"type": "integer", "minimum": -maximum, "maximum": -1})
        kwargs["metadata"] = {
            "description": description,
            "anyOf": [{"type": "string", "pattern": pattern, "example": "25.50"}, *integer_ranges],
            **kwargs.get("metadata", {}),
        }
        super().__init__(**kwargs)

    def deserialize(self, value, attr=None, data=None, **kwargs):
        # null gets the stable code too, not marshmallow's generic "may not be null".
        if value is None:
            return self._deserialize(value, attr, data, **kwargs)
        return super().deserialize(value, attr, data, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs) -> Decimal:
        return parse_amount(
            value,
            field=attr,
            error=self.error_code,
            maximum=self.maximum,
            allow_zero=self.allow_zero,
            signed=self.signed,
        )


class PatternString(fields.String):
    """A string that must fully match ``pattern`` (documented as is); anything else is
    422 with the stable ``error`` code, as the service would answer."""

    def __init__(self, *, pattern: str, error: str, message: str, **kwargs):
        self.pattern, self.error_code, self.message = pattern, error, message
        kwargs["metadata"] = {"pattern": pattern, **kwargs.get("metadata", {})}
        super().__init__(**kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if not re.fullmatch(self.pattern, text):
            raise InvalidInput(self.message, error=self.error_code, field=attr)
        return text


def nul_free_strings(self, field, ret, **kwargs) -> dict:
    """apispec attribute function: BaseSchema refuses NUL anywhere, so every string the
    spec documents without a pattern of its own says so."""
    if isinstance(field, fields.String) and ret.get("type") == "string" and "pattern" not in ret:
        return {"pattern": r"^[^\x00]*$"}
    return {}


@lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones())


def zone_named(name: str | None) -> ZoneInfo:
    """The IANA zone ``name`` (UTC when absent or empty), for every edge that reads one
    (usage queries, spend limits, the console). :raises InvalidInput: ``invalid_timezone``."""
    if name is None or name == "":
        return ZoneInfo("UTC")
    if name not in _zone_names():
        raise query_error("tz", "invalid_timezone", f"Unknown time zone {name[:64]!r}; use an IANA name.")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise query_error("tz", "invalid_timezone", f"Unknown time zone {name[:64]!r}.") from exc
