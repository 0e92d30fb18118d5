from flask.views import MethodView
from flask_smorest import Page

from shared.services import billing, wallets
from web.api import Blueprint
from web.context import current_user, db, runtime
from web.schemas.billing import LedgerEntrySchema
from web.schemas.users import WalletSummarySchema

blp = Blueprint("wallet", __name__, url_prefix="/api/v1/wallet", description="The caller's credit wallet")


@blp.route("")
class Wallet(MethodView):
    @blp.response(200, WalletSummarySchema)
    def get(self):
        """The caller's balance, held credit, available credit and low-balance flag"""
        return wallets.wallet_summary(db(), current_user().id, runtime().settings.low_balance_threshold)


@blp.route("/ledger")
class WalletLedger(MethodView):
    @blp.response(200, LedgerEntrySchema(many=True))
    @blp.paginate(Page)
    def get(self):
        """The caller's ledger entries, newest first"""
        return billing.list_ledger(db(), current_user().id)
