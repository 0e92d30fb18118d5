from flask.views import MethodView
from flask_smorest import Page

from shared.services import auth
from web.api import Blueprint
from web.context import current_user, db, runtime
from web.schemas.common import ErrorSchema
from web.schemas.users import (
    ApiKeyCreateSchema,
    ApiKeySchema,
    IssuedKeySchema,
    UserCreatedSchema,
    UserCreateSchema,
    UserSchema,
)

blp = Blueprint("admin_users", __name__, url_prefix="/api/v1/admin", description="Users and API keys")


@blp.route("/users")
class Users(MethodView):
    @blp.response(200, UserSchema(many=True))
    @blp.paginate(Page)
    def get(self):
        """List users"""
        return auth.list_users(db())

    @blp.arguments(UserCreateSchema)
    @blp.response(201, UserCreatedSchema)
    @blp.alt_response(409, schema=ErrorSchema, description="Email already registered (`email_taken`)")
    @blp.alt_response(422, schema=ErrorSchema, description="`invalid_email` or a validation error")
    def post(self, data):
        """Create a user with a wallet and a first API key"""
        user, issued = auth.create_user(db(), data["email"], data["role"], actor_id=current_user().id)
        return {"user": user, "api_key": issued.secret, "key": issued.api_key}


@blp.route("/users/<string:user_id>/api-keys")
class UserApiKeys(MethodView):
    @blp.response(200, ApiKeySchema(many=True))
    def get(self, user_id):
        """List a user's API keys (hashes are never shown)"""
        return auth.list_keys(db(), user_id)

    @blp.arguments(ApiKeyCreateSchema)
    @blp.response(201, IssuedKeySchema)
    def post(self, data, user_id):
        """Issue another API key for a user"""
        issued = auth.issue_api_key(db(), current_user().id, user_id, data["name"])
        return {"api_key": issued.secret, "key": issued.api_key}


@blp.route("/api-keys/<string:key_id>")
class ApiKeyItem(MethodView):
    @blp.response(200, ApiKeySchema)
    def delete(self, key_id):
        """Revoke an API key (idempotent)"""
        return auth.revoke_api_key(runtime(), db(), current_user().id, key_id)
