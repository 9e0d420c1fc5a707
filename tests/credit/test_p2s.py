"""finegrain.credit.p2s (GRPO with process supervision on P2S's step rewards): worked examples (a),
a plain loop over random batches (b), invariances (c), the combiner and registration (d). The
reward, the config and the runs are in tests/rewards/test_p2s.py."""

from __future__ import annotations

import math

import pytest
import torch

from finegrain.config import check_levels, load_config
from finegrain.credit import ADVANTAGES
from finegrain.credit.outcome import grpo
from finegrain.credit.p2s import counting_steps, p2s, reward_positions
from finegrain.rewards.base import RewardOutput
from finegrain.rewards.combine import combine, total
from finegrain.trajectory import Trajectory
from tests.helpers import ATOL, RTOL, M, T, close


# ================================================================================ (a) worked examples

def test_counting_steps_and_reward_positions():
    assert counting_steps(torch.tensor([[-1, 0, 0, -1, 1, -1], [-1, -1, -1, -1, -1, -1]])).tolist() == \
        [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]]
    r = T([[0.0, 1.0, 0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    s = torch.tensor([[0, 0, 1, 1, 2, -1], [0, 0, 1, 1, -1, -1]])
    m = M([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    steps, positions, _ = reward_positions(r, m, s)
    close(steps, [[1.0, 0.0, 0.5], [0.0, 0.0, 0.0]])                 # the EOS reward counts in step 2
    # row 0: step 0 (nonzero) and step 2 (last); step 1 is 0 and not last. Row 1: its last step only
    assert positions.tolist() == [[True, False, True], [False, True, False]]


def test_worked_example_by_hand():
    # row 0: steps 0, 1 then EOS; row 1: steps 0, 1, 2 (no EOS). Rewards on the step ends:
    # row 0 (1, 3); row 1 (−1, 0, 2), where row 1's step 1 is no position (0 and not last).
    s = torch.tensor([[0, 0, 1, 1, -1], [0, 1, 1, 2, 2]])
    m = torch.ones(2, 5, dtype=torch.bool)
    r = T([[0.0, 1.0, 0.0, 3.0, 0.0], [-1.0, 0.0, 0.0, 0.0, 2.0]])
    # positions {1, 3, −1, 2}: μ = 5/4, unbiased σ² = (0.0625 + 3.0625 + 5.0625 + 0.5625)/3 = 35/12
    sd = math.sqrt(35 / 12)
    a, b, c, d = -0.25 / sd, 1.75 / sd, -2.25 / sd, 0.75 / sd      # r̃ of (1, 3, −1, 2)
    want = [[a + b, a + b, b, b, b],                                  # EOS takes step 1's advantage
            [c + d, d, d, d, d]]                                      # step 1 takes the sum from step 2 on
    torch.testing.assert_close(p2s(r, m, torch.tensor([7, 7]), s), T(want), rtol=RTOL, atol=1e-5)
    centred = p2s(r, m, torch.tensor([7, 7]), s, scale_by_std=False)
    close(centred[:, 0], [(-0.25 + 1.75), (-2.25 + 0.75)])


def random_batch(seed, B=10, L=12, groups=3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    response = torch.arange(L)[None, :] < lengths[:, None]
    # steps of random lengths, with some −1 separators and an EOS-like −1 at the end
    step_ids = torch.full((B, L), -1)
    for i in range(B):
        k, t = 0, 0
        while t < int(lengths[i]) - 1:
            n = int(torch.randint(1, 4, (1,), generator=g))
            step_ids[i, t:min(t + n, int(lengths[i]) - 1)] = k
            t += n + int(torch.rand(1, generator=g) < 0.3)       # sometimes a separator outside steps
            k += 1
    loss_mask = response & (torch.rand(B, L, generator=g) < 0.85)
    rewards = torch.randn(B, L, generator=g) * (torch.rand(B, L, generator=g) < 0.3)
    group_ids = torch.randint(0, groups, (B,), generator=g) * 11
    return rewards, loss_mask, group_ids, step_ids


def test_one_reward_per_row_is_exactly_grpo():
    for seed in range(5):
        _, m, g, s = random_batch(seed)
        R = torch.randn(m.shape[0], generator=torch.Generator().manual_seed(100 + seed)).round()   # ties too
        last = torch.where(m, torch.arange(m.shape[1]), torch.full_like(m, -1, dtype=torch.long)).max(1).values
        r = torch.zeros(m.shape)
        rows = (last >= 0).nonzero().flatten()
        r[rows, last[rows]] = R[rows]                                 # the outcome on the last trained token
        torch.testing.assert_close(p2s(r, m, g, s), grpo(r, m, g, s), rtol=RTOL, atol=ATOL)


# ================================================================================ (b) plain loop

def loop_p2s(r, m, group_ids, s, scale_by_std=True, eps=1e-6):
    """The module docstring's equations, one row, step and token at a time, in float64."""
    B, L = r.shape
    counted, positions = [], []
    for i in range(B):
        e, cur = [], -1
        for t in range(L):
            cur = max(cur, int(s[i, t]))
            e.append(max(cur, 0))
        steps: dict[int, float] = {}
        for t in range(L):
            if m[i, t]:
                steps[e[t]] = steps.get(e[t], 0.0) + float(r[i, t])
        last = max(steps) if steps else None
        counted.append(e)
        positions.append({k: v for k, v in steps.items() if k == last or v != 0})
    normed = [dict() for _ in range(B)]
    for gid in set(group_ids.tolist()):
        members = [i for i in range(B) if int(group_ids[i]) == gid]
        vals = [v for i in members for v in positions[i].values()]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        for i in members:
            for k, v in positions[i].items():
                if max(vals) == min(vals):
                    normed[i][k] = 0.0
                else:
                    normed[i][k] = (v - mean) / (std + eps) if scale_by_std else v - mean
    adv = torch.zeros(B, L, dtype=torch.float64)
    for i in range(B):
        for t in range(L):
            if m[i, t]:
                adv[i, t] = sum(v for k, v in normed[i].items() if k >= counted[i][t])
    return adv.float()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_vectorised_equals_the_plain_loop(seed, scale_by_std):
    r, m, g, s = random_batch(seed)
    torch.testing.assert_close(p2s(r, m, g, s, scale_by_std=scale_by_std), loop_p2s(r, m, g, s, scale_by_std),
                               rtol=RTOL, atol=1e-5)


# ================================================================================ (c) invariances

def test_garbage_under_a_false_mask_changes_nothing():
    r, m, g, s = random_batch(3)
    base = p2s(r, m, g, s)
    dirty = torch.where(m, r, torch.full_like(r, float("nan")))
    out = p2s(dirty, m, g, s)
    torch.testing.assert_close(out, base, rtol=RTOL, atol=ATOL)
    assert (out[~m] == 0).all()


def test_permuting_the_batch_permutes_the_advantages():
    r, m, g, s = random_batch(4)
    perm = torch.randperm(r.shape[0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p2s(r[perm], m[perm], g[perm], s[perm]), p2s(r, m, g, s)[perm], rtol=RTOL, atol=ATOL)


def test_group_of_one_constant_groups_and_empty_rows_are_finite():
    s = torch.tensor([[0, 0, 1, 1, -1], [0, 0, 1, 1, -1], [0, 1, -1, -1, -1]])
    m = M([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    one_reward = T([[0.0, 0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0, 9.0]])
    out = p2s(one_reward, m, torch.tensor([0, 1, 2]), s)                  # groups of one: one position each
    assert torch.isfinite(out).all() and (out == 0).all()
    dense = T([[0.0, 1.0, 0.0, -3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    out = p2s(dense, m, torch.tensor([0, 1, 2]), s)                       # a lone row's steps among themselves
    assert torch.isfinite(out).all() and out[0].abs().sum() > 0 and (out[1:] == 0).all()
    const = T([[0.0, 1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert (p2s(const, m, torch.tensor([5, 5, 5]), s) == 0).all()         # a constant set: exactly 0


# ================================================================================ (d) placement, registration

def traj_of(steps, group_ids):
    B, L = steps.shape
    response = torch.ones(B, L, dtype=torch.bool)
    return Trajectory(prompt_ids=torch.ones(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                      response_ids=torch.ones(B, L, dtype=torch.long), response_mask=response,
                      loss_mask=response.clone(), group_ids=group_ids, step_ids=steps,
                      behavior_logprobs=torch.zeros(B, L), truncated=torch.zeros(B, dtype=torch.bool))


def test_the_combiner_places_what_the_estimator_reads():
    # one all-wrong group (dense PFR on both rows), one group with a correct row (outcomes on the
    # last steps, as rewards.p2s gives them), and the verifier at weight 0 (the filters' outcome)
    steps = torch.tensor([[0, 0, 1, 1, -1], [0, 0, 1, 1, 1], [0, 0, 1, 1, -1], [0, 1, 1, 1, -1]])
    traj = traj_of(steps, torch.tensor([0, 0, 1, 1]))
    outputs = {"verifier": RewardOutput(T([0.0, 0.0, 1.0, 0.0]), M([1, 1, 1, 1]), "outcome"),
               "p2s": RewardOutput(T([[0.5, -2.0], [1.5, -1.0], [0.0, 1.0], [0.0, 0.0]]),
                                   M([[1, 1], [1, 1], [0, 1], [0, 1]]), "step")}
    placed = total(combine(outputs, {"verifier": 0.0, "p2s": 1.0}, traj))
    r, positions, _ = reward_positions(placed, traj.loss_mask, traj.step_ids)
    close(r, [[0.5, -2.0], [1.5, -1.0], [0.0, 1.0], [0.0, 0.0]])
    assert positions.tolist() == [[True, True], [True, True], [False, True], [False, True]]
    adv = p2s(placed, traj.loss_mask, traj.group_ids, traj.step_ids)
    # group 1 has one position per row: GRPO on (1, 0), i.e. ±0.7071 on every token
    close(adv[2:], [[0.707106] * 5, [-0.707106] * 5])
    # group 0: positions (0.5, −2, 1.5, −1), μ = −0.25, σ² = (0.5625 + 3.0625 + 3.0625 + 0.5625)/3
    sd = math.sqrt(7.25 / 3)
    n = [x / sd for x in (0.75, -1.75, 1.75, -0.75)]
    torch.testing.assert_close(adv[:2], T([[n[0] + n[1]] * 2 + [n[1]] * 3, [n[2] + n[3]] * 2 + [n[3]] * 3]),
                               rtol=RTOL, atol=1e-5)


def test_registration_and_level_check():
    meta = ADVANTAGES.meta("p2s")
    assert meta["consumes"] == "step" and meta["needs_groups"]
    ADVANTAGES.check_kwargs("p2s", {"scale_by_std": False, "eps": 1e-6}, "advantage.kwargs")
    with pytest.raises(ValueError, match="eps"):
        ADVANTAGES.check_kwargs("p2s", {"eps": 0.0}, "advantage.kwargs")
    with pytest.raises(ValueError, match="consumes outcome rewards but 'p2s' gives step rewards; use one of: .*p2s"):
        check_levels(load_config(None, ["rewards=[{name: p2s, weight: 1.0, kwargs: {}}]", "advantage.name=grpo"]))
    check_levels(load_config(None, ["rewards=[{name: p2s, weight: 1.0, kwargs: {}}]", "advantage.name=p2s"]))
