"""The discriminative PRM's training loss: binary cross-entropy of step logits against step labels.

    ℓ = (1/|K|) Σ_{(i,k) ∈ K} −[ y_{ik} log σ(s_{ik}) + (1 − y_{ik}) log(1 − σ(s_{ik})) ]

over the labelled steps K = {(i, k): step_mask_{ik}}, pooled over the batch (a "token-mean" over
steps: a response with more steps weighs more, as in Math-Shepherd's and TRL PRMTrainer's
token-level cross-entropy at the step tags). Labels are hard (0/1: exact labels, PRM800K ratings,
ProcessBench's first wrong step, Math-Shepherd's hard estimate) or soft (y ∈ [0, 1]: Math-Shepherd's
soft estimate, the fraction of rollouts that reach the right answer; arXiv:2312.08935 §3.3).
Computed from logits (``binary_cross_entropy_with_logits``), which does not saturate for large |s|.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finegrain.shapes import check_mask, check_shapes


def step_bce_loss(step_logits: torch.Tensor, step_labels: torch.Tensor, step_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean BCE over the labelled steps (module docstring), and metrics.

    Args:
        step_logits: (B, S) float, s_{ik} (gradients flow through it).
        step_labels: (B, S) float in [0, 1] where step_mask is True; anything (NaN too) elsewhere.
        step_mask: (B, S) bool, True = step k of row i exists and is labelled.
    Returns:
        loss: scalar (0 with no labelled step, still differentiable);
        metrics: 'acc' = fraction of labelled steps with (s > 0) = (y > ½) (s = 0 counts as
        "predicts 0"), 'prob_mean' = mean σ(s), 'label_mean' = mean y, 'n_steps' = |K|.

    >>> loss, m = step_bce_loss(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[True, True]]))
    >>> round(float(loss), 4), float(m["acc"])       # (log 2 + (2 + log(1 + e^−2))) / 2
    (1.41, 0.0)
    """
    check_shapes(step_logits=(step_logits, ("B", "S")), step_labels=(step_labels, ("B", "S")),
                 step_mask=(step_mask, ("B", "S")))
    check_mask("step_mask", step_mask)
    zero = torch.zeros((), dtype=step_logits.dtype, device=step_logits.device)
    s = torch.where(step_mask, step_logits, zero)                                   # (B, S), garbage removed
    y = torch.where(step_mask, step_labels.to(step_logits.dtype), zero)              # (B, S)
    per_step = F.binary_cross_entropy_with_logits(s, y, reduction="none")            # (B, S)
    n = step_mask.sum()
    denom = n.clamp(min=1).to(step_logits.dtype)
    loss = torch.where(step_mask, per_step, zero).sum() / denom
    with torch.no_grad():
        right = ((s > 0) == (y > 0.5)) & step_mask
        metrics = {"acc": right.sum() / denom, "prob_mean": torch.where(step_mask, torch.sigmoid(s), zero).sum() / denom,
                   "label_mean": y.sum() / denom, "n_steps": n}
    return loss, metrics
