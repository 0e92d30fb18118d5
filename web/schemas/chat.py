from marshmallow import fields, validate

from shared.services.pricing import MAX_MODEL_NAME
from web.schemas.common import BaseSchema, Money, StrictInteger


class RoomCreateSchema(BaseSchema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=200))


class RoomSchema(BaseSchema):
    id = fields.String(required=True)
    name = fields.String(required=True)
    created_at = fields.DateTime(required=True)


class SessionCreateSchema(BaseSchema):
    title = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=200))


class SessionSchema(BaseSchema):
    id = fields.String(required=True)
    room_id = fields.String(required=True)
    title = fields.String(allow_none=True)
    summary = fields.String(allow_none=True)
    summary_updated_at = fields.DateTime(allow_none=True)
    created_at = fields.DateTime(required=True)


class TurnCreateSchema(BaseSchema):
    content = fields.String(required=True, metadata={"description": "The user's message; not blank"})
    model = fields.String(
        load_default=None, allow_none=True, validate=validate.Length(min=1, max=MAX_MODEL_NAME)
    )
    max_output_tokens = StrictInteger(
        load_default=None, allow_none=True, validate=validate.Range(min=1, max=8192)
    )
    stream = fields.Boolean(
        load_default=False,
        metadata={"description": "Answer 200 text/event-stream (turn, delta, tool_call, done events)"},
    )


class UsageSchema(BaseSchema):
    input_tokens = fields.Integer(required=True)
    output_tokens = fields.Integer(required=True)


class ToolCallSchema(BaseSchema):
    id = fields.String(required=True)
    tool = fields.String(required=True)
    arguments = fields.Dict(required=True)
    status = fields.String(required=True, metadata={"description": "ok | error | timeout"})
    duration_ms = fields.Integer(required=True)
    result_excerpt = fields.String(allow_none=True)


class TurnErrorSchema(BaseSchema):
    code = fields.String(required=True)
    message = fields.String(required=True)


class TurnSchema(BaseSchema):
    """TurnRead, dumped from a ``Turn`` (its ``tool_calls`` loaded on access) or from the
    ``turns.TurnRead`` that ``GET /turns/{id}`` reads: the same attributes."""

    id = fields.String(required=True)
    session_id = fields.String(required=True)
    room_id = fields.String(required=True)
    seq = fields.Integer(required=True)
    status = fields.String(
        required=True, metadata={"description": "queued | running | completed | failed | cancelled"}
    )
    content = fields.String(required=True)
    reply = fields.String(allow_none=True)
    model = fields.String(required=True)
    usage = fields.Nested(UsageSchema, required=True)
    cost = Money(allow_none=True)
    balance_after = Money(allow_none=True)
    low_balance = fields.Boolean(required=True)
    summary_used_fallback = fields.Boolean(required=True)
    tool_calls = fields.List(fields.Nested(ToolCallSchema), required=True)
    error = fields.Nested(TurnErrorSchema, allow_none=True)
    usage_estimated = fields.Boolean(
        required=True,
        metadata={"description": "Some usage is the token rule's estimate, not the provider's report"},
    )
    created_at = fields.DateTime(required=True)
    completed_at = fields.DateTime(allow_none=True)

    def get_attribute(self, obj, attr, default):
        # `usage` and `error` group columns of the turn; every other field is one attribute.
        if attr == "usage":
            return {"input_tokens": obj.input_tokens, "output_tokens": obj.output_tokens}
        if attr == "error":
            return {"code": obj.error_code, "message": obj.error_message or ""} if obj.error_code else None
        return super().get_attribute(obj, attr, default)
