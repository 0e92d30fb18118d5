"""Usage summary and export schemas.

Query values are taken as strings and validated by ``services/usage.py`` so each
bad value gets one stable error code (``invalid_date``, ``invalid_timezone`` …).
"""

from marshmallow import fields

from web.schemas.common import BaseSchema, Money

ATTRIBUTION_NOTE = (
    "A turn counts on the local date in `tz` of its completion. Exact in every zone, across "
    "DST changes and for half- and quarter-hour offsets (Asia/Kolkata, Asia/Kathmandu, "
    "Pacific/Chatham): usage is rolled up per UTC hour with the split of each hour at :15, "
    ":30 and :45, and every local midnight since 1972 falls on a UTC quarter hour."
)


class UsageQuerySchema(BaseSchema):
    bucket = fields.String(
        load_default=None,
        metadata={
            "description": "`day` (default), `week` (ISO, Monday) or `month`. "
            "Any other value: 200 with `daily: []` and the totals filled.",
            "example": "day",
        },
    )
    start = fields.String(
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
    end = fields.String(
        load_default=None,
        metadata={
            "description": "Last local date (inclusive), YYYY-MM-DD. "
            "Default (also when empty): today in `tz`.",
            "anyOf": [{"format": "date"}, {"maxLength": 0}],
            "example": "2026-01-31",
        },
    )
    user_id = fields.String(
        load_default=None,
        metadata={"description": "Only this user's usage. Not a UUID → 422 `invalid_user_id`."},
    )
    model = fields.String(load_default=None, metadata={"description": "Only this model's usage."})
    tz = fields.String(
        load_default=None,
        metadata={
            "description": "IANA zone for local bucket boundaries (default UTC). "
            "Unknown → 422 `invalid_timezone`. " + ATTRIBUTION_NOTE,
            "example": "Europe/Berlin",
        },
    )


class UsageExportQuerySchema(UsageQuerySchema):
    group_by = fields.String(
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
