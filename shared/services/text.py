"""Text from outside (model output, tool arguments) made storable.

Postgres ``text`` and ``json`` cannot hold NUL, and UTF-8 cannot encode lone
surrogates (which ``json.loads`` accepts from ``"\\ud800"``). Model output may
contain either; it is cleaned before it reaches the database, so a reply can
never make a turn's final write fail.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


def clean_text(value: str) -> str:
    """``value`` without NUL characters and with lone surrogates replaced."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = "".join(REPLACEMENT if "\ud800" <= ch <= "\udfff" else ch for ch in value)
    return value


def clean_json(value: Any, _depth: int = 0) -> Any:
    """A JSON value with every string (keys included) cleaned; nesting past 64 levels is cut."""
    if _depth > 64:
        return None
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(str(key)): clean_json(item, _depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [clean_json(item, _depth + 1) for item in value]
    return value
