"""Tests for finegrain.credit.gae: worked examples (a), a plain-loop reference (b), invariances (c)."""

from __future__ import annotations

import pytest
import torch

from finegrain.credit import ADVANTAGES
from finegrain.credit.gae import gae, gae_advantages_returns
from finegrain.masked import masked_reverse_cumsum
from tests.helpers import M, T, close


def random_batch(seed: int, B: int, L: int):
    """Right-padded masks of random length (some rows empty) with untrained holes anywhere (tool
    output in the middle), dense rewards and values."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=gen)
    loss_mask = torch.arange(L)[None, :] < lengths[:, None]                     # (B, L)
    loss_mask &= ~(torch.rand(B, L, generator=gen) < 0.2)
    rewards = torch.randn(B, L, generator=gen)
    values = torch.randn(B, L, generator=gen)
    return rewards, loss_mask, values


def loop_gae(rewards, loss_mask, values, gamma, lam):
    """Reference: per row, keep only the trained positions, run textbook GAE on that sequence
    (V after the last one = 0), put the results back; 0 elsewhere. Plain Python floats."""
    B, L = rewards.shape
    adv = [[0.0] * L for _ in range(B)]
    ret = [[0.0] * L for _ in range(B)]
    for i in range(B):
        idx = [t for t in range(L) if bool(loss_mask[i, t])]
        r = [float(rewards[i, t]) for t in idx]
        v = [float(values[i, t]) for t in idx] + [0.0]
        a_next = 0.0
        for k in range(len(idx) - 1, -1, -1):
            delta = r[k] + gamma * v[k + 1] - v[k]
            a_next = delta + gamma * lam * a_next
            adv[i][idx[k]] = a_next
            ret[i][idx[k]] = a_next + v[k]
    return torch.tensor(adv), torch.tensor(ret)


def steps(mask):
    return torch.zeros(mask.shape, dtype=torch.long)


def groups(mask):
    return torch.arange(mask.shape[0])


# ------------------------------------------------------------------------------ (a) worked examples

def test_three_token_worked_example():
    # r = [0, 0, 1], V = [0.5, 0.2, 0.8], γ = 0.9, λ = 0.5, so γλ = 0.45 and V after EOS = 0:
    #   δ_2 = 1 + 0.9·0   − 0.8 =  0.2       A_2 = 0.2
    #   δ_1 = 0 + 0.9·0.8 − 0.2 =  0.52      A_1 = 0.52 + 0.45·0.2  = 0.61
    #   δ_0 = 0 + 0.9·0.2 − 0.5 = −0.32      A_0 = −0.32 + 0.45·0.61 = −0.0455
    #   returns = A + V = [0.4545, 0.81, 1.0]
    adv, ret = gae_advantages_returns(T([[0, 0, 1]]), M([[1, 1, 1]]), T([[0.5, 0.2, 0.8]]), gamma=0.9, lam=0.5)
    close(adv, [[-0.0455, 0.61, 0.2]])
    close(ret, [[0.4545, 0.81, 1.0]])


def test_masked_token_in_the_middle_is_skipped():
    # the same response with a tool-output token (mask False) between tokens 0 and 1: skipped, so
    # nothing changes on the trained tokens, and its own reward and value are never read
    r, v = T([[0, 9, 0, 1]]), T([[0.5, -7, 0.2, 0.8]])
    adv, ret = gae_advantages_returns(r, M([[1, 0, 1, 1]]), v, gamma=0.9, lam=0.5)
    close(adv, [[-0.0455, 0.0, 0.61, 0.2]])
    close(ret, [[0.4545, 0.0, 0.81, 1.0]])


def test_lambda_zero_is_the_one_step_td_error():
    r, v, m = T([[0, 0, 1]]), T([[0.5, 0.2, 0.8]]), M([[1, 1, 1]])
    adv, _ = gae_advantages_returns(r, m, v, gamma=0.9, lam=0.0)
    close(adv, [[-0.32, 0.52, 0.2]])


def test_gamma_lambda_one_is_return_to_go_minus_value():
    # A_t = Σ_{l} δ_{t+l} telescopes to Σ_{s≥t} r_s − V_t (V after the end is 0), and R_t = Σ_{s≥t} r_s
    for seed in range(3):
        r, m, v = random_batch(seed, 6, 9)
        adv, ret = gae_advantages_returns(r, m, v, gamma=1.0, lam=1.0)
        rtg = masked_reverse_cumsum(r, m, 1.0)
        close(adv, torch.where(m, rtg - v, torch.zeros(())))
        close(ret, rtg)


def test_last_token_target_is_its_reward():
    # V after the final trained token is 0: R_T = r_T whatever V_T is
    r, m, v = random_batch(7, 8, 6)
    _, ret = gae_advantages_returns(r, m, v, gamma=0.95, lam=0.9)
    last = torch.where(m, torch.arange(6).expand(8, 6), -1).max(dim=1).values
    rows = (last >= 0).nonzero().flatten()
    close(ret[rows, last[rows]], r[rows, last[rows]])


# ------------------------------------------------------------------------------ (b) loop reference

@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.7, 0.0), (0.0, 0.3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_plain_loop(seed, gamma, lam):
    r, m, v = random_batch(seed, 7, 11)
    adv, ret = gae_advantages_returns(r, m, v, gamma=gamma, lam=lam)
    ref_adv, ref_ret = loop_gae(r, m, v, gamma, lam)
    close(adv, ref_adv)
    close(ret, ref_ret)
    close(gae(r, m, groups(m), steps(m), v, gamma=gamma, lam=lam), ref_adv)


# ------------------------------------------------------------------------------ (c) invariances

def test_garbage_under_a_false_mask_changes_nothing():
    r, m, v = random_batch(3, 6, 10)
    adv, ret = gae_advantages_returns(r, m, v, gamma=0.9, lam=0.8)
    r2 = torch.where(m, r, torch.full_like(r, float("nan")))
    v2 = torch.where(m, v, torch.full_like(v, float("inf")))
    adv2, ret2 = gae_advantages_returns(r2, m, v2, gamma=0.9, lam=0.8)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    assert torch.equal(adv[~m], torch.zeros(int((~m).sum()))) and torch.equal(ret[~m], torch.zeros(int((~m).sum())))


def test_permuting_the_batch_permutes_the_output():
    r, m, v = random_batch(4, 9, 7)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    adv, ret = gae_advantages_returns(r, m, v, gamma=0.9, lam=0.95)
    adv_p, ret_p = gae_advantages_returns(r[perm], m[perm], v[perm], gamma=0.9, lam=0.95)
    assert torch.equal(adv_p, adv[perm]) and torch.equal(ret_p, ret[perm])


def test_row_without_trained_tokens_gets_zero():
    r, v = T([[1, 2], [3, 4]]), T([[5, 6], [7, 8]])
    m = M([[0, 0], [1, 1]])
    adv, ret = gae_advantages_returns(r, m, v, gamma=1.0, lam=1.0)
    close(adv[0], [0.0, 0.0])
    close(ret[0], [0.0, 0.0])
    close(adv[1], [3 + 4 - 7, 4 - 8])


# ------------------------------------------------------------------------------ contract

def test_registry_metadata_and_kwargs():
    meta = ADVANTAGES.meta("gae")
    assert meta["consumes"] == "token" and meta["needs_values"] is True and not meta.get("needs_groups")
    ADVANTAGES.check_kwargs("gae", {"gamma": 0.99, "lam": 0.9}, "advantage.kwargs")
    with pytest.raises(ValueError, match=r"advantage.kwargs.lam: expected a number in \[0, 1\]"):
        ADVANTAGES.check_kwargs("gae", {"lam": 1.5}, "advantage.kwargs")
    # the critic's values are an input, not a hyperparameter a config could set
    with pytest.raises(ValueError, match="unknown key 'values' .* allowed: gamma, lam"):
        ADVANTAGES.check_kwargs("gae", {"values": 0.0}, "advantage.kwargs")


def test_shape_and_type_errors():
    r, m, v = random_batch(0, 3, 4)
    with pytest.raises(ValueError, match="values: expected shape"):
        gae_advantages_returns(r, m, v[:, :3])
    with pytest.raises(TypeError, match="masks must be torch.bool"):
        gae_advantages_returns(r, m.float(), v)
    with pytest.raises(ValueError, match="GAE needs the critic's values"):
        gae_advantages_returns(r, m, None)
    with pytest.raises(ValueError, match="lam: expected 0 <= lam <= 1"):
        gae_advantages_returns(r, m, v, lam=1.5)
