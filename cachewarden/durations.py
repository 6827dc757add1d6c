"""Parsing of human durations such as "250ms", "30s", "10m", "1h"."""

from __future__ import annotations

import math
import re

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


def parse_duration_ms(text: str | int | float) -> int:
    """Return a duration in whole milliseconds; bare numbers are seconds.

    Raises ValueError with the accepted forms when the text is not a duration.
    """
    if isinstance(text, bool):
        raise ValueError('expected a duration such as "500ms", "30s", "10m" or "1h"')
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError("a duration cannot be negative")
        return _whole_ms(text * 1000)
    match = _PATTERN.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration; write a number and a unit: "
            '"500ms", "30s", "10m", "1h" or "1d"'
        )
    return _whole_ms(float(match.group(1)) * _UNITS_MS[match.group(2)])


def _whole_ms(value: int | float) -> int:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError('a duration must be a finite number, such as "30s"')
    return int(value)


def format_duration(ms: int) -> str:
    """`ms` in the largest unit that divides it: "10m", "30s", "250ms"."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
