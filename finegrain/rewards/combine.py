"""Turn reward outputs at any level into per-source token rewards (B, L), with weights applied.

Placement rules (every reward lands on a token the policy is trained on, ``loss_mask`` True, so
no estimator can lose it; a row or segment without a trained token places nothing):
    outcome (B,)   -> on the last trained response token of each row
    turn    (B, T) -> on the last trained token of turn k (``Trajectory.turns``)
    step    (B, S) -> on the last trained token of step s (``Trajectory.step_ids``)
    token   (B, L) -> as is, on real response tokens
A False mask entry contributes nothing (not the same as a zero reward).
"""

from __future__ import annotations

import torch

from finegrain.masked import last_true_index
from finegrain.rewards.base import RewardOutput
from finegrain.trajectory import place_at_segment_ends


def to_token_rewards(out: RewardOutput, traj) -> torch.Tensor:
    """Place one signal's values on tokens of ``traj`` (uses its loss_mask, step_ids, turns).

    Returns: (B, L) float, zero where nothing is placed.
    """
    trained = traj.loss_mask & traj.response_mask
    B, L = trained.shape
    if out.level == "outcome":
        last = last_true_index(trained)  # (B,)
        r = torch.zeros(B, L, dtype=out.values.dtype, device=out.values.device)
        ok = out.mask & (last >= 0)
        rows = ok.nonzero().flatten()
        r[rows, last[rows]] = out.values[rows]
        return r
    if out.level == "turn":
        return place_at_segment_ends(out.values, out.mask, traj.turns, trained)
    if out.level == "step":
        return place_at_segment_ends(out.values, out.mask, traj.step_ids, trained)
    return torch.where(out.mask & traj.response_mask, out.values, torch.zeros_like(out.values))


def combine(outputs: dict[str, RewardOutput], weights: dict[str, float], traj) -> dict[str, torch.Tensor]:
    """Per-source weighted token rewards: {name: w_name · placed(values_name)}, each (B, L).

    Every weight is really applied (PRIME's reference code ignores its coefficients on the RLOO
    path; see docs/algorithms/prime.md). A name without a weight is an error, not weight 1.
    """
    missing = [n for n in outputs if n not in weights]
    if missing:
        raise KeyError(f"reward weights: no weight for signal(s) {missing}")
    return {n: weights[n] * to_token_rewards(o, traj) for n, o in outputs.items()}


def total(per_source: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over sources of (B, L) token rewards."""
    return torch.stack(list(per_source.values())).sum(0)
