"""Per-token entropy of the policy's next-token distribution, from logits.

H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v,   p = softmax(z)

The logsumexp form never forms log p of a tiny probability and never overflows. It is the form
verl uses (``verl/utils/torch_functional.py::entropy_from_logits``,
volcengine/verl @ 012be9d9dcb7c38499f23616142870d2682757fc).

Where this module departs from verl:

1. Logits of −inf (a vocabulary entry masked out) count as p_v = 0 and contribute 0; verl's
   formula gives 0·(−inf) = NaN there.
2. Half-precision logits are computed in float32 and the result is float32.

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
    lse = torch.logsumexp(z, dim=-1)                                         # (N,)
    p = torch.softmax(z, dim=-1)                                             # (N, V)
    z_finite = torch.where(torch.isneginf(z), torch.zeros((), dtype=z.dtype, device=z.device), z)
    return lse - (p * z_finite).sum(dim=-1)


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
    if chunk_size is None or chunk_size >= rows.shape[0]:
        return _entropy_rows(rows).reshape(B, L)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    parts = [_entropy_rows(rows[i:i + chunk_size]) for i in range(0, rows.shape[0], chunk_size)]
    return torch.cat(parts).reshape(B, L)                                    # (B, L)
