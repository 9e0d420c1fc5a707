"""Shape checks at function boundaries, and the notation used in every docstring.

Notation for tensor shapes:
    B  sequences in a batch (B = prompts x G)
    G  samples per prompt (group size)
    P  prompt length (left-padded)
    L  response length (right-padded)
    S  steps per response (padded to the batch maximum)
    V  vocabulary size
Masks are ``torch.bool`` and True always means *included*.

>>> import torch
>>> check_shapes(x=(torch.zeros(2, 3), ("B", "L")), m=(torch.zeros(2, 3, dtype=torch.bool), ("B", "L")))
{'B': 2, 'L': 3}
>>> check_shapes(x=(torch.zeros(2, 3), ("B", "L")), g=(torch.zeros(3), ("B",)))
Traceback (most recent call last):
...
ValueError: g: expected shape (B,) with B=2, got (3,)
"""

from __future__ import annotations

import torch


def check_shapes(**named: tuple[torch.Tensor, tuple]) -> dict[str, int]:
    """Check each ``name=(tensor, spec)``; letters in ``spec`` must bind consistently.

    Returns the bound sizes, e.g. ``{"B": 4, "L": 7}``. An int in ``spec`` must match exactly.
    """
    sizes: dict[str, int] = {}
    for name, (t, spec) in named.items():
        if t is None:
            continue
        if t.dim() != len(spec):
            raise ValueError(f"{name}: expected {len(spec)} dims {_fmt(spec)}, got shape {tuple(t.shape)}")
        for dim, want in zip(t.shape, spec):
            if isinstance(want, int):
                if dim != want:
                    raise ValueError(f"{name}: expected shape {_fmt(spec)}, got {tuple(t.shape)}")
            elif want in sizes and sizes[want] != dim:
                bound = ", ".join(f"{k}={sizes[k]}" for k in spec if k in sizes)
                raise ValueError(f"{name}: expected shape {_fmt(spec)} with {bound}, got {tuple(t.shape)}")
            else:
                sizes[want] = dim
    return sizes


def check_mask(name: str, mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: masks must be torch.bool (True = included), got {mask.dtype}")


def _fmt(spec: tuple) -> str:
    inner = ", ".join(str(s) for s in spec)
    return f"({inner},)" if len(spec) == 1 else f"({inner})"
