"""Domain exceptions. ``web/errors.py`` maps them to the JSON error shape;
the worker maps them to a turn's ``error.code``."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    status_code = 400
    error = "bad_request"
    message = "The request could not be processed."
    # Response headers the error carries (e.g. Retry-After); web/errors.py sends them.
    headers: dict[str, str] = {}

    def __init__(self, message: str | None = None, *, error: str | None = None, **details: Any) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message
        if error:
            self.error = error
        self.details = details


class Unauthorized(DomainError):
    status_code = 401
    error = "unauthorized"
    message = "A valid API key is required (Authorization: Bearer <key>)."


class Forbidden(DomainError):
    status_code = 403
    error = "forbidden"
    message = "This action needs the admin role."


class NotFound(DomainError):
    status_code = 404
    error = "not_found"
    message = "No such resource."


class Conflict(DomainError):
    status_code = 409
    error = "conflict"


class IdempotencyConflict(Conflict):
    error = "idempotency_conflict"
    message = "This Idempotency-Key was already used with a different request body."


class FileTooLarge(DomainError):
    status_code = 413
    error = "file_too_large"
    message = "The file is larger than the upload limit."


class UnsupportedMediaType(DomainError):
    status_code = 415
    error = "unsupported_media_type"
    message = "Only .txt, .md, .csv, .json (UTF-8 text) and .pdf files can be uploaded."


class InsufficientBalance(DomainError):
    status_code = 402
    error = "insufficient_balance"
    message = "The wallet's available balance does not cover this turn."


class SpendLimitReached(DomainError):
    """A user's or API key's spend limit does not cover this turn's worst case (design §8)."""

    status_code = 402
    error = "spend_limit_reached"
    message = "The spend limit for this period does not cover this turn."


class TooManyRequests(DomainError):
    """``rate_limited`` or ``too_many_concurrent_turns``, with ``Retry-After`` seconds."""

    status_code = 429
    error = "rate_limited"
    message = "Too many requests; retry later."

    def __init__(self, message: str | None = None, *, retry_after: int, error: str | None = None, **details):
        super().__init__(message, error=error, retry_after=retry_after, **details)
        self.headers = {"Retry-After": str(retry_after)}


class InvalidInput(DomainError):
    """A semantic validation failure found by a service (422)."""

    status_code = 422
    error = "validation_error"


class ServiceUnavailable(DomainError):
    status_code = 503
    error = "service_unavailable"
    message = "A dependency is unavailable; try again shortly."
