"""Group filters: drop prompts whose samples teach nothing (all equal) or are out of an accuracy band.

Sources: DAPO's dynamic sampling (arXiv 2503.14476) drops groups whose outcomes are all equal;
PRIME's online accuracy filter (arXiv 2502.01456; PRIME-RL/PRIME ray_trainer.py) keeps a prompt
only if 0.2 ≤ mean group accuracy ≤ 0.8.
Departure: PRIME oversamples by a factor and fills the batch from a buffer; here the trainer
oversamples and runs bounded refill rounds within the step (``filters.max_refills``), so every kept
group was sampled by the current policy.
"""

from __future__ import annotations

import torch

from finegrain.filters import FILTERS
from finegrain.masked import group_mean_std


@FILTERS.register("accuracy_band", needs_groups=True, bounds={"low": "[0, 1]", "high": "[0, 1]"})
def accuracy_band(traj, outcome: torch.Tensor, *, low: float = 0.2, high: float = 0.8):
    """Keep groups with low ≤ mean_g(outcome) ≤ high. outcome (B,) in [0, 1]."""
    mean, _, _ = group_mean_std(outcome.float(), traj.group_ids)
    keep = (mean >= low - 1e-9) & (mean <= high + 1e-9)
    return keep, traj.loss_mask, {"kept_frac": keep.float().mean()}


@FILTERS.register("zero_variance", needs_groups=True, bounds={"eps": "[0, inf)"})
def zero_variance(traj, outcome: torch.Tensor, *, eps: float = 1e-8):
    """Keep groups whose outcomes are not all equal (std > eps). A group of one is dropped."""
    _, std, _ = group_mean_std(outcome.float(), traj.group_ids)
    keep = std > eps
    return keep, traj.loss_mask, {"kept_frac": keep.float().mean()}
