"""The values of prebuilt statements that write ``turns`` columns: the admission's INSERT,
the runner's UPDATE, and the ended turn's row in a settlement's wallet statement
(``billing.TurnRow``)."""

from __future__ import annotations

from sqlalchemy import bindparam

from shared.models import Turn


def turn_columns(names) -> dict:
    """A prebuilt statement's values for these ``turns`` columns: a bound parameter
    ``new_<name>`` each, typed as its column (``turn_values`` fills them)."""
    table = Turn.__table__
    return {name: bindparam(f"new_{name}", type_=table.c[name].type) for name in names}


def turn_values(values: dict) -> dict:
    """The parameters of ``turn_columns``' statement for these column values."""
    return {f"new_{name}": value for name, value in values.items()}
