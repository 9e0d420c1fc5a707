"""Tests for finegrain.losses.value: the clipped value loss by hand, the unclipped case, masks, metrics."""

from __future__ import annotations

import pytest
import torch

from finegrain.losses.aggregate import aggregate
from finegrain.losses.value import clipped_value_loss, explained_variance
from tests.helpers import M, T, close

ALL = M([[1, 1, 1]])


def test_clipping_by_hand():
    # V_old = 1 everywhere, ε = 0.2, so V_clip = clip(V, 0.8, 1.2):
    #   token 0: V = 1.5 → V_clip = 1.2, R = 2: (V−R)² = 0.25 < (V_clip−R)² = 0.64 → ½·0.64 = 0.32, clipped,
    #            and the gradient through V is 0 (clamp is flat outside the range)
    #   token 1: V = 0.5 → V_clip = 0.8, R = 2: 2.25 > 1.44 → ½·2.25 = 1.125, not clipped, ∂/∂V = V − R = −1.5
    #   token 2: V = 1.1 inside the range, R = 0: both 1.21 → 0.605, not clipped, ∂/∂V = 1.1
    v = T([[1.5, 0.5, 1.1]]).requires_grad_(True)
    loss, metrics = clipped_value_loss(v, T([[1, 1, 1]]), T([[2, 2, 0]]), ALL, value_clip=0.2)
    close(loss.detach(), [[0.32, 1.125, 0.605]])
    close(metrics["clipfrac"], 1 / 3)
    loss.sum().backward()
    close(v.grad, [[0.0, -1.5, 1.1]])


def test_unclipped_case_is_half_squared_error():
    v = T([[1.5, 0.5, 1.1]]).requires_grad_(True)
    loss, metrics = clipped_value_loss(v, T([[1, 1, 1]]), T([[2, 2, 0]]), ALL, value_clip=None)
    close(loss.detach(), [[0.125, 1.125, 0.605]])            # ½(V − R)²
    close(metrics["clipfrac"], 0.0)
    loss.sum().backward()
    close(v.grad, [[-0.5, -1.5, 1.1]])


def test_on_policy_start_is_never_clipped():
    # V == V_old (the first minibatch of a batch): the clipped term equals the unclipped one
    gen = torch.Generator().manual_seed(0)
    v, R = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    mask = torch.rand(4, 5, generator=gen) < 0.7
    clipped, m1 = clipped_value_loss(v, v, R, mask, value_clip=0.1)
    plain, _ = clipped_value_loss(v, v, R, mask, value_clip=None)
    assert torch.equal(clipped, plain) and float(m1["clipfrac"]) == 0.0


def test_masked_entries_give_no_loss_and_no_gradient_even_when_nan():
    v = T([[0.3, float("nan")]]).requires_grad_(True)
    old, R = T([[0.0, float("inf")]]), T([[1.0, float("nan")]])
    loss, metrics = clipped_value_loss(v, old, R, M([[1, 0]]), value_clip=0.2)
    close(loss.detach(), [[0.5 * (0.2 - 1.0) ** 2, 0.0]])      # token 0 clipped at V_old + ε = 0.2
    loss.sum().backward()
    assert torch.equal(v.grad, torch.zeros(1, 2))
    assert all(torch.isfinite(x) for x in metrics.values())


def test_aggregated_with_the_policy_loss_modes():
    v = T([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]])
    R = torch.zeros(2, 3)
    mask = M([[1, 1, 0], [1, 0, 0]])
    loss, _ = clipped_value_loss(v, v, R, mask, value_clip=0.2)   # ½V²: [[0.5, 2, ·], [8, ·, ·]]
    close(aggregate(loss, mask, "token-mean"), (0.5 + 2 + 8) / 3)
    close(aggregate(loss, mask, "seq-mean-token-mean"), (1.25 + 8) / 2)
    close(aggregate(loss, mask, "seq-mean-token-sum"), (2.5 + 8) / 2)


def test_explained_variance():
    R = T([[1, 2, 3, 4]])
    mask = M([[1, 1, 1, 1]])
    close(explained_variance(R, R, mask), 1.0)                     # perfect critic
    close(explained_variance(torch.full_like(R, 2.5), R, mask), 0.0)  # a constant: no better than the mean
    # V = R + [1, −1, 1, −1]: Var(R − V) = 4/3, Var(R) = 5/3 (unbiased) → 1 − 0.8 = 0.2
    close(explained_variance(R + T([[1, -1, 1, -1]]), R, mask), 0.2)
    close(explained_variance(R, torch.ones(1, 4), mask), 0.0)      # constant returns: defined as 0
    # masked entries are ignored
    close(explained_variance(T([[1, 2, 99]]), T([[1, 2, -50]]), M([[1, 1, 0]])), 1.0)


def test_metrics_and_errors():
    v, R = T([[1.0, 3.0]]), T([[2.0, 2.0]])
    _, metrics = clipped_value_loss(v, v, R, M([[1, 1]]), value_clip=0.5)
    close(metrics["value_mean"], 2.0)
    close(metrics["return_mean"], 2.0)
    assert set(metrics) == {"clipfrac", "explained_var", "value_mean", "return_mean"}
    with pytest.raises(ValueError, match="value_clip must be > 0"):
        clipped_value_loss(v, v, R, M([[1, 1]]), value_clip=0.0)
    with pytest.raises(ValueError, match="returns: expected shape"):
        clipped_value_loss(v, v, R[:, :1], M([[1, 1]]))
    with pytest.raises(TypeError, match="masks must be torch.bool"):
        clipped_value_loss(v, v, R, torch.ones(1, 2))
