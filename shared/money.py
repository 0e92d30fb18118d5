"""Money as a request gives it, parsed once at each edge into a ``Decimal``.

The API's ``MoneyInput`` field (``web/schemas/common.py``) calls :func:`parse_amount`, and
so does every other edge that reads an amount typed by a person (the admin console goes
through the API's schemas). Services receive the ``Decimal`` and check only their domain
rules (``pricing.check_money``: sign and range).
"""

from __future__ import annotations

import re
from decimal import Decimal
from functools import lru_cache

from shared.db import MONEY_QUANT
from shared.errors import InvalidInput


@lru_cache(maxsize=32)
def amount_pattern(maximum: int, *, allow_zero: bool, signed: bool) -> str:
    """Decimal strings with at most 6 places (trailing zeros beyond are fine), no exponent,
    no leading zeros, in [0 or >0, maximum] (or its negation, when ``signed``)."""
    integer_digits = len(str(maximum)) - 1
    fraction = r"(?:\.[0-9]{1,6}0*)?"
    positive = [
        rf"[1-9][0-9]{{0,{integer_digits - 1}}}{fraction}",
        r"0\.[0-9]{0,5}[1-9]0*",
        rf"{maximum}(?:\.0+)?",
    ]
    if allow_zero:
        positive.append(r"0(?:\.0+)?")
    sign = "-?" if signed else ""
    return rf"^{sign}(?:{'|'.join(positive)})$"


def parse_amount(
    raw: object, *, field: str, error: str, maximum: int, allow_zero: bool = False, signed: bool = False
) -> Decimal:
    """A money amount: a decimal string matching :func:`amount_pattern` or an integer in range
    (JSON floats, booleans and anything else are refused: money is never a float), as a
    ``Decimal`` with 6 places.

    :raises InvalidInput: with the given ``error`` code and ``field``.
    """
    # fullmatch: Python's `$` would also match before a trailing newline, ECMA's does not.
    if isinstance(raw, str) and re.fullmatch(
        amount_pattern(maximum, allow_zero=allow_zero, signed=signed), raw
    ):
        return Decimal(raw).quantize(MONEY_QUANT) + 0  # + 0: no "-0.000000"
    if isinstance(raw, int) and not isinstance(raw, bool):
        minimum = 0 if allow_zero else 1
        if minimum <= (abs(raw) if signed else raw) <= maximum:
            return Decimal(raw).quantize(MONEY_QUANT)
    raise InvalidInput(
        f'{field} must be a decimal string such as "12.50" with at most 6 decimal places, '
        f"or an integer, at most {maximum}{'' if allow_zero else ' and not zero'}.",
        error=error,
        field=field,
    )
