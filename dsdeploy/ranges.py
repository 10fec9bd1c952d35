"""Numeric option values where they enter the library: range checks and the one duration grammar.

Every check names the field and the allowed range in one line, so the CLI and recipes
report the same thing. NaN and infinity are refused everywhere (they compare False with
every bound, so a plain ``x <= 0`` test lets them through).
"""

from __future__ import annotations

import math
import re
from numbers import Integral, Real
from typing import Any

from dsdeploy.errors import ConfigError


def check_number(value: Any, field: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 optional: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a finite number in the given range.

    Args:
        value: the value to check.
        field: the name reported (e.g. ``"finetune lr"``).
        low, high: bounds (None: unbounded); ``low_open``/``high_open`` exclude them.
        integer: require an integer (bool is refused).
        optional: accept None.
    """
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, Integral if integer else Real):
        raise ConfigError(f"{field} must be {kind}, got {value!r}")
    if not math.isfinite(float(value)):
        raise ConfigError(f"{field} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ConfigError(f"{field} must be {describe_range(low, high, low_open, high_open)}, got {value!r}")


def describe_range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """``positive``, ``>= 1``, ``in [0, 1)``... for messages."""
    if high is None:
        if low == 0 and low_open:
            return "positive"
        return f"{'>' if low_open else '>='} {low:g}" if low is not None else "finite"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_DURATION = re.compile(rf"(?:{_NUM}h)?(?:{_NUM}m)?(?:{_NUM}s)?(?:{_NUM}ms)?|{_NUM}")
_UNIT_SECONDS = (3600.0, 60.0, 1.0, 1e-3, 1.0)  # h, m, s, ms, a bare number


def parse_duration(text: str | float | int, field: str = "duration") -> float:
    """Seconds in a duration: ``"500ms"``, ``"90s"``, ``"10m"``, ``"2h"``, combinations in
    that order (``"1h30m"``, ``"1m30s"``, ``"2s500ms"``), or a bare number of seconds
    (``"45"``, ``12``, ``0.5``). Case and white space are ignored.

    Raises ConfigError (naming ``field``) for text that is no duration, and for a duration
    that is not positive and finite.
    """
    if isinstance(text, bool):
        raise ConfigError(f"cannot read the {field} {text!r}: use e.g. 500ms, 90s, 10m, 1h30m")
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = re.sub(r"\s+", "", str(text).lower())
        parts = _DURATION.fullmatch(s) if s else None
        if parts is None:
            raise ConfigError(f"cannot read the {field} {text!r}: use e.g. 500ms, 90s, 10m, 1h30m")
        seconds = sum(float(v) * unit for v, unit in zip(parts.groups(), _UNIT_SECONDS) if v)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"the {field} must be positive, got {text!r}")
    return seconds
