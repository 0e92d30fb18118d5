"""The OpenAI-compatible endpoint: ``POST /v1/chat/completions``, ``GET /v1/models``
(design §7, docs/openai_compatible.md). Outside ``/api/v1`` and its OpenAPI spec, so an
OpenAI SDK works with ``base_url="http://host/v1"`` and a Tollgate API key; errors in
OpenAI's shape ``{"error": {"message", "type", "code", "param"}}``.

Each call is a turn: the same submit (validation, pricing, enforcement gate and hold), the
same worker, settlement and ledger; a streamed call relays the turn's stream as
``chat.completion.chunk`` events ending ``data: [DONE]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

from flask import Blueprint, current_app, jsonify, request
from sqlalchemy import select
from werkzeug.exceptions import HTTPException

from shared import metrics
from shared.db import is_database_unavailable
from shared.errors import DomainError, InvalidInput, NotFound
from shared.models import Turn, TurnStatus
from shared.services import openai_compat, turns
from web import streaming
from web.api import InvalidJsonBody, load_json_body
from web.auth import bearer_token
from web.context import db, idempotency_key, runtime

log = logging.getLogger(__name__)

bp = Blueprint("openai", __name__, url_prefix="/v1")

# A non-streamed call waits for its turn as long as the worker may take (the task's hard
# time limit), like the upstream it stands in for; the turn goes on if the client leaves.
WAIT_MARGIN_SECONDS = 60

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error(status: int, message: str, code: str | None, param: str | None = None, headers=None):
    body = {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


@bp.errorhandler(DomainError)
def _domain_error(exc: DomainError):
    status, code = exc.status_code, exc.error
    if status == 401:
        code = "invalid_api_key"
    elif isinstance(exc, InvalidInput):
        if code == "model_not_priced":
            status, code = 404, "model_not_found"
        else:
            status = 400
    elif isinstance(exc, NotFound):
        code = "not_found"
    headers = {}
    if exc.details.get("retry_after") is not None:
        headers["Retry-After"] = str(exc.details["retry_after"])
    return openai_error(status, exc.message, code, exc.details.get("field"), headers)


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    status = exc.code or 500
    return openai_error(status, exc.description or "Request failed.", None)


@bp.errorhandler(Exception)
def _unexpected(exc: Exception):
    if is_database_unavailable(exc):
        return openai_error(503, "A dependency is unavailable; try again shortly.", "service_unavailable")
    log.exception("unhandled error in /v1")
    return openai_error(500, "Internal server error.", "internal_error")


@bp.get("/models")
def models():
    """Priced models, as OpenAI's model list."""
    openai_compat.caller(db(), bearer_token(), cache=runtime().key_cache)
    return jsonify(openai_compat.list_models(db()))


@bp.post("/chat/completions")
def chat_completions():
    rt, session = runtime(), db()
    user, key = openai_compat.caller(session, bearer_token(), cache=rt.key_cache)
    try:
        body = load_json_body(request.get_data(cache=True))
    except (InvalidJsonBody, ValueError) as exc:
        raise InvalidInput(f"The body is not valid JSON: {exc}", error="invalid_json") from None
    completion_request = openai_compat.parse_request(body, max_turn_chars=rt.settings.max_turn_chars)
    chat = openai_compat.chat_session(session, user, key, request.headers.get("X-Tollgate-Session"))
    turn, created = turns.submit(
        rt, session, user, chat.id, completion_request.turn_data(), idempotency_key(), api_key_id=key.id
    )
    start = turns.run_starter(
        current_app.extensions["celery"], turn, created=created, streamed=completion_request.stream
    )
    headers = {"X-Tollgate-Turn-Id": turn.id, "X-Tollgate-Session": chat.id}
    answer = openai_compat.Answer.of(turn)
    session.commit()
    if completion_request.stream:
        if start is not None:
            start()
        metrics.stream_opened("openai")
        response = streaming.event_stream(_chunks(rt, answer, completion_request.include_usage))
        response.headers.update(headers)
        return response
    wait = rt.settings.task_soft_time_limit_seconds + WAIT_MARGIN_SECONDS
    turn = turns.wait_until_finished(rt, session, turn, wait, start=start, entity=True)
    if turn.status not in turns.FINISHED:
        return openai_error(
            504, "The model did not answer in time; the turn goes on.", "timeout", None, headers
        )
    if turn.status == TurnStatus.FAILED:
        return openai_error(
            openai_compat.failure_status(turn.error_code),
            turn.error_message or "The turn failed.",
            turn.error_code,
            None,
            headers,
        )
    response = jsonify(openai_compat.completion(turn))
    response.headers.update(headers)
    return response


def _data(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


def _reply_tool_calls(rt, turn_id: str) -> list[dict] | None:
    with rt.db.session() as session:
        calls = session.scalar(select(Turn.reply_tool_calls).where(Turn.id == turn_id))
        session.commit()
    return calls


def _chunks(rt, answer: openai_compat.Answer, include_usage: bool) -> Iterator[str]:
    """The turn's stream as ``chat.completion.chunk`` events, then ``data: [DONE]``. A turn
    that failed ends with an ``error`` event (the SDKs raise it) before ``[DONE]``."""
    yield _data(answer.chunk({"role": "assistant", "content": ""}))
    for item in streaming.relay(rt, answer.turn_id):
        if item is None:
            yield streaming.PING
            continue
        _, event, data = item
        if event == "delta":
            yield _data(answer.chunk({"content": data["text"]}))
        elif event == "done":
            usage = data["usage"]
            if data["status"] == TurnStatus.FAILED:
                error = data.get("error") or {}
                yield _data(
                    {
                        "error": {
                            "message": error.get("message") or "The turn failed.",
                            "type": "server_error",
                            "param": None,
                            "code": error.get("code"),
                        }
                    }
                )
            else:
                finish = answer.finish_reason(usage["output_tokens"])
                calls = _reply_tool_calls(rt, answer.turn_id)
                if calls:
                    # Not streamed piece by piece: the calls come whole once the turn has them.
                    delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
                    yield _data(answer.chunk(delta))
                    finish = "tool_calls"
                yield _data(answer.chunk({}, finish))
                if include_usage:
                    yield _data(answer.usage_chunk(usage["input_tokens"], usage["output_tokens"]))
    yield _data("[DONE]")
