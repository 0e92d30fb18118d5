from marshmallow import fields, post_load, validate

from shared.models import Role
from shared.services.auth import normalize_email
from web.schemas.common import WHITESPACE_CLASS, BaseSchema, Money, PatternString

# What the service accepts: a local part, "@", a domain with a dot; no whitespace inside
# (nor NUL); surrounding whitespace is stripped.
_SPACE = f"[{WHITESPACE_CLASS}]"
_NOT_SPACE = f"[^\\x00{WHITESPACE_CLASS}]"
EMAIL_PATTERN = f"^{_SPACE}*[^@\\x00{WHITESPACE_CLASS}]+@{_NOT_SPACE}*\\.{_NOT_SPACE}*{_SPACE}*$"


class WalletSummarySchema(BaseSchema):
    balance = Money(required=True)
    held = Money(required=True)
    available = Money(required=True)
    low_balance = fields.Boolean(required=True)


class UserSchema(BaseSchema):
    id = fields.String(required=True)
    email = fields.String(required=True)
    role = fields.String(required=True)
    created_at = fields.DateTime(required=True)


class MeSchema(UserSchema):
    wallet = fields.Nested(WalletSummarySchema, required=True)


class UserCreateSchema(BaseSchema):
    email = PatternString(
        required=True,
        pattern=EMAIL_PATTERN,
        error="invalid_email",
        message="Not a valid email address.",
        validate=validate.Length(max=320),
    )
    role = fields.String(load_default=Role.USER.value, validate=validate.OneOf([role.value for role in Role]))

    @post_load
    def _normalized_email(self, data, **kwargs):
        # After every field's own checks, so a request gets the same first error as ever.
        return {**data, "email": normalize_email(data["email"])}


class ApiKeySchema(BaseSchema):
    id = fields.String(required=True)
    user_id = fields.String(required=True)
    prefix = fields.String(required=True)
    name = fields.String(allow_none=True)
    created_at = fields.DateTime(required=True)
    revoked_at = fields.DateTime(allow_none=True)


class ApiKeyCreateSchema(BaseSchema):
    name = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=200))


class IssuedKeySchema(BaseSchema):
    api_key = fields.String(required=True, metadata={"description": "Shown once; store it now"})
    key = fields.Nested(ApiKeySchema, required=True)


class UserCreatedSchema(BaseSchema):
    user = fields.Nested(UserSchema, required=True)
    api_key = fields.String(required=True, metadata={"description": "Shown once; store it now"})
    key = fields.Nested(ApiKeySchema, required=True)
