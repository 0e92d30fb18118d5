from flask.views import MethodView
from flask_smorest import Page

from shared.services import billing, limits
from web.api import Blueprint
from web.context import current_api_key_id, current_user, db, runtime
from web.schemas.billing import LedgerEntrySchema
from web.schemas.limits import WalletReadSchema

blp = Blueprint("wallet", __name__, url_prefix="/api/v1/wallet", description="The caller's credit wallet")


@blp.route("")
class Wallet(MethodView):
    @blp.response(200, WalletReadSchema)
    def get(self):
        """The caller's balance, held and available credit, low-balance flag, and limits"""
        return limits.wallet_view(
            db(),
            current_user().id,
            current_api_key_id(),
            runtime().settings.low_balance_threshold,
            now=runtime().clock(),
        )


@blp.route("/ledger")
class WalletLedger(MethodView):
    @blp.response(200, LedgerEntrySchema(many=True))
    @blp.paginate(Page)
    def get(self):
        """The caller's ledger entries, newest first"""
        return billing.list_ledger(db(), current_user().id)
