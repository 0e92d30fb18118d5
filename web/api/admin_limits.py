from flask.views import MethodView

from shared.models import LimitSubject
from shared.services import limits
from web.api import Blueprint
from web.context import current_user, db, runtime
from web.schemas.common import ErrorSchema
from web.schemas.limits import LimitsSchema, LimitsUpdateSchema

blp = Blueprint(
    "admin_limits", __name__, url_prefix="/api/v1/admin", description="Spend, rate and concurrency limits"
)


@blp.route("/users/<string:user_id>/limits")
class UserLimits(MethodView):
    @blp.response(200, LimitsSchema)
    @blp.alt_response(404, schema=ErrorSchema)
    def get(self, user_id):
        """A user's limits, with the current period's spent, held and resets_at"""
        return limits.get_limits(db(), LimitSubject.USER, user_id, now=runtime().clock())

    @blp.arguments(LimitsUpdateSchema)
    @blp.response(200, LimitsSchema)
    @blp.alt_response(404, schema=ErrorSchema)
    def put(self, new_limits, user_id):
        """Replace a user's limits (null: no limit of that kind)"""
        return limits.set_limits(
            db(),
            actor_id=current_user().id,
            subject_type=LimitSubject.USER,
            subject_id=user_id,
            limits=new_limits,
            now=runtime().clock(),
        )


@blp.route("/api-keys/<string:key_id>/limits")
class ApiKeyLimits(MethodView):
    @blp.response(200, LimitsSchema)
    @blp.alt_response(404, schema=ErrorSchema)
    def get(self, key_id):
        """An API key's limits, with the current period's spent, held and resets_at"""
        return limits.get_limits(db(), LimitSubject.API_KEY, key_id, now=runtime().clock())

    @blp.arguments(LimitsUpdateSchema)
    @blp.response(200, LimitsSchema)
    @blp.alt_response(404, schema=ErrorSchema)
    def put(self, new_limits, key_id):
        """Replace an API key's limits (null: no limit of that kind)"""
        return limits.set_limits(
            db(),
            actor_id=current_user().id,
            subject_type=LimitSubject.API_KEY,
            subject_id=key_id,
            limits=new_limits,
            now=runtime().clock(),
        )
