"""Correcting for the gap between the sampler's and the trainer's log-probs.

An inference engine (vLLM) and the trainer compute log π(y_t | ·) with different kernels and
precisions, so the tokens are sampled from π_rollout while the PPO ratio is taken against the
trainer's π_old. Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL
Training" (2025, fengyao.notion.site/off-policy-rl) correct the policy gradient with a truncated
importance weight per token (TIS):

    ∇J ≈ E_{y ~ π_rollout} [ min(π_old(y_t) / π_rollout(y_t), C) · ∇ ℓ_PPO(π_θ / π_old, A_t) ]

so the per-token loss ℓ_t is multiplied by the detached weight w_t = min(exp(lp_old − lp_rollout), C).
The ``mask`` mode instead drops tokens whose ratio leaves [low, C] and weights the rest by the
ratio (w_t = ρ_t · 1[low ≤ ρ_t ≤ C]), the token-masking form of IcePop (Ling team, Ring-1T report,
arXiv:2510.18855; the 0.5..2.0 band is methods.md's default).

Shapes: every tensor (B, L); ``loss_mask`` bool, True = trained token.

Metrics (plain keys, masked means over trained tokens; the trainer logs them under ``loss/``):
    mismatch_kl     k3 estimate of KL(π_rollout ‖ π_old) on the sampled tokens:
                    mean(ρ − 1 − log ρ), ρ = π_old/π_rollout (≥ 0; 0 iff the two agree)
    mismatch_k1     mean(lp_rollout − lp_old), the k1 estimate (can be negative)
    mismatch_max    largest |lp_old − lp_rollout|
    is_clipped_frac fraction of tokens whose weight was truncated (tis) or that were masked (mask)
    is_weight_mean  mean weight w_t

Where this departs from the sources:
1. Weights are per token only; verl also offers sequence- and geometric-level weights.
2. The log-ratio is clamped to [−20, 20] before exp, as the policy losses do.
3. In ``mask`` mode a masked token keeps its place in the aggregation's denominator (its weight is
   0, the loss mask is unchanged), whereas verl removes rejected tokens from the denominator.
4. IcePop's exact weighting inside the band (ratio vs 1) is UNVERIFIED in methods.md; we use the
   ratio, which makes ``mask`` = TIS with a lower cut-off.

>>> import torch
>>> old = torch.log(torch.tensor([[0.5, 0.9, 0.1]]))
>>> beh = torch.log(torch.tensor([[0.5, 0.3, 0.4]]))
>>> w, m = rollout_is_weights(old, beh, torch.ones(1, 3, dtype=torch.bool), mode="tis", cap=2.0)
>>> w                                      # ratios 1, 3 → capped to 2, 0.25
tensor([[1.0000, 2.0000, 0.2500]])
>>> round(float(m["is_clipped_frac"]), 4)
0.3333
>>> w, _ = rollout_is_weights(old, beh, torch.ones(1, 3, dtype=torch.bool), mode="mask", cap=2.0, low=0.5)
>>> w                                      # 3 and 0.25 leave [0.5, 2]
tensor([[1., 0., 0.]])
"""

from __future__ import annotations

import torch

from finegrain.masked import masked_max, masked_mean
from finegrain.shapes import check_mask, check_shapes

MODES = ("none", "tis", "mask")
LOG_RATIO_CLAMP = 20.0


def mismatch_metrics(old_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor,
                     loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """mismatch_kl (k3), mismatch_k1 and mismatch_max of π_old against π_rollout on trained tokens.

    old_logprobs, behavior_logprobs (B, L) float; loss_mask (B, L) bool. Garbage under a False
    mask is replaced before any arithmetic."""
    check_shapes(old_logprobs=(old_logprobs, ("B", "L")), behavior_logprobs=(behavior_logprobs, ("B", "L")),
                 loss_mask=(loss_mask, ("B", "L")))
    check_mask("loss_mask", loss_mask)
    zero = torch.zeros_like(old_logprobs, dtype=torch.float32)
    log_r = torch.where(loss_mask, old_logprobs.float() - behavior_logprobs.float(), zero)  # log ρ, (B, L)
    log_r = log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    k3 = torch.expm1(log_r) - log_r                                                        # ρ − 1 − log ρ
    return {"mismatch_kl": masked_mean(k3, loss_mask), "mismatch_k1": masked_mean(-log_r, loss_mask),
            "mismatch_max": masked_max(log_r.abs(), loss_mask)}


@torch.no_grad()
def rollout_is_weights(old_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, loss_mask: torch.Tensor, *,
                       mode: str = "tis", cap: float = 2.0, low: float = 0.5) -> tuple[torch.Tensor, dict]:
    """Detached per-token importance weights w (B, L) of π_old over π_rollout, and metrics.

    mode "tis": w = min(ρ, cap); "mask": w = ρ · 1[low ≤ ρ ≤ cap]; "none": w = 1 (metrics only).
    ρ = exp(clamp(old_logprobs − behavior_logprobs, ±20)). w is 0 where ``loss_mask`` is False."""
    if mode not in MODES:
        raise ValueError(f"loss.rollout_correction: '{mode}' is not one of {', '.join(MODES)}")
    if not cap > 0 or not 0 <= low <= cap:
        raise ValueError(f"loss.rollout_correction: needs 0 <= low <= cap and cap > 0, got low={low}, cap={cap}")
    metrics = mismatch_metrics(old_logprobs, behavior_logprobs, loss_mask)
    zero = torch.zeros_like(old_logprobs, dtype=torch.float32)
    log_r = torch.where(loss_mask, old_logprobs.float() - behavior_logprobs.float(), zero)
    ratio = torch.exp(log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))                       # ρ, (B, L)
    if mode == "none":
        w, cut = torch.ones_like(ratio), torch.zeros_like(loss_mask)
    elif mode == "tis":
        cut = ratio > cap
        w = ratio.clamp(max=cap)
    else:
        cut = (ratio < low) | (ratio > cap)
        w = torch.where(cut, zero, ratio)
    w = torch.where(loss_mask, w, zero)
    metrics |= {"is_clipped_frac": masked_mean(cut.float(), loss_mask), "is_weight_mean": masked_mean(w, loss_mask)}
    return w, metrics
