from flask.views import MethodView
from flask_smorest import Page

from shared.services import webhooks
from web.api import Blueprint
from web.context import current_user, db, runtime
from web.schemas.common import ErrorSchema
from web.schemas.webhooks import (
    WebhookCreatedSchema,
    WebhookCreateSchema,
    WebhookDeliverySchema,
    WebhookSchema,
)

blp = Blueprint("admin_webhooks", __name__, url_prefix="/api/v1/admin", description="Signed webhooks")


@blp.route("/webhooks")
class Webhooks(MethodView):
    @blp.response(200, WebhookSchema(many=True))
    @blp.paginate(Page)
    def get(self):
        """List webhooks (secrets are never shown again)"""
        return webhooks.list_endpoints(db())

    @blp.arguments(WebhookCreateSchema)
    @blp.response(201, WebhookCreatedSchema)
    def post(self, data):
        """Register a webhook; its signing secret is shown this once"""
        endpoint, secret = webhooks.create_endpoint(
            db(),
            actor_id=current_user().id,
            url=data["url"],
            events=data["events"],
            description=data["description"],
            allow_private=runtime().settings.webhook_allow_private,
        )
        return {**{c: getattr(endpoint, c) for c in WebhookSchema().fields}, "secret": secret}


@blp.route("/webhooks/<string:webhook_id>")
class WebhookItem(MethodView):
    @blp.response(200, WebhookSchema)
    @blp.alt_response(404, schema=ErrorSchema)
    def delete(self, webhook_id):
        """Delete a webhook; its pending deliveries end failed"""
        return webhooks.delete_endpoint(db(), actor_id=current_user().id, endpoint_id=webhook_id)


@blp.route("/webhooks/<string:webhook_id>/deliveries")
class WebhookDeliveries(MethodView):
    @blp.response(200, WebhookDeliverySchema(many=True))
    @blp.alt_response(404, schema=ErrorSchema)
    @blp.paginate(Page)
    def get(self, webhook_id):
        """A webhook's deliveries, newest first"""
        return webhooks.list_deliveries(db(), webhook_id)


@blp.route("/webhooks/<string:webhook_id>/deliveries/<string:delivery_id>/redeliver")
class WebhookRedeliver(MethodView):
    @blp.response(200, WebhookDeliverySchema)
    @blp.alt_response(404, schema=ErrorSchema)
    def post(self, webhook_id, delivery_id):
        """Send a delivery again now (same event id)"""
        return webhooks.redeliver(
            db(), actor_id=current_user().id, endpoint_id=webhook_id, delivery_id=delivery_id
        )
