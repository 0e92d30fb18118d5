"""Uploads on SQLite through the HTTP API: limits, types, filenames, ownership, extraction."""

from __future__ import annotations

import hashlib
import io
import json
import zlib

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select

from shared.models import Room, UploadedFile
from shared.services import files
from tests.factories import make_actor

MAX_UPLOAD = 4096


def make_pdf(*pages: str) -> bytes:
    """A minimal valid PDF, one page per argument, each line of text drawn in Helvetica."""

    def escape(line: str) -> str:
        return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(len(pages)))}] "
        f"/Count {len(pages)} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for index, page in enumerate(pages):
        shown = " ".join(f"({escape(line)}) Tj T*" for line in page.split("\n"))
        stream = f"BT /F1 12 Tf 14 TL 72 720 Td {shown} ET".encode("latin-1")
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * index} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref_at = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref_at}\n%%EOF\n".encode()
    return out


def make_pdf_bomb(pages: int = 8, stream_chars: int = 5_000_000) -> bytes:
    """Issue 11's PDF: a few KB on disk, every page drawing the same Flate-compressed
    content stream, which inflates to ``stream_chars`` characters of text per page."""
    line = b"(" + b"A" * 4000 + b") Tj T* "
    drawn = b"BT /F1 12 Tf 14 TL 72 720 Td " + line * (stream_chars // 4000) + b" ET"
    stream = zlib.compress(drawn, 9)
    kids = " ".join(f"{5 + i} 0 R" for i in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    objects += [
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 3 0 R >> >> /Contents 4 0 R >>"
    ] * pages
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref_at = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref_at}\n%%EOF\n".encode()
    return out


@pytest.fixture
def settings(settings):
    return settings.replace(max_upload_bytes=MAX_UPLOAD)


@pytest.fixture
def room(db, user) -> Room:
    room = Room(user_id=user.id, name="Research")
    db.add(room)
    db.commit()
    return room


def upload(client, actor, room_id, data: bytes, filename: str = "notes.txt", **extra):
    return client.post(
        f"/api/v1/rooms/{room_id}/files",
        data={"file": (io.BytesIO(data), filename), **extra},
        headers=actor.headers,
        content_type="multipart/form-data",
    )


def queued_tasks(settings) -> list[dict]:
    """The task messages waiting in the embedded (filesystem) broker."""
    messages = []
    for path in (settings.var_dir / "broker" / "queue").glob("*"):
        envelope = json.loads(path.read_bytes())
        messages.append({"task": envelope["headers"]["task"], "args": envelope["headers"].get("argsrepr")})
    return messages


def test_an_upload_returns_201_with_its_metadata_and_queues_text_extraction(client, user, room, settings):
    data = b"Quarterly revenue grew 12 percent.\n"
    response = upload(client, user, room.id, data, "report.txt")
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert set(body) == {
        "id",
        "room_id",
        "filename",
        "content_type",
        "size_bytes",
        "sha256",
        "status",
        "error",
        "created_at",
    }
    assert len(body["id"]) == 36 and body["room_id"] == room.id
    assert body["filename"] == "report.txt"
    assert body["content_type"] == "text/plain; charset=utf-8"
    assert body["size_bytes"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["status"] == "pending" and body["error"] is None
    assert {"task": "tollgate.ingest_file", "args": repr([body["id"]])} in queued_tasks(settings)


def test_a_file_can_be_listed_read_downloaded_and_deleted_by_its_owner(client, user, room):
    data = "# Notes\n\nCafé au lait ☕\n".encode()
    created = upload(client, user, room.id, data, "notes.md").get_json()

    listed = client.get(f"/api/v1/rooms/{room.id}/files", headers=user.headers)
    assert listed.status_code == 200
    assert [f["id"] for f in listed.get_json()] == [created["id"]]
    assert json.loads(listed.headers["X-Pagination"])["total"] == 1

    assert client.get(f"/api/v1/files/{created['id']}", headers=user.headers).get_json() == created

    content = client.get(f"/api/v1/files/{created['id']}/content", headers=user.headers)
    assert content.status_code == 200
    assert content.data == data
    assert content.headers["Content-Type"] == "text/markdown; charset=utf-8"
    assert content.headers["Content-Disposition"] == "attachment; filename=notes.md"
    assert content.headers["X-Content-Type-Options"] == "nosniff"
    unchanged = client.get(
        f"/api/v1/files/{created['id']}/content",
        headers={**user.headers, "If-None-Match": f'"{created["sha256"]}"'},
    )
    assert unchanged.status_code == 304

    assert client.delete(f"/api/v1/files/{created['id']}", headers=user.headers).status_code == 204
    assert client.get(f"/api/v1/files/{created['id']}", headers=user.headers).status_code == 404
    assert client.delete(f"/api/v1/files/{created['id']}", headers=user.headers).status_code == 404
    assert client.get(f"/api/v1/rooms/{room.id}/files", headers=user.headers).get_json() == []


def test_files_are_listed_newest_first_and_paginated(client, user, room):
    ids = [
        upload(client, user, room.id, f"file {n}".encode(), f"f{n}.txt").get_json()["id"] for n in range(3)
    ]
    page = client.get(f"/api/v1/rooms/{room.id}/files?page=1&page_size=2", headers=user.headers)
    assert [f["id"] for f in page.get_json()] == ids[::-1][:2]
    assert json.loads(page.headers["X-Pagination"])["total_pages"] == 2


def test_another_users_room_and_files_are_not_found(client, user, room, db):
    created = upload(client, user, room.id, b"secret plans").get_json()
    other = make_actor(db)
    assert upload(client, other, room.id, b"intrusion").status_code == 404
    assert client.get(f"/api/v1/rooms/{room.id}/files", headers=other.headers).status_code == 404
    for path in (f"/api/v1/files/{created['id']}", f"/api/v1/files/{created['id']}/content"):
        response = client.get(path, headers=other.headers)
        assert response.status_code == 404 and response.get_json()["error"] == "not_found"
    assert client.delete(f"/api/v1/files/{created['id']}", headers=other.headers).status_code == 404
    assert client.get(f"/api/v1/files/{created['id']}", headers=user.headers).status_code == 200


@pytest.mark.parametrize("file_id", ["nope", "00000000-0000-0000-0000-000000000000", "x" * 300])
def test_unknown_or_malformed_file_ids_are_404(client, user, file_id):
    assert client.get(f"/api/v1/files/{file_id}", headers=user.headers).status_code == 404
    assert client.get(f"/api/v1/files/{file_id}/content", headers=user.headers).status_code == 404


def test_files_need_an_api_key(client, room):
    assert client.get(f"/api/v1/rooms/{room.id}/files").status_code == 401
    assert upload(client, type("Anon", (), {"headers": {}})(), room.id, b"x").status_code == 401


@pytest.mark.parametrize("size", [MAX_UPLOAD + 1, MAX_UPLOAD + 200 * 1024])
def test_a_file_over_the_upload_cap_is_413_file_too_large(client, user, room, db, size):
    response = upload(client, user, room.id, b"a" * size)
    assert response.status_code == 413
    body = response.get_json()
    assert body["error"] == "file_too_large" and body["max_bytes"] == MAX_UPLOAD
    assert db.scalar(select(UploadedFile.id)) is None


def test_a_file_of_exactly_the_cap_is_accepted(client, user, room):
    assert upload(client, user, room.id, b"a" * MAX_UPLOAD).status_code == 201


@pytest.mark.parametrize(
    ("filename", "data"),
    [
        ("program.exe", b"MZ\x90\x00"),
        ("page.html", b"<html><script>alert(1)</script></html>"),
        ("README", b"no extension"),
        ("fake.pdf", b"just text pretending to be a PDF"),
        ("latin1.txt", "café".encode("latin-1")),
        ("binary.csv", b"a,b\n\x00\x01\x02"),
        ("image.json", b"\x89PNG\r\n\x1a\n\x00\x00"),
    ],
)
def test_unsupported_types_are_415(client, user, room, filename, data):
    response = upload(client, user, room.id, data, filename)
    assert response.status_code == 415, response.get_json()
    assert response.get_json()["error"] == "unsupported_media_type"


@pytest.mark.parametrize(
    ("filename", "data", "content_type"),
    [
        ("table.CSV", b"name,amount\nalice,3\n", "text/csv; charset=utf-8"),
        ("data.json", b'{"a": 1}', "application/json"),
        ("paper.pdf", make_pdf("Hello"), "application/pdf"),
        ("bom.txt", b"\xef\xbb\xbfwith a byte order mark", "text/plain; charset=utf-8"),
    ],
)
def test_allowed_types_are_accepted_whatever_the_declared_content_type(
    client, user, room, filename, data, content_type
):
    response = client.post(
        f"/api/v1/rooms/{room.id}/files",
        data={"file": (io.BytesIO(data), filename, "application/octet-stream")},
        headers=user.headers,
    )
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["content_type"] == content_type


def test_an_empty_file_is_422_empty_file(client, user, room):
    response = upload(client, user, room.id, b"")
    assert response.status_code == 422 and response.get_json()["error"] == "empty_file"


def test_a_request_without_the_file_part_is_422_file_required(client, user, room):
    as_json = client.post(f"/api/v1/rooms/{room.id}/files", json={"file": "x"}, headers=user.headers)
    assert as_json.status_code == 422 and as_json.get_json()["error"] == "file_required"
    as_field = client.post(
        f"/api/v1/rooms/{room.id}/files", data={"file": "not a file part"}, headers=user.headers
    )
    assert as_field.status_code == 422 and as_field.get_json()["error"] == "file_required"
    other_part = client.post(
        f"/api/v1/rooms/{room.id}/files",
        data={"attachment": (io.BytesIO(b"x"), "a.txt")},
        headers=user.headers,
    )
    assert other_part.status_code == 422


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("../../etc/passwd.txt", "passwd.txt"),
        ("C:\\Users\\me\\report.md", "report.md"),
        ("/abs/path/data.csv", "data.csv"),
        ("bell\x07and\x1bescape.txt", "bellandescape.txt"),
        ("invoice\u202etxt.pdf", "invoicetxt.pdf"),
        ('quote"and<angle>.txt', "quote_and_angle_.txt"),
        ("  spaced   out  .txt ", "spaced out .txt"),
        ("trailing.txt...", "trailing.txt"),
        ("Cafe\u0301.md", "Café.md"),
    ],
)
def test_hostile_filenames_are_sanitised(raw, stored):
    assert files.sanitize_filename(raw) == stored


def test_very_long_filenames_are_truncated_keeping_the_extension():
    name = files.sanitize_filename("x" * 400 + ".json")
    assert len(name) == 255 and name.endswith(".json")


@pytest.mark.parametrize("raw", ["", "..", "../..", "/", "\x01\x02", " . ", "\u202e"])
def test_filenames_with_nothing_left_are_invalid(raw):
    with pytest.raises(files.InvalidInput) as caught:
        files.sanitize_filename(raw)
    assert caught.value.error == "invalid_filename"


def test_a_hostile_upload_is_stored_and_served_under_its_sanitised_name(client, user, room):
    response = upload(client, user, room.id, b"hi", "../../../etc/bell\x07passwd.txt")
    assert response.status_code == 201
    created = response.get_json()
    assert created["filename"] == "bellpasswd.txt"
    content = client.get(f"/api/v1/files/{created['id']}/content", headers=user.headers)
    assert content.headers["Content-Disposition"] == "attachment; filename=bellpasswd.txt"


def test_an_upload_with_an_empty_filename_is_422_invalid_filename(client, user, room):
    response = upload(client, user, room.id, b"data", "")
    assert response.status_code == 422 and response.get_json()["error"] == "invalid_filename"


def test_a_long_unicode_name_downloads_with_an_rfc5987_filename(client, user, room):
    created = upload(client, user, room.id, b"x", "é" * 300 + ".txt").get_json()
    assert len(created["filename"]) == 255
    content = client.get(f"/api/v1/files/{created['id']}/content", headers=user.headers)
    assert "filename*=UTF-8''" in content.headers["Content-Disposition"]


# -- extraction -------------------------------------------------------------------------


def ingest_and_get(client, actor, db, file_id) -> dict:
    files.ingest(db, file_id)
    return client.get(f"/api/v1/files/{file_id}", headers=actor.headers).get_json()


def extracted_text(db, file_id) -> str | None:
    db.expire_all()
    return db.scalar(select(UploadedFile.text).where(UploadedFile.id == file_id))


def test_pdf_text_is_extracted_page_by_page(client, user, room, db):
    pdf = make_pdf("Invoice 2041\nTotal due: 310 EUR", "Payment terms (net 30)")
    created = upload(client, user, room.id, pdf, "invoice.pdf").get_json()
    assert ingest_and_get(client, user, db, created["id"])["status"] == "ready"
    text = extracted_text(db, created["id"])
    assert "Invoice 2041" in text and "Total due: 310 EUR" in text
    assert "Payment terms (net 30)" in text
    assert text.index("Invoice") < text.index("Payment")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (
            b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage without xref",
            "pdf_unreadable: could not read the PDF",
        ),
        (make_pdf("Hello")[:60], "pdf_unreadable: could not read the PDF"),
        (make_pdf(""), "no_text: the PDF has no extractable text"),
    ],
)
def test_an_unreadable_pdf_fails_with_a_reason_instead_of_crashing(client, user, room, db, data, error):
    created = upload(client, user, room.id, data, "broken.pdf").get_json()
    body = ingest_and_get(client, user, db, created["id"])
    assert body["status"] == "failed"
    assert body["error"].startswith(error)
    assert extracted_text(db, created["id"]) is None


def store_large(db, actor, room, data: bytes, filename: str) -> dict:
    """Stored through the service: the bombs are larger than this module's upload cap."""
    incoming = io.BytesIO(data)
    incoming.filename = filename
    return {"id": files.upload(db, actor.id, room.id, incoming, max_bytes=1 << 20).id}


def test_a_pdf_bomb_stops_at_the_text_cap_and_fails_without_storing_text(client, user, room, db, monkeypatch):
    from pypdf import PageObject

    bomb = make_pdf_bomb()
    assert len(bomb) < 16_000  # 8 pages x 5 M characters from a few KB
    pages_read = []
    extract_page = PageObject.extract_text

    def counting(page, *args, **kwargs):
        pages_read.append(page)
        return extract_page(page, *args, **kwargs)

    monkeypatch.setattr(PageObject, "extract_text", counting)
    created = store_large(db, user, room, bomb, "bomb.pdf")

    body = ingest_and_get(client, user, db, created["id"])

    assert body["status"] == "failed"
    assert body["error"] == (
        "too_large_when_extracted: the extracted text is longer than 2,000,000 characters"
    )
    assert extracted_text(db, created["id"]) is None
    # Stopped part-way through the first page, not after reading all eight.
    assert len(pages_read) == 1


def test_text_files_and_pretty_printed_json_are_held_to_the_same_cap(client, user, room, db):
    cases = {
        "exact.txt": (b"x" * 20, "ready"),
        "over.txt": (b"x" * 21, "failed"),
        # 11 characters as sent, 27 once pretty-printed.
        "grows.json": (b"[1,2,3,4,5]", "failed"),
    }
    for filename, (data, status) in cases.items():
        created = upload(client, user, room.id, data, filename).get_json()
        assert files.ingest(db, created["id"], max_chars=20) == status, filename
        body = client.get(f"/api/v1/files/{created['id']}", headers=user.headers).get_json()
        if status == "failed":
            assert body["error"].startswith("too_large_when_extracted: "), filename
            assert extracted_text(db, created["id"]) is None
        else:
            assert extracted_text(db, created["id"]) == "x" * 20


def test_an_extraction_past_its_time_limit_fails_with_extraction_timeout(client, user, room, db):
    # Parsing its one 1 MB content stream alone takes longer than the limit.
    created = store_large(db, user, room, make_pdf_bomb(pages=2, stream_chars=1_000_000), "slow.pdf")

    # No character cap to speak of: only the clock stops this one.
    assert files.ingest(db, created["id"], max_chars=10**9, time_limit_seconds=0.05) == "failed"

    body = client.get(f"/api/v1/files/{created['id']}", headers=user.headers).get_json()
    assert body["error"] == "extraction_timeout: text extraction took longer than allowed (0.05 s)"
    assert extracted_text(db, created["id"]) is None


def test_the_workers_soft_time_limit_fails_the_file_with_extraction_timeout(
    client, user, room, db, monkeypatch
):
    def interrupted(*_args, **_kwargs):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(files, "extract_text", interrupted)
    created = upload(client, user, room.id, make_pdf("Hello"), "stuck.pdf").get_json()

    assert files.ingest(db, created["id"]) == "failed"
    body = client.get(f"/api/v1/files/{created['id']}", headers=user.headers).get_json()
    assert body["error"].startswith("extraction_timeout: ")


def test_text_types_are_extracted_as_text_and_json_is_pretty_printed(client, user, room, db):
    cases = {
        "notes.md": (b"\xef\xbb\xbf# Title\nbody", "# Title\nbody"),
        "rows.csv": (b"name,amount\nalice,3\n", "name,amount\nalice,3\n"),
        "data.json": (b'{"b":[1,2],"a":"\xc3\xa9"}', '{\n  "b": [\n    1,\n    2\n  ],\n  "a": "é"\n}'),
        "broken.json": (b'{"not": json', '{"not": json'),
    }
    for filename, (data, expected) in cases.items():
        created = upload(client, user, room.id, data, filename).get_json()
        assert ingest_and_get(client, user, db, created["id"])["status"] == "ready", filename
        assert extracted_text(db, created["id"]) == expected, filename


def test_ingest_is_idempotent_a_ready_file_is_not_reprocessed(client, user, room, db):
    created = upload(client, user, room.id, b"original words").get_json()
    assert files.ingest(db, created["id"]) == "ready"
    row = db.get(UploadedFile, created["id"])
    row.text = "left alone"
    db.commit()
    assert files.ingest(db, created["id"]) == "ready"
    assert extracted_text(db, created["id"]) == "left alone"


def test_ingest_of_a_deleted_or_unknown_file_does_nothing(client, user, room, db):
    created = upload(client, user, room.id, b"short lived").get_json()
    client.delete(f"/api/v1/files/{created['id']}", headers=user.headers)
    assert files.ingest(db, created["id"]) is None
    assert files.ingest(db, "not-an-id") is None


def test_a_malformed_multipart_body_is_a_4xx_not_a_crash(client, user, room):
    for content_type, body in (
        ("multipart/form-data", b"--x\r\nno boundary declared"),
        ("multipart/form-data; boundary=abc", b'--abc\r\nContent-Disposition: form-data; name="file"; fi'),
        ("application/octet-stream", b"raw bytes"),
    ):
        response = client.post(
            f"/api/v1/rooms/{room.id}/files", data=body, content_type=content_type, headers=user.headers
        )
        assert 400 <= response.status_code < 500, (content_type, response.status_code)
        assert response.is_json


def test_pending_files_whose_extraction_was_lost_are_resent_and_eventually_failed(
    client, user, room, db, settings
):
    stale = upload(client, user, room.id, b"stale").get_json()
    abandoned = upload(client, user, room.id, b"abandoned").get_json()
    fresh = upload(client, user, room.id, b"fresh").get_json()
    for file_id in (stale["id"], abandoned["id"], fresh["id"]):
        assert {"task": "tollgate.ingest_file", "args": repr([file_id])} in queued_tasks(settings)
    for path in (settings.var_dir / "broker" / "queue").glob("*"):
        path.unlink()
    now = files.utcnow()
    db.get(UploadedFile, stale["id"]).created_at = now - files.INGEST_RESEND_AFTER * 2
    db.get(UploadedFile, abandoned["id"]).created_at = now - files.INGEST_GIVE_UP_AFTER * 2
    db.commit()

    outcome = files.recover_pending_files(db, client.application.extensions["celery"])
    assert outcome == {"resent": 1, "failed": 1}
    assert queued_tasks(settings) == [{"task": "tollgate.ingest_file", "args": repr([stale["id"]])}]
    gave_up = client.get(f"/api/v1/files/{abandoned['id']}", headers=user.headers).get_json()
    assert gave_up["status"] == "failed"
    assert gave_up["error"] == "extraction_abandoned: text extraction did not complete in time"
    assert client.get(f"/api/v1/files/{fresh['id']}", headers=user.headers).get_json()["status"] == "pending"
