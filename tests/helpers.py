"""Shared test helpers: the default tolerances and small tensor constructors."""

import torch

RTOL, ATOL = 1e-5, 1e-6  # style.md: defaults; tests/test_tolerances.py rejects rtol > 1e-2


def close(actual, expected):
    """assert_close at the default tolerances, with ``expected`` cast to ``actual``'s dtype."""
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=RTOL, atol=ATOL)


def T(rows):
    return torch.tensor(rows, dtype=torch.float32)


def M(rows):
    return torch.tensor(rows, dtype=torch.bool)
