"""Usage summary and export schemas.

Each query value is parsed here into its type (a date, a ``ZoneInfo``, a checked UUID
string, a ``GroupBy``), a bad one with its stable error code (``invalid_date``,
``invalid_timezone`` …); an empty value is the same as none. ``services/usage.py``
applies the defaults and the range rules.
"""

import re
import uuid
from datetime import date
from zoneinfo import ZoneInfo

from marshmallow import fields

from shared.services.usage import MAX_DATE, MAX_MODEL_LENGTH, MIN_DATE, GroupBy, query_error
from web.schemas.common import BaseSchema, Money, zone_named

DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")

ATTRIBUTION_NOTE = (
    "A turn counts on the local date in `tz` of its completion. Exact in every zone, across "
    "DST changes and for half- and quarter-hour offsets (Asia/Kolkata, Asia/Kathmandu, "
    "Pacific/Chatham): usage is rolled up per UTC hour with the split of each hour at :15, "
    ":30 and :45, and every local midnight since 1972 falls on a UTC quarter hour."
)


class QueryValue(fields.String):
    """A query-string value parsed by ``parse``; empty is absent (``None``)."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        return None if text == "" else self.parse(text, attr)

    def parse(self, text: str, name: str):
        return text


class LocalDate(QueryValue):
    def parse(self, text: str, name: str) -> date:
        message = f"{name} must be a date YYYY-MM-DD between {MIN_DATE} and {MAX_DATE}."
        try:
            value = date.fromisoformat(text) if DATE_PATTERN.match(text) else None
        except ValueError:
            value = None
        if value is None or not MIN_DATE <= value <= MAX_DATE:
            raise query_error(name, "invalid_date", message)
        return value


class UserId(QueryValue):
    def parse(self, text: str, name: str) -> str:
        """The UUID in its canonical lower-case form."""
        try:
            parsed = uuid.UUID(text)
        except ValueError as exc:
            raise query_error(name, "invalid_user_id", "user_id must be a UUID.") from exc
        if len(text) != 36:
            raise query_error(name, "invalid_user_id", "user_id must be a UUID (36 characters).")
        return str(parsed)


class ModelName(QueryValue):
    def parse(self, text: str, name: str) -> str:
        if len(text) > MAX_MODEL_LENGTH:
            raise query_error(name, "invalid_model", f"model may be at most {MAX_MODEL_LENGTH} characters.")
        return text


class Zone(QueryValue):
    def parse(self, text: str, name: str) -> ZoneInfo:
        return zone_named(text)


class GroupByValue(QueryValue):
    def parse(self, text: str, name: str) -> GroupBy:
        try:
            return GroupBy(text)
        except ValueError:
            raise query_error(name, "invalid_group_by", "group_by must be user or model.") from None


class UsageQuerySchema(BaseSchema):
    bucket = QueryValue(
        load_default=None,
        metadata={
            "description": "`day` (default), `week` (ISO, Monday) or `month`. "
            "Any other value: 200 with `daily: []` and the totals filled.",
            "example": "day",
        },
    )
    start = LocalDate(
        load_default=None,
        metadata={
            "description": "First local date (inclusive), YYYY-MM-DD. Default (also when empty): "
            "`end` − 29 days. "
            "Malformed → 422 `invalid_date`; after `end` → 422 `invalid_range`; "
            "more than 3660 days → 422 `range_too_large`.",
            "anyOf": [{"format": "date"}, {"maxLength": 0}],
            "example": "2026-01-01",
        },
    )
    end = LocalDate(
        load_default=None,
        metadata={
            "description": "Last local date (inclusive), YYYY-MM-DD. "
            "Default (also when empty): today in `tz`.",
            "anyOf": [{"format": "date"}, {"maxLength": 0}],
            "example": "2026-01-31",
        },
    )
    user_id = UserId(
        load_default=None,
        metadata={"description": "Only this user's usage. Not a UUID → 422 `invalid_user_id`."},
    )
    model = ModelName(load_default=None, metadata={"description": "Only this model's usage."})
    tz = Zone(
        load_default=None,
        metadata={
            "description": "IANA zone for local bucket boundaries (default UTC). "
            "Unknown → 422 `invalid_timezone`. " + ATTRIBUTION_NOTE,
            "example": "Europe/Berlin",
        },
    )


class UsageExportQuerySchema(UsageQuerySchema):
    group_by = GroupByValue(
        load_default=None,
        metadata={
            "description": "`user` or `model`: one row per bucket and user (model). "
            "Anything else → 422 `invalid_group_by`."
        },
    )


class UsageTotalsSchema(BaseSchema):
    turns = fields.Integer(required=True, metadata={"description": "Completed turns"})
    input_tokens = fields.Integer(
        required=True, metadata={"description": "Includes conversation-summary tokens"}
    )
    output_tokens = fields.Integer(
        required=True, metadata={"description": "Includes conversation-summary tokens"}
    )
    cost = Money(required=True)


class UsageBucketSchema(BaseSchema):
    bucket_start = fields.Date(
        required=True, metadata={"description": "Local date the bucket starts (the day, Monday or the 1st)"}
    )
    turns = fields.Integer(required=True)
    input_tokens = fields.Integer(required=True)
    output_tokens = fields.Integer(required=True)
    cost = Money(required=True)


class UsageSummarySchema(BaseSchema):
    bucket = fields.String(required=True)
    start = fields.Date(required=True)
    end = fields.Date(required=True)
    totals = fields.Nested(UsageTotalsSchema, required=True)
    daily = fields.List(
        fields.Nested(UsageBucketSchema),
        required=True,
        metadata={"description": "The buckets with usage, ascending; named `daily` for every bucket size."},
    )
