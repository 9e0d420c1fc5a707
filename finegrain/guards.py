"""Stop a step on non-finite numbers before the optimizer moves any weight (and so before any save).

A NaN reward weight or an infinite learning rate used to turn every weight into NaN at step 1 and
then *checkpoint* them. Now the first non-finite loss, reward, advantage or gradient norm raises
``NonFiniteError`` naming what and where; the run stops with its last checkpoint intact, and a
resume starts from it.
"""

from __future__ import annotations

import torch


class NonFiniteError(ValueError):
    """A loss, reward, advantage or gradient was NaN or infinite."""


def check_finite(where: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise ``NonFiniteError`` if ``x`` (where ``mask`` is True, if given) holds NaN or ±inf."""
    vals = x if mask is None else x[mask]
    if vals.numel() and not bool(torch.isfinite(vals).all()):
        n = int((~torch.isfinite(vals)).sum())
        raise NonFiniteError(f"{where}: {n} non-finite value(s) (NaN or inf); stopped before the optimizer step, "
                             f"nothing saved")


def clip_and_step(params, optimizer, grad_clip: float, where: str) -> float:
    """Clip the global gradient norm (``grad_clip`` ≤ 0: no clipping), refuse a non-finite norm,
    then ``optimizer.step()``. Returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(gnorm, "full_tensor"):  # a sharded model's norm is a (replicated) DTensor
        gnorm = gnorm.full_tensor()
    if not bool(torch.isfinite(gnorm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"{where}: gradient norm is {float(gnorm)}; stopped before the optimizer step, "
                             f"nothing saved")
    optimizer.step()
    return float(gnorm)
