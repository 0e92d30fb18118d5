from flask import after_this_request
from flask.views import MethodView
from flask_smorest import Page

from shared.pagination import Listing
from shared.services import audit, billing, enforcement, pricing
from web.api import Blueprint
from web.context import current_user, db, idempotency_key, runtime
from web.schemas.admin import (
    AdminEnforcementSchema,
    AdminSettingsSchema,
    AuditEventSchema,
    EnforcementUpdateSchema,
)
from web.schemas.billing import (
    MODEL_PATH_PARAMETER,
    AdjustmentCreateSchema,
    GrantCreateSchema,
    LedgerEntrySchema,
    ModelPriceSchema,
    PriceUpdateSchema,
    checked_model_name,
)
from web.schemas.common import ErrorSchema

blp = Blueprint(
    "admin_billing",
    __name__,
    url_prefix="/api/v1/admin",
    description="Grants, ledgers, pricing, enforcement and the audit log",
)

STALE_HEADER = "X-Enforcement-Stale"


def _flag_stale(result):
    """Redis was unreachable: the body is the last state this process saw; say so in a header."""
    state = result["enforcement"] if isinstance(result, dict) else result
    if state.stale:

        @after_this_request
        def _header(response):
            response.headers[STALE_HEADER] = "true"
            return response

    return result


@blp.route("/users/<string:user_id>/grants")
class Grants(MethodView):
    @blp.arguments(GrantCreateSchema)
    @blp.response(201, LedgerEntrySchema)
    @blp.alt_response(
        409, schema=ErrorSchema, description="`idempotency_conflict`: key used for another grant"
    )
    def post(self, data, user_id):
        """Grant credit to a user (replay-safe with an Idempotency-Key header)"""
        return billing.grant_credit(
            db(),
            actor_id=current_user().id,
            user_id=user_id,
            amount=data["amount"],
            reason=data["reason"],
            idempotency_key=idempotency_key(),
        )


@blp.route("/users/<string:user_id>/adjustments")
class Adjustments(MethodView):
    @blp.arguments(AdjustmentCreateSchema)
    @blp.response(201, LedgerEntrySchema)
    @blp.alt_response(
        409, schema=ErrorSchema, description="`adjustment_exceeds_available`, `idempotency_conflict`"
    )
    def post(self, data, user_id):
        """Adjust a user's balance by a signed amount, with a reason (replay-safe)"""
        return billing.adjust_credit(
            db(),
            actor_id=current_user().id,
            user_id=user_id,
            amount=data["amount"],
            reason=data["reason"],
            idempotency_key=idempotency_key(),
        )


@blp.route("/users/<string:user_id>/ledger")
class UserLedger(MethodView):
    @blp.response(200, LedgerEntrySchema(many=True))
    @blp.paginate(Page)
    def get(self, user_id):
        """A user's ledger entries, newest first"""
        return billing.list_ledger(db(), user_id)


@blp.route("/pricing")
class Prices(MethodView):
    @blp.response(200, ModelPriceSchema(many=True))
    def get(self):
        """The price version in force now for every priced model"""
        return pricing.list_current_prices(db())


@blp.route("/pricing/<path:model>", parameters=[MODEL_PATH_PARAMETER])
class Price(MethodView):
    @blp.arguments(PriceUpdateSchema)
    @blp.response(200, ModelPriceSchema)
    def put(self, data, model):
        """Add a new price version for a model, effective now (history is kept)"""
        model = checked_model_name(model)
        return pricing.set_price(db(), current_user().id, model, data["input_per_1k"], data["output_per_1k"])


@blp.route("/settings")
class AdminSettings(MethodView):
    @blp.response(200, AdminSettingsSchema)
    def get(self):
        """Enforcement state and billing settings (header X-Enforcement-Stale when Redis is unreachable)"""
        return _flag_stale(enforcement.settings_overview(runtime()))


@blp.route("/settings/enforcement")
class Enforcement(MethodView):
    @blp.arguments(EnforcementUpdateSchema)
    @blp.response(200, AdminEnforcementSchema)
    @blp.alt_response(503, schema=ErrorSchema, description="`enforcement_store_unavailable`: nothing changed")
    def patch(self, data):
        """Override billing enforcement for every process, effective on their next check"""
        return _flag_stale(
            enforcement.set_override(db(), runtime(), actor_id=current_user().id, enabled=data["enabled"])
        )

    @blp.response(200, AdminEnforcementSchema)
    @blp.alt_response(503, schema=ErrorSchema, description="`enforcement_store_unavailable`: nothing changed")
    def delete(self):
        """Clear the override: back to BILLING_ENFORCEMENT_ENABLED"""
        return _flag_stale(enforcement.clear_override(db(), runtime(), actor_id=current_user().id))


@blp.route("/audit")
class Audit(MethodView):
    @blp.response(200, AuditEventSchema(many=True))
    @blp.paginate(Page)
    def get(self):
        """Admin actions, newest first"""
        return Listing(db(), audit.list_events(db()))
