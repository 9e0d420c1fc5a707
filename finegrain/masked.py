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


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Largest included entry (a 0-dim tensor); 0 when nothing is included. NaN under a False
    mask is ignored."""
    if not bool(mask.any()):
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x[mask].max()


def group_min_max(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min and max over the row's group. values (B,) -> ((B,), (B,)).

    ``min == max`` says a group is constant *exactly*, which a float mean cannot: seven copies of
    0.3 summed and divided by 7 is not 0.3 in float32, so ``v − mean`` would be a tiny nonzero
    number that a std division then blows up.
    """
    idx, k = group_index(group_ids)
    lo = torch.empty(k, dtype=values.dtype, device=values.device).scatter_reduce_(
        0, idx, values, reduce="amin", include_self=False)
    hi = torch.empty(k, dtype=values.dtype, device=values.device).scatter_reduce_(
        0, idx, values, reduce="amax", include_self=False)
    return lo[idx], hi[idx]


def masked_reverse_cumsum(x: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted return-to-go over the *included* positions only. x, mask (B, L) -> (B, L).

    G_t = Σ_{s≥t, m_s} γ^{k(s)−k(t)} x_s,  k(t) = number of included positions before t.

    Excluded positions neither add their value (NaN there is fine) nor count as a time step for γ:
    a tool-output span in the middle of a response is skipped and the return flows across it.
    Excluded positions of the output are 0.
    """
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x = torch.where(mask, x, zero)
    if gamma == 1.0:
        out = x.flip(1).cumsum(1).flip(1)
    else:
        # a loop over positions: the closed form γ^{−k(t)} Σ_{s≥t} γ^{k(s)} x_s overflows for long
        # responses (0.9^{−3000}); each iteration is one (B,) op
        out = torch.zeros_like(x)
        running = torch.zeros_like(x[:, 0])
        for t in range(x.shape[1] - 1, -1, -1):
            running = torch.where(mask[:, t], x[:, t] + gamma * running, running)
            out[:, t] = running
    return torch.where(mask, out, zero)


def group_loo_mean(values: torch.Tensor, group_ids: torch.Tensor, include: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out group mean: the mean of ``values`` over the *other* included rows of each row's group.

    loo_i = Σ_{j∈g(i), j≠i, include_j} v_j / n_others_i,   n_others_i = #{j∈g(i), j≠i, include_j}
    (loo_i = 0 when n_others_i = 0, e.g. a group of one). Excluded rows still get the mean of
    their group's included rows, and never contribute to anyone's mean, even when they hold NaN.

    Args:  values (B,) float; group_ids (B,) long; include (B,) bool or None (= all rows).
    Returns: loo mean (B,), n_others (B,) float.
    """
    if include is None:
        include = torch.ones_like(values, dtype=torch.bool)
    v = torch.where(include, values, torch.zeros_like(values))
    inc = include.to(values.dtype)
    total, _ = group_sum(v, group_ids)  # (B,)
    count, _ = group_sum(inc, group_ids)  # (B,)
    n_others = count - inc
    loo = (total - v) / n_others.clamp(min=1)
    return torch.where(n_others > 0, loo, torch.zeros_like(loo)), n_others
