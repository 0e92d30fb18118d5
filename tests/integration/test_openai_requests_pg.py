"""How ``POST /v1/chat/completions`` handles a request beyond the happy path, driven by the
real ``openai`` SDK over HTTP (Postgres + Redis + a live worker): an ``Idempotency-Key``
replays the same completion and bills once; what the endpoint does not do is refused
with 400 ``unsupported_parameter`` and what it cannot read with 400 ``invalid_json`` /
``context_length_exceeded``, all before any turn exists; an answer cut at ``max_tokens``
finishes with ``length``; a turn that does not end in time is a 504 ``timeout`` while the
turn goes on; a key's concurrency limit is a 429 ``too_many_concurrent_turns`` with
``Retry-After`` (docs/openai_compatible.md)."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import httpx
import openai
import pytest
from sqlalchemy import func, select

from shared.models import LedgerEntry, Turn
from tests.integration.test_openai_compat_pg import sdk, tollgate_url, turn_of  # noqa: F401 - fixture
from web import openai_api
from web.app import create_app

pytestmark = pytest.mark.usefixtures("live_worker")

HI = [{"role": "user", "content": "hi"}]
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}


def turn_count(pg_db) -> int:
    pg_db.expire_all()
    count = pg_db.scalar(select(func.count()).select_from(Turn))
    pg_db.commit()
    return count


def charges(pg_db, turn_id) -> list[LedgerEntry]:
    pg_db.expire_all()
    found = list(
        pg_db.scalars(
            select(LedgerEntry).where(
                LedgerEntry.turn_id == turn_id, LedgerEntry.kind.in_(("capture", "debit"))
            )
        )
    )
    pg_db.commit()
    return found


def test_an_idempotency_key_replays_the_same_completion_billed_once(
    tollgate_url,  # noqa: F811
    pg_user,
    pg_db,
):
    client = sdk(tollgate_url, pg_user.key)
    key = {"Idempotency-Key": "v1-once"}
    messages = [{"role": "user", "content": "What is a hold?"}]
    first = client.chat.completions.create(model="offline-small", messages=messages, extra_headers=key)
    replay = client.chat.completions.create(model="offline-small", messages=messages, extra_headers=key)
    assert replay.id == first.id
    assert replay.choices[0].message.content == first.choices[0].message.content
    assert turn_count(pg_db) == 1
    assert len(charges(pg_db, turn_of(pg_db, first.id).id)) == 1

    # A streamed replay attaches to the same turn and relays the same answer.
    streamed = list(
        client.chat.completions.create(
            model="offline-small", messages=messages, extra_headers=key, stream=True
        )
    )
    assert {c.id for c in streamed} == {first.id}
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
        first.choices[0].message.content
    )

    with pytest.raises(openai.ConflictError) as conflict:
        client.chat.completions.create(model="offline-small", messages=HI, extra_headers=key)
    assert conflict.value.body["code"] == "idempotency_conflict"
    assert turn_count(pg_db) == 1


UNSUPPORTED = [
    ({"n": 2}, "n"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"functions": [SEARCH["function"]]}, "functions"),
    ({"tools": [SEARCH], "tool_choice": {"type": "function", "function": {"name": "search"}}}, "tool_choice"),
    ({"tools": [SEARCH], "tool_choice": "required"}, "tool_choice"),
]


def test_what_the_endpoint_does_not_do_is_400_unsupported_parameter(
    tollgate_url,  # noqa: F811
    pg_user,
    pg_db,
):
    client = sdk(tollgate_url, pg_user.key)
    for options, param in UNSUPPORTED:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="offline-small", messages=HI, **options)
        assert refused.value.status_code == 400, options
        body = refused.value.body
        assert (body["code"], body["param"], body["type"]) == (
            "unsupported_parameter",
            param,
            "invalid_request_error",
        ), options
    assert turn_count(pg_db) == 0


def test_those_parameters_at_their_defaults_ask_for_nothing_and_are_accepted(
    tollgate_url,  # noqa: F811
    pg_user,
):
    completion = sdk(tollgate_url, pg_user.key).chat.completions.create(
        model="offline-small", messages=HI, n=1, logprobs=False
    )
    assert completion.choices[0].finish_reason == "stop"


def test_a_body_that_is_not_json_is_400_invalid_json_in_openais_shape(
    tollgate_url,  # noqa: F811
    pg_user,
    pg_db,
):
    for body in (b'{"model": "offline-small", "messages": [', b"\xff\xfe", b"[1, 2"):
        response = httpx.post(
            f"{tollgate_url}/v1/chat/completions",
            content=body,
            headers={**pg_user.headers, "Content-Type": "application/json"},
            timeout=10,
        )
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert (error["code"], error["type"]) == ("invalid_json", "invalid_request_error"), body
        assert error["message"]
    assert turn_count(pg_db) == 0


def test_messages_longer_than_the_context_allows_are_400_context_length_exceeded(
    tollgate_url,  # noqa: F811
    pg_app,
    pg_user,
    pg_db,
):
    limit = pg_app.extensions["tollgate"].settings.max_turn_chars
    # Each message fits a turn; together they are over the whole-context bound.
    history = [{"role": "system", "content": "x" * limit} for _ in range(9)]
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(tollgate_url, pg_user.key).chat.completions.create(
            model="offline-small", messages=[*history, {"role": "user", "content": "and now?"}]
        )
    assert refused.value.body["code"] == "context_length_exceeded"
    assert refused.value.body["param"] == "messages"
    assert turn_count(pg_db) == 0


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_cut_at_max_tokens_finishes_with_length(
    tollgate_url,  # noqa: F811
    pg_user,
    pg_db,
    stream,
):
    client = sdk(tollgate_url, pg_user.key)
    question = [{"role": "user", "content": "Explain in detail how holds, captures and releases work"}]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="offline-small",
                messages=question,
                max_tokens=3,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage, completion_id = chunks[-1].usage, chunks[0].id
    else:
        completion = client.chat.completions.create(model="offline-small", messages=question, max_tokens=3)
        finish, usage, completion_id = [completion.choices[0].finish_reason], completion.usage, completion.id
    assert finish == ["length"]
    assert usage.completion_tokens == 3 == turn_of(pg_db, completion_id).output_tokens
    # The same question with room to answer ends with stop.
    roomy = client.chat.completions.create(model="offline-small", messages=question, max_tokens=500)
    assert roomy.choices[0].finish_reason == "stop" and roomy.usage.completion_tokens < 500


@contextmanager
def serve(app):
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)


def test_a_turn_that_does_not_end_in_time_is_504_timeout_and_goes_on(
    pg_app, pg_settings, pg_user, pg_db, monkeypatch
):
    # The wait is the task's time limit + WAIT_MARGIN_SECONDS: made 1 s here. The turn's task
    # goes to a broker no worker reads (the app's own Redis database), so it stays queued.
    monkeypatch.setattr(openai_api, "WAIT_MARGIN_SECONDS", 0)
    quiet = create_app(
        pg_settings.replace(
            celery_broker_url=pg_settings.redis_url,
            celery_result_backend=pg_settings.redis_url,
            task_soft_time_limit_seconds=1,
        )
    )
    try:
        with serve(quiet) as url:
            with pytest.raises(openai.APIStatusError) as timed_out:
                sdk(url, pg_user.key).chat.completions.create(model="offline-small", messages=HI)
    finally:
        quiet.extensions["tollgate"].close()
    assert timed_out.value.status_code == 504
    assert timed_out.value.body["code"] == "timeout" and timed_out.value.body["type"] == "server_error"
    turn_id = timed_out.value.response.headers["X-Tollgate-Turn-Id"]
    pg_db.expire_all()
    assert pg_db.get(Turn, turn_id).status == "queued"  # not failed, not cancelled: it goes on


def test_a_keys_concurrency_limit_refuses_a_v1_call_with_429_and_retry_after(
    pg_app, pg_settings, pg_client, pg_admin, pg_user, pg_db
):
    keys = pg_client.get(f"/api/v1/admin/users/{pg_user.id}/api-keys", headers=pg_admin.headers).get_json()
    body = {"max_concurrent_turns": 1}
    assert (
        pg_client.put(
            f"/api/v1/admin/api-keys/{keys[0]['id']}/limits", json=body, headers=pg_admin.headers
        ).status_code
        == 200
    )
    # Nobody runs the first call's turn (its task goes to the app's own Redis database): a
    # streamed call returns at once and its turn holds the key's one slot.
    quiet = create_app(
        pg_settings.replace(
            celery_broker_url=pg_settings.redis_url, celery_result_backend=pg_settings.redis_url
        )
    )
    try:
        with serve(quiet) as url:
            client = sdk(url, pg_user.key)
            with client.chat.completions.with_streaming_response.create(
                model="offline-small", messages=HI, stream=True
            ) as first:
                assert first.status_code == 200
            with pytest.raises(openai.RateLimitError) as refused:
                client.chat.completions.create(model="offline-small", messages=HI)
    finally:
        quiet.extensions["tollgate"].close()
    assert refused.value.body["code"] == "too_many_concurrent_turns"
    assert int(refused.value.response.headers["Retry-After"]) >= 1
    assert turn_count(pg_db) == 1
