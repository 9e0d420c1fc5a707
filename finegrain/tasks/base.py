"""What a task is: examples (prompt + reference), a verifier, and optionally exact step labels."""

from __future__ import annotations

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
