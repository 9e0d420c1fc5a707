"""What a task is: examples (prompt + reference), a verifier, and optionally exact step labels."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# Step label values used by every task that can check steps.
STEP_CORRECT, STEP_WRONG, STEP_UNPARSEABLE = 1, 0, -1


@dataclass(frozen=True)
class Example:
    """One problem. ``prompt`` is the raw question text (a chat template, if any, is applied by the
    rollout engine); ``answer`` the reference final answer as text; ``solution`` a gold worked
    solution in the task's step format (used for SFT), '' when the task has none; ``meta`` holds
    task-specific data (e.g. the operations of an arith problem)."""

    id: str
    prompt: str
    answer: str
    solution: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepLabels:
    """Exact labels for the steps of one response.

    labels: one per step span, STEP_CORRECT / STEP_WRONG / STEP_UNPARSEABLE.
    spans: (start, end) character span of each step in the response text (same spans as the
        task's segmenter gives, so labels line up with ``Trajectory.step_ids``).
    first_error: index of the first step that is not correct, None if every step is correct.
    """

    labels: list[int]
    spans: list[tuple[int, int]]
    first_error: int | None


@runtime_checkable
class Task(Protocol):
    name: str
    segmenter: str  # name in finegrain.segment.SEGMENTERS

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        """Deterministic examples of ``split`` ('train' or 'test'); ``n`` caps the count."""

    def verify(self, example: Example, response: str) -> float:
        """Outcome score in [0, 1] (1 = final answer correct)."""


@runtime_checkable
class StepTask(Task, Protocol):
    def label_steps(self, example: Example, response: str) -> StepLabels:
        """Label every step of ANY response against the problem."""


# ---- checking constructor arguments ---------------------------------------------------------
#
# Task constructors check every keyword argument before doing any work, and raise one line that
# names the config field, the allowed values and the value received, e.g.
# "task.kwargs.min_steps: expected an integer in [1, 100], got 0".

KWARGS = "task.kwargs"


def _shown(value: Any) -> str:
    """``repr(value)`` on one line, at most 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def kwarg_error(name: str, expected: str, value: Any) -> ValueError:
    """The one-line error for task kwarg ``name``.

    >>> str(kwarg_error("max_steps", "an integer >= 1", 0))
    'task.kwargs.max_steps: expected an integer >= 1, got 0'
    """
    return ValueError(f"{KWARGS}.{name}: expected {expected}, got {_shown(value)}")


def _range(low: Any, high: Any, low_name: str | None, high_name: str | None) -> str:
    lo = None if low is None else f"{low_name} ({low})" if low_name else f"{low}"
    hi = None if high is None else f"{high_name} ({high})" if high_name else f"{high}"
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    return f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else ""


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              low_name: str | None = None, high_name: str | None = None) -> int:
    """``value`` if it is an integer (not a bool, not a float) in [low, high], else raise
    ``kwarg_error``. ``low_name``/``high_name`` name a bound that is another kwarg.

    >>> check_int("seed", 3)
    3
    >>> check_int("max_steps", 2, low=3, high=100, low_name="min_steps")
    Traceback (most recent call last):
    ...
    ValueError: task.kwargs.max_steps: expected an integer in [min_steps (3), 100], got 2
    """
    expected = "an integer" + _range(low, high, low_name, high_name)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise kwarg_error(name, expected, value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise kwarg_error(name, expected, value)
    return int(value)


def check_float(name: str, value: Any, *, low: float | None = None,
                high: float | None = None) -> float:
    """``value`` as a float if it is a finite real number (not a bool) in [low, high], else
    raise ``kwarg_error``.

    >>> check_float("fraction", float("nan"), low=0, high=1)
    Traceback (most recent call last):
    ...
    ValueError: task.kwargs.fraction: expected a finite number in [0, 1], got nan
    """
    expected = "a finite number" + _range(low, high, None, None)
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise kwarg_error(name, expected, value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise kwarg_error(name, expected, value)
    return float(value)


def check_str(name: str, value: Any, *, optional: bool = False,
              path: bool = False) -> str | None:
    """``value`` if it is a non-empty one-line string (or, with ``path``, an ``os.PathLike``,
    returned as text); None passes when ``optional``. Else raise ``kwarg_error``.

    >>> check_str("question_field", "problem"), check_str("dataset", None, optional=True)
    ('problem', None)
    >>> check_str("answer_field", "")
    Traceback (most recent call last):
    ...
    ValueError: task.kwargs.answer_field: expected a non-empty string, got ''
    """
    expected = ("a non-empty path" if path else "a non-empty string") + (" or null" if optional else "")
    if value is None and optional:
        return None
    if path and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip() or "\n" in value:
        raise kwarg_error(name, expected, value)
    return value
