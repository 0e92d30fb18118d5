from marshmallow import fields, validate

from shared.models import DeliveryStatus, WebhookEventType
from web.schemas.common import BaseSchema

EVENT_TYPES = [member.value for member in WebhookEventType]


class WebhookCreateSchema(BaseSchema):
    url = fields.String(
        required=True,
        metadata={
            "description": "http(s) only, no credentials, at most 2048 characters; private, loopback and "
            "link-local addresses are refused unless WEBHOOK_ALLOW_PRIVATE=true"
        },
    )
    events = fields.List(
        fields.String(validate=validate.OneOf(EVENT_TYPES)), required=True, validate=validate.Length(min=1)
    )
    description = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=500))


class WebhookSchema(BaseSchema):
    id = fields.String(required=True)
    url = fields.String(required=True)
    events = fields.List(fields.String(), required=True)
    description = fields.String(required=True, allow_none=True)
    created_at = fields.DateTime(required=True)
    deleted_at = fields.DateTime(required=True, allow_none=True)


class WebhookCreatedSchema(WebhookSchema):
    secret = fields.String(
        required=True, metadata={"description": "The signing secret, shown this once (`Tollgate-Signature`)"}
    )


class WebhookDeliverySchema(BaseSchema):
    id = fields.String(required=True)
    endpoint_id = fields.String(required=True)
    event_id = fields.String(required=True)
    event_type = fields.String(required=True)
    status = fields.String(required=True, metadata={"enum": [member.value for member in DeliveryStatus]})
    attempts = fields.Integer(required=True)
    next_attempt_at = fields.DateTime(required=True, allow_none=True)
    last_attempt_at = fields.DateTime(required=True, allow_none=True)
    response_status = fields.Integer(required=True, allow_none=True)
    response_excerpt = fields.String(required=True, allow_none=True)
    last_error = fields.String(required=True, allow_none=True)
    delivered_at = fields.DateTime(required=True, allow_none=True)
    created_at = fields.DateTime(required=True)
