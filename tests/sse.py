"""Reading Server-Sent Events in tests: from a Flask test-client response or an httpx stream."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass
class Event:
    id: str | None
    event: str | None
    data: object


def parse(chunks: Iterable[bytes | str]) -> Iterator[Event | str]:
    """Events as they arrive; a comment line (``: ping``) comes out as its text."""
    buffer = ""
    for chunk in chunks:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            fields: dict[str, str] = {}
            for line in block.split("\n"):
                if line.startswith(":"):
                    yield line
                    continue
                name, _, value = line.partition(": ")
                fields[name] = fields.get(name, "") + value if name == "data" else value
            if "data" in fields:
                data = fields["data"]
                try:
                    decoded = json.loads(data)
                except ValueError:
                    decoded = data
                yield Event(fields.get("id"), fields.get("event"), decoded)


def events(response) -> list[Event]:
    """Every event of a finished Flask streaming response (pings dropped)."""
    return [e for e in parse(response.response) if isinstance(e, Event)]
