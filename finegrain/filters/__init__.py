"""Batch filters. One signature::

    fn(traj, outcome (B,) float, *, **hp) -> (keep (B,) bool, loss_mask (B, L) bool, metrics)

``keep`` False drops the row (group filters drop whole groups); ``loss_mask`` is the trajectory's
loss mask, possibly with more tokens excluded (e.g. masking truncated responses).
"""

from finegrain.registry import Registry

FILTERS = Registry("filter")

from finegrain.filters import groups, length, std_ema  # noqa: E402,F401  (registers entries)
from finegrain.filters import prof  # noqa: E402,F401  (registers PROF; needs_signals=True)
