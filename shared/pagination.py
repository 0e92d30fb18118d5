"""A lazily counted, lazily sliced view of a select, as flask-smorest's ``Page`` expects."""

from __future__ import annotations

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

# Postgres and SQLite take a signed 64-bit OFFSET; no table here gets near it, so a page
# past it is simply empty (a huge ``?page=`` must not reach the database as an overflow).
MAX_OFFSET = 2**62


class Listing:
    def __init__(self, session: Session, statement: Select) -> None:
        self.session = session
        self.statement = statement

    def __len__(self) -> int:
        count = select(func.count()).select_from(self.statement.order_by(None).subquery())
        return int(self.session.scalar(count) or 0)

    def __getitem__(self, window: slice) -> list:
        start = window.start or 0
        stop = window.stop if window.stop is not None else start + 1000
        if start > MAX_OFFSET:
            return []
        return list(self.session.scalars(self.statement.offset(start).limit(max(stop - start, 0))))
