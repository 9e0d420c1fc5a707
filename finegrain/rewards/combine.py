"""Turn reward outputs at any level into per-source token rewards (B, L), with weights applied.

Placement rules:
    outcome (B,)   -> on the last real response token of each row
    step    (B, S) -> on the last token of step s (tokens whose step id is s)
    token   (B, L) -> as is
A False mask entry contributes nothing (and is counted in ``coverage`` for logging).
"""

from __future__ import annotations

import torch

from finegrain.masked import last_true_index
from finegrain.rewards.base import RewardOutput
from finegrain.trajectory import place_at_step_ends


def to_token_rewards(out: RewardOutput, response_mask: torch.Tensor, step_ids: torch.Tensor) -> torch.Tensor:
    """Place one signal's values on tokens.

    Args: out: RewardOutput; response_mask (B, L) bool; step_ids (B, L) long (−1 outside steps).
    Returns: (B, L) float, zero where nothing is placed.
    """
    B, L = response_mask.shape
    if out.level == "outcome":
        last = last_true_index(response_mask)  # (B,)
        r = torch.zeros(B, L, dtype=out.values.dtype, device=out.values.device)
        ok = out.mask & (last >= 0)
        rows = ok.nonzero().flatten()
        r[rows, last[rows]] = out.values[rows]
        return r
    if out.level == "step":
        return place_at_step_ends(out.values, out.mask, step_ids)
    vals = torch.where(out.mask & response_mask, out.values, torch.zeros_like(out.values))
    return vals


def combine(outputs: dict[str, RewardOutput], weights: dict[str, float], response_mask: torch.Tensor,
            step_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-source weighted token rewards: {name: w_name · placed(values_name)}, each (B, L).

    Every weight is really applied (PRIME's reference code ignores its coefficients on the RLOO
    path; see docs/algorithms/prime.md). A name without a weight is an error, not weight 1.
    """
    missing = [n for n in outputs if n not in weights]
    if missing:
        raise KeyError(f"reward weights: no weight for signal(s) {missing}")
    return {n: weights[n] * to_token_rewards(o, response_mask, step_ids) for n, o in outputs.items()}


def total(per_source: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over sources of (B, L) token rewards."""
    return torch.stack(list(per_source.values())).sum(0)
