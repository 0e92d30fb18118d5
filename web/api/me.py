from flask.views import MethodView

from shared.services import wallets
from web.api import Blueprint
from web.context import current_user, db, runtime
from web.schemas.users import MeSchema

blp = Blueprint("auth", __name__, url_prefix="/api/v1/auth", description="The caller")


@blp.route("/me")
class Me(MethodView):
    @blp.response(200, MeSchema)
    def get(self):
        """The authenticated user and their wallet"""
        user = current_user()
        summary = wallets.wallet_summary(db(), user.id, runtime().settings.low_balance_threshold)
        return {
            "id": user.id,
            "email": user.email,
            "role": user.role,
            "created_at": user.created_at,
            "wallet": summary,
        }
