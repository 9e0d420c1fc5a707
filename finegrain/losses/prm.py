"""Losses that train an implicit PRM from response-level labels (gradients flow through prm_logprobs).

The implicit PRM's response score is z_i = β Σ_t m_{i,t} (log π_φ(y_{i,t}|·) − log π_ref(y_{i,t}|·))
(Yuan et al. 2024, arXiv:2412.01981; PRIME, arXiv:2502.01456). Training z_i to predict the label
makes every token's β·log-ratio a process reward (``finegrain.rewards.implicit_prm``).

Reference code read: PRIME-RL/PRIME training/verl/trainer/ppo/core_algos.py::compute_ce_dpo_loss_rm
and ::compute_dpo_accuracy (fork zkcpku/PRIME @ 8d6a5e6ca1b566b647c0b12832c96b83802a7aea); the same
two functions in volcengine/verl recipe/prime/prime_core_algos.py (@ 15510e8d).

Where this module departs from the reference code:

1. The CE loss uses ``binary_cross_entropy_with_logits`` on z; the reference applies ``sigmoid``
   first and then ``binary_cross_entropy``, which saturates (log 0 clamped to −100) for |z| ≳ 17.
   Same value elsewhere.
2. Masked positions are removed with ``where``, so NaN or inf there (padding garbage) reaches
   neither the loss nor the gradient; the reference multiplies by the mask (NaN·0 = NaN).
3. Pairs for the DPO loss and ``pair_acc`` come from ``group_ids`` (rows in any order, groups of
   any size). ``compute_dpo_accuracy`` walks contiguous blocks of n_samples rows.
4. ``pair_acc`` pools all (w, l) pairs of the batch and counts a tie z_w = z_l as ½.
   ``compute_dpo_accuracy`` averages per group (a group without a label difference counts 0.5),
   weights pairs by |Δacc|, and scores a tie as right or wrong depending on which of the two rows
   comes first in the batch. For 0/1 labels and no ties the pooled and per-group figures differ
   only in how groups are weighted.
5. The reference trains the PRM with CE only (``PRIME_LOSS = {'ce': ...}``); the DPO loss here
   follows ImplicitPRM's pairwise objective (arXiv:2412.01981 Eq. for L_DPO) on PRIME's online
   groups, pairing every correct response with every incorrect one of the same prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finegrain.shapes import check_mask, check_shapes


def _scores(prm_logprobs, ref_logprobs, mask, beta) -> torch.Tensor:
    """z_i = β Σ_t m_{i,t}(lp_prm − lp_ref): (B,), differentiable in prm_logprobs."""
    zero = torch.zeros((), dtype=prm_logprobs.dtype, device=prm_logprobs.device)
    return beta * torch.where(mask, prm_logprobs - ref_logprobs, zero).sum(dim=1)  # (B,)


def _check(prm_logprobs, ref_logprobs, mask, labels, group_ids=None) -> None:
    check_shapes(prm_logprobs=(prm_logprobs, ("B", "L")), ref_logprobs=(ref_logprobs, ("B", "L")),
                 mask=(mask, ("B", "L")), labels=(labels, ("B",)), group_ids=(group_ids, ("B",)))
    check_mask("mask", mask)
    if not labels.is_floating_point():
        raise TypeError(f"labels: expected a float tensor in [0, 1], got {labels.dtype}")


def implicit_prm_ce_loss(prm_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                         labels: torch.Tensor, *, beta: float = 0.05) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Response-level cross-entropy of the implicit PRM.

    z_i = β Σ_t m_{i,t} (log π_φ(y_{i,t}|·) − log π_ref(y_{i,t}|·))
    L   = (1/B) Σ_i −[ l_i log σ(z_i) + (1 − l_i) log(1 − σ(z_i)) ]

    arXiv:2412.01981 (CE objective, β = 0.05); PRIME's online PRM loss (arXiv:2502.01456 §3,
    core_algos.py::compute_ce_dpo_loss_rm, β = beta_train = 0.05).

    Args:
        prm_logprobs: (B, L) float, log-probs of the response tokens under π_φ (with grad).
        ref_logprobs: (B, L) float, the same under π_ref (no grad needed).
        mask: (B, L) bool, True = real response token; anything elsewhere is ignored.
        labels: (B,) float in [0, 1], e.g. the verifier's accuracy.
        beta: β.
    Returns:
        loss: scalar. metrics (detached): 'acc' = fraction of rows with (z_i > 0) == (l_i > 0.5),
        'score_mean' = mean_i z_i.
    """
    _check(prm_logprobs, ref_logprobs, mask, labels)
    z = _scores(prm_logprobs, ref_logprobs, mask, beta)                          # (B,)
    loss = F.binary_cross_entropy_with_logits(z, labels.to(z.dtype))
    zd = z.detach()
    metrics = {"acc": ((zd > 0) == (labels > 0.5)).float().mean(), "score_mean": zd.mean()}
    return loss, metrics


def implicit_prm_dpo_loss(prm_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                          labels: torch.Tensor, group_ids: torch.Tensor, *, beta: float = 0.05
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise (DPO) loss of the implicit PRM over every better/worse pair of each group.

    z_i = β Σ_t m_{i,t} (log π_φ(y_{i,t}|·) − log π_ref(y_{i,t}|·))
    𝒫   = {(w, l) : g_w = g_l, l_w > l_l}            (for 0/1 labels: correct w, incorrect l)
    L   = (1/|𝒫|) Σ_{(w,l)∈𝒫} −log σ(z_w − z_l)

    arXiv:2412.01981 (DPO objective, β = 0.05); PRIME-RL/PRIME's "dpo_acc" diagnostic
    (core_algos.py::compute_dpo_accuracy) for the pair accuracy.

    Args:
        prm_logprobs, ref_logprobs, mask, labels: as ``implicit_prm_ce_loss``.
        group_ids: (B,) long; rows with equal id are responses to one prompt, in any order.
        beta: β.
    Returns:
        loss: scalar. With no pair (every group all-correct, all-wrong or of one) the loss is
        0 · Σ_i z_i: exactly 0, still attached to the graph, so ``backward()`` works and gives zero
        gradients. metrics (detached): 'n_pairs' = |𝒫|; 'pair_acc' = fraction of pairs with
        z_w > z_l (a tie counts ½; 0.5 when there is no pair).
    """
    _check(prm_logprobs, ref_logprobs, mask, labels, group_ids)
    z = _scores(prm_logprobs, ref_logprobs, mask, beta)                          # (B,)
    pairs = (group_ids[:, None] == group_ids[None, :]) & (labels[:, None] > labels[None, :])  # (B, B) [w, l]
    margin = z[:, None] - z[None, :]                                             # (B, B) z_w − z_l
    n_pairs = pairs.sum()
    if int(n_pairs) == 0:
        loss = 0.0 * z.sum()
        pair_acc = torch.tensor(0.5, device=z.device)
    else:
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        loss = torch.where(pairs, F.softplus(-margin), zero).sum() / n_pairs       # −log σ(x) = softplus(−x)
        md = margin.detach()
        right = (md > 0).float() + 0.5 * (md == 0).float()
        pair_acc = right[pairs].mean()
    return loss, {"n_pairs": n_pairs.detach(), "pair_acc": pair_acc}
