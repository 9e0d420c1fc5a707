"""Per-token estimators of KL(π_θ ‖ π_ref) from the log-probabilities of the sampled tokens.

Every entry has the ``KL_ESTIMATORS`` signature::

    fn(logprobs (B, L), ref_logprobs (B, L)) -> per-token estimate (B, L)

With tokens sampled from π_θ and the log ratio lr = log π_θ(a) − log π_ref(a), Schulman's
approximations (http://joschu.net/blog/kl-approx.html) are

    k1 = lr                     unbiased, high variance, can be negative
    k2 = ½ lr²                  biased (low bias near π_θ ≈ π_ref), ≥ 0
    k3 = exp(−lr) − 1 + lr      unbiased, lower variance, ≥ 0 ("low_var_kl" in verl; GRPO's KL)

Use ``kl_penalty`` to apply one under a mask. As a loss term (GRPO) the gradient flows through
``logprobs``; as a reward penalty (r_t ← r_t − β·k, REINFORCE++/PPO) detach it first.

Where this module departs from verl's ``core_algos.py::kl_penalty``
(volcengine/verl @ 012be9d9dcb7c38499f23616142870d2682757fc):

1. Only k3 clamps: lr is clamped to [−20, 20] before exp so exp(−lr) stays finite; beyond the
   clamp, k3 gets no gradient. verl also clamps the k3 *value* to [−10, 10], which zeroes the
   gradient of any token with k3 > 10; we do not clamp the value.

>>> import math, torch
>>> lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])   # lr = log 2
>>> k3(lp, ref)                                   # 1/2 − 1 + log 2
tensor([[0.1931]])
"""

from __future__ import annotations

import torch

from finegrain.losses import KL_ESTIMATORS
from finegrain.shapes import check_mask, check_shapes

LOG_RATIO_CLAMP = 20.0


def _check(logprobs, ref_logprobs) -> None:
    check_shapes(logprobs=(logprobs, ("B", "L")), ref_logprobs=(ref_logprobs, ("B", "L")))


@KL_ESTIMATORS.register("k1")
def k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π_θ(a) − log π_ref(a). Args: (B, L) each. Returns: (B, L)."""
    _check(logprobs, ref_logprobs)
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π_θ(a) − log π_ref(a))². Args: (B, L) each. Returns: (B, L)."""
    _check(logprobs, ref_logprobs)
    return 0.5 * (logprobs - ref_logprobs).square()


@KL_ESTIMATORS.register("k3")
def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(−lr) − 1 + lr,  lr = clamp(log π_θ(a) − log π_ref(a), −20, 20).

    r = π_ref/π_θ = exp(−lr) has E_{π_θ}[r] = 1, so k3 = (r − 1) − log r is unbiased and ≥ 0.
    Used as the GRPO KL loss (Shao et al. 2024, arXiv:2402.03300, Eq. 4).

    Args: (B, L) each. Returns: (B, L).
    """
    _check(logprobs, ref_logprobs)
    lr = (logprobs - ref_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.expm1(-lr) + lr


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, loss_mask: torch.Tensor, *,
               estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate, 0 where ``loss_mask`` is False.

    Masked entries are replaced before any arithmetic, so NaN/inf there reaches neither the value
    nor the gradient.

    Args:
        logprobs: (B, L) log π_θ of the sampled tokens.
        ref_logprobs: (B, L) log π_ref of the same tokens.
        loss_mask: (B, L) bool, True = trained-on token.
        estimator: a name in ``KL_ESTIMATORS`` ("k1", "k2", "k3").
    Returns:
        (B, L); 0 where loss_mask is False.
    """
    check_shapes(logprobs=(logprobs, ("B", "L")), ref_logprobs=(ref_logprobs, ("B", "L")),
                 loss_mask=(loss_mask, ("B", "L")))
    check_mask("loss_mask", loss_mask)
    fn = KL_ESTIMATORS.get(estimator)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = fn(torch.where(loss_mask, logprobs, zero), torch.where(loss_mask, ref_logprobs, zero))
    return torch.where(loss_mask, kl, torch.zeros_like(kl))
