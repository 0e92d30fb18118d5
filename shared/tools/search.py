"""``search(query, limit)``: full-text search over the room's ready files and the session's earlier turns.

Postgres: ``websearch_to_tsquery`` (so "quoted phrases", ``or`` and ``-exclusions``
work), ranked by ``ts_rank_cd`` and shown with ``ts_headline`` snippets, matched
through GIN expression indexes (migration ``20261125_0002``). SQLite: a simpler
path with the same shape: every word must appear (substring, case-insensitive
for ASCII), ranked by how many query words a document holds and how densely.

Both paths first require every word; when nothing matches (and the query has no
exclusions) they retry with any word, and say so in the result.

Only the first ``INDEXED_PREFIX_CHARS`` characters of a file are searched:
Postgres refuses a tsvector over 1 MB, and ranking recomputes the vector of
each candidate, so an unbounded document would both fail and slow every search.
``file_read`` still reads the whole text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.orm import Session

from shared.models import FileStatus, ToolCallStatus, Turn, UploadedFile
from shared.tools.base import Tool, ToolContext, ToolError, ToolResult

# Also written literally in the index definitions of migration 20261125_0002: the
# query expressions below must stay identical to them for Postgres to use the indexes.
INDEXED_PREFIX_CHARS = 200_000
DEFAULT_LIMIT = 5
MAX_LIMIT = 10
MAX_QUERY_CHARS = 500
SNIPPET_CHARS = 240  # SQLite snippet window
HEADLINE_OPTIONS = (
    'StartSel=**, StopSel=**, MaxWords=35, MinWords=12, MaxFragments=2, FragmentDelimiter=" … "'
)

FILE_VECTOR = "to_tsvector('english', left(coalesce(f.text, ''), 200000))"
TURN_DOCUMENT = "left(coalesce(t.content, '') || ' ' || coalesce(t.reply, ''), 200000)"
TURN_VECTOR = f"to_tsvector('english', {TURN_DOCUMENT})"

_WORD = re.compile(r"\w+", re.UNICODE)
_QUERY_WORD = re.compile(r"(?:(?<=\s)|^)(-?)(\w+)", re.UNICODE)
_STOPWORDS = frozenset(
    "a an and are as at be but by for from has have he her his i if in into is it its me my no not "
    "of on or our she so than that the their them then there these they this to was we were what "
    "when where which who why will with you your".split()
)
MAX_TERMS = 16


@dataclass
class Hit:
    kind: str  # "file" | "turn"
    id: str
    rank: float
    snippet: str
    filename: str | None = None
    seq: int | None = None

    def as_data(self) -> dict[str, Any]:
        base: dict[str, Any] = {"kind": self.kind, "rank": round(self.rank, 6), "snippet": self.snippet}
        if self.kind == "file":
            base.update(file_id=self.id, filename=self.filename)
        else:
            base.update(turn_id=self.id, seq=self.seq)
        return base

    def line(self, number: int) -> str:
        if self.kind == "file":
            where = f'file "{self.filename}" (file_id={self.id})'
        else:
            where = f"earlier turn #{self.seq} (turn_id={self.id})"
        return f"{number}. {where}: {self.snippet}"


def _collapse(value: str) -> str:
    return " ".join(value.split())


# -- Postgres ---------------------------------------------------------------------------


def _pg_tsquery(session: Session, query: str) -> str:
    """The query as tsquery text (``'refund' & 'polici'``); empty when it has no searchable words."""
    return session.scalar(text("SELECT websearch_to_tsquery('english', :q)::text"), {"q": query}) or ""


def _pg_search(session: Session, ctx: ToolContext, tsquery: str, limit: int) -> list[Hit]:
    params: dict[str, Any] = {
        "tsq": tsquery,
        "room_id": ctx.room_id,
        "user_id": ctx.user_id,
        "session_id": ctx.chat_session_id,
        "limit": limit,
        "opts": HEADLINE_OPTIONS,
    }
    # Headlines are costly: computed in the outer query, for the top rows only.
    files = session.execute(
        text(
            f"""
            SELECT top.id, top.filename, top.rank,
                   ts_headline('english', left(coalesce(f.text, ''), 200000),
                               CAST(:tsq AS tsquery), :opts) AS snippet
            FROM (
                SELECT f.id, f.filename, f.created_at,
                       ts_rank_cd({FILE_VECTOR}, CAST(:tsq AS tsquery), 1) AS rank
                FROM uploaded_files f
                WHERE f.room_id = :room_id AND f.user_id = :user_id AND f.status = '{FileStatus.READY}'
                  AND {FILE_VECTOR} @@ CAST(:tsq AS tsquery)
                ORDER BY rank DESC, f.created_at DESC, f.id
                LIMIT :limit
            ) AS top
            JOIN uploaded_files f ON f.id = top.id
            ORDER BY top.rank DESC, top.created_at DESC, top.id
            """
        ),
        params,
    ).all()
    before = ""
    if ctx.before_seq is not None:
        before = "AND t.seq < :before_seq"
        params["before_seq"] = ctx.before_seq
    turns = session.execute(
        text(
            f"""
            SELECT top.id, top.seq, top.rank,
                   ts_headline('english', {TURN_DOCUMENT}, CAST(:tsq AS tsquery), :opts) AS snippet
            FROM (
                SELECT t.id, t.seq, ts_rank_cd({TURN_VECTOR}, CAST(:tsq AS tsquery), 1) AS rank
                FROM turns t
                WHERE t.session_id = :session_id AND t.user_id = :user_id AND t.room_id = :room_id
                  {before}
                  AND {TURN_VECTOR} @@ CAST(:tsq AS tsquery)
                ORDER BY rank DESC, t.seq DESC
                LIMIT :limit
            ) AS top
            JOIN turns t ON t.id = top.id
            ORDER BY top.rank DESC, top.seq DESC
            """
        ),
        params,
    ).all()
    hits = [Hit("file", r.id, float(r.rank), _collapse(r.snippet), filename=r.filename) for r in files]
    hits += [Hit("turn", r.id, float(r.rank), _collapse(r.snippet), seq=r.seq) for r in turns]
    return hits


def _any_word(tsquery: str) -> str | None:
    """The all-words tsquery relaxed to any word, or None when that would change its meaning."""
    if "!" in tsquery or "&" not in tsquery:
        return None
    return tsquery.replace(" & ", " | ")


# -- SQLite -----------------------------------------------------------------------------


def _terms(query: str) -> tuple[list[str], list[str]]:
    """The words to look for and the ``-excluded`` ones."""
    terms: list[str] = []
    excluded: list[str] = []
    for minus, word in _QUERY_WORD.findall(query.lower()):
        target = excluded if minus else terms
        if len(word) >= 2 and word not in _STOPWORDS and word not in target:
            target.append(word)
    return terms[:MAX_TERMS], excluded[:MAX_TERMS]


def _like(term: str) -> str:
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _score(document: str, terms: list[str]) -> tuple[int, float]:
    lowered = document.lower()
    counts = [lowered.count(term) for term in terms]
    words = len(_WORD.findall(document)) or 1
    # Like ts_rank_cd's normalization 1: more matches count, long documents are damped.
    return sum(1 for c in counts if c), sum(counts) / (1 + math.log(words))


def _snippet(document: str, terms: list[str]) -> str:
    pattern = re.compile("|".join(re.escape(term) for term in terms), re.IGNORECASE)
    first = pattern.search(document)
    start = 0
    if first:
        start = max(0, first.start() - SNIPPET_CHARS // 3)
        if start:
            space = document.find(" ", start)
            start = space + 1 if 0 <= space < first.start() else start
    window = document[start : start + SNIPPET_CHARS]
    end = start + len(window)
    if end < len(document):
        space = window.rfind(" ")
        if space > len(window) // 2:
            window = window[:space]
    marked = pattern.sub(lambda m: f"**{m.group(0)}**", window)
    return ("… " if start else "") + _collapse(marked) + (" …" if end < len(document) else "")


def _matching(document, terms: list[str], excluded: list[str], every: bool):
    combine = and_ if every else or_
    wanted = combine(*(document.ilike(_like(term), escape="\\") for term in terms))
    return and_(wanted, *(~document.ilike(_like(term), escape="\\") for term in excluded))


def _sqlite_search(
    session: Session, ctx: ToolContext, terms: list[str], excluded: list[str], every: bool, limit: int
) -> list[Hit]:
    file_text = func.substr(func.coalesce(UploadedFile.text, ""), 1, INDEXED_PREFIX_CHARS)
    files = session.execute(
        select(UploadedFile.id, UploadedFile.filename, file_text.label("document")).where(
            UploadedFile.room_id == ctx.room_id,
            UploadedFile.user_id == ctx.user_id,
            UploadedFile.status == FileStatus.READY,
            _matching(file_text, terms, excluded, every),
        )
    ).all()
    turn_text = func.substr(
        func.coalesce(Turn.content, "") + " " + func.coalesce(Turn.reply, ""), 1, INDEXED_PREFIX_CHARS
    )
    conditions = [
        Turn.session_id == ctx.chat_session_id,
        Turn.user_id == ctx.user_id,
        Turn.room_id == ctx.room_id,
        _matching(turn_text, terms, excluded, every),
    ]
    if ctx.before_seq is not None:
        conditions.append(Turn.seq < ctx.before_seq)
    turns = session.execute(select(Turn.id, Turn.seq, turn_text.label("document")).where(*conditions)).all()

    scored: list[tuple[tuple[int, float], Hit]] = []
    for row in files:
        matched, density = _score(row.document, terms)
        hit = Hit("file", row.id, matched + density, "", filename=row.filename)
        scored.append(((matched, density), hit))
    for row in turns:
        matched, density = _score(row.document, terms)
        scored.append(((matched, density), Hit("turn", row.id, matched + density, "", seq=row.seq)))
    scored.sort(key=lambda item: item[0], reverse=True)
    top = [hit for _, hit in scored[:limit]]
    documents = {row.id: row.document for row in (*files, *turns)}
    for hit in top:
        hit.snippet = _snippet(documents[hit.id], terms)
    return top


# -- the tool ---------------------------------------------------------------------------


def search(ctx: ToolContext, query: str, limit: int = DEFAULT_LIMIT) -> ToolResult:
    """Ranked snippets from the room's ready files and the session's earlier turns, best first."""
    query = query.strip()
    if not query:
        raise ToolError("query is empty; give the words to look for")
    limit = min(max(limit, 1), MAX_LIMIT)
    session = ctx.session
    match = "all"
    if session.get_bind().dialect.name == "postgresql":
        tsquery = _pg_tsquery(session, query)
        if not tsquery:
            raise ToolError("the query has no searchable words (only stop words or punctuation); rephrase")
        hits = _pg_search(session, ctx, tsquery, limit)
        relaxed = _any_word(tsquery)
        if not hits and relaxed:
            hits, match = _pg_search(session, ctx, relaxed, limit), "any"
    else:
        terms, excluded = _terms(query)
        if not terms:
            raise ToolError("the query has no searchable words (only stop words or punctuation); rephrase")
        hits = _sqlite_search(session, ctx, terms, excluded, True, limit)
        if not hits and len(terms) > 1 and not excluded:
            hits, match = _sqlite_search(session, ctx, terms, excluded, False, limit), "any"
    hits.sort(key=lambda hit: hit.rank, reverse=True)
    hits = hits[:limit]

    if not hits:
        content = f"No results for \"{query}\" in this room's files or this session's earlier turns."
    else:
        if match == "all":
            header = f'{len(hits)} result(s) for "{query}", best first:'
        else:
            header = f'No document has every word of "{query}"; {len(hits)} match some of them, best first:'
        content = "\n".join([header, *(hit.line(n) for n, hit in enumerate(hits, 1))])
    return ToolResult(
        ToolCallStatus.OK,
        content,
        {"query": query, "match": match, "results": [hit.as_data() for hit in hits]},
    )


SEARCH_TOOL = Tool(
    name="search",
    description=(
        "Full-text search over the files uploaded to this room and the earlier turns of this "
        "conversation. Returns ranked snippets, each with the file_id (use file_read to read more) "
        "or the turn it came from."
    ),
    parameters={
        "type": "object",
        "properties": {
            "query": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_QUERY_CHARS,
                "description": 'Words to look for. "Quoted phrases", OR and -word work as in a web search.',
            },
            "limit": {
                "type": "integer",
                "minimum": 1,
                "default": DEFAULT_LIMIT,
                "description": f"How many results (at most {MAX_LIMIT}; more is treated as {MAX_LIMIT}).",
            },
        },
        "required": ["query"],
        "additionalProperties": False,
    },
    handler=search,
)
