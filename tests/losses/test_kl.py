"""Tests for finegrain.losses.kl: worked examples (a), loop references (b), invariances (c)."""

from __future__ import annotations

import math

import pytest
import torch

from finegrain.losses import KL_ESTIMATORS
from finegrain.losses.kl import k1, k2, k3, kl_penalty
from tests.reference import loops
from tests.helpers import close

NAMES = ["k1", "k2", "k3"]


def random_batch(seed: int, B: int, L: int):
    gen = torch.Generator().manual_seed(seed)
    ref = -torch.rand(B, L, generator=gen) * 4
    logprobs = ref + torch.randn(B, L, generator=gen)
    mask = torch.rand(B, L, generator=gen) < 0.7
    return logprobs, ref, mask


# ------------------------------------------------------------------------------ (a) worked examples

# Three tokens with log ratio lr = log π_θ − log π_ref = log 2, 0, −log 2.
LP = torch.log(torch.tensor([[0.5, 0.3, 0.1]]))
REF = torch.log(torch.tensor([[0.25, 0.3, 0.2]]))
LN2 = math.log(2)


def test_k1_worked():
    close(k1(LP, REF), [[LN2, 0.0, -LN2]])


def test_k2_worked():
    # ½ lr²: ½ (ln 2)² = 0.2402265 for both ±ln 2
    close(k2(LP, REF), [[0.5 * LN2**2, 0.0, 0.5 * LN2**2]])


def test_k3_worked():
    # exp(−lr) − 1 + lr:  lr = ln 2 -> 1/2 − 1 + ln 2 = 0.1931472;  lr = −ln 2 -> 2 − 1 − ln 2 = 0.3068528
    close(k3(LP, REF), [[0.5 - 1 + LN2, 0.0, 2 - 1 - LN2]])


def test_k1_and_k3_average_to_the_exact_kl():
    # Both are unbiased: Σ_x π_θ(x) k(x) = KL(π_θ ‖ π_ref) exactly over a categorical's support.
    # π_θ = (0.5, 0.3, 0.2), π_ref = (0.25, 0.25, 0.5):
    # KL = 0.5 ln 2 + 0.3 ln 1.2 + 0.2 ln 0.4 = 0.2105...
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64)
    exact = 0.5 * math.log(2) + 0.3 * math.log(1.2) + 0.2 * math.log(0.4)
    for fn in (k1, k3):
        close((p * fn(p.log(), q.log())).sum(), exact)


def test_kl_penalty_worked():
    # Mask out the middle token; k3 as above elsewhere.
    m = torch.tensor([[True, False, True]])
    close(kl_penalty(LP, REF, m), [[0.5 - 1 + LN2, 0.0, 2 - 1 - LN2]])
    close(kl_penalty(LP, REF, m, estimator="k1"), [[LN2, 0.0, -LN2]])


# ------------------------------------------------------------------------------ (b) loop references

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("B,L", [(1, 1), (3, 5), (8, 13)])
@pytest.mark.parametrize("name", NAMES)
def test_matches_loop(seed, B, L, name):
    lp, ref, mask = random_batch(seed, B, L)
    close(KL_ESTIMATORS.get(name)(lp, ref), loops.kl_estimate(lp.tolist(), ref.tolist(), name))
    expected = [[v if m else 0.0 for v, m in zip(row, mrow)]
                for row, mrow in zip(loops.kl_estimate(lp.tolist(), ref.tolist(), name), mask.tolist())]
    close(kl_penalty(lp, ref, mask, estimator=name), expected)


# ------------------------------------------------------------------------------ (c) invariances

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_garbage_under_mask_changes_nothing_and_gets_no_gradient(name, garbage):
    lp, ref, mask = random_batch(1, 5, 6)
    clean = kl_penalty(lp, ref, mask, estimator=name)
    g = torch.full_like(lp, garbage)
    dirty_lp = torch.where(mask, lp, g).requires_grad_()
    dirty = kl_penalty(dirty_lp, torch.where(mask, ref, g), mask, estimator=name)
    assert torch.equal(clean, dirty.detach())
    dirty.sum().backward()
    assert torch.isfinite(dirty_lp.grad).all()
    assert torch.equal(dirty_lp.grad[~mask], torch.zeros_like(dirty_lp.grad[~mask]))


@pytest.mark.parametrize("name", ["k2", "k3"])
def test_nonnegative(name):
    lp, ref, _ = random_batch(2, 16, 16)
    assert (KL_ESTIMATORS.get(name)(lp, ref) >= 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_zero_when_policies_agree(name):
    lp, _, _ = random_batch(3, 4, 4)
    assert torch.equal(KL_ESTIMATORS.get(name)(lp, lp), torch.zeros_like(lp))


def test_k3_clamps_the_log_ratio():
    # lr = −1000 would overflow exp(1000); it is clamped to −20: e^20 − 1 − 20.
    # lr = +1000 clamps to 20: e^−20 − 1 + 20.
    out = k3(torch.tensor([[-1000.0, 1000.0]]), torch.zeros(1, 2))
    close(out, [[math.exp(20) - 21, math.exp(-20) + 19]])


def test_k3_gradient():
    # ∂k3/∂log π_θ = 1 − exp(−lr): at lr = ln 2 that is 1/2.
    lp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    k3(lp, torch.tensor([[math.log(0.25)]])).sum().backward()
    close(lp.grad, [[0.5]])


@pytest.mark.parametrize("name", NAMES)
def test_permuting_the_batch_permutes_the_output(name):
    lp, ref, mask = random_batch(4, 6, 3)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    close(kl_penalty(lp[perm], ref[perm], mask[perm], estimator=name),
          kl_penalty(lp, ref, mask, estimator=name)[perm])


# ------------------------------------------------------------------------------ registry and contract

def test_registry_and_errors():
    assert set(NAMES) <= set(KL_ESTIMATORS.names())
    lp, ref, mask = random_batch(0, 2, 3)
    with pytest.raises(KeyError, match="k3"):
        kl_penalty(lp, ref, mask, estimator="low_var_kl")
    with pytest.raises(ValueError, match="ref_logprobs"):
        k3(lp, ref[:, :2])
    with pytest.raises(TypeError, match="bool"):
        kl_penalty(lp, ref, mask.float())
