"""Files and tools on Postgres: full-text search through the GIN indexes, and ingestion by a live worker."""

from __future__ import annotations

import hashlib
import io
import time

import pytest
from sqlalchemy import text

from shared.models import ChatSession, Room, UploadedFile
from shared.services import files
from shared.tools.registry import ToolContext, build_registry
from shared.tools.search import FILE_VECTOR, TURN_VECTOR
from tests.factories import make_actor, make_completed_turn
from tests.web.test_files import make_pdf, make_pdf_bomb

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def registry():
    return build_registry(None)


def add_room(db, user_id: str) -> tuple[Room, ChatSession]:
    room = Room(user_id=user_id, name="room")
    db.add(room)
    db.flush()
    chat = ChatSession(room_id=room.id, user_id=user_id)
    db.add(chat)
    db.commit()
    return room, chat


def add_file(db, room: Room, filename: str, body: str, status: str = "ready") -> UploadedFile:
    data = body.encode()
    stored = UploadedFile(
        room_id=room.id,
        user_id=room.user_id,
        filename=filename,
        content_type="text/plain; charset=utf-8",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        data=data,
        text=body if status == "ready" else None,
        status=status,
    )
    db.add(stored)
    db.commit()
    return stored


def ctx_for(db, chat: ChatSession, before_seq: int | None = None) -> ToolContext:
    return ToolContext(db, chat.user_id, chat.room_id, chat.id, before_seq)


@pytest.fixture
def chat(pg_db, pg_user):
    return add_room(pg_db, pg_user.id)


def test_postgres_search_ranks_the_more_relevant_document_first(pg_db, chat, registry):
    room, session = chat
    passing = add_file(
        pg_db,
        room,
        "handbook.txt",
        "The handbook covers holidays, travel and equipment. " * 30 + "Refunds exist.",
    )
    focused = add_file(
        pg_db,
        room,
        "refund-policy.md",
        "Refund policy. A refund is issued within 14 days. Refunds for annual plans are prorated.",
    )
    add_file(pg_db, room, "unrelated.txt", "Quarterly revenue grew in every region.")
    result = registry.call("search", {"query": "refund policy"}, ctx_for(pg_db, session), timeout=TIMEOUT)
    assert result.status == "ok", result.content
    # Stemming: "refunds" matches "refund"; every word must match, so the handbook drops out.
    assert [h["file_id"] for h in result.data["results"]] == [focused.id]
    assert result.data["match"] == "all"

    relaxed = registry.call("search", {"query": "refunds"}, ctx_for(pg_db, session), timeout=TIMEOUT)
    hits = relaxed.data["results"]
    assert [h["file_id"] for h in hits] == [focused.id, passing.id]
    assert hits[0]["rank"] > hits[1]["rank"]
    assert "**Refund**" in hits[0]["snippet"] and "**Refunds**" in hits[0]["snippet"]
    assert f'1. file "refund-policy.md" (file_id={focused.id}): ' in relaxed.content


def test_postgres_search_supports_phrases_and_exclusions_and_falls_back_to_any_word(pg_db, chat, registry):
    room, session = chat
    exact = add_file(pg_db, room, "a.txt", "The service level agreement guarantees uptime.")
    add_file(pg_db, room, "b.txt", "An agreement about the service of level floors.")
    ctx = ctx_for(pg_db, session)
    phrase = registry.call("search", {"query": '"service level agreement"'}, ctx, timeout=TIMEOUT)
    assert [h["file_id"] for h in phrase.data["results"]] == [exact.id]
    excluded = registry.call("search", {"query": "agreement -uptime"}, ctx, timeout=TIMEOUT)
    assert [h["filename"] for h in excluded.data["results"]] == ["b.txt"]
    fallback = registry.call("search", {"query": "uptime spaceship"}, ctx, timeout=TIMEOUT)
    assert fallback.data["match"] == "any" and [h["file_id"] for h in fallback.data["results"]] == [exact.id]
    stop_words = registry.call("search", {"query": "the of and"}, ctx, timeout=TIMEOUT)
    assert stop_words.status == "error" and "no searchable words" in stop_words.content


def test_postgres_search_mixes_files_and_earlier_turns_and_isolates_everyone_else(
    pg_db, pg_user, chat, registry
):
    room, session = chat
    mine = add_file(pg_db, room, "kiwi.txt", "Kiwi orchard yields.")
    add_file(pg_db, room, "pending.txt", "kiwi pending", status="pending")
    earlier = make_completed_turn(
        pg_db, session, 1, "Tell me about kiwi harvests", "Kiwi harvests peak in May."
    )
    make_completed_turn(pg_db, session, 2, "kiwi again (the current turn)", "")
    other_room, other_session = add_room(pg_db, pg_user.id)
    add_file(pg_db, other_room, "other.txt", "kiwi in another room")
    make_completed_turn(pg_db, other_session, 1, "kiwi in another session", "kiwi")
    stranger = make_actor(pg_db)
    stranger_room, stranger_session = add_room(pg_db, stranger.id)
    add_file(pg_db, stranger_room, "stranger.txt", "kiwi of a stranger")
    make_completed_turn(pg_db, stranger_session, 1, "kiwi of a stranger", "kiwi")

    result = registry.call(
        "search", {"query": "kiwi"}, ctx_for(pg_db, session, before_seq=2), timeout=TIMEOUT
    )
    found = {(h["kind"], h.get("file_id") or h.get("turn_id")) for h in result.data["results"]}
    assert found == {("file", mine.id), ("turn", earlier.id)}
    turn_hit = next(h for h in result.data["results"] if h["kind"] == "turn")
    assert turn_hit["seq"] == 1 and "**Kiwi** harvests" in turn_hit["snippet"]

    forged = ToolContext(pg_db, stranger.id, room.id, session.id, None)
    assert registry.call("search", {"query": "kiwi"}, forged, timeout=TIMEOUT).data["results"] == []


def test_search_uses_the_gin_expression_indexes(pg_db, chat):
    room, session = chat
    add_file(pg_db, room, "x.txt", "indexed words")
    plans = []
    # The very expressions the search tool queries with.
    for table, vector, alias in (("uploaded_files", FILE_VECTOR, "f"), ("turns", TURN_VECTOR, "t")):
        pg_db.execute(text("SET LOCAL enable_seqscan = off"))
        rows = pg_db.execute(
            text(f"EXPLAIN SELECT 1 FROM {table} {alias} WHERE {vector} @@ CAST(:q AS tsquery)"),
            {"q": "'index'"},
        ).scalars()
        plans.append("\n".join(rows))
        pg_db.rollback()
    assert "ix_uploaded_files_text_search" in plans[0]
    assert "ix_turns_text_search" in plans[1]


def test_a_text_too_big_for_one_tsvector_is_still_ingested_and_searchable(
    pg_client, pg_user, pg_db, chat, registry
):
    room, session = chat
    # ~2 MB of distinct tokens: over Postgres's 1 MB tsvector limit if indexed whole.
    body = " ".join(hashlib.md5(str(n).encode()).hexdigest() for n in range(60_000)) + " needle-at-the-end"
    body = "haystack opening words " + body
    response = pg_client.post(
        f"/api/v1/rooms/{room.id}/files",
        data={"file": (io.BytesIO(body.encode()), "tokens.txt")},
        headers=pg_user.headers,
    )
    assert response.status_code == 201
    file_id = response.get_json()["id"]
    assert files.ingest(pg_db, file_id) == "ready"
    ctx = ctx_for(pg_db, session)
    found = registry.call("search", {"query": "haystack opening"}, ctx, timeout=TIMEOUT)
    assert [h["file_id"] for h in found.data["results"]] == [file_id]
    tail = registry.call("file_read", {"file_id": file_id, "offset": len(body) - 17}, ctx, timeout=TIMEOUT)
    assert tail.data["text"] == "needle-at-the-end" and tail.data["total_chars"] == len(body)


def test_file_read_slices_on_postgres_and_hides_other_rooms(pg_db, pg_user, chat, registry):
    room, session = chat
    stored = add_file(pg_db, room, "unicode.txt", "αβγδε" * 1000)
    ctx = ctx_for(pg_db, session)
    result = registry.call(
        "file_read", {"filename": "unicode.txt", "offset": 3, "max_chars": 4}, ctx, timeout=TIMEOUT
    )
    assert (
        result.data["text"] == "δεαβ"
        and result.data["next_offset"] == 7
        and result.data["total_chars"] == 5000
    )
    other_room, other_session = add_room(pg_db, pg_user.id)
    other = registry.call("file_read", {"file_id": stored.id}, ctx_for(pg_db, other_session), timeout=TIMEOUT)
    assert (other.status, other.content) == ("error", "file not found")


def wait_for_status(client, actor, file_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    body = {}
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/files/{file_id}", headers=actor.headers).get_json()
        if body["status"] != "pending":
            return body
        time.sleep(0.1)
    raise AssertionError(f"file {file_id} still pending: {body}")


@pytest.mark.usefixtures("live_worker")
def test_a_live_worker_ingests_uploads_end_to_end(pg_client, pg_user, pg_db, chat, registry):
    room, session = chat
    pdf = make_pdf("Maintenance window: Sundays 02:00 UTC", "Escalation contact: the platypus team")
    uploaded = pg_client.post(
        f"/api/v1/rooms/{room.id}/files",
        data={"file": (io.BytesIO(pdf), "runbook.pdf")},
        headers=pg_user.headers,
    )
    assert uploaded.status_code == 201 and uploaded.get_json()["status"] == "pending"
    broken = pg_client.post(
        f"/api/v1/rooms/{room.id}/files",
        data={"file": (io.BytesIO(b"%PDF-1.7\nthis is not really a pdf"), "broken.pdf")},
        headers=pg_user.headers,
    )

    ready = wait_for_status(pg_client, pg_user, uploaded.get_json()["id"])
    assert ready["status"] == "ready" and ready["error"] is None
    failed = wait_for_status(pg_client, pg_user, broken.get_json()["id"])
    assert failed["status"] == "failed" and "could not read the PDF" in failed["error"]

    found = registry.call(
        "search", {"query": "platypus escalation"}, ctx_for(pg_db, session), timeout=TIMEOUT
    )
    assert [h["filename"] for h in found.data["results"]] == ["runbook.pdf"]
    listed = pg_client.get(f"/api/v1/rooms/{room.id}/files", headers=pg_user.headers).get_json()
    assert {f["filename"]: f["status"] for f in listed} == {"runbook.pdf": "ready", "broken.pdf": "failed"}


@pytest.mark.usefixtures("live_worker")
def test_a_live_worker_fails_a_pdf_bomb_without_storing_its_text(pg_client, pg_user, pg_db, chat):
    room, _ = chat
    uploaded = pg_client.post(
        f"/api/v1/rooms/{room.id}/files",
        data={"file": (io.BytesIO(make_pdf_bomb()), "bomb.pdf")},
        headers=pg_user.headers,
    )
    assert uploaded.status_code == 201, uploaded.get_json()

    failed = wait_for_status(pg_client, pg_user, uploaded.get_json()["id"])

    assert failed["status"] == "failed"
    assert failed["error"].startswith("too_large_when_extracted: ")
    stored = pg_db.scalar(
        text("SELECT length(text) FROM uploaded_files WHERE id = :id"), {"id": failed["id"]}
    )
    assert stored is None


@pytest.mark.usefixtures("live_worker")
def test_a_turn_can_search_and_read_an_uploaded_file(pg_client, pg_user):
    room = pg_client.post("/api/v1/rooms", json={"name": "ops"}, headers=pg_user.headers).get_json()
    chat = pg_client.post(f"/api/v1/rooms/{room['id']}/sessions", json={}, headers=pg_user.headers).get_json()
    uploaded = pg_client.post(
        f"/api/v1/rooms/{room['id']}/files",
        data={"file": (io.BytesIO(b"On-call rota: the wombat squad covers weekends."), "rota.txt")},
        headers=pg_user.headers,
    ).get_json()
    assert wait_for_status(pg_client, pg_user, uploaded["id"])["status"] == "ready"

    response = pg_client.post(
        f"/api/v1/sessions/{chat['id']}/turns",
        json={"content": "Search for wombat squad, then check rota.txt"},
        headers=pg_user.headers,
    )
    assert response.status_code == 201, response.get_json()
    turn = response.get_json()
    calls = {call["tool"]: call for call in turn["tool_calls"]}
    assert set(calls) == {"search", "file_read"}
    assert all(call["status"] == "ok" for call in calls.values())
    assert uploaded["id"] in calls["search"]["result_excerpt"]
    assert calls["file_read"]["arguments"] == {"file_id": uploaded["id"]}
    assert "wombat squad covers weekends" in calls["file_read"]["result_excerpt"]
    assert "wombat" in turn["reply"].lower()
