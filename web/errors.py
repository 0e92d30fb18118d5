"""One JSON error shape for every error: domain exceptions, HTTP errors, crashes.

``{"code": 402, "status": "Payment Required", "message": "...", "error": "insufficient_balance", ...details}``
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from shared.db import is_database_unavailable
from shared.errors import DomainError

log = logging.getLogger(__name__)

HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    412: "precondition_failed",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "validation_error",
    428: "precondition_required",
    429: "too_many_requests",
    431: "request_header_fields_too_large",
    500: "internal_error",
    503: "service_unavailable",
}


def error_body(status: int, message: str, error: str | None = None, **details) -> dict:
    body = {
        "code": status,
        "status": HTTPStatus(status).phrase,
        "message": message,
        "error": error or HTTP_ERROR_CODES.get(status, "error"),
    }
    body.update(details)
    return body


def _respond(status: int, body: dict, headers=None):
    response = jsonify(body)
    response.status_code = status
    if headers:
        for name, value in headers:
            if name.lower() != "content-type":
                response.headers[name] = value
    return response


def handle_domain_error(exc: DomainError):
    return _respond(
        exc.status_code,
        error_body(exc.status_code, exc.message, exc.error, **exc.details),
        list(exc.headers.items()),
    )


def handle_http_exception(exc: HTTPException):
    status = exc.code or 500
    details = {}
    data = getattr(exc, "data", None) or {}
    # The request parser (web/api/__init__.py) names its own code, e.g. invalid_json.
    error = data.get("error")
    messages = data.get("messages")
    if messages:
        # webargs/marshmallow: {"json": {"field": ["msg"]}} -> errors per location.
        details["errors"] = messages
    message = data.get("message") or exc.description or HTTPStatus(status).phrase
    if status == 422 and not data.get("message"):
        message = "The request failed validation; see errors."
    headers = exc.get_headers() if status == 405 else None
    return _respond(status, error_body(status, message, error, **details), headers)


def handle_unexpected(exc: Exception):
    # A dependency that vanished mid-request is a 503 the client can retry, not a 500.
    if is_database_unavailable(exc) or _is_redis_error(exc):
        log.warning("dependency unavailable: %s", exc)
        return _respond(503, error_body(503, "A dependency is unavailable; try again shortly."))
    log.exception("unhandled error")
    return _respond(500, error_body(500, "Internal server error."))


def _is_redis_error(exc: Exception) -> bool:
    try:
        import redis
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)


def register_error_handlers(app: Flask) -> None:
    # Registered after flask-smorest's Api so these replace its HTTPException handler.
    app.register_error_handler(DomainError, handle_domain_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
