"""CIF values: unquoting, numbers ('0.123(4)', '1/4'), nulls, and `BlockSkip`, the reason
a data block is not read (every step of the reader raises it)."""

from __future__ import annotations

import math

import numpy as np
from gemmi import cif


class BlockSkip(Exception):
    """Internal: this data block is not read; the message is the reason."""


NULLS = ("?", ".")
_QUOTES = ("'", '"', ";")


def unquote(values) -> list[str]:
    """Raw CIF values -> strings without quotes (most values are unquoted: fast path)."""
    as_string = cif.as_string
    return [as_string(v) if v[:1] in _QUOTES else v for v in values]


def _number(value: str) -> float:
    """One raw CIF value -> float: '0.123(4)' -> 0.123, '1/4' -> 0.25, else NaN."""
    number = cif.as_number(cif.as_string(value))
    if math.isnan(number) and "/" in value:
        numerator, _, denominator = value.partition("/")
        try:
            number = float(numerator) / float(denominator)
        except (ValueError, ZeroDivisionError):
            pass
    return number


def floats(values: list[str]) -> np.ndarray:
    """Raw CIF values -> float64 array (see `_number`); '?', '.', junk -> NaN."""
    try:
        return np.array(list(map(float, values)), dtype=np.float64)
    except ValueError:
        return np.array([_number(v) for v in values], dtype=np.float64)


def first_value(block, tags) -> str | None:
    """The first non-null value of the first present tag, unquoted."""
    for tag in tags:
        value = block.find_value(tag)
        if value is not None:
            value = cif.as_string(value).strip()
            return None if value in NULLS or not value else value
    return None

