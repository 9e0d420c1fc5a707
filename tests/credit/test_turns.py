"""Tests for finegrain.credit.turns: worked examples (a), loop references (b), invariances (c), and
(d) the variable-turn-count bias of verl issue #7244, computed exactly by enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from finegrain.credit import ADVANTAGES
from finegrain.credit.outcome import dr_grpo, grpo, rloo
from finegrain.credit.turns import igpo, matchtir, turn_rewards_of, turn_rloo
from finegrain.trajectory import Trajectory
from tests.helpers import ATOL, RTOL, close

NAMES = ["turn_rloo", "igpo", "matchtir"]
NAN = float("nan")


def episodes(rows, groups, L=None, garbage=0.0):
    """Build (token_rewards, loss_mask, group_ids, turn_ids) from rows of turns.

    Each row is a list of turns (n_model, n_obs, reward): n_model trained tokens, then n_obs
    tool-output tokens (loss_mask False) of the same turn; ``reward`` sits on the turn's last
    trained token (as the combiner places turn and outcome rewards); ``garbage`` on tool-output
    and padding positions.
    """
    L = L or max(sum(m + o for m, o, _ in row) for row in rows)
    B = len(rows)
    r = torch.full((B, L), garbage)
    m = torch.zeros(B, L, dtype=torch.bool)
    t_ids = torch.full((B, L), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for k, (n_model, n_obs, reward) in enumerate(row):
            r[b, t:t + n_model] = 0.0
            m[b, t:t + n_model] = True
            t_ids[b, t:t + n_model + n_obs] = k
            if n_model:
                r[b, t + n_model - 1] = reward
            t += n_model + n_obs
    return r, m, torch.tensor(groups), t_ids


def call(name, r, m, g, t, **kw):
    return ADVANTAGES.get(name)(r, m, g, t, **kw)


def per_turn(adv, m, t_ids, row, turn):
    """The advantage of (row, turn), checking that every trained token of the turn carries it."""
    vals = adv[row][m[row] & (t_ids[row] == turn)]
    assert torch.allclose(vals, vals[0].expand_as(vals)), vals
    return float(vals[0])


# ------------------------------------------------------------------------------ (a) worked examples

# Group 5 = rows 0, 1, 2; row 3 is alone in group 9.
#   row 0: tool call (cost −0.5, 2 model tokens + 1 output token), then answer (outcome 1)
#   row 1: answers at once (outcome 1)
#   row 2: tool call (−0.5), then answer (outcome 0)
WORKED = [[(2, 1, -0.5), (1, 0, 1.0)], [(2, 0, 1.0)], [(1, 2, -0.5), (2, 0, 0.0)], [(1, 0, 3.0)]]
WORKED_G = [5, 5, 5, 9]


def test_turn_rloo_worked_example():
    # returns-to-go (γ = 1): row 0 G = [0.5, 1]; row 1 [1]; row 2 [−0.5, 0]; row 3 [3]
    # turn 0 (everyone of group 5 reached it):
    #   row 0: 0.5 − mean(1, −0.5) = 0.5 − 0.25 = 0.25;  row 1: 1 − mean(0.5, −0.5) = 1
    #   row 2: −0.5 − mean(0.5, 1) = −1.25
    # turn 1 (rows 0 and 2): row 0: 1 − 0 = 1;  row 2: 0 − 1 = −1
    # row 3 is alone: 0. Tool-output and padding tokens: 0.
    r, m, g, t = episodes(WORKED, WORKED_G, garbage=NAN)
    out = turn_rloo(r, m, g, t)
    expected = {(0, 0): 0.25, (0, 1): 1.0, (1, 0): 1.0, (2, 0): -1.25, (2, 1): -1.0, (3, 0): 0.0}
    for (b, k), v in expected.items():
        assert per_turn(out, m, t, b, k) == pytest.approx(v, rel=RTOL, abs=ATOL)
    assert torch.equal(out[~m], torch.zeros_like(out[~m]))


def test_turn_rloo_discounts_per_turn():
    # γ = 0.5: row 0 G_0 = −0.5 + 0.5·1 = 0; row 2 G_0 = −0.5 + 0.5·0 = −0.5; row 1 G_0 = 1
    #   turn 0: row 0: 0 − mean(1, −0.5) = −0.25; row 1: 1 − mean(0, −0.5) = 1.25; row 2: −0.5 − 0.5 = −1
    #   turn 1 is undiscounted from itself: ±1 as before
    r, m, g, t = episodes(WORKED, WORKED_G)
    out = turn_rloo(r, m, g, t, gamma=0.5)
    expected = {(0, 0): -0.25, (1, 0): 1.25, (2, 0): -1.0, (0, 1): 1.0, (2, 1): -1.0}
    for (b, k), v in expected.items():
        assert per_turn(out, m, t, b, k) == pytest.approx(v, rel=RTOL, abs=ATOL)


def _igpo_norm(values, std=True, eps=1e-6):
    """IGPO's z-score of a list, written out: population variance, sqrt(var + 1e-8), σ = 1 for one value."""
    n = len(values)
    mean = sum(values) / n
    sigma = 1.0 if n <= 1 else math.sqrt(sum((v - mean) ** 2 for v in values) / n + 1e-8)
    return [(v - mean) / (sigma + eps) if std else v - mean for v in values]


def test_igpo_worked_example_separate():
    # one group: row 0 = IG 0.2, IG 0.4, outcome 1;  row 1 = IG −0.2, outcome 0
    # outcome set {1, 0}: mean 0.5, σ = sqrt(0.25 + 1e-8) -> o = ±0.5/(σ + 1e-6) ≈ ±1
    # IG set {0.2, 0.4, −0.2}: mean 0.1333, population var 0.062222, σ = 0.249444
    #   -> 0.267261, 1.069045, −1.336306
    # A (γ = 1) = normalised reward summed over the turns left:
    #   row 0: [0.2673 + 1.0690 + 1, 1.0690 + 1, 1] = [2.3363, 2.0690, 1];  row 1: [−1.3363 − 1, −1]
    rows = [[(1, 1, 0.2), (1, 1, 0.4), (2, 0, 1.0)], [(2, 1, -0.2), (1, 0, 0.0)]]
    r, m, g, t = episodes(rows, [0, 0])
    o = _igpo_norm([1.0, 0.0])
    ig = _igpo_norm([0.2, 0.4, -0.2])
    out = igpo(r, m, g, t)
    expected = {(0, 0): ig[0] + ig[1] + o[0], (0, 1): ig[1] + o[0], (0, 2): o[0],
                (1, 0): ig[2] + o[1], (1, 1): o[1]}
    assert o[0] == pytest.approx(1.0, rel=1e-5) and ig[1] == pytest.approx(1.069045, rel=1e-5)
    for (b, k), v in expected.items():
        assert per_turn(out, m, t, b, k) == pytest.approx(v, rel=RTOL, abs=ATOL)


def test_igpo_worked_example_joint_and_unscaled():
    # joint: one set {0.2, 0.4, 1, −0.2, 0}, mean 0.28, population var 0.1736 (σ ≈ 0.416653)
    rows = [[(1, 1, 0.2), (1, 1, 0.4), (2, 0, 1.0)], [(2, 1, -0.2), (1, 0, 0.0)]]
    r, m, g, t = episodes(rows, [0, 0])
    z = _igpo_norm([0.2, 0.4, 1.0, -0.2, 0.0])
    out = igpo(r, m, g, t, norm_mode="joint")
    expected = {(0, 0): z[0] + z[1] + z[2], (0, 1): z[1] + z[2], (0, 2): z[2], (1, 0): z[3] + z[4], (1, 1): z[4]}
    for (b, k), v in expected.items():
        assert per_turn(out, m, t, b, k) == pytest.approx(v, rel=RTOL, abs=ATOL)
    # without the std: centred values, e.g. row 1 turn 0 = (−0.2 − 0.28) + (0 − 0.28) = −0.76
    flat = igpo(r, m, g, t, norm_mode="joint", scale_by_std=False)
    assert per_turn(flat, m, t, 1, 0) == pytest.approx(-0.76, rel=RTOL, abs=ATOL)


def test_igpo_zero_intermediate_reward_is_not_a_reward_position():
    # as in the reference, a turn whose IG is exactly 0 does not enter the IG statistics:
    # IG set = {0.4, −0.2} (mean 0.1, σ 0.3); the zero turn gets 0 + the sum of what follows.
    rows = [[(1, 0, 0.0), (1, 0, 0.4), (1, 0, 1.0)], [(1, 0, -0.2), (1, 0, 0.0)]]
    r, m, g, t = episodes(rows, [0, 0])
    o, ig = _igpo_norm([1.0, 0.0]), _igpo_norm([0.4, -0.2])
    out = igpo(r, m, g, t)
    assert per_turn(out, m, t, 0, 0) == pytest.approx(ig[0] + o[0], rel=RTOL, abs=ATOL)
    assert per_turn(out, m, t, 0, 1) == pytest.approx(ig[0] + o[0], rel=RTOL, abs=ATOL)


def test_matchtir_worked_example():
    # one group: row 0 turn rewards [0.5, 1] (call, answer), row 1 [0] (answers at once, wrong)
    # trajectory: R = 1.5, 0 -> mean 0.75, unbiased std sqrt(2·0.75²) = 1.06066 -> ±0.707106
    # turn returns, λ = 0.9: row 0 G = [0.5 + 0.9·1, 1] = [1.4, 1]; row 1 G = [0]
    #   turn 0: {1.4, 0}: mean 0.7, std 0.989949 -> ±0.707106;  turn 1: only row 0 -> 0
    # fused: row 0 = [(0.7071 + 0.7071)/2, (0.7071 + 0)/2] = [0.7071, 0.3536]; row 1 = [−0.7071]
    rows = [[(1, 2, 0.5), (2, 0, 1.0)], [(2, 0, 0.0)]]
    r, m, g, t = episodes(rows, [3, 3])
    a = 0.75 / (math.sqrt(2 * 0.75 ** 2) + 1e-6)
    b = 0.7 / (math.sqrt(2 * 0.7 ** 2) + 1e-6)
    out = matchtir(r, m, g, t)
    assert per_turn(out, m, t, 0, 0) == pytest.approx((a + b) / 2, rel=RTOL, abs=ATOL)
    assert per_turn(out, m, t, 0, 1) == pytest.approx(a / 2, rel=RTOL, abs=ATOL)
    assert per_turn(out, m, t, 1, 0) == pytest.approx(-(a + b) / 2, rel=RTOL, abs=ATOL)


def test_turn_rewards_of_sums_trained_tokens_per_turn():
    r, m, g, t = episodes([[(2, 1, 0.5), (1, 0, 2.0)], [(1, 0, -1.0)]], [0, 0], L=5, garbage=NAN)
    vals, exists = turn_rewards_of(r, m, t)
    close(vals, [[0.5, 2.0], [-1.0, 0.0]])
    assert exists.tolist() == [[True, True], [True, False]]


# ------------------------------------------------------------------------------ (b) loop references

def random_episodes(seed, B, max_turns=4, garbage=0.0):
    """Random multi-turn rows (1..max_turns turns, 0..2 output tokens per turn, a turn with no
    model token now and then), arbitrary non-contiguous group ids, rewards from a small set (so
    ties and zeros occur) or continuous."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        K = int(torch.randint(1, max_turns + 1, (1,), generator=g))
        row = []
        for _k in range(K):
            n_model = int(torch.randint(0, 3, (1,), generator=g)) if torch.rand(1, generator=g) < 0.15 else \
                int(torch.randint(1, 3, (1,), generator=g))
            n_obs = int(torch.randint(0, 3, (1,), generator=g))
            choices = [0.0, 1.0, -0.5, 0.3]
            rew = choices[int(torch.randint(0, 4, (1,), generator=g))] if torch.rand(1, generator=g) < 0.6 \
                else float(torch.randn(1, generator=g))
            row.append((n_model, n_obs, rew))
        rows.append(row)
    labels = torch.randint(0, max(1, B // 3), (B,), generator=g)
    ids = (torch.randperm(50, generator=g)[:max(1, B // 3)] * 7 - 20)[labels]
    return episodes(rows, ids.tolist(), L=sum(3 + 2 for _ in range(max_turns)), garbage=garbage)


def loop_turns(r, m, t):
    """Per row: {turn: reward} over turns with a trained token (plain Python)."""
    out = []
    for rr, mm, tt in zip(r.tolist(), m.tolist(), t.tolist()):
        d = {}
        for v, keep, k in zip(rr, mm, tt):
            if keep and k >= 0:
                d[k] = d.get(k, 0.0) + v
        out.append(d)
    return out


def loop_returns(d, gamma):
    """{turn: G} with G_k = r_k + γ G_{next existing turn}."""
    G, running = {}, 0.0
    for k in sorted(d, reverse=True):
        running = d[k] + gamma * running
        G[k] = running
    return G


def to_tokens(per_row, m, t):
    return [[per_row[b].get(k, 0.0) if keep else 0.0 for keep, k in zip(mm, tt)]
            for b, (mm, tt) in enumerate(zip(m.tolist(), t.tolist()))]


def loop_turn_rloo(r, m, g, t, gamma=1.0):
    turns = loop_turns(r, m, t)
    G = [loop_returns(d, gamma) for d in turns]
    groups = g.tolist()
    adv = []
    for i, Gi in enumerate(G):
        a = {}
        for k, v in Gi.items():
            others = [G[j][k] for j in range(len(G)) if j != i and groups[j] == groups[i] and k in G[j]]
            a[k] = v - sum(others) / len(others) if others else 0.0
        adv.append(a)
    return to_tokens(adv, m, t)


def _zscore_unbiased(vals, v, eps):
    n = len(vals)
    if n < 2 or all(x == vals[0] for x in vals):
        return 0.0
    mean = sum(vals) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (n - 1))
    return (v - mean) / (std + eps)


def loop_matchtir(r, m, g, t, lam=0.9, eps=1e-6):
    turns = loop_turns(r, m, t)
    groups = g.tolist()
    R = [sum(d.values()) for d in turns]
    G = [loop_returns(d, lam) for d in turns]
    adv = []
    for i, d in enumerate(turns):
        if not d:
            adv.append({})
            continue
        group_R = [R[j] for j in range(len(R)) if groups[j] == groups[i] and turns[j]]
        a_traj = _zscore_unbiased(group_R, R[i], eps)
        a = {}
        for k in d:
            same_k = [G[j][k] for j in range(len(G)) if groups[j] == groups[i] and k in G[j]]
            a[k] = (a_traj + _zscore_unbiased(same_k, G[i][k], eps)) / 2
        adv.append(a)
    return to_tokens(adv, m, t)


def loop_igpo(r, m, g, t, norm_mode="separate", scale_by_std=True, gamma=1.0, eps=1e-6):
    turns = loop_turns(r, m, t)
    groups = g.tolist()
    kind = []   # per row: {turn: 'O' | 'IG'} for reward positions
    for d in turns:
        last = max(d) if d else None
        kind.append({k: ("O" if k == last else "IG") for k, v in d.items() if k == last or v != 0})
    shaped = []
    for i, d in enumerate(turns):
        s = {}
        for k, what in kind[i].items():
            same = (lambda w: w == what) if norm_mode == "separate" else (lambda w: True)
            pool = [turns[j][kk] for j in range(len(turns)) if groups[j] == groups[i]
                    for kk, w in kind[j].items() if same(w)]
            if all(x == pool[0] for x in pool):
                s[k] = 0.0
                continue
            n = len(pool)
            mean = sum(pool) / n
            sigma = math.sqrt(sum((x - mean) ** 2 for x in pool) / n + 1e-8)
            s[k] = (d[k] - mean) / (sigma + eps) if scale_by_std else d[k] - mean
        shaped.append({k: s.get(k, 0.0) for k in d})
    adv = [loop_returns(s, gamma) for s in shaped]
    return to_tokens(adv, m, t)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("B", [1, 4, 9])
@pytest.mark.parametrize("gamma", [1.0, 0.7])
def test_turn_rloo_matches_loop(seed, B, gamma):
    r, m, g, t = random_episodes(seed, B)
    close(turn_rloo(r, m, g, t, gamma=gamma), loop_turn_rloo(r, m, g, t, gamma))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("B", [1, 4, 9])
@pytest.mark.parametrize("lam", [0.9, 1.0])
def test_matchtir_matches_loop(seed, B, lam):
    r, m, g, t = random_episodes(seed, B)
    close(matchtir(r, m, g, t, lam=lam), loop_matchtir(r, m, g, t, lam=lam))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("B", [1, 4, 9])
@pytest.mark.parametrize("kw", [{}, {"norm_mode": "joint"}, {"scale_by_std": False}, {"gamma": 0.8}])
def test_igpo_matches_loop(seed, B, kw):
    r, m, g, t = random_episodes(seed, B)
    close(igpo(r, m, g, t, **kw), loop_igpo(r, m, g, t, **kw))


# ------------------------------------------------------------------------------ (c) invariances

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("garbage", [NAN, float("inf"), -1e30])
def test_garbage_on_tool_output_and_padding_changes_nothing(name, garbage):
    clean = call(name, *random_episodes(3, 12))
    r, m, g, t = random_episodes(3, 12, garbage=garbage)
    dirty = call(name, r, m, g, t)
    assert torch.equal(clean, dirty)
    assert torch.equal(dirty[~m], torch.zeros_like(dirty[~m]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", range(3))
def test_permuting_episodes_permutes_the_advantages(name, seed):
    r, m, g, t = random_episodes(seed, 11)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(seed + 7))
    close(call(name, r[perm], m[perm], g[perm], t[perm]), call(name, r, m, g, t)[perm])


@pytest.mark.parametrize("name", NAMES)
def test_relabelling_groups_changes_nothing(name):
    r, m, g, t = random_episodes(4, 10)
    close(call(name, r, m, g * 11 - 3, t), call(name, r, m, g, t))


def one_turn_batch(seed):
    """Single-turn rows (turn id 0 everywhere, no tool output): what a single-turn batch gives."""
    g = torch.Generator().manual_seed(seed)
    B, L = 10, 5
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    m = torch.arange(L)[None, :] < lengths[:, None]
    R = torch.tensor([0.0, 1.0, 0.5, -1.0])[torch.randint(0, 4, (B,), generator=g)]
    r = torch.where(torch.arange(L)[None, :] == (lengths - 1)[:, None], R[:, None], torch.zeros(()))
    groups = torch.tensor([4, 8, 4, 15, 8, 4, 15, 8, 15, 99])
    return r, m, groups, torch.where(m, 0, -1)


@pytest.mark.parametrize("seed", range(4))
def test_one_turn_episodes_give_the_single_turn_estimators(seed):
    r, m, g, t = one_turn_batch(seed)
    steps = torch.zeros_like(t)
    close(turn_rloo(r, m, g, t), rloo(r, m, g, steps))                       # leave-one-out = RLOO
    close(matchtir(r, m, g, t), grpo(r, m, g, steps))                        # ½(GRPO + GRPO) = GRPO
    close(igpo(r, m, g, t, scale_by_std=False), dr_grpo(r, m, g, steps))     # centred outcome


def test_one_turn_igpo_uses_the_population_std():
    # IGPO divides by sqrt(population var + 1e-8), not torch.std: for R = {1, 0, 0} the centred
    # values (2/3, −1/3, −1/3) are divided by sqrt(2/9 + 1e-8) + 1e-6.
    r, m, g, t = episodes([[(1, 0, 1.0)], [(2, 0, 0.0)], [(1, 0, 0.0)]], [1, 1, 1])
    s = math.sqrt(2 / 9 + 1e-8) + 1e-6
    out = igpo(r, m, g, t)
    close(out, [[2 / 3 / s, 0.0], [-1 / 3 / s, -1 / 3 / s], [-1 / 3 / s, 0.0]])


@pytest.mark.parametrize("name", NAMES)
def test_group_of_one_is_finite(name):
    r, m, g, t = random_episodes(5, 7)
    out = call(name, r, m, torch.arange(7) * 3, t)
    assert torch.isfinite(out).all()
    if name in ("turn_rloo", "matchtir"):
        assert torch.equal(out, torch.zeros_like(out))       # nobody to compare with


@pytest.mark.parametrize("name", NAMES)
def test_constant_group_gives_exact_zeros(name):
    # every sample of the group does the same: 2 turns, rewards 0.3 then 0.3
    rows = [[(2, 1, 0.3), (1, 0, 0.3)]] * 7
    out = call(name, *episodes(rows, [2] * 7))
    assert torch.equal(out, torch.zeros_like(out))


def test_registry_metadata_and_kwargs():
    for name in NAMES:
        meta = ADVANTAGES.meta(name)
        assert meta["consumes"] == "turn" and meta["segments"] == "turn" and meta["needs_groups"]
    with pytest.raises(ValueError, match="gamma"):
        ADVANTAGES.check_kwargs("turn_rloo", {"gamma": 1.5}, "advantage.kwargs")
    with pytest.raises(ValueError, match="lam"):
        ADVANTAGES.check_kwargs("matchtir", {"lam": -0.1}, "advantage.kwargs")
    with pytest.raises(ValueError, match="unknown key"):
        ADVANTAGES.check_kwargs("igpo", {"curriculum_f1_weight": 0.5}, "advantage.kwargs")
    with pytest.raises(ValueError, match="norm_mode"):
        igpo(*episodes([[(1, 0, 1.0)]], [0]), norm_mode="both")


def test_trainer_passes_turn_ids_to_these_estimators():
    from finegrain.train.stages import segments_for

    r, m, g, t = episodes(WORKED, WORKED_G)
    B, L = m.shape
    traj = Trajectory(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                      response_ids=torch.zeros(B, L, dtype=torch.long), response_mask=t >= 0, loss_mask=m,
                      group_ids=g, step_ids=torch.zeros(B, L, dtype=torch.long), behavior_logprobs=torch.zeros(B, L),
                      truncated=torch.zeros(B, dtype=torch.bool), turn_ids=t)
    for name in NAMES:
        assert segments_for(name, traj) is traj.turns
    assert segments_for("grpo", traj) is traj.step_ids


# ------------------------------------------------------------------------------ (d) turn-count bias

def naive_per_turn_index(turn_r, has, groups):
    """The construction verl issue #7244 warns about (test-local reference, plain Python):

    Â_{i,k} = r_{i,k} − μ_{g,k},  μ_{g,k} = mean of r_{j,k} over the rows j of the group that have
    a reward at turn index k;  A_{i,k} = Σ_{k'≥k, has_{i,k'}} Â_{i,k'}   (summed over the turns left).
    Returns A_{i,0} for each row.
    """
    B = len(turn_r)
    out = []
    for i in range(B):
        total = 0.0
        for k in range(len(turn_r[i])):
            if not has[i][k]:
                continue
            pool = [turn_r[j][k] for j in range(B) if groups[j] == groups[i] and k < len(has[j]) and has[j][k]]
            total += turn_r[i][k] - sum(pool) / len(pool)
        out.append(total)
    return out


def stop_or_continue_batch(n, p_go, outcomes, q, cost):
    """Every group of n samples, each of which answers at once ('stop') or first makes one useless
    tool call that costs ``cost`` ('go', 2 turns), with P(go) = p_go; the outcome is outcomes[1]
    with probability q, else outcomes[0], independent of the choice.

    Returns the token layout, per-source rewards, per-row action, the probability of each row's
    group configuration, and per-turn rewards for the naive reference."""
    per_sample = [(a, o) for a in ("stop", "go") for o in (0, 1)]
    rows_r_out, rows_r_cost, go, weight, groups, turn_cost, has_cost, turn_total, has_total = [], [], [], [], [], [], [], [], []
    L = 4   # stop: [turn 0, turn 0, pad, pad]; go: [turn 0, tool output, turn 1, turn 1]
    m = []
    t_ids = []
    for gi, config in enumerate(itertools.product(per_sample, repeat=n)):
        w = math.prod((p_go if a == "go" else 1 - p_go) * (q if o else 1 - q) for a, o in config)
        for a, o in config:
            R = outcomes[o]
            if a == "stop":
                m.append([1, 1, 0, 0]); t_ids.append([0, 0, -1, -1])
                rows_r_out.append([0, R, 0, 0]); rows_r_cost.append([0, 0, 0, 0])
                turn_cost.append([0.0]); has_cost.append([False])
                turn_total.append([R]); has_total.append([True])
            else:
                m.append([1, 0, 1, 1]); t_ids.append([0, 0, 1, 1])
                rows_r_out.append([0, 0, 0, R]); rows_r_cost.append([-cost, 0, 0, 0])
                turn_cost.append([-cost, 0.0]); has_cost.append([True, False])
                turn_total.append([-cost, R]); has_total.append([True, True])
            go.append(a == "go"); weight.append(w); groups.append(gi)
    return dict(m=torch.tensor(m, dtype=torch.bool), t=torch.tensor(t_ids), g=torch.tensor(groups),
                r_out=torch.tensor(rows_r_out, dtype=torch.float32), r_cost=torch.tensor(rows_r_cost, dtype=torch.float32),
                go=torch.tensor(go), w=torch.tensor(weight, dtype=torch.float64), L=L,
                turn_cost=turn_cost, has_cost=has_cost, turn_total=turn_total, has_total=has_total)


def go_minus_stop(a0, batch):
    """E[A_{i,0} | go] − E[A_{i,0} | stop], exactly (weighted over every group configuration).

    The policy gradient on the logit of 'go' is p(1−p)·(this), so an unbiased estimator must give
    Q(go) − Q(stop) in reward units (when it does not rescale)."""
    a0 = torch.as_tensor(a0, dtype=torch.float64)
    w, go = batch["w"], batch["go"]
    return float((w * a0 * go).sum() / (w * go).sum() - (w * a0 * ~go).sum() / (w * ~go).sum())


@pytest.mark.parametrize("cost", [0.25, -0.5])
def test_naive_per_turn_baseline_hides_the_cost_of_an_extra_turn(cost):
    """RFC #7244's case: MT-GRPO-style per-turn-index normalisation of the intermediate reward plus
    a group-relative outcome advantage. The extra tool call really costs `cost` (truth:
    Q(go) − Q(stop) = −cost), but each intermediate reward is centred by the mean of its turn
    index, which is −cost itself, so the estimator sees no difference: a hidden bonus of
    +cost = −E[r_intermediate] on every 'take another turn' decision. finegrain's turn_rloo
    gives exactly −cost."""
    bt = stop_or_continue_batch(n=3, p_go=0.4, outcomes=(0.0, 1.0), q=0.6, cost=cost)
    m, g, t = bt["m"], bt["g"], bt["t"]
    steps = torch.zeros_like(t)
    naive = rloo(bt["r_out"], m, g, steps)[:, 0].double() + torch.tensor(
        naive_per_turn_index(bt["turn_cost"], bt["has_cost"], g.tolist()), dtype=torch.float64)
    ours = turn_rloo(bt["r_out"] + bt["r_cost"], m, g, t)[:, 0]
    truth = -cost
    bias_naive = go_minus_stop(naive, bt) - truth
    bias_ours = go_minus_stop(ours, bt) - truth
    assert bias_naive == pytest.approx(cost, abs=1e-6)          # the hidden bonus, = −E[r_intermediate]
    assert bias_ours == pytest.approx(0.0, abs=1e-6)
    # the same two sources, each through turn_rloo (per-source credit), is unbiased too
    per_source = turn_rloo(bt["r_out"], m, g, t)[:, 0] + turn_rloo(bt["r_cost"], m, g, t)[:, 0]
    assert go_minus_stop(per_source, bt) - truth == pytest.approx(0.0, abs=1e-6)


def test_igpo_estimator_has_the_same_blind_spot():
    """IGPO's estimator (the paper's, kept as is) centres each IG position by the group's IG mean
    and sums over the turns left: with a constant cost on every tool call the cost disappears and
    'go' and 'stop' look alike, while the true difference is −cost."""
    cost = 0.25
    bt = stop_or_continue_batch(n=3, p_go=0.4, outcomes=(0.0, 1.0), q=0.6, cost=cost)
    a0 = igpo(bt["r_out"] + bt["r_cost"], bt["m"], bt["g"], bt["t"])[:, 0]
    assert go_minus_stop(a0, bt) == pytest.approx(0.0, abs=1e-6)
    assert go_minus_stop(turn_rloo(bt["r_out"] + bt["r_cost"], bt["m"], bt["g"], bt["t"])[:, 0], bt) == \
        pytest.approx(-cost, abs=1e-6)


def test_naive_per_turn_baseline_rewards_a_useless_turn_when_turn_count_is_independent_of_reward():
    """No intermediate reward at all and an outcome in {−1, +1} that does not depend on the
    number of turns: the true gradient on 'take another turn' is 0. The naive estimator fed the
    summed rewards centres the outcome by the mean *of the turn index it lands on*, so the
    sample that took the extra turn is compared with a different baseline and gets a positive
    expected advantage; turn_rloo gives exactly 0."""
    bt = stop_or_continue_batch(n=3, p_go=0.5, outcomes=(-1.0, 1.0), q=0.25, cost=0.0)
    has_turn = [[True] * len(row) for row in bt["turn_total"]]
    naive = naive_per_turn_index(bt["turn_total"], has_turn, bt["g"].tolist())
    ours = turn_rloo(bt["r_out"], bt["m"], bt["g"], bt["t"])[:, 0]
    assert go_minus_stop(naive, bt) > 0.1
    assert go_minus_stop(ours, bt) == pytest.approx(0.0, abs=1e-6)
