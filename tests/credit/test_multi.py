"""Multi-objective rewards (finegrain/credit/multi.py): each normalisation by hand, loop versus
vectorised, the trainer paths that implement them, invariances, DPA's direction check, ReNorm,
the shipped GDPO config and a tiny end-to-end run."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from finegrain.config import load_config
from finegrain.credit import ADVANTAGES
from finegrain.credit.multi import (check_direction, direction_scalarize, normalize_then_sum, renorm_step_rewards,
                                    sum_then_normalize)
from finegrain.masked import masked_whiten
from finegrain.rewards.base import RewardOutput
from finegrain.rewards.combine import combine
from finegrain.train.stages import compute_advantages
from tests.filters.test_filters import traj_from
from tests.helpers import close

ROOT = Path(__file__).resolve().parents[2]
EPS = 1e-4


def T(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# worked examples

# one group of four, two 0/1 objectives (say correctness and format):
#   row 0 (1, 0)   row 1 (0, 1)   row 2 (0, 1)   row 3 (0, 0)
R4 = T([[1, 0], [0, 1], [0, 1], [0, 0]])
M4 = torch.ones(4, 2, dtype=torch.bool)
G4 = torch.tensor([3, 3, 3, 3])


def test_sum_then_normalize_worked_example_collapses_distinct_combinations():
    # R = (1, 1, 1, 0), mean 0.75; unbiased std = sqrt((3·0.25² + 0.75²)/3) = sqrt(0.25) = 0.5
    # A = (0.25, 0.25, 0.25, −0.75) / (0.5 + ε): rows (1, 0) and (0, 1) get the same advantage
    A = sum_then_normalize(R4, M4, G4, [1.0, 1.0], eps=EPS)
    close(A, T([0.25, 0.25, 0.25, -0.75]) / (0.5 + EPS))
    # weights apply before the sum: w = (2, 1): R = (2, 1, 1, 0), mean 1, std sqrt(2/3)
    A = sum_then_normalize(R4, M4, G4, [2.0, 1.0], eps=EPS)
    close(A, T([1, 0, 0, -1]) / (math.sqrt(2 / 3) + EPS))
    # 'none' only centres; 'batch' divides by the std over the batch (here: two groups)
    close(sum_then_normalize(R4, M4, G4, [1.0, 1.0], scale="none"), T([0.25, 0.25, 0.25, -0.75]))
    R = T([[1, 0], [0, 0], [3, 0], [1, 0]])           # groups {0, 1}: R (1, 0); {2, 3}: R (3, 1)
    g = torch.tensor([0, 0, 1, 1])
    # group-centred (0.5, −0.5, 1, −1); batch std of R = (1, 0, 3, 1): mean 1.25, var (0.0625+1.5625+3.0625+0.0625)/3
    std_b = math.sqrt((0.0625 + 1.5625 + 3.0625 + 0.0625) / 3)
    close(sum_then_normalize(R, M4, g, [1.0, 1.0], scale="batch", eps=EPS), T([0.5, -0.5, 1, -1]) / (std_b + EPS))


def test_normalize_then_sum_worked_example_keeps_them_apart():
    # objective 1 = (1, 0, 0, 0): mean 0.25, std sqrt((0.75² + 3·0.25²)/3) = 0.5
    #     z1 = (0.75, −0.25, −0.25, −0.25) / (0.5 + ε)            ≈ (1.5, −0.5, −0.5, −0.5)
    # objective 2 = (0, 1, 1, 0): mean 0.5, std sqrt(4·0.25/3) = 1/√3
    #     z2 = (−0.5, 0.5, 0.5, −0.5) / (1/√3 + ε)                ≈ ±√3/2 = ±0.866
    # R = z1 + z2 ≈ (0.634, 0.366, 0.366, −1.366): the rarer success (row 0) now gets more credit
    z1 = T([0.75, -0.25, -0.25, -0.25]) / (0.5 + EPS)
    z2 = T([-0.5, 0.5, 0.5, -0.5]) / (1 / math.sqrt(3) + EPS)
    R = z1 + z2
    close(normalize_then_sum(R4, M4, G4, [1.0, 1.0], eps=EPS, batch_norm=False), R)
    # batch normalisation: (R − mean R)/(std R + ε) over the four rows (mean R = 0 up to rounding)
    close(normalize_then_sum(R4, M4, G4, [1.0, 1.0], eps=EPS), (R - R.mean()) / (R.std() + EPS))
    # weights multiply the normalised objectives
    close(normalize_then_sum(R4, M4, G4, [1.0, 0.5], eps=EPS, batch_norm=False), z1 + 0.5 * z2)


def test_normalize_then_sum_uses_only_the_rows_an_objective_applies_to():
    # objective 2 applies to rows 0 and 1 only: its group statistics are over (0, 1) -> z2 = (−1, 1)/(√0.5 + ε);
    # rows 2 and 3 add nothing for it (a sparse objective weighs as much as a dense one: §28a)
    m = torch.tensor([[True, True], [True, True], [True, False], [True, False]])
    z1 = T([0.75, -0.25, -0.25, -0.25]) / (0.5 + EPS)
    z2 = T([-0.5, 0.5, 0.0, 0.0]) / (math.sqrt(0.5) + EPS)
    garbage = R4.clone()
    garbage[2:, 1] = float("nan")
    close(normalize_then_sum(garbage, m, G4, [1.0, 1.0], eps=EPS, batch_norm=False), z1 + z2)


def test_direction_scalarize_worked_example():
    # v = (0.8, 0.6): R = 0.8·r1 + 0.6·r2; objective 2 not applicable to row 1 (its NaN is ignored)
    r = T([[1.0, 0.5], [0.0, float("nan")], [0.25, 1.0]])
    m = torch.tensor([[True, True], [True, False], [True, True]])
    close(direction_scalarize(r, m, [0.8, 0.6]), T([0.8 + 0.3, 0.0, 0.2 + 0.6]))


def test_renorm_worked_example():
    # r = (p − ½) + (o − ½) = p + o − 1
    # row 0 right (o = 1): steps p = (0.9, 0.2) -> (0.9, 0.2)        all ≥ 0
    # row 1 wrong (o = 0): steps p = (0.9, 0.2) -> (−0.1, −0.8)      all ≤ 0
    # row 2 has no outcome: nothing; row 0's second... step 2 (masked) holds garbage
    p = T([[0.9, 0.2, float("nan")], [0.9, 0.2, 0.5], [0.3, 0.3, 0.3]])
    sm = torch.tensor([[True, True, False], [True, True, True], [True, True, True]])
    o, om = T([1.0, 0.0, float("nan")]), torch.tensor([True, True, False])
    values, mask = renorm_step_rewards(p, sm, o, om)
    close(values, T([[0.9, 0.2, 0.0], [-0.1, -0.8, -0.5], [0.0, 0.0, 0.0]]))
    assert mask.tolist() == [[True, True, False], [True, True, True], [False, False, False]]


def test_renorm_sign_follows_the_outcome():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(64, 5, generator=g, dtype=torch.float64)
    o = (torch.rand(64, generator=g) < 0.5).double()
    values, mask = renorm_step_rewards(p, torch.ones(64, 5, dtype=torch.bool), o, torch.ones(64, dtype=torch.bool))
    assert (values[o == 1] >= 0).all() and (values[o == 0] <= 0).all() and mask.all()


# ---------------------------------------------------------------------------------------------
# loop references


def _mean_std(xs):
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def loop_sum_then_normalize(r, m, g, w, scale, eps):
    B, K = len(r), len(w)
    R = [sum(w[k] * r[i][k] for k in range(K) if m[i][k]) for i in range(B)]
    ok = [any(m[i]) for i in range(B)]
    batch_sd = _mean_std([R[i] for i in range(B) if ok[i]])[1] if sum(ok) else 0.0
    out = []
    for i in range(B):
        if not ok[i]:
            out.append(0.0)
            continue
        group = [R[j] for j in range(B) if g[j] == g[i] and ok[j]]
        mean, sd = _mean_std(group)
        c = 0.0 if max(group) == min(group) else R[i] - mean
        out.append(c if scale == "none" else c / ((sd if scale == "group" else batch_sd) + eps))
    return out


def loop_normalize_then_sum(r, m, g, w, eps, batch_norm):
    B, K = len(r), len(w)
    R = []
    for i in range(B):
        total_i = 0.0
        for k in range(K):
            if not m[i][k]:
                continue
            vals = [r[j][k] for j in range(B) if g[j] == g[i] and m[j][k]]
            mean, sd = _mean_std(vals)
            c = 0.0 if max(vals) == min(vals) else r[i][k] - mean
            total_i += w[k] * c / (sd + eps)
        R.append(total_i)
    ok = [any(m[i]) for i in range(B)]
    if not batch_norm:
        return [R[i] if ok[i] else 0.0 for i in range(B)]
    kept = [R[i] for i in range(B) if ok[i]]
    if not kept:
        return [0.0] * B
    mean, sd = _mean_std(kept)
    const = max(kept) == min(kept)
    return [((0.0 if const else R[i] - mean) / (sd + eps)) if ok[i] else 0.0 for i in range(B)]


def random_case(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([1, 2, 3, 4, 6]) for _ in range(rng.randint(1, 5))]
    g = [gid * 7 + 1 for gid, n in enumerate(sizes) for _ in range(n)]
    rng.shuffle(g)
    B, K = len(g), rng.randint(1, 4)
    r = [[rng.choice([0.0, 1.0, rng.uniform(-3, 3)]) for _ in range(K)] for _ in range(B)]
    m = [[rng.random() < 0.8 for _ in range(K)] for _ in range(B)]
    if seed % 3 == 0 and B:
        m[0] = [False] * K          # a row no objective applies to
    if seed % 4 == 0:               # a constant objective
        for row in r:
            row[0] = 0.3
    w = [rng.uniform(-1, 2) for _ in range(K)]
    return r, m, g, w


@pytest.mark.parametrize("seed", range(16))
def test_vectorised_matches_loop(seed):
    r, m, g, w = random_case(seed)
    rt, mt, gt = T(r), torch.tensor(m), torch.tensor(g)
    for scale in ("group", "batch", "none"):
        close(sum_then_normalize(rt, mt, gt, w, scale=scale, eps=EPS), loop_sum_then_normalize(r, m, g, w, scale, EPS))
    for bn in (True, False):
        close(normalize_then_sum(rt, mt, gt, w, eps=EPS, batch_norm=bn), loop_normalize_then_sum(r, m, g, w, EPS, bn))


# ---------------------------------------------------------------------------------------------
# the trainer's paths are these functions


def outcome_outputs(seed, B=8, L=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    loss_mask = torch.arange(L)[None, :] < lengths[:, None]                    # (B, L) ragged rows
    traj = traj_from([0.0] * B, [4, 9, 4, 9, 4, 9, 4, 9][:B], L=L).replace(loss_mask=loss_mask, response_mask=loss_mask)
    verifier = (torch.rand(B, generator=g) < 0.5).float()
    overlong = -torch.rand(B, generator=g).round(decimals=1)
    ones = torch.ones(B, dtype=torch.bool)
    outputs = {"verifier": RewardOutput(verifier, ones, "outcome"), "overlong": RewardOutput(overlong, ones, "outcome")}
    return traj, outputs, torch.stack([verifier, overlong], dim=1).double()


@pytest.mark.parametrize("seed", range(4))
def test_grpo_on_the_weighted_sum_is_sum_then_normalize(seed):
    traj, outputs, r = outcome_outputs(seed)
    weights = {"verifier": 1.0, "overlong": 0.5}
    cfg = load_config(None, ["rewards=[{name: verifier, weight: 1.0}, {name: overlong, weight: 0.5}]",
                             "advantage.kwargs={eps: 1.0e-4}"])
    adv = compute_advantages(cfg, combine(outputs, weights, traj), traj)       # (B, L)
    want = sum_then_normalize(r, torch.ones_like(r, dtype=torch.bool), traj.group_ids, [1.0, 0.5], eps=1e-4)
    close(adv, torch.where(traj.loss_mask, want[:, None].float(), torch.zeros(())))


@pytest.mark.parametrize("seed", range(4))
def test_shipped_gdpo_config_is_normalize_then_sum_with_token_whitening(seed):
    # configs/arith_gdpo.yaml: each source GRPO-normalised in its group (ε = 1e-6), summed with its
    # coef, then whitened over the batch's trained tokens (NVlabs' verl-GDPO form)
    cfg = load_config(ROOT / "configs" / "arith_gdpo.yaml")
    traj, outputs, r = outcome_outputs(seed)
    weights = {x.name: x.weight for x in cfg.rewards}
    adv = compute_advantages(cfg, combine(outputs, weights, traj), traj)
    coefs = [cfg.advantage.per_source[k]["coef"] for k in ("verifier", "overlong")]
    R = normalize_then_sum(r, torch.ones_like(r, dtype=torch.bool), traj.group_ids, coefs, eps=1e-6, batch_norm=False)
    want = masked_whiten(torch.where(traj.loss_mask, R[:, None], torch.zeros((), dtype=R.dtype)), traj.loss_mask)
    close(adv, want.float())


# ---------------------------------------------------------------------------------------------
# invariances


@pytest.mark.parametrize("fn", ["sum_then_normalize", "normalize_then_sum"])
def test_garbage_under_a_false_mask_changes_nothing(fn):
    f = {"sum_then_normalize": sum_then_normalize, "normalize_then_sum": normalize_then_sum}[fn]
    r, m, g, w = random_case(5)
    rt, mt, gt = T(r), torch.tensor(m), torch.tensor(g)
    clean = f(rt, mt, gt, w)
    for junk in (float("nan"), 1e30, -float("inf")):
        assert torch.equal(f(torch.where(mt, rt, torch.full_like(rt, junk)), mt, gt, w), clean)


@pytest.mark.parametrize("fn", ["sum_then_normalize", "normalize_then_sum"])
def test_permuting_the_batch_permutes_the_advantages(fn):
    f = {"sum_then_normalize": sum_then_normalize, "normalize_then_sum": normalize_then_sum}[fn]
    r, m, g, w = random_case(7)
    rt, mt, gt = T(r), torch.tensor(m), torch.tensor(g)
    perm = torch.randperm(len(g), generator=torch.Generator().manual_seed(0))
    close(f(rt[perm], mt[perm], gt[perm], w), f(rt, mt, gt, w)[perm])


def test_a_group_of_one_and_a_constant_group_are_finite_and_zero():
    r = T([[1.0, 0.2], [0.5, 0.5], [0.5, 0.5]])     # row 0 alone; rows 1-2 identical
    m, g = torch.ones(3, 2, dtype=torch.bool), torch.tensor([0, 1, 1])
    for scale in ("group", "batch", "none"):
        assert sum_then_normalize(r, m, g, [1.0, 1.0], scale=scale).eq(0).all()
    assert normalize_then_sum(r, m, g, [1.0, 1.0]).eq(0).all()
    empty = torch.zeros(3, 2, dtype=torch.bool)     # nothing applies anywhere
    assert sum_then_normalize(r, empty, g, [1.0, 1.0]).eq(0).all() and normalize_then_sum(r, empty, g, [1.0, 1.0]).eq(0).all()


def test_bad_arguments_give_one_line():
    with pytest.raises(ValueError, match=r"^sum_then_normalize.scale: expected one of group \| batch \| none, got 'row'"):
        sum_then_normalize(R4, M4, G4, [1.0, 1.0], scale="row")
    with pytest.raises(ValueError, match=r"^weights: expected shape \(K,\) with K=2, got \(3,\)"):
        normalize_then_sum(R4, M4, G4, [1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match=r"^reward_mask: masks must be torch.bool"):
        normalize_then_sum(R4, M4.float(), G4, [1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# DPA's preference direction


@pytest.mark.parametrize("direction,match", [
    ([1.0, 1.0], r"^v: a preference direction must have unit length, got ‖v‖₂ = 1.414 for \[1, 1\]; divide each by 1.414$"),
    ([float("nan"), 1.0], r"^v: expected a non-empty vector of finite numbers"),
    ([], r"^v: expected a non-empty vector of finite numbers"),
    ([[0.6, 0.8]], r"^v: expected a non-empty vector of finite numbers"),
    (["a", "b"], r"^v: expected a vector of numbers"),
])
def test_check_direction_refuses_in_one_line(direction, match):
    with pytest.raises(ValueError, match=match):
        check_direction(direction, where="v")


def test_check_direction_accepts_unit_vectors_and_names_objectives():
    close(check_direction([math.cos(0.3), -math.sin(0.3)]), [math.cos(0.3), -math.sin(0.3)])
    close(check_direction([0.71, 0.70]), [0.71, 0.70])  # DPA's two-digit weights: ‖v‖₂ = 0.997
    with pytest.raises(ValueError, match=r"got ‖v‖₂ = 0.9829 "):
        check_direction([0.70, 0.69], where="v")
    with pytest.raises(ValueError, match=r"^v: 2 components for 3 objectives \(a, b, c\)"):
        check_direction([0.6, 0.8], names=["a", "b", "c"], where="v")


@pytest.mark.parametrize("overrides,ok", [
    (["rewards=[{name: verifier, weight: 0.8}, {name: overlong, weight: 0.6}]"], True),
    (["rewards=[{name: verifier, weight: 1.0}, {name: overlong, weight: 0.6}]"], False),
    (["rewards=[{name: verifier, weight: 1.0}, {name: overlong, weight: 1.0}]",
      "advantage.per_source={verifier: {name: grpo, coef: 0.6}, overlong: {name: grpo, coef: -0.8}}"], True),
    (["rewards=[{name: verifier, weight: 0.8}, {name: overlong, weight: 0.6}]",
      "advantage.per_source={verifier: {name: grpo, coef: 1.0}, overlong: {name: grpo, coef: 1.0}}"], False),
])
def test_config_checks_the_direction_against_the_weights_that_apply(overrides, ok):
    args = ["advantage.preference_direction=true", *overrides]
    if ok:
        assert load_config(None, args).advantage.preference_direction is True
        return
    with pytest.raises(ValueError, match=r"^advantage.preference_direction \(the .*\): a preference direction must have unit length") as e:
        load_config(None, args)
    assert "\n" not in str(e.value)


def test_direction_flag_is_off_by_default_and_refuses_other_values():
    from finegrain.config import to_dict
    from finegrain.train.rundir import config_diff

    cfg = load_config(None)
    assert cfg.advantage.preference_direction is None
    saved = to_dict(cfg)
    del saved["advantage"]["preference_direction"]   # a run directory saved before the key existed
    assert config_diff(saved, to_dict(cfg), cfg) == {}  # resumes without a "changed config" refusal
    load_config(None, ["advantage.preference_direction=false", "rewards=[{name: verifier, weight: 3.0}]"])
    with pytest.raises(ValueError, match=r"^advantage.preference_direction: expected true, false or null, got 'yes please'$"):
        load_config(None, ["advantage.preference_direction='yes please'"])


def test_kl_penalty_is_not_an_objective_of_the_direction():
    load_config(None, ["advantage.preference_direction=true", "loss.kl_coef=0.1", "loss.kl_mode=reward",
                       "rewards=[{name: verifier}]",
                       "advantage.per_source={verifier: {name: reinforce_pp}, kl_penalty: {name: reinforce_pp, coef: 3.0}}"])


# ---------------------------------------------------------------------------------------------
# config and end to end


def test_shipped_gdpo_config_loads():
    cfg = load_config(ROOT / "configs" / "arith_gdpo.yaml")
    assert sorted(cfg.advantage.per_source) == ["overlong", "verifier"] and cfg.advantage.whiten
    assert all(ADVANTAGES.meta(s["name"])["consumes"] == "outcome" for s in cfg.advantage.per_source.values())


def test_tiny_gdpo_run_trains(tmp_path, sft_cache):
    from finegrain.train.logging import read_log
    from finegrain.train.loop import train
    from tests.conftest import tiny_run_overrides

    # the micro model's responses are at most 24 tokens: an overlong window of 20..24 gives the
    # second objective variance in every group
    rewards = [{"name": "verifier", "weight": 1.0, "kwargs": {}},
               {"name": "overlong", "weight": 1.0, "kwargs": {"max_len": 24, "cache_len": 20}}]
    ov = tiny_run_overrides(tmp_path / "run", sft_cache, steps=2, **{"rewards": rewards, "train.save_every": 0})
    train(load_config(ROOT / "configs" / "arith_gdpo.yaml", ov), log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss/loss"])) for r in rows)
    assert all(r["adv/abs_mean"] > 0 for r in rows)
