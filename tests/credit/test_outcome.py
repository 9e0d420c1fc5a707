"""Tests for finegrain.credit.outcome: worked examples (a), loop references (b), invariances (c)."""

from __future__ import annotations

import math

import pytest
import torch

from finegrain.credit import ADVANTAGES
from finegrain.credit.outcome import dr_grpo, grpo, reinforce_pp, reinforce_pp_baseline, rloo
from tests.reference import loops
from tests.helpers import close, T, M

NAMES = ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
GROUP_RELATIVE = ["grpo", "dr_grpo", "rloo"]   # 0 for a group of one / a constant group


def no_steps(mask):
    return torch.zeros(mask.shape, dtype=torch.long)


def random_batch(seed: int, B: int, L: int, dense: bool = False):
    """Right-padded masks with random lengths (some 0), an occasional untrained hole in the middle,
    group ids that are arbitrary, non-contiguous and shuffled; outcome rewards on the last trained
    token (from a small set so ties and constant groups occur), or dense rewards."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=gen)
    loss_mask = torch.arange(L)[None, :] < lengths[:, None]                          # (B, L)
    holes = torch.rand(B, L, generator=gen) < 0.15
    loss_mask &= ~(holes & (torch.arange(L)[None, :] < lengths[:, None] - 1))        # keep last token
    n_groups = max(1, B // 3)
    labels = torch.randint(0, n_groups, (B,), generator=gen)
    ids = torch.randperm(1000, generator=gen)[:n_groups] * 37 - 500                   # arbitrary ints
    group_ids = ids[labels][torch.randperm(B, generator=gen)]
    if dense:
        token_rewards = torch.randn(B, L, generator=gen)
    else:
        choices = torch.tensor([0.0, 0.3, 1.0, -0.7])
        outcome = choices[torch.randint(0, 4, (B,), generator=gen)]
        continuous = torch.rand(B, generator=gen) < 0.3
        outcome = torch.where(continuous, torch.randn(B, generator=gen), outcome)
        pos = torch.arange(L).expand(B, L)
        last = torch.where(loss_mask, pos, -1).max(dim=1).values                    # (B,)
        token_rewards = torch.where(pos == last[:, None], outcome[:, None], torch.zeros(()))
    return token_rewards, loss_mask, group_ids, no_steps(loss_mask)


def call(name, token_rewards, loss_mask, group_ids, step_ids, **kw):
    return ADVANTAGES.get(name)(token_rewards, loss_mask, group_ids, step_ids, **kw)


# ------------------------------------------------------------------------------ (a) worked examples

# Four rows; the outcome reward sits on the last trained token.
#   row 0: group 7, R = 1    row 2: group 7, R = 0      -> group 7 = {1, 0}
#   row 1: group 3, R = 2    row 3: group 3, R = 2      -> group 3 constant
WORKED_R = T([[0, 0, 1], [0, 2, 0], [0, 0, 0], [0, 0, 2]])
WORKED_M = M([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
WORKED_G = torch.tensor([7, 3, 7, 3])


def test_grpo_worked_example():
    # group 7: mean 0.5, unbiased std = sqrt((0.5² + 0.5²)/1) = sqrt(0.5);
    #   A = ±0.5 / (sqrt(0.5) + 1e-6) ≈ ±0.7071058
    # group 3: both R = 2 -> 0. Positions outside the mask are 0.
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    out = grpo(WORKED_R, WORKED_M, WORKED_G, no_steps(WORKED_M))
    close(out, [[a, a, a], [0, 0, 0], [-a, 0, 0], [0, 0, 0]])


def test_grpo_without_std_scaling_is_dr_grpo():
    # group 7: A = R − 0.5 = ±0.5; group 3: 0.
    expected = [[0.5, 0.5, 0.5], [0, 0, 0], [-0.5, 0, 0], [0, 0, 0]]
    close(dr_grpo(WORKED_R, WORKED_M, WORKED_G, no_steps(WORKED_M)), expected)
    close(grpo(WORKED_R, WORKED_M, WORKED_G, no_steps(WORKED_M), scale_by_std=False), expected)


def test_grpo_eps_is_added_to_std():
    # group {1, 0} with eps = 1: A = 0.5 / (sqrt(0.5) + 1) = 0.2928932
    out = grpo(T([[1.0], [0.0]]), M([[1], [1]]), torch.tensor([0, 0]), no_steps(M([[1], [1]])), eps=1.0)
    close(out, [[0.5 / (math.sqrt(0.5) + 1)], [-0.5 / (math.sqrt(0.5) + 1)]])


def test_rloo_worked_example():
    # group 4 = rows 0, 1, 2 with R = 3, 0, 0:
    #   A_0 = 3 − (0 + 0)/2 = 3;  A_1 = 0 − (3 + 0)/2 = −1.5;  A_2 = −1.5
    # row 3 is alone in group 9 -> 0.
    R = T([[3.0], [0.0], [0.0], [5.0]])
    m = M([[1], [1], [1], [1]])
    out = rloo(R, m, torch.tensor([4, 4, 4, 9]), no_steps(m))
    close(out, [[3.0], [-1.5], [-1.5], [0.0]])


def test_reinforce_pp_worked_example_discounted():
    # r = [0, 1, 0, 2], γ = 0.5: G_3 = 2, G_2 = 0 + 0.5·2 = 1, G_1 = 1 + 0.5·1 = 1.5,
    # G_0 = 0 + 0.5·1.5 = 0.75. Whitening over the 4 tokens: mean = 5.25/4 = 1.3125,
    # deviations (−0.5625, 0.1875, −0.3125, 0.6875), Σ dev² = 0.921875, unbiased var = 0.921875/3.
    m = M([[1, 1, 1, 1]])
    out = reinforce_pp(T([[0, 1, 0, 2]]), m, torch.tensor([0]), no_steps(m), gamma=0.5)
    std = math.sqrt(0.921875 / 3 + 1e-8)
    close(out, [[d / std for d in (-0.5625, 0.1875, -0.3125, 0.6875)]])


def test_reinforce_pp_skips_masked_positions():
    # A tool-output token in the middle (mask False, garbage reward) is skipped: with γ = 0.5,
    # G = [1 + 0.5·1, –, 1] = [1.5, –, 1]. Whitening over {1.5, 1}: mean 1.25,
    # unbiased var = (0.25² + 0.25²)/1 = 0.125 -> A = ±0.25/sqrt(0.125) = ±0.7071068.
    m = M([[1, 0, 1]])
    out = reinforce_pp(T([[1, float("nan"), 1]]), m, torch.tensor([0]), no_steps(m), gamma=0.5)
    a = 0.25 / math.sqrt(0.125 + 1e-8)
    close(out, [[a, 0.0, -a]])


def test_reinforce_pp_baseline_worked_example():
    # group 1 = rows 0, 1 with R = 1, 0 -> centred 0.5, −0.5. Row 0 has 1 trained token, row 1 has 3,
    # so the token values are [0.5 | −0.5, −0.5, −0.5]: mean = −1/4 = −0.25,
    # deviations (0.75, −0.25, −0.25, −0.25), Σ dev² = 0.75, unbiased var = 0.25, std = 0.5
    # -> A = [1.5 | −0.5, −0.5, −0.5].
    R = T([[1, 0, 0], [0, 0, 0]])
    m = M([[1, 0, 0], [1, 1, 1]])
    out = reinforce_pp_baseline(R, m, torch.tensor([1, 1]), no_steps(m))
    s = math.sqrt(0.25 + 1e-8) / 0.5            # eps of the whitening
    close(out, [[1.5 / s, 0, 0], [-0.5 / s, -0.5 / s, -0.5 / s]])


# ------------------------------------------------------------------------------ (b) loop references

SHAPES = [(1, 1), (2, 3), (5, 4), (8, 7), (13, 9)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("B,L", SHAPES)
@pytest.mark.parametrize("name,kw,kind", [
    ("grpo", {}, "grpo"),
    ("grpo", {"eps": 0.1}, "grpo"),
    ("dr_grpo", {}, "dr_grpo"),
    ("rloo", {}, "rloo"),
])
def test_group_estimators_match_loop(seed, B, L, name, kw, kind):
    r, m, g, s = random_batch(seed, B, L)
    expected = loops.outcome_advantages(r.tolist(), m.tolist(), g.tolist(), kind, **kw)
    close(call(name, r, m, g, s, **kw), expected)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("B,L", SHAPES)
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5])
def test_reinforce_pp_matches_loop(seed, B, L, gamma):
    r, m, g, s = random_batch(seed, B, L, dense=True)
    close(reinforce_pp(r, m, g, s, gamma=gamma), loops.reinforce_pp(r.tolist(), m.tolist(), gamma))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("B,L", SHAPES)
def test_reinforce_pp_baseline_matches_loop(seed, B, L):
    r, m, g, s = random_batch(seed, B, L)
    expected = loops.reinforce_pp_baseline(r.tolist(), m.tolist(), g.tolist())
    close(reinforce_pp_baseline(r, m, g, s), expected)


# ------------------------------------------------------------------------------ (c) invariances

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -1e30])
def test_garbage_in_untrained_positions_changes_nothing(name, garbage):
    # Rewards live on trained tokens; anything at loss_mask == False (padding, tool output, whole
    # empty rows) must not reach any output entry.
    r, m, g, s = random_batch(0, 12, 8, dense=(name == "reinforce_pp"))
    clean = call(name, r, m, g, s)
    dirty = call(name, torch.where(m, r, torch.full_like(r, garbage)), m, g, s)
    assert torch.equal(clean, dirty)
    assert torch.equal(clean[~m], torch.zeros_like(clean[~m]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", range(3))
def test_permuting_the_batch_permutes_the_advantages(name, seed):
    r, m, g, s = random_batch(seed, 11, 6, dense=(name == "reinforce_pp"))
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(seed + 100))
    close(call(name, r[perm], m[perm], g[perm], s[perm]), call(name, r, m, g, s)[perm])


@pytest.mark.parametrize("name", NAMES)
def test_relabelling_groups_changes_nothing(name):
    r, m, g, s = random_batch(1, 10, 5)
    close(call(name, r, m, g * 13 + 99, s), call(name, r, m, g, s))


@pytest.mark.parametrize("name", NAMES)
def test_group_of_one_is_finite(name):
    r, m, g, s = random_batch(2, 6, 4)
    g = torch.arange(6) * 5                                  # every row alone
    out = call(name, r, m, g, s)
    assert torch.isfinite(out).all()
    if name in GROUP_RELATIVE:
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name", GROUP_RELATIVE + ["reinforce_pp_baseline"])
def test_constant_group_gives_exact_zeros(name):
    # 7 × 0.3 summed and divided by 7 is not 0.3 in float32; the estimator must still give 0,
    # not (rounding error)/(std + eps).
    m = torch.ones(7, 3, dtype=torch.bool)
    r = torch.zeros(7, 3)
    r[:, -1] = 0.3
    out = call(name, r, m, torch.full((7,), 4), no_steps(m))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name", GROUP_RELATIVE)
def test_constant_group_is_zero_next_to_a_varying_group(name):
    m = torch.ones(5, 1, dtype=torch.bool)
    r = T([[0.3], [1.0], [0.3], [0.0], [0.3]])
    out = call(name, r, m, torch.tensor([2, 8, 2, 8, 2]), no_steps(m))
    assert torch.equal(out[[0, 2, 4]], torch.zeros(3, 1))
    assert (out[[1, 3]] != 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_row_without_trained_tokens_gets_zero_and_leaves_others_unchanged(name):
    r, m, g, s = random_batch(3, 8, 5, dense=(name == "reinforce_pp"))
    m = m.clone()
    m[:, -1] |= True                                          # every row has a trained token
    r = torch.where(m, r, torch.zeros(()))
    extra_r = torch.full((1, 5), 7.0)
    extra_m = torch.zeros(1, 5, dtype=torch.bool)
    out = call(name, torch.cat([r, extra_r]), torch.cat([m, extra_m]), torch.cat([g, g[:1]]),
               torch.cat([s, s[:1]]))
    close(out[:-1], call(name, r, m, g, s))
    assert torch.equal(out[-1], torch.zeros(5))


@pytest.mark.parametrize("name", NAMES)
def test_no_gradient_is_recorded(name):
    r, m, g, s = random_batch(0, 4, 3)
    out = call(name, r.requires_grad_(), m, g, s)
    assert not out.requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_float64_in_float64_out(name):
    r, m, g, s = random_batch(0, 6, 4)
    assert call(name, r.double(), m, g, s).dtype == torch.float64


# ------------------------------------------------------------------------------ registry and contract

def test_registry_metadata():
    consumes = {name: ADVANTAGES.meta(name)["consumes"] for name in NAMES}
    assert consumes == {"grpo": "outcome", "dr_grpo": "outcome", "rloo": "outcome",
                        "reinforce_pp": "token", "reinforce_pp_baseline": "outcome"}


def test_registry_kwargs():
    ADVANTAGES.check_kwargs("grpo", {"scale_by_std": False, "eps": 1e-4}, "advantage.kwargs")
    ADVANTAGES.check_kwargs("reinforce_pp", {"gamma": 0.9}, "advantage.kwargs")
    with pytest.raises(ValueError, match="unknown key 'gamma'"):
        ADVANTAGES.check_kwargs("rloo", {"gamma": 0.9}, "advantage.kwargs")


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_dtype_errors(name):
    r, m, g, s = random_batch(0, 4, 3)
    with pytest.raises(ValueError, match="group_ids"):
        call(name, r, m, g[:3], s)
    with pytest.raises(ValueError, match="loss_mask"):
        call(name, r, m[:, :2], g, s)
    with pytest.raises(TypeError, match="bool"):
        call(name, r, m.float(), g, s)
