"""The critic's per-token loss: PPO's clipped value loss, and explained variance.

    V_clip = clip(V, V_old − ε, V_old + ε)
    l_t = ½ · max((V_t − R_t)², (V_clip,t − R_t)²)

Schulman et al. 2017, PPO (arXiv:1707.06347): the value term L^VF of the combined objective (§5); the clipped form is
the one of OpenAI baselines ppo2 that later PPO code kept. Checked against verl
``verl/trainer/ppo/core_algos.py::compute_value_loss`` (volcengine/verl @
26b5d6b2bbf0202683e49d9999f9174179ab5af3: ``0.5 * agg_loss(max(vf_losses1, vf_losses2))`` and
``vf_clipfrac = mean(vf_losses2 > vf_losses1)``) and allenai/FineGrainedRLHF ``fgrlhf/ppo.py::
PPOTrainer.loss`` (@ b1c4bc2d: ``.5 * reduce_mean(max(...), mask)``, cliprange_value 0.2).

The per-token loss is reduced to a scalar by the same ``AGGREGATIONS`` modes as the policy loss
(``finegrain.losses.aggregate``); ½ sits in the per-token loss, so ½·agg(max) = agg(½·max) as in
verl. The pessimistic max keeps V from moving more than ε away from V_old in one batch: where the
clipped term is the larger one the gradient through V is zero.

Metrics (plain keys; masked means over trained tokens, no gradient):
    clipfrac       fraction of tokens where the clipped term is the larger one (gradient cut)
    explained_var  1 − Var(R − V) / Var(R) over trained tokens (1 = perfect, 0 = no better than
                   the mean of R, < 0 worse); 0 when Var(R) = 0 or fewer than two tokens
    value_mean     mean of V
    return_mean    mean of R

Where this module departs from the references:

1. ``value_clip=None`` is the unclipped ½(V − R)², which PPO's paper writes; the references always clip.
2. Masked entries are replaced by 0 before any arithmetic (``torch.where``), so NaN or inf there
   reaches neither the loss nor the gradient; the references multiply by the mask.
3. ``explained_var`` is 0 when Var(R) = 0 (verl divides by Var(R) + 1e-5, which gives a large
   negative number for a batch with constant returns).

>>> import torch
>>> v = torch.tensor([[1.5, 0.5, 1.1]], requires_grad=True)
>>> old = torch.ones(1, 3)
>>> R = torch.tensor([[2.0, 2.0, 0.0]])
>>> loss, metrics = clipped_value_loss(v, old, R, torch.ones(1, 3, dtype=torch.bool), value_clip=0.2)
>>> loss.detach()   # ½·max(0.25, 0.64);  ½·max(2.25, 1.44);  ½·1.21 (inside the clip range)
tensor([[0.3200, 1.1250, 0.6050]])
>>> metrics["clipfrac"]
tensor(0.3333)
"""

from __future__ import annotations

import torch

from finegrain.masked import masked_mean, masked_var
from finegrain.shapes import check_mask, check_shapes


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(R − V) / Var(R) over the entries where ``mask`` is True (unbiased variances).

    Args:  values (B, L); returns (B, L); mask (B, L) bool, True = included.
    Returns: a 0-dim tensor; 0 when Var(R) = 0 (constant returns, or fewer than two entries).
    """
    check_shapes(values=(values, ("B", "L")), returns=(returns, ("B", "L")), mask=(mask, ("B", "L")))
    check_mask("mask", mask)
    zero = torch.zeros((), dtype=returns.dtype, device=returns.device)
    R = torch.where(mask, returns, zero)
    V = torch.where(mask, values.to(returns.dtype), zero)
    var_r = masked_var(R, mask)
    if mask.sum() < 2 or not bool(var_r > 0):
        return zero
    return 1 - masked_var(R - V, mask) / var_r


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       loss_mask: torch.Tensor, *, value_clip: float | None = 0.2
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss per token: ½·max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²).

    Args:
        values: (B, L) V from the critic being trained; carries the gradient.
        old_values: (B, L) V_old, the critic's values when the batch was scored; detached.
        returns: (B, L) R, the regression targets (GAE λ-returns); detached.
        loss_mask: (B, L) bool, True = trained-on token.
        value_clip: ε > 0, or None for the unclipped ½(V − R)².
    Returns:
        per_token_loss (B, L), 0 where loss_mask is False; metrics (see the module docstring).
    """
    check_shapes(values=(values, ("B", "L")), old_values=(old_values, ("B", "L")),
                 returns=(returns, ("B", "L")), loss_mask=(loss_mask, ("B", "L")))
    check_mask("loss_mask", loss_mask)
    if value_clip is not None and not value_clip > 0:
        raise ValueError(f"value_clip must be > 0 (or None for no clipping), got {value_clip}")
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    V = torch.where(loss_mask, values, zero)                                        # (B, L)
    V_old = torch.where(loss_mask, old_values.detach().to(values.dtype), zero)
    R = torch.where(loss_mask, returns.detach().to(values.dtype), zero)
    unclipped = (V - R) ** 2
    if value_clip is None:
        loss, was_clipped = unclipped, torch.zeros_like(loss_mask)
    else:
        V_clip = torch.clamp(V, V_old - value_clip, V_old + value_clip)
        clipped = (V_clip - R) ** 2
        loss, was_clipped = torch.maximum(unclipped, clipped), clipped > unclipped
    loss = torch.where(loss_mask, 0.5 * loss, zero)                                 # (B, L)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((was_clipped & loss_mask).to(values.dtype), loss_mask),
            "explained_var": explained_variance(V.detach(), R, loss_mask),
            "value_mean": masked_mean(V.detach(), loss_mask),
            "return_mean": masked_mean(R, loss_mask),
        }
    return loss, metrics
