"""Masked reductions and group statistics. All masks are bool, True = included.

Group ids are arbitrary integers (samples of one prompt share an id; rows of a group need not
be contiguous), so group statistics use ``torch.unique(..., return_inverse=True)`` + scatter.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask over ``dim`` (all dims if None). Values under a False mask never reach the sum,
    even when they are NaN or inf (``where``, not multiplication)."""
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·m / max(Σ m, 1). An all-False slice gives 0, not NaN."""
    n = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / n.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the included entries (a scalar). With ``unbiased`` divides by n−1 (n ≥ 2)."""
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    n = mask.sum()
    denom = (n - 1).clamp(min=1) if unbiased else n.clamp(min=1)
    return sq / denom


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over the included entries; excluded entries become 0.

    Same convention as verl ``masked_whiten`` (unbiased variance). ``shift_mean=False`` adds the
    mean back, i.e. only rescales.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out))


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary group ids (B,) to dense indices 0..K−1. Returns (index (B,), K)."""
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    return inv, int(uniq.numel())


def group_mean_std(values: torch.Tensor, group_ids: torch.Tensor, unbiased: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row mean, std and size of the row's group.

    mean_g = (1/n_g) Σ_{j∈g} v_j;  std_g = sqrt(Σ_{j∈g}(v_j − mean_g)² / (n_g − 1))  (n_g − 1 → 1 when n_g = 1)

    Args:  values (B,) float; group_ids (B,) long.
    Returns: mean (B,), std (B,), count (B,) — each row gets its group's statistic.
    A group of one has std 0 (finite).
    """
    idx, k = group_index(group_ids)
    count = torch.zeros(k, dtype=values.dtype, device=values.device).index_add_(0, idx, torch.ones_like(values))
    total = torch.zeros(k, dtype=values.dtype, device=values.device).index_add_(0, idx, values)
    mean = total / count
    dev2 = (values - mean[idx]) ** 2
    ss = torch.zeros(k, dtype=values.dtype, device=values.device).index_add_(0, idx, dev2)
    denom = (count - 1).clamp(min=1) if unbiased else count
    std = (ss / denom).sqrt()
    return mean[idx], std[idx], count[idx]


def group_sum(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum over the row's group and the group size. values (B,) -> ((B,), (B,))."""
    idx, k = group_index(group_ids)
    total = torch.zeros(k, dtype=values.dtype, device=values.device).index_add_(0, idx, values)
    count = torch.zeros(k, dtype=values.dtype, device=values.device).index_add_(0, idx, torch.ones_like(values))
    return total[idx], count[idx]


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True along dim 1 of a (B, L) bool mask; −1 for an all-False row."""
    L = mask.shape[1]
    pos = torch.arange(L, device=mask.device).expand_as(mask)
    return torch.where(mask, pos, torch.full_like(pos, -1)).max(dim=1).values


def reverse_cumsum(x: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted return-to-go along dim 1: G_t = Σ_{s≥t} γ^{s−t} x_s. x (B, L) -> (B, L).

    Zero entries (e.g. masked positions set to 0 by the caller) are passed through, so a
    masked-out token in the middle of a response still counts as one time step for γ.
    """
    if gamma == 1.0:
        return x.flip(1).cumsum(1).flip(1)
    out = torch.zeros_like(x)
    running = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1] - 1, -1, -1):
        running = x[:, t] + gamma * running
        out[:, t] = running
    return out
