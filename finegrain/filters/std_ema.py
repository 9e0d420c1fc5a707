"""RLPR's standard-deviation filter: drop prompts whose rewards barely differ, against a running
EMA of how much rewards differ.

    s_g   = std_{i∈g} R_i   (unbiased, over the group's samples; a group of one has s_g = 0)
    keep g  iff  s_g ≥ β · EMA                                   once the filter is active
    warm-up: rounds ema_start_step .. start_step−1 record m_c = mean_g s_g (non-finite s_g dropped);
             at round start_step, EMA = mean of those m_c; then before each later round c
             EMA ← momentum · m_{c−1} + (1 − momentum) · EMA     (m_{c−1}: every group of round c−1,
                                                                   filtered-out ones included)

With rewards in [0, 1] such as RLPR's, a fixed threshold would either keep everything or, as the
policy sharpens and rewards spread less, drop everything; the EMA follows the spread.

Source: RLPR (arXiv:2506.18254; methods.md §21, "Std filter"); OpenBMB/RLPR @
8490fca326c625a1697a09ac1a1476a4f6f76325 verl/trainer/ppo/ray_trainer.py (filter,
filter_mode=EMA, filter_target=final_reward_std; defaults filter_ema_start_step=6,
filter_start_step=11, EMA weight 0.01; std_filter_beta 0.5 for Qwen2.5-7B, 0.9 Llama-3.1-8B, 1.0
Gemma2). The file was not in the index this was written against; this follows methods.md.

Shapes: B rows; outcome (B,) float (the reward the filters read, ``filters.outcome``);
group_ids (B,) long, groups need not be contiguous.

Departures:
1. The EMA advances once per call, i.e. per generate round of ``collect_batch``, and the warm-up
   and start are counted in rounds. With ``filters.max_refills: 0`` a round is a step, as in the
   reference (steps 1-indexed); refill rounds advance it too. The reference regenerates until the
   batch is full and updates once per step from all that step's groups.
2. Surplus passing prompts are discarded, not cached and regenerated next step (the trainer's
   refill rule, docs/algorithms/filters.md).
3. No per-data-source multipliers (std_filter_beta_per_data_source).
4. State. The registered entry is the class ``StdEMA`` (registry metadata ``stateful=True``):
   the trainer builds one object per run from ``filters.filters[i].kwargs``, calls it like a
   filter function, and saves its ``state_dict`` with every checkpoint (``filter_state`` in
   ``state.pt``), so a resumed run continues the EMA where it stopped.
"""

from __future__ import annotations

import math

import torch

from finegrain.filters import FILTERS
from finegrain.masked import group_mean_std


def group_std_stats(outcome: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """Each row's group std s_g (unbiased; 0 for a group of one) and the mean of s_g over the
    groups whose s_g is finite (None if none is).

    Args: outcome (B,) float; group_ids (B,) long. Returns: s (B,), mean_g s_g.

    >>> s, m = group_std_stats(torch.tensor([0.0, 1.0, 0.5, 0.5, 0.2]), torch.tensor([3, 3, 7, 7, 7]))
    >>> [round(x, 4) for x in s.tolist()], round(m, 4)
    ([0.7071, 0.7071, 0.1732, 0.1732, 0.1732], 0.4402)
    """
    _, s, count = group_mean_std(outcome.float(), group_ids)
    finite = torch.isfinite(s)
    groups = (finite.float() / count).sum()                       # Σ over rows of 1/n_g = number of groups
    if groups <= 0:
        return s, None
    return s, float(torch.where(finite, s / count, torch.zeros_like(s)).sum() / groups)


def std_keep(group_std: torch.Tensor, ema: float | None, *, beta: float) -> torch.Tensor:
    """keep_i = s_{g(i)} ≥ β · EMA; every row when there is no EMA yet. A non-finite s_g is dropped.

    >>> std_keep(torch.tensor([0.1, 0.3, float("nan")]), 0.4, beta=0.5).tolist()
    [False, True, False]
    >>> std_keep(torch.tensor([0.1]), None, beta=0.5).tolist()
    [True]
    """
    if ema is None:
        return torch.ones_like(group_std, dtype=torch.bool)
    return group_std >= beta * ema


@FILTERS.register("std_ema", needs_groups=True, stateful=True,
                  bounds={"beta": "[0, inf)", "momentum": "[0, 1]", "ema_start_step": "[1, inf)",
                          "start_step": "[1, inf)"})
class StdEMA:
    """The std filter with its EMA state (see the module docstring). Call it as a filter:
    ``keep, loss_mask, metrics = f(traj, outcome)``; the loss mask is passed through."""

    def __init__(self, *, beta: float = 0.5, momentum: float = 0.01, ema_start_step: int = 6,
                 start_step: int = 11):
        if not (beta >= 0 and 0 <= momentum <= 1 and ema_start_step >= 1 and start_step >= 1):
            raise ValueError(f"std_ema: expected beta ≥ 0, momentum in [0, 1], ema_start_step ≥ 1 and "
                             f"start_step ≥ 1, got {beta}, {momentum}, {ema_start_step}, {start_step}")
        self.beta, self.momentum, self.ema_start, self.start = beta, momentum, ema_start_step, start_step
        self.rounds = 0                       # calls so far
        self.warmup_sum, self.warmup_count = 0.0, 0
        self.ema: float | None = None
        self.last_mean: float | None = None   # mean_g s_g of the previous call

    def advance(self, mean_std: float | None) -> None:
        """Count one round whose mean group std is ``mean_std``: record it in the warm-up, start
        the EMA at ``start_step`` (from the warm-up; if that recorded nothing, from the previous
        round, else this one), or move the EMA by the previous round's mean."""
        self.rounds += 1
        c = self.rounds
        if c >= self.start:
            if self.ema is None:
                if self.warmup_count:
                    self.ema = self.warmup_sum / self.warmup_count
                else:
                    self.ema = self.last_mean if self.last_mean is not None else mean_std
            elif self.last_mean is not None:
                self.ema = self.momentum * self.last_mean + (1 - self.momentum) * self.ema
        elif c >= self.ema_start and mean_std is not None:
            self.warmup_sum, self.warmup_count = self.warmup_sum + mean_std, self.warmup_count + 1
        self.last_mean = mean_std

    @torch.no_grad()
    def __call__(self, traj, outcome: torch.Tensor):
        s, mean_std = group_std_stats(outcome, traj.group_ids)
        self.advance(mean_std)
        active = self.rounds >= self.start and self.ema is not None
        keep = std_keep(s, self.ema if active else None, beta=self.beta)
        metrics = {"kept_frac": keep.float().mean(), "mean_std": mean_std if mean_std is not None else 0.0,
                   "ema": self.ema if self.ema is not None else 0.0, "active": float(active)}
        return keep, traj.loss_mask, metrics

    def state_dict(self) -> dict:
        return {"rounds": self.rounds, "warmup_sum": self.warmup_sum, "warmup_count": self.warmup_count,
                "ema": self.ema, "last_mean": self.last_mean}

    def load_state_dict(self, state: dict) -> None:
        self.rounds, self.warmup_count = int(state["rounds"]), int(state["warmup_count"])
        self.warmup_sum = float(state["warmup_sum"])
        self.ema = None if state["ema"] is None else float(state["ema"])
        self.last_mean = None if state["last_mean"] is None else float(state["last_mean"])
        if self.ema is not None and not math.isfinite(self.ema):
            raise ValueError(f"std_ema.load_state_dict: the saved EMA is not finite ({self.ema})")
