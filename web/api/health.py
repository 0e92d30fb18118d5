from flask import current_app
from flask.views import MethodView
from marshmallow import RAISE

from shared.services import health
from web import auth
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
    @blp.alt_response(
        401, schema=ErrorSchema, description="`worker=true` without a valid admin key (`unauthorized`)"
    )
    @blp.alt_response(403, schema=ErrorSchema, description="`worker=true` with a non-admin key (`forbidden`)")
    @blp.alt_response(
        503,
        schema=ErrorSchema,
        description="Not ready (`not_ready`); for an admin key, `checks` and `down` say what is down",
    )
    # The key is optional: anyone may ask, an admin key gets the details.
    @blp.doc(security=[{}, {"bearerAuth": []}])
    def get(self, query):
        """Readiness: database, migrations at the code's head, Redis, broker

        Anyone gets the status alone: 200 `{"status": "ok"}` or 503 `not_ready`.
        With an admin's Bearer key the answer also carries `version`, `checks` and
        `down`, and `worker=true` (admin only) also round-trips a ping task through a worker.
        """
        with_details = auth.admin_caller(required=query["worker"])
        result = health.readiness(
            runtime(),
            current_app.extensions["celery"],
            check_worker=query["worker"],
            with_details=with_details,
        )
        if not with_details:
            return {"status": "ok"}
        return {"status": "ok", "version": result.version, "checks": result.checks, "down": []}
