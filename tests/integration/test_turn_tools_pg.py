"""Model-driven tool dispatch in run_turn, on Postgres, with the OpenAI-compatible provider
talking HTTP to a local server that speaks the protocol (tests/fakes/openai_server.py).

The runner is called in-process so the scripted server is the only model involved.
"""

from __future__ import annotations

import io
import json
from decimal import Decimal

import pytest
from sqlalchemy import select

from shared.models import ChatSession as ChatSessionRow
from shared.models import Room, ToolCallEvent, Turn
from shared.providers import OpenAIProvider
from shared.services import files, turn_runner
from shared.tools.registry import build_registry
from web.schemas.chat import TurnSchema

pytest_plugins = ["tests.fakes.openai_server"]

BUDGET_TEXT = "Project Falcon budget: the approved budget is 40k EUR for 2027. Travel is excluded."


class NamedBytes(io.BytesIO):
    def __init__(self, data: bytes, filename: str):
        super().__init__(data)
        self.filename = filename


class ToollessProvider(OpenAIProvider):
    """An OpenAI-compatible server that declares no tool support."""

    supports_tools = False


@pytest.fixture
def room_with_file(pg_app, pg_db, pg_user):
    room = Room(user_id=pg_user.id, name="falcon")
    pg_db.add(room)
    pg_db.commit()
    uploaded = files.upload(
        pg_db, pg_user.id, room.id, NamedBytes(BUDGET_TEXT.encode(), "budget.txt"), max_bytes=1 << 20
    )
    assert files.ingest(pg_db, uploaded.id) == "ready"
    chat = ChatSessionRow(room_id=room.id, user_id=pg_user.id)
    pg_db.add(chat)
    pg_db.commit()
    return room, chat, uploaded


def make_turn(pg_db, pg_user, chat, content, model="gpt-test") -> Turn:
    from shared.services import pricing

    pricing.set_price(pg_db, pg_user.id, model, Decimal("0.010000"), Decimal("0.030000"))
    turn = Turn(
        session_id=chat.id,
        room_id=chat.room_id,
        user_id=pg_user.id,
        seq=1,
        content=content,
        model=model,
        max_output_tokens=200,
    )
    pg_db.add(turn)
    pg_db.commit()
    return turn


def run(pg_app, turn, provider):
    return turn_runner.run_turn(
        pg_app.extensions["tollgate"],
        turn.id,
        provider=provider,
        tools=build_registry(),
        takeover=False,
        final_attempt=True,
    )


def events(pg_db, turn):
    pg_db.expire_all()
    return pg_db.scalars(
        select(ToolCallEvent).where(ToolCallEvent.turn_id == turn.id).order_by(ToolCallEvent.created_at)
    ).all()


def tool_messages(request) -> list[dict]:
    return [m for m in request.body["messages"] if m["role"] == "tool"]


def test_the_model_calls_search_then_file_read_and_answers_from_the_results(
    pg_app, pg_db, pg_user, room_with_file, fake_openai
):
    _, chat, uploaded = room_with_file
    fake_openai.tool_calls(
        [{"name": "search", "arguments": {"query": "approved budget"}}],
        usage={"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
    )
    fake_openai.tool_calls(
        [{"name": "file_read", "arguments": {"file_id": uploaded.id, "max_chars": 200}}],
        usage={"prompt_tokens": 200, "completion_tokens": 12, "total_tokens": 212},
    )
    fake_openai.reply(
        "The approved budget is 40k EUR.",
        usage={"prompt_tokens": 300, "completion_tokens": 8, "total_tokens": 308},
    )
    turn = make_turn(pg_db, pg_user, chat, "What is the Falcon budget?")

    assert run(pg_app, turn, OpenAIProvider(fake_openai.base_url, backoff_base=0.01)) == "completed"

    requests = fake_openai.requests
    assert len(requests) == 3
    assert {t["function"]["name"] for t in requests[0].body["tools"]} == {"search", "file_read"}
    search_result = tool_messages(requests[1])[0]["content"]
    assert "40k" in search_result and uploaded.id in search_result
    read_result = tool_messages(requests[2])[-1]["content"]
    assert "approved budget is 40k EUR" in read_result
    recorded = events(pg_db, turn)
    assert [(e.tool, e.status) for e in recorded] == [("search", "ok"), ("file_read", "ok")]
    assert recorded[1].arguments == {"file_id": uploaded.id, "max_chars": 200}
    assert all(e.room_id == chat.room_id and len(e.room_id) == 36 for e in recorded)
    pg_db.expire_all()
    done = pg_db.get(Turn, turn.id)
    assert done.reply == "The approved budget is 40k EUR."
    assert (done.input_tokens, done.output_tokens) == (600, 30)
    # 600 input tokens at 0.01/1k + 30 output at 0.03/1k
    assert str(done.cost) == "0.006900"
    shown = TurnSchema().dump(done)["tool_calls"]
    assert [c["tool"] for c in shown] == ["search", "file_read"] and shown[0]["result_excerpt"]


def test_bad_tool_arguments_become_an_error_result_for_the_model_not_a_crash(
    pg_app, pg_db, pg_user, room_with_file, fake_openai
):
    _, chat, _ = room_with_file
    fake_openai.tool_calls([{"name": "file_read", "arguments": "{not json"}])
    fake_openai.tool_calls([{"name": "search", "arguments": {"query": 42}}])
    fake_openai.tool_calls([{"name": "no_such_tool", "arguments": {}}])
    fake_openai.reply("Sorry, I could not read that.")
    turn = make_turn(pg_db, pg_user, chat, "Read the file please")

    assert run(pg_app, turn, OpenAIProvider(fake_openai.base_url, backoff_base=0.01)) == "completed"
    assert [e.status for e in events(pg_db, turn)] == ["error", "error", "error"]
    fed_back = [tool_messages(r)[-1]["content"] for r in fake_openai.requests[1:]]
    assert "invalid arguments" in fed_back[0]
    assert all(fed_back)


def test_tool_rounds_are_bounded(pg_app, pg_db, pg_user, room_with_file, fake_openai):
    _, chat, _ = room_with_file
    fake_openai.tool_calls([{"name": "search", "arguments": {"query": "budget"}}], times=10)
    fake_openai.reply("Final answer without more tools.")
    turn = make_turn(pg_db, pg_user, chat, "Keep searching forever")
    fake_openai.default = None  # nothing beyond the script

    outcome = run(pg_app, turn, OpenAIProvider(fake_openai.base_url, backoff_base=0.01))
    requests = fake_openai.requests
    assert outcome == "completed"
    assert len(requests) == turn_runner.MAX_TOOL_ROUNDS + 1
    assert "tools" not in requests[-1].body  # the last round offers no tools
    assert len(events(pg_db, turn)) == turn_runner.MAX_TOOL_ROUNDS


def test_a_provider_without_tools_gets_the_heuristic_search(
    pg_app, pg_db, pg_user, room_with_file, fake_openai
):
    _, chat, _ = room_with_file
    fake_openai.reply("Found it: 40k EUR.")
    turn = make_turn(pg_db, pg_user, chat, "search for approved budget")

    assert run(pg_app, turn, ToollessProvider(fake_openai.base_url, backoff_base=0.01)) == "completed"
    (request,) = fake_openai.requests
    assert "tools" not in request.body
    injected = [m["content"] for m in request.body["messages"] if m["role"] == "system"]
    assert any(text.startswith("Search results:") and "40k" in text for text in injected)
    assert [(e.tool, e.status, e.arguments) for e in events(pg_db, turn)] == [
        ("search", "ok", {"query": "approved budget"})
    ]


def test_a_provider_that_can_call_tools_gets_no_heuristic(
    pg_app, pg_db, pg_user, room_with_file, fake_openai
):
    _, chat, _ = room_with_file
    fake_openai.reply("No search needed.")
    turn = make_turn(pg_db, pg_user, chat, "search for approved budget")
    assert run(pg_app, turn, OpenAIProvider(fake_openai.base_url, backoff_base=0.01)) == "completed"
    assert events(pg_db, turn) == []
    assert json.dumps(fake_openai.requests[0].body).count("Search results:") == 0


def test_an_upstream_error_body_never_reaches_the_turns_error_message(
    pg_app, pg_db, pg_user, room_with_file, fake_openai
):
    _, chat, _ = room_with_file
    fake_openai.status(401, body={"error": {"message": "Incorrect API key provided: sk-proj-Ab12****wxYz."}})
    turn = make_turn(pg_db, pg_user, chat, "What is the budget?")

    assert run(pg_app, turn, OpenAIProvider(fake_openai.base_url, backoff_base=0.01)) == "failed"

    pg_db.expire_all()
    shown = TurnSchema().dump(pg_db.get(Turn, turn.id))["error"]
    assert shown == {"code": "provider_rejected", "message": "The model provider rejected the request."}
