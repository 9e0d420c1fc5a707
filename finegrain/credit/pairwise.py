"""Pairwise preferences → per-response advantages (Think-RM), and the ``passthrough`` estimator.

Think-RM (docs/methods.md §25d) judges every unordered pair (i, j), i < j, of one prompt's G
samples once and turns the verdicts into an antisymmetric matrix of reward differences::

    D[i, j] = d_ij,   D[j, i] = −d_ij,   D[i, i] = 0           (d_ij > 0: i is better than j)
    A_i = ((1/G) Σ_j D[i, j]) / sqrt( Σ_{j,k} D[j, k]² / (2 G (G − 1)) + ε ),   ε = 1e-6

with the sums over the group of i. If D[j, k] = r_j − r_k for some scores r, the numerator is
r_i − mean r and Σ_{j,k} (r_j − r_k)² = 2G Σ_j (r_j − mean r)², so A_i = (r_i − mean r) /
sqrt(var_unbiased r + ε): GRPO's advantage with ε under the root.

Source: IlgeeHong/Think-RM @2976ace75afac0573cdf38967f733c007f3062be,
PairwiseRLHF/verl/trainer/ppo/core_algos.py::compute_grpo_difference_advantage (the formula) and
PairwiseRLHF/verl/workers/reward_manager/batch_pref.py (pairs i < j within a uid, D from d_ij).

How it fits finegrain's contracts: the verdicts belong to the ``think_rm`` reward signal
(``finegrain/rewards/think_rm.py``), which calls ``pairwise_advantage`` and returns A_i as its
outcome value; the configured estimator is ``passthrough``, which puts R_i = A_i on every trained
token unchanged. An estimator cannot do the normalisation itself: it receives one reward per
row, and Σ_{j,k} D[j, k]² is not a function of the row sums of D.

Departures from the reference code:

1. G is the number of rows of the group in the batch, not the configured group size, so a group
   a per-row filter shrank is normalised over the rows that are trained. The reference raises
   unless every group has exactly ``num_repeat`` members.
2. A group of one has no pair: A = 0 (the reference's 2G(G − 1) = 0 would divide by zero).
3. Groups are found from ``group_ids`` in any order, never by contiguity or by NaN patterns in a
   dense (B, B) matrix; only the O(B·G) pair list is stored.
4. A pair that is not listed counts as D = 0, which is Think-RM's "unparsable → 0".

>>> import torch
>>> rows = torch.tensor([[0, 1], [0, 2], [1, 2]])            # one group of 3: every pair once
>>> d = torch.tensor([1., 1., 0.])                            # 0 beats 1 and 2; 1 ties 2
>>> pairwise_advantage(rows, d, torch.tensor([7, 7, 7]))      # (2/3, −1/3, −1/3) / sqrt(4/12 + 1e-6)
tensor([ 1.1547, -0.5773, -0.5773])
"""

from __future__ import annotations

import torch

from finegrain.credit import ADVANTAGES
from finegrain.masked import masked_sum
from finegrain.shapes import check_mask, check_shapes


def group_pairs(group_ids: torch.Tensor) -> torch.Tensor:
    """Every unordered pair (i, j), i < j, of rows with the same group id, in row-major order.

    Args: group_ids (B,) long, in any order.
    Returns: (P, 2) long, P = Σ_g n_g (n_g − 1) / 2.

    >>> group_pairs(torch.tensor([4, 9, 4, 4])).tolist()
    [[0, 2], [0, 3], [2, 3]]
    """
    check_shapes(group_ids=(group_ids, ("B",)))
    B = group_ids.shape[0]
    same = group_ids[:, None] == group_ids[None, :]                                       # (B, B)
    upper = torch.ones(B, B, dtype=torch.bool, device=group_ids.device).triu(diagonal=1)   # (B, B)
    return (same & upper).nonzero()                                                       # (P, 2)


@torch.no_grad()
def pairwise_advantage(pair_rows: torch.Tensor, pair_diffs: torch.Tensor, group_ids: torch.Tensor, *,
                       eps: float = 1e-6) -> torch.Tensor:
    """Think-RM's advantage from pairwise reward differences (formula in the module docstring).

    A_i = (s_i / n) / sqrt(Q_g / (2 n (n − 1)) + ε)     for n = n_g ≥ 2, else 0
    s_i = Σ_j D[i, j] = Σ_{(i,j)} d_ij − Σ_{(j,i)} d_ji,   Q_g = Σ_{j,k∈g} D[j, k]² = 2 Σ_{pairs of g} d²

    Args:
        pair_rows: (P, 2) long; row p = (i, j), two distinct rows of one group, i as A, j as B;
            each unordered pair at most once (``group_pairs`` gives them all).
        pair_diffs: (P,) float; d_ij > 0 means row i is better. Missing pairs count as 0.
        group_ids: (B,) long; samples of one prompt share an id, in any order.
        eps: ε under the square root (Think-RM: 1e-6).
    Returns:
        advantages (B,), dtype of ``pair_diffs``; 0 for a group of one and for a group whose
        differences are all 0.
    Raises:
        ValueError (one line) for a pair across groups, a row paired with itself, a repeated
        pair, or a row index out of range.
    """
    check_shapes(pair_rows=(pair_rows, ("P", 2)), pair_diffs=(pair_diffs, ("P",)), group_ids=(group_ids, ("B",)))
    B, dev = group_ids.shape[0], group_ids.device
    i, j = pair_rows[:, 0], pair_rows[:, 1]                                   # (P,) each
    if pair_rows.numel():
        if int(pair_rows.min()) < 0 or int(pair_rows.max()) >= B:
            raise ValueError(f"pairwise_advantage: pair rows must be in [0, {B}), got "
                             f"[{int(pair_rows.min())}, {int(pair_rows.max())}]")
        if bool((i == j).any()):
            raise ValueError("pairwise_advantage: a row is paired with itself")
        if bool((group_ids[i] != group_ids[j]).any()):
            raise ValueError("pairwise_advantage: a pair joins rows of different groups")
        key = torch.minimum(i, j) * B + torch.maximum(i, j)                  # (P,) the unordered pair
        if key.unique().numel() != key.numel():
            raise ValueError("pairwise_advantage: an unordered pair is listed twice")
    _, inverse, counts = group_ids.unique(return_inverse=True, return_counts=True)
    n = counts[inverse].to(pair_diffs.dtype)                                 # (B,) group size of each row
    row_sum = torch.zeros(B, dtype=pair_diffs.dtype, device=dev)
    row_sum.index_add_(0, i, pair_diffs).index_add_(0, j, -pair_diffs)       # (B,) Σ_j D[i, j]
    sq = torch.zeros(counts.shape[0], dtype=pair_diffs.dtype, device=dev)
    sq.index_add_(0, inverse[i], 2 * pair_diffs ** 2)                        # (n_groups,) Σ_{j,k} D[j, k]²
    big = n > 1
    denom = torch.sqrt(sq[inverse] / (2 * n * (n - 1)).clamp(min=1) + eps)   # (B,)
    return torch.where(big, (row_sum / n) / denom, torch.zeros_like(row_sum))


@ADVANTAGES.register("passthrough", consumes="outcome")
@torch.no_grad()
def passthrough(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor,
                step_ids: torch.Tensor) -> torch.Tensor:
    """The summed outcome reward is the advantage, broadcast to every trained token.

    R_i = Σ_t m_{i,t} r_{i,t};   A_{i,t} = R_i · m_{i,t}

    For signals that already give a normalised advantage per response (``think_rm``'s A_i). With
    ``advantage.whiten`` false and the signal's weight 1, the trainer's advantage is exactly the
    signal's value; other signals in the same run add their weighted outcome reward to R_i.

    Args:
        token_rewards: (B, L) float; outcome rewards sit on the last trained token.
        loss_mask: (B, L) bool, True = trained-on token; rewards elsewhere are ignored.
        group_ids: (B,) long; unused (any grouping happened in the signal).
        step_ids: (B, L) long; unused.
    Returns:
        advantages (B, L); 0 where loss_mask is False.
    """
    check_shapes(token_rewards=(token_rewards, ("B", "L")), loss_mask=(loss_mask, ("B", "L")),
                 group_ids=(group_ids, ("B",)), step_ids=(step_ids, ("B", "L")))
    check_mask("loss_mask", loss_mask)
    R = masked_sum(token_rewards, loss_mask, dim=1)                          # (B,)
    return torch.where(loss_mask, R[:, None], torch.zeros((), dtype=R.dtype, device=R.device))   # (B, L)
