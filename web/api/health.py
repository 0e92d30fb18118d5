from flask import current_app
from flask.views import MethodView
from marshmallow import RAISE

from shared.services import health
from web.api import Blueprint
from web.context import runtime
from web.schemas.common import ErrorSchema
from web.schemas.health import LivenessSchema, ReadinessQuerySchema, ReadinessSchema

blp = Blueprint("health", __name__, url_prefix="/api/v1/health", description="Liveness and readiness")


@blp.route("")
class Liveness(MethodView):
    @blp.response(200, LivenessSchema)
    def get(self):
        """Liveness: the process answers (no dependency calls)"""
        return {"status": "ok"}


@blp.route("/ready")
class Ready(MethodView):
    @blp.arguments(ReadinessQuerySchema, location="query", unknown=RAISE)
    @blp.response(200, ReadinessSchema)
    @blp.alt_response(503, schema=ErrorSchema, description="Not ready (`not_ready`); `down` names what is")
    def get(self, query):
        """Readiness: database, migrations at the code's head, Redis, broker"""
        result = health.readiness(runtime(), current_app.extensions["celery"], check_worker=query["worker"])
        return {"status": "ok", "version": result.version, "checks": result.checks, "down": []}
