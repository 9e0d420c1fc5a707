"""Allowed ranges of numeric settings, written as intervals, checked before any work.

A range is a string in interval notation: ``"(0, inf)"`` (positive), ``"[0, 1)"``, ``"[1, inf)"``.
Every numeric value must also be finite, whatever its range: NaN and ±inf are refused everywhere
(a NaN learning rate or reward weight would otherwise poison every weight at the first step).

>>> check_range("optim.lr", 1e-4, "(0, inf)")
>>> check_range("optim.lr", 0.0, "(0, inf)")
Traceback (most recent call last):
...
ValueError: optim.lr: expected a number in (0, inf), got 0.0
>>> check_range("rollout.top_p", float("nan"), "(0, 1]")
Traceback (most recent call last):
...
ValueError: rollout.top_p: expected a finite number in (0, 1], got nan
"""

from __future__ import annotations

import math
import re

_INTERVAL = re.compile(r"\s*([\[(])\s*(-?inf|-?[\d.e+-]+)\s*,\s*(-?inf|-?[\d.e+-]+)\s*([\])])\s*")


def parse_range(spec: str) -> tuple[float, float, bool, bool]:
    """'(0, 1]' -> (0.0, 1.0, False, True): low, high, low included, high included."""
    m = _INTERVAL.fullmatch(spec)
    if not m:
        raise ValueError(f"range '{spec}': expected interval notation like '(0, inf)' or '[0, 1]'")
    lo, hi = float(m.group(2)), float(m.group(3))
    return lo, hi, m.group(1) == "[", m.group(4) == "]"


def in_range(value: float, spec: str) -> bool:
    lo, hi, lo_in, hi_in = parse_range(spec)
    return (value > lo or (lo_in and value == lo)) and (value < hi or (hi_in and value == hi))


def check_range(where: str, value, spec: str | None = None) -> None:
    """Raise one line naming ``where`` unless ``value`` is a finite number inside ``spec``.

    Booleans and non-numbers are not checked here (types are checked elsewhere).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number{f' in {spec}' if spec else ''}, got {value}")
    if spec is not None and not in_range(value, spec):
        raise ValueError(f"{where}: expected a number in {spec}, got {value}")
