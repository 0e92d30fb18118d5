"""One blueprint module per resource group, all built on :class:`Blueprint` below.

Every request body is read by :class:`RequestParser`, so what counts as a valid
JSON body is decided here, once, for every endpoint.
"""

from __future__ import annotations

import json
import re
import typing

import flask_smorest
from marshmallow import RAISE, missing
from webargs.flaskparser import FlaskParser, abort, is_json_request

# Our bodies nest three or four levels; 64 leaves room for tool schemas and the like
# while keeping every later walk over the body (schemas, NUL checks) far from the
# interpreter's recursion limit.
MAX_JSON_DEPTH = 64
INVALID_JSON_MESSAGE = "The request body is not valid JSON"

_OPENERS = (b"[", b"{")
# A \uD800-\uDFFF escape: only these can put a lone surrogate into a decoded string
# (raw UTF-8 bytes that encode one are refused by the decoder already).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidJsonBody(json.JSONDecodeError):
    """A body that is JSON to Python's parser but not one we can take (webargs answers
    any ``JSONDecodeError`` with its invalid-JSON handler)."""

    def __init__(self, reason: str, document: str) -> None:
        super().__init__(reason, document, 0)
        self.reason = reason


def load_json_body(raw: bytes) -> typing.Any:
    """Decode a request body, refusing what would otherwise fail later, deep inside the
    app, as a 500: nesting deeper than ``MAX_JSON_DEPTH`` (Python's parser recurses:
    200,000 ``[`` is a ``RecursionError``), integers past Python's 4,300-digit
    conversion limit (a ``ValueError``), and unpaired surrogate escapes such as
    ``"\\ud800"`` (valid JSON grammar, but no UTF-8 can store them).

    :raises json.JSONDecodeError: ``InvalidJsonBody`` with the reason, or the parser's own.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJsonBody(f"it is not UTF-8 (byte {exc.start})", raw.decode("utf-8", "replace")) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise InvalidJsonBody(f"it is nested deeper than {MAX_JSON_DEPTH} levels", text) from None
    except ValueError:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise InvalidJsonBody("it holds a number with too many digits", text) from None
    # Cheap byte scans first: most bodies need no walk at all.
    may_be_deep = sum(raw.count(opener) for opener in _OPENERS) > MAX_JSON_DEPTH
    may_hold_surrogates = _SURROGATE_ESCAPE.search(raw) is not None
    if may_be_deep or may_hold_surrogates:
        reason = _refusal(value)
        if reason:
            raise InvalidJsonBody(reason, text)
    return value


def _refusal(value: typing.Any) -> str | None:
    """Why a decoded body is refused, walking it without recursion, or ``None``."""
    stack: list[tuple[typing.Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return "it holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)"
        elif isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                return f"it is nested deeper than {MAX_JSON_DEPTH} levels"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


class RequestParser(FlaskParser):
    """webargs' Flask parser with :func:`load_json_body`, and an invalid body answered
    400 ``invalid_json`` with the reason in ``message``."""

    def _raw_load_json(self, req) -> typing.Any:
        if not is_json_request(req):
            return missing
        return load_json_body(req.get_data(cache=True))

    def _handle_invalid_json_error(self, error, req, *args, **kwargs) -> typing.NoReturn:
        reason = error.reason if isinstance(error, InvalidJsonBody) else str(error)
        abort(
            400,
            exc=error,
            messages={"json": ["Invalid JSON body."]},
            message=f"{INVALID_JSON_MESSAGE}: {reason}.",
            error="invalid_json",
        )


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's Blueprint with our :class:`RequestParser`, and a paginated list that
    refuses unknown query parameters (422) like every other documented query string,
    instead of silently ignoring a typo."""

    ARGUMENTS_PARSER = RequestParser()
    PAGINATION_ARGUMENTS_PARSER = RequestParser(unknown=RAISE)
