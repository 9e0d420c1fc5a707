"""Sum per-source advantages with coefficients that are really applied, then optionally whiten.

PRIME computes one leave-one-out return per reward source (implicit PRM, outcome verifier) and
adds them (arXiv:2502.01456 §3: "calculate their returns separately before summing together").

Where this departs from the reference code:

1. Every coefficient multiplies its source's advantage. In PRIME-RL/PRIME
   training/verl/trainer/ppo/core_algos.py::compute_rloo_returns (fork zkcpku/PRIME @ 8d6a5e6c)
   the function reads no coefficient at all, so the configured reward coefficients never reach
   the advantages. verl's recipe (recipe/prime/prime_core_algos.py) multiplies by
   ``dpo_coef``/``gt_coef``, as we do.
2. A source without a coefficient, or a coefficient for a source that is not there, is an error
   naming it (a silent default of 1, or an unused coefficient, hides config typos).
3. Whitening is over ``loss_mask`` (trained tokens); the reference whitens over the response
   mask, which includes tool or forced tokens when there are any.
"""

from __future__ import annotations

import torch

from finegrain.masked import masked_whiten
from finegrain.shapes import check_mask, check_shapes


@torch.no_grad()
def combine_source_advantages(per_source: dict[str, torch.Tensor], coefs: dict[str, float],
                              loss_mask: torch.Tensor, *, whiten: bool) -> torch.Tensor:
    """A = Σ_s c_s · A_s, then (if ``whiten``) A ← (A − μ) / sqrt(σ² + 1e-8) over trained tokens.

    μ and σ² are the mean and unbiased variance of A over all positions with loss_mask True
    (``finegrain.masked.masked_whiten``, same convention as verl ``masked_whiten``).

    Args:
        per_source: {source name: advantages (B, L)}, e.g. {'implicit_prm': ..., 'verifier': ...}.
        coefs: {source name: c_s}; must name exactly the sources of ``per_source``.
        loss_mask: (B, L) bool, True = trained-on token.
        whiten: whiten the sum over the batch's trained tokens (PRIME does).
    Returns:
        advantages (B, L); 0 where loss_mask is False.
    Raises:
        KeyError naming a source that has no coefficient, or a coefficient with no source.
        ValueError if ``per_source`` is empty.
    """
    if not per_source:
        raise ValueError("combine_source_advantages: per_source is empty")
    missing = [name for name in per_source if name not in coefs]
    if missing:
        raise KeyError(f"advantage coefficients: no coefficient for source(s) {missing}; given: {sorted(coefs)}")
    unused = [name for name in coefs if name not in per_source]
    if unused:
        raise KeyError(f"advantage coefficients: coefficient(s) for unknown source(s) {unused}; "
                       f"sources: {sorted(per_source)}")
    check_mask("loss_mask", loss_mask)
    for name, adv in per_source.items():
        check_shapes(loss_mask=(loss_mask, ("B", "L")), **{name: (adv, ("B", "L"))})
    zero = torch.zeros((), dtype=next(iter(per_source.values())).dtype, device=loss_mask.device)
    total = sum(coefs[name] * torch.where(loss_mask, adv, zero) for name, adv in per_source.items())  # (B, L)
    return masked_whiten(total, loss_mask) if whiten else total
