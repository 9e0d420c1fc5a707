"""Per-token policy-gradient losses: ``ppo_clip`` and ``reinforce``.

Every entry has the ``POLICY_LOSSES`` signature::

    fn(logprobs (B, L), old_logprobs (B, L), advantages (B, L), loss_mask (B, L) bool, *, **hp)
        -> (per_token_loss (B, L), metrics: dict[str, 0-dim Tensor])

The per-token loss is 0 where ``loss_mask`` is False, with zero gradient there even when the
masked entries hold NaN or inf. Reducing it to a scalar is a separate choice
(``finegrain.losses.aggregate``).

Metrics (plain keys; masked means over trained tokens, 0 when there are none, no gradient):
    clipfrac    fraction of tokens whose loss was clipped (PPO clip or dual clip), i.e. whose
                gradient through the ratio is cut
    ratio_mean  mean of ρ = exp(logprobs − old_logprobs)
    ratio_max   largest ρ
    approx_kl   mean of (ρ − 1) − log ρ, the k3 estimate of KL(π_old ‖ π_θ) (always ≥ 0)

Where this module departs from the papers and from verl's ``core_algos.py``
(volcengine/verl @ 012be9d9dcb7c38499f23616142870d2682757fc):

1. The log-ratio is clamped to [−20, 20] before exp, as in verl (PPO has no clamp). A token
   beyond the clamp gets no gradient through ρ.
2. Dual clip is off by default (``dual_clip_c=None``). verl always applies it with c = 3.
3. ``approx_kl`` uses k3; verl's ``ppo_kl`` is the k1 mean of old − new, which can be negative.
4. ``clipfrac`` counts dual-clipped tokens too; verl reports those separately.
5. ``reinforce`` is written as −A·ρ with ρ computed against a detached ``old_logprobs``; on-policy
   (logprobs == old_logprobs) its gradient is the REINFORCE gradient −A·∇log π, and off-policy it
   is importance-weighted without clipping.

>>> import torch
>>> lp = torch.log(torch.tensor([[0.5, 0.9]]))
>>> old = torch.log(torch.tensor([[0.5, 0.5]]))
>>> loss, metrics = ppo_clip(lp, old, torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool))
>>> loss                                   # ρ = 1 → −1;  ρ = 1.8 clipped to 1.2 → −1.2
tensor([[-1.0000, -1.2000]])
>>> metrics["clipfrac"]
tensor(0.5000)
"""

from __future__ import annotations

import torch

from finegrain.losses import POLICY_LOSSES
from finegrain.masked import masked_max, masked_mean
from finegrain.shapes import check_mask, check_shapes

LOG_RATIO_CLAMP = 20.0  # exp(20) ≈ 4.9e8 stays finite in float16/bfloat16/float32


def _check(logprobs, old_logprobs, advantages, loss_mask) -> None:
    check_shapes(logprobs=(logprobs, ("B", "L")), old_logprobs=(old_logprobs, ("B", "L")),
                 advantages=(advantages, ("B", "L")), loss_mask=(loss_mask, ("B", "L")))
    check_mask("loss_mask", loss_mask)


def _masked_log_ratio(logprobs, old_logprobs, advantages, loss_mask):
    """Clamped log ρ and advantages with masked entries replaced by 0 *before* any arithmetic,
    so NaN/inf there reaches neither the value nor the gradient."""
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(loss_mask, logprobs - old_logprobs.detach(), zero)      # (B, L)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    adv = torch.where(loss_mask, advantages.detach(), zero)                         # (B, L)
    return log_ratio, adv


@torch.no_grad()
def _ratio_metrics(log_ratio: torch.Tensor, loss_mask: torch.Tensor, clipped: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    ratio = log_ratio.exp()
    return {
        "clipfrac": masked_mean(clipped.to(ratio.dtype), loss_mask),
        "ratio_mean": masked_mean(ratio, loss_mask),
        "ratio_max": masked_max(ratio, loss_mask),
        "approx_kl": masked_mean((ratio - 1) - log_ratio, loss_mask),
    }


@POLICY_LOSSES.register("ppo_clip", bounds={"clip_low": "[0, 1)", "clip_high": "(0, inf)", "dual_clip_c": "(1, inf)"})
def ppo_clip(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             loss_mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
             dual_clip_c: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate per token, with asymmetric clip range and optional dual clip.

    ρ_t = exp(log π_θ(a_t) − log π_old(a_t))
    l_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε_low, 1 + ε_high))
    dual clip (A_t < 0 only):  l_t ← min(l_t, −A_t c)

    Schulman et al. 2017, PPO (arXiv:1707.06347); clip-higher ε_low ≠ ε_high from DAPO
    (arXiv:2503.14476); dual clip from Ye et al. 2020 (arXiv:1912.09729). Checked against verl
    ``core_algos.py::compute_policy_loss_vanilla``.

    Args:
        logprobs: (B, L) log π_θ of the sampled tokens; carries the gradient.
        old_logprobs: (B, L) log π_old from the rollout policy; detached.
        advantages: (B, L); detached.
        loss_mask: (B, L) bool, True = trained-on token.
        clip_low, clip_high: ε_low and ε_high (DAPO uses 0.2 and 0.28).
        dual_clip_c: the dual-clip bound c > 1 (verl default 3.0), or None for no dual clip.
    Returns:
        per_token_loss (B, L), 0 where loss_mask is False; metrics (see the module docstring).
    """
    _check(logprobs, old_logprobs, advantages, loss_mask)
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    log_ratio, adv = _masked_log_ratio(logprobs, old_logprobs, advantages, loss_mask)
    ratio = log_ratio.exp()                                                    # (B, L)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip_c is not None:
        cap = -adv * dual_clip_c
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        was_clipped = was_clipped | dual
    loss = torch.where(loss_mask, loss, torch.zeros_like(loss))                # (B, L)
    return loss, _ratio_metrics(log_ratio, loss_mask, was_clipped & loss_mask)


@POLICY_LOSSES.register("reinforce")
def reinforce(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              loss_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Vanilla policy gradient (REINFORCE) per token, written through the importance ratio.

    l_t = −A_t ρ_t,   ρ_t = exp(log π_θ(a_t) − sg[log π_old(a_t)])
    ∇l_t = −A_t ρ_t ∇log π_θ(a_t), which is −A_t ∇log π_θ(a_t) when π_θ = π_old.

    Williams 1992. Written as −A·ρ rather than −A·log π so the loss *value* is −A on-policy
    (not −A·log π, whose value means nothing) and the same code is correct for a few off-policy
    minibatch steps. No clipping; ``clipfrac`` is always 0.

    Args:
        logprobs, old_logprobs, advantages, loss_mask: as ``ppo_clip``.
    Returns:
        per_token_loss (B, L), 0 where loss_mask is False; metrics (see the module docstring).
    """
    _check(logprobs, old_logprobs, advantages, loss_mask)
    log_ratio, adv = _masked_log_ratio(logprobs, old_logprobs, advantages, loss_mask)
    loss = -adv * log_ratio.exp()                                              # (B, L)
    loss = torch.where(loss_mask, loss, torch.zeros_like(loss))
    return loss, _ratio_metrics(log_ratio, loss_mask, torch.zeros_like(loss_mask))
