"""The OpenAI-compatible endpoint driven by the real ``openai`` SDK against Tollgate served
over HTTP, on Postgres + Redis with a live worker (offline model)."""

from __future__ import annotations

import json
import threading
from decimal import Decimal

import openai
import pytest
from sqlalchemy import select
from werkzeug.serving import make_server

from shared.models import ApiKey, LedgerEntry, Turn, Wallet
from shared.services import ledger_check
from tests.factories import make_actor
from tests.integration.test_enforced_turns_pg import assert_no_credit_reserved, grant, new_chat

pytestmark = pytest.mark.usefixtures("live_worker")


@pytest.fixture
def tollgate_url(pg_app):
    """Tollgate over real HTTP (the SDK brings its own client), threaded like gunicorn's workers."""
    server = make_server("127.0.0.1", 0, pg_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)


def sdk(url: str, key: str, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60, **options)


def turn_of(pg_db, completion_id: str) -> Turn:
    pg_db.expire_all()
    turn = pg_db.get(Turn, completion_id.removeprefix("chatcmpl-"))
    pg_db.commit()
    return turn


def balance(pg_db, user_id) -> Decimal:
    pg_db.expire_all()
    value = pg_db.scalar(select(Wallet.balance).where(Wallet.user_id == user_id))
    pg_db.commit()
    return value


def test_a_completion_is_a_billed_turn_in_the_keys_default_session(
    tollgate_url, pg_client, pg_admin, pg_user, pg_db
):
    pg_client.patch("/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers)
    grant(pg_client, pg_admin, pg_user.user.id, "10.00")
    client = sdk(tollgate_url, pg_user.key)
    completion = client.chat.completions.create(
        model="offline-small",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is a ledger?"},
        ],
        max_tokens=200,
    )
    assert completion.object == "chat.completion"
    turn = turn_of(pg_db, completion.id)
    assert turn.status == "completed"
    assert completion.choices[0].message.content == turn.reply
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == turn.input_tokens > 0
    assert completion.usage.completion_tokens == turn.output_tokens > 0
    # The caller's messages were the context; the wallet is debited by exactly the turn's cost.
    assert turn.request_messages[0] == {"role": "system", "content": "You are terse."}
    assert balance(pg_db, pg_user.user.id) == Decimal("10.00") - turn.cost
    assert_no_credit_reserved(pg_db, pg_user.user.id)

    # Recorded in the key's default session, visible through /api/v1; the next call joins it.
    second = client.chat.completions.create(
        model="offline-small", messages=[{"role": "user", "content": "And a hold?"}]
    )
    key = pg_db.scalar(select(ApiKey).where(ApiKey.user_id == pg_user.user.id))
    listed = pg_client.get(f"/api/v1/sessions/{key.default_session_id}/turns", headers=pg_user.headers)
    assert [t["id"] for t in listed.get_json()] == [turn.id, turn_of(pg_db, second.id).id]


def test_a_streamed_completion_with_include_usage(tollgate_url, pg_user, pg_db):
    client = sdk(tollgate_url, pg_user.key)
    stream = client.chat.completions.create(
        model="offline-small",
        messages=[{"role": "user", "content": "Stream me an answer about credit holds"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # in pieces
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    turn = turn_of(pg_db, chunks[0].id)
    assert text == turn.reply
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (
        turn.input_tokens,
        turn.output_tokens,
    )
    charges = pg_db.scalars(select(LedgerEntry).where(LedgerEntry.turn_id == turn.id)).all()
    assert [(c.kind, -c.amount) for c in charges] == [("debit", turn.cost)]


def test_models_list_shows_priced_models(tollgate_url, pg_user):
    models = sdk(tollgate_url, pg_user.key).models.list()
    assert "offline-small" in [m.id for m in models.data]


def test_errors_come_in_openais_shape(tollgate_url, pg_client, pg_admin, pg_user, pg_db):
    with pytest.raises(openai.AuthenticationError) as wrong_key:
        sdk(tollgate_url, "tg_not-a-key").chat.completions.create(
            model="offline-small", messages=[{"role": "user", "content": "hi"}]
        )
    assert wrong_key.value.status_code == 401
    assert wrong_key.value.body["code"] == "invalid_api_key"

    client = sdk(tollgate_url, pg_user.key)
    with pytest.raises(openai.NotFoundError) as unpriced:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert unpriced.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="offline-small", messages=[])

    pg_client.patch("/api/v1/admin/settings/enforcement", json={"enabled": True}, headers=pg_admin.headers)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(
                model="offline-small", messages=[{"role": "user", "content": "no credit"}], stream=stream
            )
        assert refused.value.status_code == 402
        assert refused.value.body["code"] == "insufficient_balance"
    assert pg_db.scalar(select(Turn.id).limit(1)) is None  # refused before any turn existed
    assert ledger_check.find_mismatches(pg_db) == []


def test_x_tollgate_session_records_the_call_in_the_callers_session(tollgate_url, pg_client, pg_user, pg_db):
    chat = new_chat(pg_client, pg_user)
    client = sdk(tollgate_url, pg_user.key, default_headers={"X-Tollgate-Session": chat["id"]})
    completion = client.chat.completions.create(
        model="offline-small", messages=[{"role": "user", "content": "in my own session"}]
    )
    assert turn_of(pg_db, completion.id).session_id == chat["id"]
    other = make_actor(pg_db, "user")
    with pytest.raises(openai.NotFoundError):
        sdk(
            tollgate_url, other.key, default_headers={"X-Tollgate-Session": chat["id"]}
        ).chat.completions.create(model="offline-small", messages=[{"role": "user", "content": "not mine"}])


SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the caller's documents.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_the_callers_tools_come_back_as_tool_calls_for_the_caller_to_run(
    tollgate_url, pg_user, pg_db, stream
):
    client = sdk(tollgate_url, pg_user.key)
    messages = [{"role": "user", "content": "search for holiday policy"}]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="offline-small", messages=messages, tools=[SEARCH], stream=True
            )
        )
        [call_chunk] = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        [call] = call_chunk.choices[0].delta.tool_calls
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            "tool_calls"
        ]
        completion_id = chunks[0].id
    else:
        completion = client.chat.completions.create(model="offline-small", messages=messages, tools=[SEARCH])
        assert completion.choices[0].finish_reason == "tool_calls"
        [call] = completion.choices[0].message.tool_calls
        completion_id = completion.id
    assert call.function.name == "search" and json.loads(call.function.arguments) == {
        "query": "holiday policy"
    }
    assert turn_of(pg_db, completion_id).reply_tool_calls[0]["id"] == call.id
    # Tollgate ran nothing: the caller runs the tool and sends the result back.
    follow_up = client.chat.completions.create(
        model="offline-small",
        tools=[SEARCH],
        messages=[
            *messages,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": "search", "arguments": call.function.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "Holidays: 25 days a year."},
        ],
    )
    assert follow_up.choices[0].finish_reason == "stop"
    assert "25 days a year" in follow_up.choices[0].message.content
    turn = turn_of(pg_db, follow_up.id)
    assert turn.cost > 0 and ledger_check.find_mismatches(pg_db) == []
