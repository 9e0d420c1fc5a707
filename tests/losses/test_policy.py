"""Tests for finegrain.losses.policy: worked examples (a), loop references (b), invariances (c)."""

from __future__ import annotations

import math

import pytest
import torch

from finegrain.losses import POLICY_LOSSES
from finegrain.losses.policy import ppo_clip, reinforce
from tests.reference import loops
from tests.helpers import close

METRIC_KEYS = {"clipfrac", "ratio_mean", "ratio_max", "approx_kl"}


def log(xs):
    return torch.log(torch.tensor(xs, dtype=torch.float32))


def random_batch(seed: int, B: int, L: int):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=gen) * 3                        # log-probs in (−3, 0]
    logprobs = old + torch.randn(B, L, generator=gen) * 0.4           # ratios spread around 1
    advantages = torch.randn(B, L, generator=gen)
    loss_mask = torch.rand(B, L, generator=gen) < 0.7
    return logprobs, old, advantages, loss_mask


# ------------------------------------------------------------------------------ (a) worked examples

# Four tokens, ε = 0.2 (clip range [0.8, 1.2]):
#   A = +1, ρ = 0.5: max(−0.5, −0.8) = −0.5    not clipped (ratio moved against the advantage)
#   A = +1, ρ = 1.5: max(−1.5, −1.2) = −1.2    clipped
#   A = −1, ρ = 0.5: max( 0.5,  0.8) =  0.8    clipped
#   A = −1, ρ = 1.5: max( 1.5,  1.2) =  1.5    not clipped
# clipfrac = 2/4; ratio_mean = (0.5 + 1.5 + 0.5 + 1.5)/4 = 1; ratio_max = 1.5;
# approx_kl = mean((ρ − 1) − ln ρ) = ((−0.5 + ln 2) + (0.5 − ln 1.5)) / 2
WORKED_LP = log([[0.5, 1.5, 0.5, 1.5]])
WORKED_OLD = torch.zeros(1, 4)
WORKED_A = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
WORKED_M = torch.ones(1, 4, dtype=torch.bool)


def test_ppo_clip_worked_example():
    loss, metrics = ppo_clip(WORKED_LP, WORKED_OLD, WORKED_A, WORKED_M)
    close(loss, [[-0.5, -1.2, 0.8, 1.5]])
    assert set(metrics) == METRIC_KEYS
    close(metrics["clipfrac"], 0.5)
    close(metrics["ratio_mean"], 1.0)
    close(metrics["ratio_max"], 1.5)
    close(metrics["approx_kl"], ((-0.5 + math.log(2)) + (0.5 - math.log(1.5))) / 2)
    assert all(v.dim() == 0 for v in metrics.values())


def test_ppo_clip_asymmetric_clip_higher():
    # clip_high = 0.28: A = +1, ρ = 1.5 -> −min(1.5, 1.28) = −1.28;
    # clip_low = 0.1: A = −1, ρ = 0.5 -> max(0.5, 0.9) = 0.9
    loss, _ = ppo_clip(WORKED_LP, WORKED_OLD, WORKED_A, WORKED_M, clip_low=0.1, clip_high=0.28)
    close(loss, [[-0.5, -1.28, 0.9, 1.5]])


def test_ppo_clip_dual_clip():
    # A = −1, ρ = 4: PPO gives max(4, 1.2) = 4; dual clip c = 3 caps it at −A·c = 3.
    # A = −1, ρ = 2: max(2, 1.2) = 2 < 3, unchanged. A = +2, ρ = 4: −2·1.2 = −2.4, dual clip
    # never applies to A > 0. clipfrac = 2/3 (dual-clipped token and the A > 0 token).
    lp, old = log([[4.0, 2.0, 4.0]]), torch.zeros(1, 3)
    A, m = torch.tensor([[-1.0, -1.0, 2.0]]), torch.ones(1, 3, dtype=torch.bool)
    loss, metrics = ppo_clip(lp, old, A, m, dual_clip_c=3.0)
    close(loss, [[3.0, 2.0, -2.4]])
    close(metrics["clipfrac"], 2 / 3)
    loss_off, _ = ppo_clip(lp, old, A, m)
    close(loss_off, [[4.0, 2.0, -2.4]])


def test_ppo_clip_gradient_worked_example():
    # ∂l/∂log π = −A ρ where the unclipped term is active, 0 where clipped:
    # tokens 0 and 3 are unclipped: −(1)(0.5) = −0.5 and −(−1)(1.5) = 1.5; tokens 1, 2 clipped: 0.
    lp = WORKED_LP.clone().requires_grad_()
    loss, _ = ppo_clip(lp, WORKED_OLD, WORKED_A, WORKED_M)
    loss.sum().backward()
    close(lp.grad, [[-0.5, 0.0, 0.0, 1.5]])


def test_reinforce_worked_example():
    # On-policy (ρ = 1): l = −A, ∂l/∂log π = −A.
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, metrics = reinforce(lp, lp.detach().clone(), torch.tensor([[2.0, -0.5]]),
                              torch.ones(1, 2, dtype=torch.bool))
    close(loss, [[-2.0, 0.5]])
    loss.sum().backward()
    close(lp.grad, [[-2.0, 0.5]])
    close(metrics["clipfrac"], 0.0)
    close(metrics["ratio_mean"], 1.0)
    close(metrics["approx_kl"], 0.0)


def test_reinforce_off_policy_is_importance_weighted():
    # ρ = 2, A = 1: l = −2 and ∂l/∂log π = −2 (no clipping).
    lp = torch.tensor([[math.log(2.0)]], requires_grad=True)
    loss, _ = reinforce(lp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool))
    close(loss, [[-2.0]])
    loss.sum().backward()
    close(lp.grad, [[-2.0]])


# ------------------------------------------------------------------------------ (b) loop references

SHAPES = [(1, 1), (2, 5), (6, 3), (9, 11)]
CONFIGS = [
    ("ppo_clip", {}),
    ("ppo_clip", {"clip_low": 0.2, "clip_high": 0.28}),
    ("ppo_clip", {"clip_low": 0.1, "clip_high": 0.3, "dual_clip_c": 3.0}),
    ("ppo_clip", {"dual_clip_c": 1.5}),
    ("reinforce", {}),
]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("B,L", SHAPES)
@pytest.mark.parametrize("name,kw", CONFIGS)
def test_matches_loop(seed, B, L, name, kw):
    lp, old, A, m = random_batch(seed, B, L)
    loss, metrics = POLICY_LOSSES.get(name)(lp, old, A, m, **kw)
    ref_loss, ref_metrics = loops.policy_loss(lp.tolist(), old.tolist(), A.tolist(), m.tolist(), kind=name, **kw)
    close(loss, ref_loss)
    assert set(metrics) == set(ref_metrics) == METRIC_KEYS
    for key in METRIC_KEYS:
        close(metrics[key], ref_metrics[key])


# ------------------------------------------------------------------------------ (c) invariances

NAMES = ["ppo_clip", "reinforce"]


@pytest.mark.parametrize("name,kw", CONFIGS)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_garbage_under_mask_changes_no_output(name, kw, garbage):
    lp, old, A, m = random_batch(5, 6, 7)
    clean_loss, clean_metrics = POLICY_LOSSES.get(name)(lp, old, A, m, **kw)
    g = torch.full_like(lp, garbage)
    dirty_loss, dirty_metrics = POLICY_LOSSES.get(name)(
        torch.where(m, lp, g), torch.where(m, old, g), torch.where(m, A, g), m, **kw)
    assert torch.equal(clean_loss, dirty_loss)
    for key in METRIC_KEYS:
        assert torch.equal(clean_metrics[key], dirty_metrics[key]), key


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_gradient_flows_and_is_zero_at_masked_tokens_even_with_garbage(name, kw):
    lp, old, A, m = random_batch(6, 5, 8)
    lp = torch.where(m, lp, torch.full_like(lp, float("nan"))).requires_grad_()
    old = torch.where(m, old, torch.full_like(old, float("inf")))
    loss, _ = POLICY_LOSSES.get(name)(lp, old, A, m, **kw)
    loss.sum().backward()
    assert torch.isfinite(lp.grad).all()
    assert torch.equal(lp.grad[~m], torch.zeros_like(lp.grad[~m]))
    assert (lp.grad[m] != 0).any()


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_gradient_matches_analytic(name, kw):
    # ∂l/∂log π = −A ρ on tokens whose loss is the unclipped −A ρ, 0 on clipped tokens.
    lp, old, A, m = random_batch(7, 4, 6)
    lp.requires_grad_()
    loss, _ = POLICY_LOSSES.get(name)(lp, old, A, m, **kw)
    loss.sum().backward()
    rho = (lp.detach() - old).exp()
    unclipped = torch.isclose(loss.detach(), -A * rho) & m
    expected = torch.where(unclipped, -A * rho, torch.zeros_like(rho))
    close(lp.grad, expected)


@pytest.mark.parametrize("name", NAMES)
def test_no_gradient_to_old_logprobs_or_advantages(name):
    lp, old, A, m = random_batch(8, 3, 4)
    old.requires_grad_()
    A.requires_grad_()
    lp.requires_grad_()
    loss, metrics = POLICY_LOSSES.get(name)(lp, old, A, m)
    loss.sum().backward()
    assert old.grad is None and A.grad is None
    assert not any(v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("name", NAMES)
def test_permuting_the_batch_permutes_the_loss(name):
    lp, old, A, m = random_batch(9, 7, 5)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    loss, metrics = POLICY_LOSSES.get(name)(lp, old, A, m)
    loss_p, metrics_p = POLICY_LOSSES.get(name)(lp[perm], old[perm], A[perm], m[perm])
    close(loss_p, loss[perm])
    for key in METRIC_KEYS:
        close(metrics_p[key], metrics[key])


@pytest.mark.parametrize("name", NAMES)
def test_empty_mask_gives_zero_loss_and_metrics(name):
    lp, old, A, _ = random_batch(10, 3, 4)
    m = torch.zeros(3, 4, dtype=torch.bool)
    loss, metrics = POLICY_LOSSES.get(name)(lp, old, A, m)
    assert torch.equal(loss, torch.zeros(3, 4))
    assert all(float(v) == 0.0 for v in metrics.values())


def test_extreme_log_ratio_is_clamped_and_finite():
    # log ρ = ±1000 is clamped to ±20: ρ = e^20 (A = −1 -> loss e^20), ρ = e^−20 (A = −1 -> 0.8).
    lp = torch.tensor([[1000.0, -1000.0]])
    loss, metrics = ppo_clip(lp, torch.zeros(1, 2), -torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool))
    close(loss, [[math.exp(20.0), 0.8]])
    assert all(torch.isfinite(v) for v in metrics.values())


def test_ppo_clip_equals_reinforce_inside_the_trust_region():
    # With every ρ inside [1 − ε, 1 + ε] nothing is clipped and both losses agree.
    lp, old, A, m = random_batch(11, 4, 5)
    lp = old + (lp - old).clamp(-0.1, 0.1)
    close(ppo_clip(lp, old, A, m)[0], reinforce(lp, old, A, m)[0])


# ------------------------------------------------------------------------------ registry and contract

def test_registry():
    assert {"ppo_clip", "reinforce"} <= set(POLICY_LOSSES.names())
    POLICY_LOSSES.check_kwargs("ppo_clip", {"clip_low": 0.2, "clip_high": 0.28, "dual_clip_c": 3.0}, "loss.kwargs")
    with pytest.raises(ValueError, match="unknown key"):
        POLICY_LOSSES.check_kwargs("reinforce", {"clip_low": 0.2}, "loss.kwargs")


def test_bad_arguments():
    lp, old, A, m = random_batch(0, 2, 3)
    with pytest.raises(ValueError, match="dual_clip_c"):
        ppo_clip(lp, old, A, m, dual_clip_c=1.0)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip(lp, old, A[:, :2], m)
    with pytest.raises(TypeError, match="bool"):
        reinforce(lp, old, A, m.long())
