"""Per-token entropy of the policy's next-token distribution, from logits.

H = −Σ_v p_v log p_v = Σ_v p_v (logsumexp(z) − z_v),   p = softmax(z)

−log p_v = logsumexp(z) − z_v is formed without taking the log of a tiny probability, and every
term of the sum is ≥ 0, so nothing cancels.

Where this module departs from verl's ``verl/utils/torch_functional.py::entropy_from_logits``
(volcengine/verl @ 012be9d9dcb7c38499f23616142870d2682757fc), which computes
logsumexp(z) − Σ_v p_v z_v:

1. verl's form subtracts two numbers of the size of the largest logit; for a peaked
   distribution (small H) in float32 that loses about 1e-6 absolute. Ours sums non-negative terms.
2. Logits of −inf (a vocabulary entry masked out) count as p_v = 0 and contribute 0; verl's
   formula gives 0·(−inf) = NaN there.
3. Half-precision logits are computed in float32 and the result is float32.

>>> import torch
>>> entropy_from_logits(torch.zeros(1, 1, 4))     # uniform over 4: log 4
tensor([[1.3863]])
"""

from __future__ import annotations

import torch

from finegrain.shapes import check_shapes


def _entropy_rows(z: torch.Tensor) -> torch.Tensor:
    """z (N, V) -> (N,)."""
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)                           # (N, 1)
    p = torch.softmax(z, dim=-1)                                             # (N, V)
    # −log p; set to 0 where z = −inf (p = 0 there) so neither 0·inf nor its gradient is NaN
    neg_logp = torch.where(torch.isneginf(z), torch.zeros((), dtype=z.dtype, device=z.device), lse - z)
    return (p * neg_logp).sum(dim=-1)


def entropy_from_logits(logits: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of softmax(logits) at every position.

    Args:
        logits: (B, L, V).
        chunk_size: if set, process this many of the B·L rows at a time, so the (rows, V)
            softmax temporaries never exceed chunk_size × V (the logits themselves are not
            copied). Gradients flow either way; under autograd each chunk's temporaries are
            still kept for backward, so chunking saves most under ``torch.no_grad()``.
    Returns:
        (B, L) entropy in nats (float32 for half-precision input). No mask is applied: reduce
        it with ``finegrain.losses.aggregate`` and a loss_mask.
    """
    check_shapes(logits=(logits, ("B", "L", "V")))
    B, L, V = logits.shape
    rows = logits.reshape(B * L, V)                                          # (B·L, V)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if chunk_size is None or chunk_size >= rows.shape[0]:
        return _entropy_rows(rows).reshape(B, L)
    parts = [_entropy_rows(rows[i:i + chunk_size]) for i in range(0, rows.shape[0], chunk_size)]
    return torch.cat(parts).reshape(B, L)                                    # (B, L)
