"""finegrain.credit.spae: worked examples (a), a plain loop (b), invariances (c), the rewards as the
combiner places them, the shipped config and a tiny end-to-end run (d)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from finegrain.config import load_config, to_dict, validate
from finegrain.credit import ADVANTAGES
from finegrain.credit.spae import spae, split_outcome_and_steps
from finegrain.masked import masked_whiten
from finegrain.rewards.base import RewardOutput
from finegrain.rewards.combine import combine, total
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from finegrain.trajectory import Trajectory
from tests.conftest import tiny_run_overrides
from tests.helpers import ATOL, RTOL, M, T, close

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
A0 = 0.5 / (math.sqrt(0.5) + 1e-6)          # GRPO of R = (1, 0) in a group of two


# ================================================================================ (a) worked examples

STEPS = torch.tensor([[0, 0, 1, 1, 2, 2, -1], [0, 0, 1, 1, 2, 2, -1]])   # 3 steps, then EOS
MASK = torch.ones(2, 7, dtype=torch.bool)
# ΔΦ_0 on col 1, ΔΦ_1 on col 3, the answer step 2 unprobed, the outcome on the EOS (col 6)
REWARDS = T([[0.0, 0.6, 0.0, 0.5, 0.0, 0.0, 1.0],
             [0.0, -0.2, 0.0, 1.2, 0.0, 0.0, 0.0]])


def test_worked_example_with_saturation():
    got = spae(REWARDS, MASK, torch.tensor([4, 4]), STEPS, whiten=False)
    # row 0 (A = +A0): Φ̃ = 0.6 after step 0, 1.1 ≥ 0.9 after step 1: the tokens after col 3 are
    # saturated and, the outcome being above the group mean, get λ·A = 0.5·A0
    # row 1 (A = −A0): Φ̃ = −0.2, 1.0: saturated too, but a negative advantage keeps its full blame
    want = [[A0 + 0.6, A0 + 0.6, A0 + 0.5, A0 + 0.5, 0.5 * A0, 0.5 * A0, 0.5 * A0],
            [-A0 - 0.2, -A0 - 0.2, -A0 + 1.2, -A0 + 1.2, -A0, -A0, -A0]]
    close(got, want)
    close(spae(REWARDS, MASK, torch.tensor([4, 4]), STEPS), masked_whiten(T(want), MASK))     # whiten=True
    # ξ = 2, λ = 0, τ = 1.05: row 0 still saturates (1.1), row 1 does not matter (A < 0)
    got = spae(REWARDS, MASK, torch.tensor([4, 4]), STEPS, xi=2.0, saturation_weight=0.0, threshold=1.05,
               whiten=False)
    close(got, [[A0 + 1.2, A0 + 1.2, A0 + 1.0, A0 + 1.0, 0.0, 0.0, 0.0],
                [-A0 - 0.4, -A0 - 0.4, -A0 + 2.4, -A0 + 2.4, -A0, -A0, -A0]])


def test_the_step_that_reaches_saturation_keeps_its_credit():
    # one probed step jumps to Φ̃ = 0.95: its own tokens are before the saturation, the rest after
    r = T([[0.0, 0.95, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    steps = torch.tensor([[0, 0, 1, 1, -1], [0, 0, 1, 1, -1]])
    got = spae(r, torch.ones(2, 5, dtype=torch.bool), torch.tensor([0, 0]), steps, xi=0.0, whiten=False)
    close(got, [[A0, A0, 0.5 * A0, 0.5 * A0, 0.5 * A0], [-A0] * 5])


def test_a_truncated_row_reads_its_outcome_from_the_last_step():
    # no EOS: the last trained token (col 3) ends the unprobed last step and carries the outcome only
    r = T([[0.0, 0.3, 0.0, 1.0], [0.0, -0.1, 0.0, 0.0]])
    steps = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    R, step_r, _ = split_outcome_and_steps(r, torch.ones(2, 4, dtype=torch.bool), steps)
    close(R, [1.0, 0.0])
    close(step_r, [[0.3, 0.0], [-0.1, 0.0]])
    got = spae(r, torch.ones(2, 4, dtype=torch.bool), torch.tensor([0, 0]), steps, whiten=False)
    close(got, [[A0 + 0.3, A0 + 0.3, A0, A0], [-A0 - 0.1, -A0 - 0.1, -A0, -A0]])


def test_registration():
    meta = ADVANTAGES.meta("spae")
    assert meta["consumes"] == "step" and meta["needs_groups"]
    ADVANTAGES.check_kwargs("spae", {"xi": 0.5, "threshold": 0.8, "saturation_weight": 0.0, "whiten": False},
                            "advantage.kwargs")
    with pytest.raises(ValueError, match="saturation_weight"):
        ADVANTAGES.check_kwargs("spae", {"saturation_weight": 2.0}, "advantage.kwargs")


# ================================================================================ (b) plain loop

def loop_spae(r, mask, group_ids, steps, *, xi, threshold, lam, whiten, eps=1e-6):
    """The module docstring's formula, one token at a time."""
    B, L = r.shape
    trained = [[t for t in range(L) if mask[i, t]] for i in range(B)]
    last = [ts[-1] if ts else None for ts in trained]
    R = [float(r[i, last[i]]) if last[i] is not None else 0.0 for i in range(B)]
    A = []
    for i in range(B):
        grp = [j for j in range(B) if group_ids[j] == group_ids[i] and last[j] is not None]
        vals = [R[j] for j in grp]
        if last[i] is None or len(vals) < 2 or min(vals) == max(vals):
            A.append(0.0)
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        A.append((R[i] - mean) / (std + eps))
    out = torch.zeros(B, L)
    for i in range(B):
        step_r = {}
        for t in trained[i]:
            if t != last[i] and steps[i, t] >= 0:
                step_r[int(steps[i, t])] = step_r.get(int(steps[i, t]), 0.0) + float(r[i, t])
        gained, reached = 0.0, 0.0
        for t in range(L):
            reached = max(reached, gained)
            if mask[i, t]:
                f = lam if (A[i] > 0 and reached >= threshold) else 1.0
                d = step_r.get(int(steps[i, t]), 0.0) if steps[i, t] >= 0 else 0.0
                out[i, t] = A[i] * f + xi * d
                if t != last[i] and steps[i, t] >= 0:
                    gained += float(r[i, t])
    return masked_whiten(out, mask) if whiten else out


def random_batch(seed, B=12, L=16):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    response = torch.arange(L)[None, :] < lengths[:, None]
    eos = torch.rand(B, generator=g) < 0.6                                       # else truncated
    bounds = (torch.rand(B, L, generator=g) < 0.3).long().cumsum(1)
    steps = torch.where(response, bounds, torch.full((B, L), -1))
    last_col = lengths - 1
    steps[eos, last_col[eos]] = -1                                               # the EOS is in no step
    mask = response & (torch.rand(B, L, generator=g) < 0.9)                      # a few untrained tokens
    mask[torch.arange(B), last_col] = True
    group_ids = torch.arange(B) % 3
    placed = torch.zeros(B, L)
    K = (steps.max(1).values + 1).clamp(min=0)
    for i in range(B):                                                           # as rewards.combine places them
        for k in range(int(K[i]) - 1):                                           # ΔΦ on every step but the last
            at = [t for t in range(L) if steps[i, t] == k and mask[i, t]]
            if at:
                placed[i, at[-1]] += float(torch.rand(1, generator=g) * 1.5 - 0.3)
        placed[i, last_col[i]] += float(torch.randint(0, 2, (1,), generator=g))
    return placed, mask, group_ids, steps


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("whiten", [False, True])
def test_vectorised_equals_the_plain_loop(seed, whiten):
    r, mask, group_ids, steps = random_batch(seed)
    kw = dict(xi=[1.0, 0.3, 2.0, 1.0, 0.0][seed], threshold=[0.9, 0.5, 0.2, 1.5, 0.9][seed],
              saturation_weight=[0.5, 0.0, -0.5, 1.0, 0.25][seed])
    got = spae(r, mask, group_ids, steps, whiten=whiten, **kw)
    want = loop_spae(r, mask, group_ids, steps, xi=kw["xi"], threshold=kw["threshold"],
                     lam=kw["saturation_weight"], whiten=whiten)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-5)
    if kw["saturation_weight"] != 1.0 and not whiten:          # the saturation branch really ran
        assert (got != spae(r, mask, group_ids, steps, whiten=False, **{**kw, "saturation_weight": 1.0})).any()


# ================================================================================ (c) invariances

def test_garbage_under_a_false_mask_changes_nothing():
    r, mask, group_ids, steps = random_batch(7)
    want = spae(r, mask, group_ids, steps)
    junk = torch.where(mask, r, torch.full_like(r, float("nan")))
    got = spae(junk, mask, group_ids, steps)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert torch.all(got[~mask] == 0)


def test_permuting_the_batch_permutes_the_advantages():
    r, mask, group_ids, steps = random_batch(8)
    perm = torch.randperm(r.shape[0], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(spae(r[perm], mask[perm], group_ids[perm], steps[perm]),
                               spae(r, mask, group_ids, steps)[perm], rtol=RTOL, atol=ATOL)


def test_group_of_one_and_empty_rows_are_finite():
    r = T([[0.0, 0.4, 1.0], [0.0, 0.0, 0.0]])
    mask = M([[1, 1, 1], [0, 0, 0]])
    steps = torch.tensor([[0, 0, -1], [-1, -1, -1]])
    got = spae(r, mask, torch.tensor([0, 1]), steps, whiten=False)
    close(got, [[0.4, 0.4, 0.0], [0.0, 0.0, 0.0]])            # A = 0: only the shaping remains
    assert torch.isfinite(spae(r, mask, torch.tensor([0, 1]), steps)).all()
    assert torch.isfinite(spae(r, torch.zeros(2, 3, dtype=torch.bool), torch.tensor([0, 1]), steps)).all()


# ================================================================================ (d) placement, config, run

def traj_of(steps, group_ids):
    B, L = steps.shape
    response = torch.ones(B, L, dtype=torch.bool)
    return Trajectory(prompt_ids=torch.ones(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                      response_ids=torch.ones(B, L, dtype=torch.long), response_mask=response,
                      loss_mask=response.clone(), group_ids=group_ids, step_ids=steps,
                      behavior_logprobs=torch.zeros(B, L), truncated=torch.zeros(B, dtype=torch.bool))


def test_the_combiner_places_what_the_estimator_reads():
    traj = traj_of(torch.tensor([[0, 0, 1, 1, 2, 2, -1], [0, 0, 1, 1, 2, 2, 2]]), torch.tensor([4, 4]))  # row 1: no EOS
    outputs = {"verifier": RewardOutput(T([1.0, 0.0]), M([1, 1]), "outcome"),
               "spae_potential": RewardOutput(T([[0.6, 0.5, 0.0], [-0.2, 1.2, 0.0]]), M([[1, 1, 0], [1, 1, 0]]), "step")}
    placed = total(combine(outputs, {"verifier": 1.0, "spae_potential": 1.0}, traj))
    R, step_r, _ = split_outcome_and_steps(placed, traj.loss_mask, traj.step_ids)
    close(R, [1.0, 0.0])
    close(step_r, [[0.6, 0.5, 0.0], [-0.2, 1.2, 0.0]])


def test_config_loads_validates_and_only_swaps_rewards_and_estimator():
    cfg = load_config(CONFIGS / "arith_spae.yaml")
    validate(cfg)
    assert [(r.name, r.weight) for r in cfg.rewards] == [("verifier", 1.0), ("spae_potential", 1.0)]
    assert cfg.advantage.name == "spae" and not cfg.advantage.per_source
    mine, base = to_dict(cfg), to_dict(load_config(CONFIGS / "arith_grpo.yaml"))
    for d in (mine, base):
        d.pop("rewards"), d["advantage"].pop("name"), d["train"].pop("out_dir")
    assert mine == base


def test_tiny_run_end_to_end(tmp_path, sft_cache):
    overrides = tiny_run_overrides(tmp_path / "run", sft_cache, steps=2, **{"train.save_every": 0})
    cfg = load_config(CONFIGS / "arith_spae.yaml", overrides)
    validate(cfg)
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/loss"]) and math.isfinite(r["reward/spae_potential/mean"]) for r in rows)
    # two-line problems: every row of two or more steps is probed once per step but the last
    assert any(r["reward/spae_potential/probed_steps"] > 0 for r in rows)
    assert all(r["adv/abs_mean"] > 0 for r in rows)                 # whitened: not all zero
