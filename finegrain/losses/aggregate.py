"""Reducing a per-token loss (B, L) to the scalar that is back-propagated.

Every entry has the ``AGGREGATIONS`` signature::

    fn(per_token_loss (B, L), loss_mask (B, L) bool, *, constant: float | None = None) -> 0-dim Tensor

Write l_{i,t} for the per-token loss, m_{i,t} for the mask, n_i = Σ_t m_{i,t}, and B⁺ for the
number of rows with n_i > 0.

token-mean               Σ_i Σ_t m l / Σ_i n_i
    Every token weighs the same whatever its sequence's length (DAPO; verl's default).
seq-mean-token-mean      (1/B⁺) Σ_i (Σ_t m l / n_i)
    Every *sequence* weighs the same, so a token of a long sequence weighs less (original GRPO).
    With a negative advantage, a long wrong answer is punished less per token.
seq-mean-token-sum       (1/B⁺) Σ_i Σ_t m l
    No per-token down-weighting; the loss scale grows with response length.
seq-mean-token-sum-norm  Σ_i Σ_t m l / (B⁺ · C)
    Token sums divided by a constant C (Dr.GRPO): no length in the batch changes a token's weight.

With dense (per-token or per-step) advantages, only ``seq-mean-token-mean`` makes a token's weight
depend on the length of its own sequence.

Where this module departs from the papers and from verl's ``agg_loss``
(volcengine/verl @ 012be9d9dcb7c38499f23616142870d2682757fc):

1. Rows with no trained token (n_i = 0) are left out of every seq-mean (B⁺, not B), so adding an
   empty row changes nothing. verl's ``seq-mean-token-mean`` divides 0 by 0 for such a row (NaN),
   and its ``seq-mean-token-sum`` counts it in the mean. An all-False batch gives 0, not NaN.
2. ``seq-mean-token-sum-norm`` divides by B⁺·C as Dr.GRPO does (oat ``masked_sum(...,
   constant_normalizer)`` per sequence, then a mean over sequences). verl at the commit above
   divides the sum over sequences by C only, without the 1/B.
3. The normalisers are local to this (micro)batch. Gradient-accumulation and data-parallel
   normalisers are the trainer's job.

>>> import torch
>>> l = torch.tensor([[1., 1., 1., 1.], [4., 0., 0., 0.]])
>>> m = torch.tensor([[True, True, True, True], [True, False, False, False]])
>>> aggregate(l, m, "token-mean")            # (4 + 4) / 5
tensor(1.6000)
>>> aggregate(l, m, "seq-mean-token-mean")   # (4/4 + 4/1) / 2
tensor(2.5000)
>>> aggregate(l, m, "seq-mean-token-sum")    # (4 + 4) / 2
tensor(4.)
>>> aggregate(l, m, "seq-mean-token-sum-norm", constant=8.0)   # (4 + 4) / (2 · 8)
tensor(0.5000)
"""

from __future__ import annotations

import torch

from finegrain.losses import AGGREGATIONS
from finegrain.masked import masked_mean, masked_sum
from finegrain.shapes import check_mask, check_shapes


def _check(per_token_loss, loss_mask, constant, mode) -> None:
    check_shapes(per_token_loss=(per_token_loss, ("B", "L")), loss_mask=(loss_mask, ("B", "L")))
    check_mask("loss_mask", loss_mask)
    if constant is not None and mode != "seq-mean-token-sum-norm":
        raise ValueError(f"aggregation '{mode}' takes no constant (got {constant}); "
                         "only 'seq-mean-token-sum-norm' does")


@AGGREGATIONS.register("token-mean")
def token_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, *, constant: float | None = None
               ) -> torch.Tensor:
    """Σ_i Σ_t m l / Σ_i Σ_t m: the mean over all trained tokens of the batch.

    DAPO (arXiv:2503.14476, token-level policy-gradient loss); verl ``agg_loss`` "token-mean".

    Args:
        per_token_loss: (B, L).
        loss_mask: (B, L) bool, True = trained-on token; other entries are never read.
        constant: must be None.
    Returns:
        0-dim tensor; 0 if no token is trained.
    """
    _check(per_token_loss, loss_mask, constant, "token-mean")
    return masked_mean(per_token_loss, loss_mask)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, *,
                        constant: float | None = None) -> torch.Tensor:
    """(1/B⁺) Σ_i (Σ_t m l / n_i): mean per sequence, then mean over non-empty sequences.

    The original GRPO objective (Shao et al. 2024, arXiv:2402.03300, Eq. 3); verl ``agg_loss``
    "seq-mean-token-mean".

    Args and Returns: as ``token_mean``. Rows with n_i = 0 are left out of the mean.
    """
    _check(per_token_loss, loss_mask, constant, "seq-mean-token-mean")
    per_seq = masked_mean(per_token_loss, loss_mask, dim=1)       # (B,)
    return masked_mean(per_seq, loss_mask.any(dim=1))


@AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, *,
                       constant: float | None = None) -> torch.Tensor:
    """(1/B⁺) Σ_i Σ_t m l: sum per sequence, then mean over non-empty sequences.

    verl ``agg_loss`` "seq-mean-token-sum".

    Args and Returns: as ``token_mean``. Rows with n_i = 0 are left out of the mean.
    """
    _check(per_token_loss, loss_mask, constant, "seq-mean-token-sum")
    per_seq = masked_sum(per_token_loss, loss_mask, dim=1)        # (B,)
    return masked_mean(per_seq, loss_mask.any(dim=1))


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, *,
                            constant: float | None = None) -> torch.Tensor:
    """Σ_i Σ_t m l / (B⁺ · C): sum per sequence divided by a constant C, mean over sequences.

    Dr.GRPO (Liu et al. 2025, arXiv:2503.20783): C is the generation budget (max new tokens; 3000
    in the official scripts), the same for every batch, so no length in the batch rescales a
    token's gradient. ``constant=None`` uses C = L, the padded response length of this batch, as
    verl's "seq-mean-token-sum-norm" does; pass the generation budget to make C truly constant
    across batches.

    Args:
        per_token_loss, loss_mask: as ``token_mean``.
        constant: C > 0, or None for L.
    Returns:
        0-dim tensor; 0 if no token is trained.
    """
    _check(per_token_loss, loss_mask, constant, "seq-mean-token-sum-norm")
    C = float(per_token_loss.shape[1] if constant is None else constant)
    if C <= 0:
        raise ValueError(f"constant must be > 0, got {constant}")
    per_seq = masked_sum(per_token_loss, loss_mask, dim=1) / C    # (B,)
    return masked_mean(per_seq, loss_mask.any(dim=1))


def aggregate(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, mode: str, *,
              constant: float | None = None) -> torch.Tensor:
    """Look ``mode`` up in ``AGGREGATIONS`` and apply it. An unknown mode lists the valid ones."""
    return AGGREGATIONS.get(mode)(per_token_loss, loss_mask, constant=constant)
