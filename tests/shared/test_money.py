"""Money as a request gives it, parsed once at the edge (``shared.money``)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from shared.errors import InvalidInput
from shared.money import parse_amount

D = Decimal
MAX = 1_000_000_000_000


@pytest.mark.parametrize(
    "raw",
    ["0", "-1", "abc", "", " 2.50 ", "1.0000001", "NaN", "Infinity", "1e12", "01", "1\n", "1000000000000.5"]
    + [0, -5, MAX + 1, 1e-7, 0.5, True, None, [1]],
)
def test_anything_but_a_plain_decimal_string_or_an_integer_in_range_is_refused(raw):
    with pytest.raises(InvalidInput) as caught:
        parse_amount(raw, field="amount", error="invalid_amount", maximum=MAX)
    assert caught.value.error == "invalid_amount"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", "1"), ("2.50", "2.5"), ("0.000001", "0.000001"), ("3.1000000000", "3.1"), (7, "7"), (MAX, "1e12")],
)
def test_amounts_become_exact_six_place_decimals(raw, expected):
    value = parse_amount(raw, field="amount", error="invalid_amount", maximum=MAX)
    assert value == D(expected) and value.as_tuple().exponent == -6


def test_zero_and_signs_only_where_allowed():
    assert parse_amount("0", field="price", error="invalid_price", maximum=10, allow_zero=True) == 0
    assert parse_amount("-2.5", field="amount", error="invalid_amount", maximum=10, signed=True) == D("-2.5")
    assert parse_amount(-3, field="amount", error="invalid_amount", maximum=10, signed=True) == D(-3)
    assert str(parse_amount("0.0", field="p", error="e", maximum=10, allow_zero=True)) == "0.000000"
    for raw in ("-0", "-0.0", 0):
        with pytest.raises(InvalidInput):
            parse_amount(raw, field="amount", error="invalid_amount", maximum=10, signed=True)
