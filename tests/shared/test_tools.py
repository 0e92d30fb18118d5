"""The tool registry and the search / file_read tools, on SQLite."""

from __future__ import annotations

import hashlib
import time

import pytest

from shared.models import ChatSession, Room, UploadedFile
from shared.tools.base import Tool, ToolContext, ToolResult
from shared.tools.registry import ArgumentError, ToolRegistry, build_registry, validate_arguments
from tests.factories import make_actor, make_completed_turn

TIMEOUT = 5.0


@pytest.fixture(scope="module")
def registry() -> ToolRegistry:
    return build_registry(None)


def add_room(db, user_id: str, name: str = "room") -> tuple[Room, ChatSession]:
    room = Room(user_id=user_id, name=name)
    db.add(room)
    db.flush()
    chat = ChatSession(room_id=room.id, user_id=user_id)
    db.add(chat)
    db.commit()
    return room, chat


def add_file(db, room: Room, filename: str, text: str | None, status: str = "ready", error=None):
    data = (text or "x").encode()
    stored = UploadedFile(
        room_id=room.id,
        user_id=room.user_id,
        filename=filename,
        content_type="text/plain; charset=utf-8",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        data=data,
        text=text,
        status=status,
        error=error,
    )
    db.add(stored)
    db.commit()
    return stored


def context(db, chat: ChatSession, before_seq: int | None = None) -> ToolContext:
    return ToolContext(
        session=db,
        user_id=chat.user_id,
        room_id=chat.room_id,
        chat_session_id=chat.id,
        before_seq=before_seq,
    )


@pytest.fixture
def chat(db, user):
    return add_room(db, user.id)


# -- the registry -----------------------------------------------------------------------


def test_the_registry_offers_search_and_file_read_as_openai_function_tools(registry):
    schemas = registry.schemas()
    assert [s["function"]["name"] for s in schemas] == ["search", "file_read"]
    for schema in schemas:
        assert schema["type"] == "function"
        assert schema["function"]["description"]
        parameters = schema["function"]["parameters"]
        assert parameters["type"] == "object" and parameters["additionalProperties"] is False
    assert schemas[0]["function"]["parameters"]["required"] == ["query"]
    assert registry.schemas() is schemas, "built once: every hold sizing and model call asks"


def test_registering_a_tool_rebuilds_the_schemas():
    registry = ToolRegistry()
    registry.register(Tool("echo", "Echo.", {"type": "object", "properties": {}}, lambda ctx: None))
    before = registry.schemas()
    registry.register(Tool("ping", "Ping.", {"type": "object", "properties": {}}, lambda ctx: None))
    assert [s["function"]["name"] for s in registry.schemas()] == ["echo", "ping"]
    assert [s["function"]["name"] for s in before] == ["echo"]


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("delete_everything", {}, "unknown tool 'delete_everything' (available: search, file_read)"),
        ("search", {}, "missing required argument 'query'"),
        ("search", {"query": 42}, "query must be a string, got the number 42"),
        ("search", {"query": ""}, "query must be at least 1 characters"),
        ("search", {"query": "x" * 501}, "query must be at most 500 characters"),
        ("search", {"query": "tax", "limit": "3"}, "limit must be an integer, got a string"),
        ("search", {"query": "tax", "limit": True}, "limit must be an integer, got a boolean"),
        ("search", {"query": "tax", "limit": 2.5}, "limit must be an integer, got the number 2.5"),
        ("search", {"query": "tax", "limit": 0}, "limit must be >= 1"),
        ("search", {"query": "tax", "sql": "DROP"}, "unknown argument(s) sql (allowed: limit, query)"),
        ("search", ["tax"], "arguments must be an object, got an array"),
        ("search", None, "arguments must be an object, got null"),
        ("file_read", {"offset": -1, "file_id": "x"}, "offset must be >= 0"),
        ("file_read", {"file_id": None}, "file_id must be a string, got null"),
    ],
)
def test_bad_arguments_come_back_as_an_error_result_never_an_exception(
    db, chat, registry, name, arguments, message
):
    result = registry.call(name, arguments, context(db, chat[1]), timeout=TIMEOUT)
    assert result.status == "error"
    assert message in result.content


def test_validation_fills_defaults_and_accepts_integral_floats():
    schema = build_registry(None).tools["file_read"].parameters
    assert validate_arguments(schema, {"file_id": "f", "max_chars": 100.0}) == {
        "file_id": "f",
        "max_chars": 100,
        "offset": 0,
    }
    with pytest.raises(ArgumentError):
        validate_arguments({"type": "number"}, float("nan"))


def test_a_tool_that_runs_past_its_timeout_returns_timeout_without_waiting_for_it(db, chat):
    def slow(ctx, seconds):
        time.sleep(seconds)
        return ToolResult("ok", "late")

    registry = ToolRegistry()
    registry.register(
        Tool(
            "slow",
            "sleeps",
            {"type": "object", "properties": {"seconds": {"type": "number"}}, "additionalProperties": False},
            slow,
        )
    )
    started = time.monotonic()
    result = registry.call("slow", {"seconds": 3}, context(db, chat[1]), timeout=0.2)
    assert result.status == "timeout"
    assert "slow did not finish within 0.2 seconds" in result.content
    assert time.monotonic() - started < 1.5
    assert registry.call("slow", {"seconds": 0}, context(db, chat[1]), timeout=TIMEOUT).status == "ok"


def test_a_tool_that_crashes_returns_an_error_result(db, chat):
    def broken(ctx):
        raise RuntimeError("boom")

    registry = ToolRegistry()
    registry.register(Tool("broken", "fails", {"type": "object", "properties": {}}, broken))
    result = registry.call("broken", {}, context(db, chat[1]), timeout=TIMEOUT)
    assert result.status == "error" and "broken failed unexpectedly" in result.content


# -- search -----------------------------------------------------------------------------


def test_search_ranks_the_more_relevant_file_first_with_marked_snippets(db, chat, registry):
    room, session = chat
    passing = add_file(db, room, "misc.txt", "A long memo about many things. " * 20 + "One line on invoices.")
    focused = add_file(
        db, room, "invoices.md", "Invoices: every invoice is due in 30 days. Invoices are sent monthly."
    )
    add_file(db, room, "other.txt", "Nothing relevant here at all.")
    result = registry.call("search", {"query": "invoices"}, context(db, session), timeout=TIMEOUT)
    assert result.status == "ok", result.content
    hits = result.data["results"]
    assert [h["file_id"] for h in hits] == [focused.id, passing.id]
    assert hits[0]["filename"] == "invoices.md" and "**Invoices**" in hits[0]["snippet"]
    assert f'file "invoices.md" (file_id={focused.id})' in result.content.splitlines()[1]
    assert result.content.startswith('2 result(s) for "invoices"')


def test_search_covers_earlier_turns_of_the_session_only(db, chat, registry):
    room, session = chat
    earlier = make_completed_turn(db, session, 1, "My favourite colour is turquoise.", "Noted: turquoise.")
    make_completed_turn(db, session, 2, "Turquoise again, in the current turn.")
    _, other_session = add_room(db, room.user_id, "elsewhere")
    make_completed_turn(db, other_session, 1, "Turquoise in another session.")

    result = registry.call(
        "search", {"query": "turquoise"}, context(db, session, before_seq=2), timeout=TIMEOUT
    )
    assert [(h["kind"], h["turn_id"], h["seq"]) for h in result.data["results"]] == [("turn", earlier.id, 1)]
    assert f"earlier turn #1 (turn_id={earlier.id})" in result.content
    everything = registry.call("search", {"query": "turquoise"}, context(db, session), timeout=TIMEOUT)
    assert len(everything.data["results"]) == 2


def test_search_never_returns_other_rooms_users_or_files_that_are_not_ready(db, user, chat, registry):
    room, session = chat
    mine = add_file(db, room, "mine.txt", "zebra migration notes")
    add_file(db, room, "pending.txt", "zebra pending", status="pending")
    add_file(db, room, "failed.txt", "zebra failed", status="failed", error="bad")
    other_room, _ = add_room(db, user.id, "my other room")
    add_file(db, other_room, "other-room.txt", "zebra in another room")
    stranger = make_actor(db)
    stranger_room, stranger_session = add_room(db, stranger.id)
    add_file(db, stranger_room, "stranger.txt", "zebra of a stranger")
    make_completed_turn(db, stranger_session, 1, "zebra said by a stranger")

    result = registry.call("search", {"query": "zebra"}, context(db, session), timeout=TIMEOUT)
    assert [h.get("file_id") for h in result.data["results"]] == [mine.id]

    # The same session id claimed by another user sees nothing of it.
    forged = ToolContext(db, stranger.id, room.id, session.id, None)
    assert registry.call("search", {"query": "zebra"}, forged, timeout=TIMEOUT).data["results"] == []


def test_search_falls_back_to_any_word_and_says_so(db, chat, registry):
    room, session = chat
    add_file(db, room, "cats.txt", "All about cats.")
    result = registry.call("search", {"query": "cats quantum"}, context(db, session), timeout=TIMEOUT)
    assert result.data["match"] == "any" and len(result.data["results"]) == 1
    assert result.content.startswith('No document has every word of "cats quantum"')


def test_search_honours_exclusions_and_limit(db, chat, registry):
    room, session = chat
    for n in range(12):
        add_file(db, room, f"apple{n}.txt", f"apple pie number {n}" + (" with pears" if n % 2 else ""))
    result = registry.call(
        "search", {"query": "apple -pears", "limit": 50}, context(db, session), timeout=TIMEOUT
    )
    names = [h["filename"] for h in result.data["results"]]
    assert len(names) == 6 and all(int(name[5:-4]) % 2 == 0 for name in names)
    assert (
        len(
            registry.call("search", {"query": "apple"}, context(db, session), timeout=TIMEOUT).data["results"]
        )
        == 5
    )


def test_search_without_results_or_searchable_words(db, chat, registry):
    _, session = chat
    empty = registry.call("search", {"query": "nothing-matches-this"}, context(db, session), timeout=TIMEOUT)
    assert empty.status == "ok" and empty.data["results"] == []
    assert empty.content.startswith('No results for "nothing-matches-this"')
    stop = registry.call("search", {"query": "the and of"}, context(db, session), timeout=TIMEOUT)
    assert stop.status == "error" and "no searchable words" in stop.content
    blank = registry.call("search", {"query": "   "}, context(db, session), timeout=TIMEOUT)
    assert blank.status == "error" and "query is empty" in blank.content


def test_search_treats_like_wildcards_literally(db, chat, registry):
    room, session = chat
    add_file(db, room, "plain.txt", "nothing special")
    add_file(db, room, "percent.txt", "a 100%_sure thing")
    result = registry.call("search", {"query": "100%_sure"}, context(db, session), timeout=TIMEOUT)
    assert [h["filename"] for h in result.data["results"]] == ["percent.txt"]


# -- file_read --------------------------------------------------------------------------


def test_file_read_returns_slices_with_the_total_and_the_next_offset(db, chat, registry):
    room, session = chat
    text = "".join(chr(ord("a") + n % 26) for n in range(5000))
    stored = add_file(db, room, "alphabet.txt", text)
    ctx = context(db, session)

    first = registry.call("file_read", {"file_id": stored.id}, ctx, timeout=TIMEOUT)
    assert first.status == "ok"
    assert first.data["text"] == text[:2000]
    assert first.data["total_chars"] == 5000 and first.data["next_offset"] == 2000
    assert first.content.splitlines()[0] == (
        f'file "alphabet.txt" (file_id={stored.id}), characters 0-2000 of 5000 (next_offset=2000):'
    )
    last = registry.call(
        "file_read", {"file_id": stored.id, "offset": 4500, "max_chars": 1000}, ctx, timeout=TIMEOUT
    )
    assert last.data["text"] == text[4500:] and last.data["next_offset"] is None
    assert "(end of file)" in last.content.splitlines()[0]
    at_end = registry.call("file_read", {"file_id": stored.id, "offset": 5000}, ctx, timeout=TIMEOUT)
    assert at_end.status == "ok" and at_end.data["text"] == ""
    past = registry.call("file_read", {"file_id": stored.id, "offset": 5001}, ctx, timeout=TIMEOUT)
    assert past.status == "error" and "past the end of the file (5000 characters)" in past.content


def test_file_read_caps_max_chars_at_20000(db, chat, registry):
    room, session = chat
    stored = add_file(db, room, "big.txt", "é" * 30000)
    result = registry.call(
        "file_read", {"file_id": stored.id, "max_chars": 10**6}, context(db, session), timeout=TIMEOUT
    )
    assert result.data["returned_chars"] == 20000 and result.data["next_offset"] == 20000


def test_file_read_finds_a_file_by_name_preferring_the_exact_spelling(db, chat, registry):
    room, session = chat
    add_file(db, room, "Report.TXT", "upper")
    lower = add_file(db, room, "report.txt", "lower")
    ctx = context(db, session)
    assert (
        registry.call("file_read", {"filename": "report.txt"}, ctx, timeout=TIMEOUT).data["file_id"]
        == lower.id
    )
    assert registry.call("file_read", {"filename": "REPORT.txt"}, ctx, timeout=TIMEOUT).status == "ok"


def test_file_read_of_another_room_or_user_or_an_unknown_file_is_not_found(db, user, chat, registry):
    room, session = chat
    other_room, _ = add_room(db, user.id, "other")
    elsewhere = add_file(db, other_room, "elsewhere.txt", "secret of another room")
    stranger = make_actor(db)
    stranger_room, _ = add_room(db, stranger.id)
    theirs = add_file(db, stranger_room, "theirs.txt", "secret of another user")
    ctx = context(db, session)
    for arguments in (
        {"file_id": elsewhere.id},
        {"file_id": theirs.id},
        {"filename": "elsewhere.txt"},
        {"filename": "theirs.txt"},
        {"file_id": "00000000-0000-0000-0000-000000000000"},
        {"file_id": "../../etc/passwd"},
    ):
        result = registry.call("file_read", arguments, ctx, timeout=TIMEOUT)
        assert (result.status, result.content) == ("error", "file not found"), arguments
        assert "secret" not in result.content


def test_file_read_explains_files_that_are_not_ready(db, chat, registry):
    room, session = chat
    pending = add_file(db, room, "soon.txt", None, status="pending")
    failed = add_file(db, room, "scan.pdf", None, status="failed", error="the PDF has no extractable text")
    ctx = context(db, session)
    result = registry.call("file_read", {"file_id": pending.id}, ctx, timeout=TIMEOUT)
    assert result.status == "error" and "not ready yet" in result.content
    result = registry.call("file_read", {"file_id": failed.id}, ctx, timeout=TIMEOUT)
    assert result.status == "error" and "no extractable text" in result.content
    missing = registry.call("file_read", {}, ctx, timeout=TIMEOUT)
    assert missing.status == "error" and missing.content == "give file_id or filename"


def test_a_deleted_file_disappears_from_both_tools(client, db, user, chat, registry):
    room, session = chat
    stored = add_file(db, room, "gone.txt", "ephemeral walrus")
    ctx = context(db, session)
    assert registry.call("search", {"query": "walrus"}, ctx, timeout=TIMEOUT).data["results"]
    assert client.delete(f"/api/v1/files/{stored.id}", headers=user.headers).status_code == 204
    assert registry.call("search", {"query": "walrus"}, ctx, timeout=TIMEOUT).data["results"] == []
    assert (
        registry.call("file_read", {"file_id": stored.id}, ctx, timeout=TIMEOUT).content == "file not found"
    )
