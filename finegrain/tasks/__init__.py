"""Tasks: examples, verifiers and exact step labels. ``TASKS`` maps a name to a Task class."""

from finegrain.registry import Registry

TASKS = Registry("task")

from finegrain.tasks import arith, arith_calc, arith_words, gsm8k, lookup  # noqa: E402,F401  (registers entries)
