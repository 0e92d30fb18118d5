"""The formats the turn pipeline writes into a conversation and a model may read back.

Both sides import them from here: the pipeline (``turn_context``, ``summaries``,
``turn_runner``) writes them, the offline provider recognises them. Neither side
depends on the other's wording.

- A summary request is a system message starting with ``SUMMARY_INSTRUCTION_PREFIX``.
- The room's files are one system line: ``Room files: name1 [id=ID1]; name2 [id=ID2]``.
- ``search for X`` / ``search: X`` in a user message asks for a search.
- ``[[offline:…]]`` markers inject failures into the offline model; they are never
  part of what is asked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SUMMARY_INSTRUCTION_PREFIX = "Summarize the conversation"
SUMMARY_PROMPT = (
    f"{SUMMARY_INSTRUCTION_PREFIX} so far for a model that will continue it. Keep names, numbers, "
    "decisions and open questions; at most 150 words."
)
ROOM_FILES_PREFIX = "Room files:"

OFFLINE_MARKER = re.compile(r"\[\[offline:[^\]]*\]\]", re.IGNORECASE)
# "search for X" / "search: X"; X runs to the end of its sentence or line.
# A sentence ends at . ? ! followed by a space or the end, so "report.pdf" stays whole.
_SEARCH = re.compile(r"\bsearch(?:\s+for\b|\s*:)\s*(?P<query>.+?)\s*(?:[.?!](?:\s|$)|\n|$)", re.IGNORECASE)
_QUOTED = re.compile(r"[\"“']([^\"”']+)[\"”']")
_ROOM_FILE = re.compile(r"\s*(?P<name>[^;]+?)\s*\[id=(?P<id>[^\]\s]+)\]")


def is_summary_instruction(text: str) -> bool:
    """True when ``text`` (a system message) asks for a summary."""
    return text.lstrip().lower().startswith(SUMMARY_INSTRUCTION_PREFIX.lower())


def room_files_line(files: Iterable[tuple[str, str]]) -> str:
    """The system-message line that tells the model which files the room holds.

    ``files`` is ``(filename, file_id)`` pairs; :func:`room_files_in` reads it back.
    """
    return ROOM_FILES_PREFIX + " " + "; ".join(f"{name} [id={file_id}]" for name, file_id in files)


def room_files_in(line: str) -> list[tuple[str, str]]:
    """The ``(filename, file_id)`` pairs of a :func:`room_files_line` (none for any other line)."""
    line = line.strip()
    if not line.startswith(ROOM_FILES_PREFIX):
        return []
    rest = line[len(ROOM_FILES_PREFIX) :]
    return [(m.group("name"), m.group("id")) for m in _ROOM_FILE.finditer(rest)]


def extract_search_query(text: str) -> str | None:
    """The X of ``search for X`` / ``search: X`` in ``text``, or ``None``.

    The heuristic trigger, also usable as the fallback for providers that cannot call tools.
    """
    match = _SEARCH.search(OFFLINE_MARKER.sub("", text))
    if not match:
        return None
    query = match.group("query").strip()
    quoted = _QUOTED.match(query)
    if quoted:  # search for "exact words" and ... -> the quoted words
        query = quoted.group(1)
    query = query.strip("\"'“”‘’`").strip()
    return query or None
