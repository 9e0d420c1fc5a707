"""Tests for finegrain.credit.prime: worked examples (a), loop references (b), invariances (c)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from finegrain.credit import ADVANTAGES
from finegrain.credit.prime import prime_batch_norm, prime_loo_exact, prime_rloo, reward_positions
from tests.helpers import close, T, M

ESTIMATORS = {"prime_rloo": prime_rloo, "prime_loo_exact": prime_loo_exact}
WHERE = ["token", "step_end", "last"]


# ----------------------------------------------------------------------------- loop reference (b)

def positions_loop(loss_mask, step_ids, reward_at):
    """Reward positions per row as lists of indices, one token at a time."""
    out = []
    for m, s in zip(loss_mask, step_ids):
        L = len(m)
        trained = [t for t in range(L) if m[t]]
        if reward_at == "token":
            out.append(trained)
        elif reward_at == "last":
            out.append(trained[-1:])
        else:  # step_end: a trained token whose step id is ≥ 0 and changes right after it
            out.append([t for t in trained if s[t] >= 0 and (t == L - 1 or s[t + 1] != s[t])])
    return out


def prime_loop(token_rewards, loss_mask, group_ids, step_ids, *, gamma, reward_at, form):
    """form 'rloo': r·n/(n−1) − Σ_j m_j/(n−1); form 'exact': r − (1/(n−1)) Σ_{j≠i} m_j. n = 1: r."""
    r, m = token_rewards.tolist(), loss_mask.tolist()
    g, s = group_ids.tolist(), step_ids.tolist()
    B, L = len(r), len(r[0])
    P = positions_loop(m, s, reward_at)
    mean = [sum(r[i][t] for t in P[i]) / len(P[i]) if P[i] else None for i in range(B)]
    members = {}
    for i in range(B):
        if P[i]:
            members.setdefault(g[i], []).append(i)
    out = [[0.0] * L for _ in range(B)]
    for i in range(B):
        if not P[i]:
            continue
        rows = members[g[i]]
        n = len(rows)
        shaped = [0.0] * L
        for t in P[i]:
            if n == 1:
                shaped[t] = r[i][t]
            elif form == "rloo":
                shaped[t] = r[i][t] * n / (n - 1) - sum(mean[j] for j in rows) / (n - 1)
            else:
                shaped[t] = r[i][t] - sum(mean[j] for j in rows if j != i) / (n - 1)
        G = 0.0
        for t in reversed(range(L)):
            if m[i][t]:
                G = shaped[t] + gamma * G
                out[i][t] = G
    return out


def random_batch(seed, *, dtype=torch.float64, min_group=1):
    """Random B, L; right-padded masks with random lengths (some 0) and untrained holes; random
    steps (some tokens outside any step); group ids arbitrary, non-contiguous, shuffled, of
    varying size (groups of one when min_group == 1)."""
    gen = torch.Generator().manual_seed(seed)
    B = int(torch.randint(2, 13, (1,), generator=gen))
    L = int(torch.randint(1, 9, (1,), generator=gen))
    lengths = torch.randint(0, L + 1, (B,), generator=gen)
    real = torch.arange(L)[None, :] < lengths[:, None]                                # (B, L)
    holes = torch.rand(B, L, generator=gen) < 0.2
    loss_mask = real & ~holes
    new_step = torch.rand(B, L, generator=gen) < 0.4
    step_ids = new_step.long().cumsum(1)
    outside = torch.rand(B, L, generator=gen) < 0.1
    step_ids = torch.where(real & ~outside, step_ids, torch.full_like(step_ids, -1))
    if min_group == 1:
        labels = torch.randint(0, max(1, B // 2), (B,), generator=gen)
    else:  # every group has ≥ min_group rows
        n_groups = max(1, B // min_group)
        labels = torch.arange(B) % n_groups
    ids = torch.randperm(1000, generator=gen)[: int(labels.max()) + 1] * 13 - 400
    group_ids = ids[labels][torch.randperm(B, generator=gen)]
    token_rewards = torch.randn(B, L, generator=gen, dtype=dtype)
    return token_rewards, loss_mask, group_ids, step_ids


# ----------------------------------------------------------------------------- worked examples (a)

# One group of n = 3, L = 3, γ = 1, reward_at='token' (implicit PRM on every trained token).
#   row 0: r = [1, 2, 3]          m_0 = 2
#   row 1: r = [2, 4, pad]        m_1 = 3
#   row 2: r = [1, 0, 2]          m_2 = 1          Σ m = 6
WORKED_R = T([[1, 2, 3], [2, 4, 99], [1, 0, 2]])
WORKED_M = M([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
WORKED_G = torch.tensor([5, 5, 5])
WORKED_S = torch.zeros(3, 3, dtype=torch.long)


def test_prime_rloo_worked_example():
    # r' = r·n/(n−1) − Σm/(n−1) = 1.5 r − 3
    #   row 0: [−1.5, 0, 1.5]  → return-to-go [0, 1.5, 1.5]
    #   row 1: [0, 3, ·]       → [3, 3, 0]
    #   row 2: [−1.5, −3, 0]   → [−4.5, −3, 0]
    out = prime_rloo(WORKED_R, WORKED_M, WORKED_G, WORKED_S)
    close(out, [[0, 1.5, 1.5], [3, 3, 0], [-4.5, -3, 0]])


def test_prime_loo_exact_worked_example():
    # b_i = mean of the others' m:  b_0 = (3+1)/2 = 2,  b_1 = (2+1)/2 = 1.5,  b_2 = (2+3)/2 = 2.5
    #   row 0: r − 2   = [−1, 0, 1]          → [0, 1, 1]
    #   row 1: r − 1.5 = [0.5, 2.5, ·]       → [3, 2.5, 0]
    #   row 2: r − 2.5 = [−1.5, −2.5, −0.5]  → [−4.5, −3, −0.5]
    out = prime_loo_exact(WORKED_R, WORKED_M, WORKED_G, WORKED_S)
    close(out, [[0, 1, 1], [3, 2.5, 0], [-4.5, -3, -0.5]])
    # γ = 0.5, row 0: G_2 = 1, G_1 = 0 + 0.5·1 = 0.5, G_0 = −1 + 0.5·0.5 = −0.75
    out = prime_loo_exact(WORKED_R, WORKED_M, WORKED_G, WORKED_S, gamma=0.5)
    close(out[0], [-0.75, 0.5, 1.0])


def test_two_forms_agree_at_first_token_only():
    # Same data: both start at [0, 3, −4.5] (the extra (r − m_i)/(n−1) sums to 0 over a row) ...
    a = prime_rloo(WORKED_R, WORKED_M, WORKED_G, WORKED_S)
    b = prime_loo_exact(WORKED_R, WORKED_M, WORKED_G, WORKED_S)
    close(a[:, 0], b[:, 0])
    # ... and differ after it: row 0 at t = 1 is 1.5 vs 1.
    assert not torch.allclose(a[:, 1:], b[:, 1:])


def test_outcome_worked_example_is_rloo():
    # Outcomes R = [1, 0, 1] on the last trained token (row 1 is shorter), one group.
    # R_i − mean_{j≠i} R_j = [1 − 0.5, 0 − 1, 1 − 0.5] = [0.5, −1, 0.5] on every trained token.
    r = T([[0, 0, 1], [0, 0, 0], [0, 0, 1]])
    m = M([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    for fn in ESTIMATORS.values():
        out = fn(r, m, WORKED_G, WORKED_S, reward_at="last")
        close(out, [[0.5, 0.5, 0.5], [-1, -1, 0], [0.5, 0.5, 0.5]])


def test_step_end_worked_example():
    # reward_at='step_end': step ids [0, 0, 1, 1] → ends at t = 1 and t = 3. Group of 2, γ = 1.
    #   row 0: step rewards 1 (t=1), 3 (t=3): m_0 = 2;  row 1: 0 (t=1), 2 (t=3): m_1 = 1
    #   exact: row 0: [1 − 1, 3 − 1] = [0, 2] at t = 1, 3 → returns [2, 2, 2, 2]
    #          row 1: [0 − 2, 2 − 2] = [−2, 0]           → [−2, −2, 0, 0]
    #   rloo:  r·2 − 3: row 0: [−1, 3] → [2, 2, 3, 3];  row 1: [−3, 1] → [−2, −2, 1, 1]
    r = T([[9, 1, 9, 3], [9, 0, 9, 2]])   # 9s are not at step ends: ignored
    m = M([[1, 1, 1, 1], [1, 1, 1, 1]])
    s = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    g = torch.tensor([1, 1])
    close(prime_loo_exact(r, m, g, s, reward_at="step_end"), [[2, 2, 2, 2], [-2, -2, 0, 0]])
    close(prime_rloo(r, m, g, s, reward_at="step_end"), [[2, 2, 3, 3], [-2, -2, 1, 1]])


# ----------------------------------------------------------------------------- the outcome path is RLOO

@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("seed", range(6))
def test_outcome_path_equals_rloo(name, seed):
    """Outcome on the last trained token, γ = 1: A_{i,t} = R_i − mean_{j≠i} R_j at every trained token."""
    _, loss_mask, group_ids, step_ids = random_batch(seed, min_group=2)
    loss_mask[:, 0] = True                                    # every row has a trained token
    gen = torch.Generator().manual_seed(100 + seed)
    B, L = loss_mask.shape
    R = torch.randint(0, 2, (B,), generator=gen).double() + 0.25 * torch.randn(B, generator=gen, dtype=torch.float64)
    last = reward_positions(loss_mask, step_ids, "last")
    token_rewards = torch.where(last, R[:, None], torch.zeros((), dtype=torch.float64))
    out = ESTIMATORS[name](token_rewards, loss_mask, group_ids, step_ids, reward_at="last")
    expected = [[0.0] * L for _ in range(B)]
    for i in range(B):
        others = [R[j].item() for j in range(B) if j != i and group_ids[j] == group_ids[i]]
        for t in range(L):
            if loss_mask[i, t]:
                expected[i][t] = R[i].item() - sum(others) / len(others)
    close(out, expected)
    if "rloo" in ADVANTAGES:  # the outcome-only estimator agrees too
        close(out, ADVANTAGES.get("rloo")(token_rewards, loss_mask, group_ids, step_ids))


# ----------------------------------------------------------------------------- loop references (b)

@pytest.mark.parametrize("name,form", [("prime_rloo", "rloo"), ("prime_loo_exact", "exact")])
@pytest.mark.parametrize("reward_at", WHERE)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("seed", range(8))
def test_matches_loop(name, form, reward_at, gamma, seed):
    r, m, g, s = random_batch(seed)
    out = ESTIMATORS[name](r, m, g, s, gamma=gamma, reward_at=reward_at)
    close(out, prime_loop(r, m, g, s, gamma=gamma, reward_at=reward_at, form=form))


@pytest.mark.parametrize("seed", range(5))
def test_forms_agree_at_first_reward_position_gamma_1(seed):
    r, m, g, s = random_batch(seed)
    a = prime_rloo(r, m, g, s, reward_at="token")
    b = prime_loo_exact(r, m, g, s, reward_at="token")
    first = torch.where(m, torch.arange(m.shape[1]), m.shape[1]).min(dim=1).values    # (B,)
    rows = (first < m.shape[1]).nonzero().flatten()
    close(a[rows, first[rows]], b[rows, first[rows]])


# ----------------------------------------------------------------------------- invariances (c)

@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("reward_at", WHERE)
@pytest.mark.parametrize("seed", range(4))
def test_garbage_outside_reward_positions_changes_nothing(name, reward_at, seed):
    r, m, g, s = random_batch(seed)
    pos = reward_positions(m, s, reward_at)
    gen = torch.Generator().manual_seed(seed)
    junk = torch.where(torch.rand(r.shape, generator=gen) < 0.5, torch.full_like(r, float("nan")),
                       torch.full_like(r, 1e30))
    fn = ESTIMATORS[name]
    clean = fn(r, m, g, s, reward_at=reward_at, gamma=0.9)
    dirty = fn(torch.where(pos, r, junk), m, g, s, reward_at=reward_at, gamma=0.9)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    assert torch.all(clean[~m] == 0)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("seed", range(4))
def test_permuting_the_batch_permutes_advantages(name, seed):
    r, m, g, s = random_batch(seed)
    perm = torch.randperm(r.shape[0], generator=torch.Generator().manual_seed(seed))
    fn = ESTIMATORS[name]
    for reward_at in WHERE:
        base = fn(r, m, g, s, reward_at=reward_at)
        close(fn(r[perm], m[perm], g[perm], s[perm], reward_at=reward_at), base[perm])


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_group_of_one_is_finite_and_unbaselined(name):
    # Row 0 is alone in group 1 → baseline 0, no rescaling: its advantage is its own return-to-go.
    # Row 3 has no trained token → 0, and it does not count in group 2 (so row 1, 2 form a pair).
    r = T([[1, 2, 3], [1, 1, 1], [0, 0, 0], [float("nan")] * 3])
    m = M([[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 0]])
    g = torch.tensor([1, 2, 2, 2])
    s = torch.zeros(4, 3, dtype=torch.long)
    out = ESTIMATORS[name](r, m, g, s)
    assert torch.isfinite(out).all()
    close(out[0], [6, 5, 3])
    close(out[3], [0, 0, 0])
    # rows 1, 2: m = 1 and 0; exact: row 1 gets r − 0 = [1, 1, 1] → [3, 2, 1]; rloo: 2r − 1 → [3, 2, 1]
    close(out[1], [3, 2, 1])


def test_registered_with_the_shared_signature():
    for name, fn in ESTIMATORS.items():
        assert ADVANTAGES.get(name) is fn
        assert ADVANTAGES.meta(name)["consumes"] == "token"
        params = inspect.signature(fn).parameters
        assert list(params)[:4] == ["token_rewards", "loss_mask", "group_ids", "step_ids"]
        assert params["gamma"].kind is inspect.Parameter.KEYWORD_ONLY and params["gamma"].default == 1.0
        assert params["reward_at"].kind is inspect.Parameter.KEYWORD_ONLY


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="reward_at"):
        prime_rloo(WORKED_R, WORKED_M, WORKED_G, WORKED_S, reward_at="outcome")
    with pytest.raises(ValueError, match="gamma"):
        prime_loo_exact(WORKED_R, WORKED_M, WORKED_G, WORKED_S, gamma=0.0)
    with pytest.raises(TypeError, match="bool"):
        prime_rloo(WORKED_R, WORKED_M.float(), WORKED_G, WORKED_S)
    with pytest.raises(ValueError, match="group_ids"):
        prime_rloo(WORKED_R, WORKED_M, WORKED_G[:2], WORKED_S)


# ----------------------------------------------------------------------------- prime_batch_norm

def test_batch_norm_worked_example():
    # row 0: r = [1, 2, ·] → returns [3, 2, 0];  row 1: r = [−4, 1, 1] → returns [−2, 2, 1]
    # max |return| = 3  →  r / (3 + 1e-6); the masked slot (NaN here) comes out 0.
    r = T([[1, 2, float("nan")], [-4, 1, 1]])
    m = M([[1, 1, 0], [1, 1, 1]])
    out = prime_batch_norm(r, m)
    close(out, [[1 / (3 + 1e-6), 2 / (3 + 1e-6), 0], [-4 / (3 + 1e-6), 1 / (3 + 1e-6), 1 / (3 + 1e-6)]])
    returns = out.flip(1).cumsum(1).flip(1)
    assert math.isclose(float(returns.abs().max()), 3 / (3 + 1e-6), rel_tol=1e-6)


def test_batch_norm_all_zero_stays_zero():
    out = prime_batch_norm(torch.zeros(2, 3), M([[1, 1, 0], [0, 0, 0]]))
    assert torch.equal(out, torch.zeros(2, 3))
