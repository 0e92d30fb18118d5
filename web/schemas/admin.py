"""Admin settings (enforcement) and audit schemas."""

from marshmallow import fields

from web.schemas.common import BaseSchema, Money


class StrictBoolean(fields.Boolean):
    """Only JSON ``true``/``false``: ``"yes"``, ``1`` or ``"true"`` are refused."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


class EnforcementUpdateSchema(BaseSchema):
    enabled = StrictBoolean(required=True)


class AdminEnforcementSchema(BaseSchema):
    enabled = fields.Boolean(required=True, metadata={"description": "The effective state"})
    source = fields.String(required=True, metadata={"description": "override | default"})
    default_enabled = fields.Boolean(
        required=True, metadata={"description": "BILLING_ENFORCEMENT_ENABLED of the answering process"}
    )
    override = fields.Boolean(required=True, allow_none=True)
    updated_by = fields.String(required=True, allow_none=True)
    updated_at = fields.DateTime(required=True, allow_none=True)


class AdminSettingsSchema(BaseSchema):
    enforcement = fields.Nested(AdminEnforcementSchema, required=True)
    low_balance_threshold = Money(required=True)
    default_model = fields.String(required=True)
    model_provider = fields.String(required=True)


class AuditEventSchema(BaseSchema):
    id = fields.String(required=True)
    actor_id = fields.String(required=True)
    action = fields.String(required=True)
    target_type = fields.String(allow_none=True)
    target = fields.String(allow_none=True)
    details = fields.Dict(required=True)
    created_at = fields.DateTime(required=True)
