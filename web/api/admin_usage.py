from flask import Response, stream_with_context
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import RAISE

from shared.services import usage
from web.context import db
from web.schemas.usage import (
    ATTRIBUTION_NOTE,
    UsageExportQuerySchema,
    UsageQuerySchema,
    UsageSummarySchema,
)

blp = Blueprint(
    "admin_usage", __name__, url_prefix="/api/v1/admin/usage", description="Usage summaries and export"
)

VALIDATION_CODES = (
    "`invalid_date`, `invalid_range`, `range_too_large`, `invalid_user_id`, `invalid_timezone`, "
    "`invalid_model`"
)

CSV_DOC = {
    "description": "RFC 4180 CSV (comma, double-quote quoting, CRLF), streamed, with a header row. "
    "Columns: `bucket_start` (local ISO date), then `user_id` with `group_by=user` or `model` with "
    "`group_by=model`, then `turns`, `input_tokens`, `output_tokens`, `cost` (6-place decimal). "
    "Rows ascend by bucket, then by the group key; an unknown `bucket` gives the header alone.",
    "content": {
        "text/csv": {
            "schema": {"type": "string"},
            "example": "bucket_start,model,turns,input_tokens,output_tokens,cost\r\n"
            '2026-01-05,"gpt, ""mini""",12,3400,1200,0.004200\r\n',
        }
    },
}


@blp.route("/summary")
class UsageSummary(MethodView):
    @blp.arguments(UsageQuerySchema, location="query", unknown=RAISE)
    @blp.response(200, UsageSummarySchema, description=ATTRIBUTION_NOTE)
    @blp.alt_response(422, description=f"Bad query: {VALIDATION_CODES}")
    def get(self, args):
        """Usage totals and day/week/month buckets, from the usage rollups"""
        return usage.usage_summary(db(), **args)


@blp.route("/export.csv")
class UsageExport(MethodView):
    @blp.arguments(UsageExportQuerySchema, location="query", unknown=RAISE)
    @blp.doc(responses={"200": CSV_DOC})
    @blp.alt_response(422, description=f"Bad query: {VALIDATION_CODES}, `invalid_group_by`")
    def get(self, args):
        """The summary's buckets as streamed CSV, optionally per user or model"""
        # Streamed through a server-side cursor, which lives in a transaction.
        lines = usage.export_csv(db(transaction=True), **args)
        return Response(
            stream_with_context(lines),
            mimetype="text/csv",
            headers={"Content-Disposition": 'attachment; filename="usage.csv"'},
        )
