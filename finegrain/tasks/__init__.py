"""Tasks: examples, verifiers and exact step labels. ``TASKS`` maps a name to a Task class."""

from finegrain.registry import Registry

TASKS = Registry("task")

from finegrain.tasks import arith, gsm8k  # noqa: E402,F401  (registers entries)
