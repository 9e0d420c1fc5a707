"""The std filter of RLPR (finegrain/filters/std_ema.py): worked warm-up and EMA sequence, the
state round trip, invariances, the registered entry and its validation."""

from __future__ import annotations

import math

import pytest
import torch

from finegrain.config import load_config
from finegrain.filters import FILTERS
from finegrain.filters.std_ema import StdEMA, group_std_stats, std_keep
from tests.filters.test_filters import traj_from
from tests.helpers import RTOL, close

# two groups of two (non-contiguous): group 5 rewards (0, 2a), group 8 rewards (0.5, 0.5 + 2b)
# -> unbiased stds √2·a and √2·b; mean group std √2·(a + b)/2


def round_of(a: float, b: float):
    outcome = torch.tensor([0.0, 0.5, 2 * a, 0.5 + 2 * b])
    return traj_from(outcome.tolist(), [5, 8, 5, 8]), outcome


S2 = math.sqrt(2)


def test_group_std_stats_worked_example():
    s, m = group_std_stats(torch.tensor([0.0, 0.5, 0.2, 0.9]), torch.tensor([5, 8, 5, 8]))
    close(s, [0.2 / S2, 0.4 / S2, 0.2 / S2, 0.4 / S2])          # std of (0, 0.2) = 0.2/√2
    assert m == pytest.approx(0.3 / S2, rel=RTOL)
    # a group of one has std 0 and counts as a group; no finite group gives None
    s, m = group_std_stats(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 1, 1]))
    close(s, [0.0, S2 / 2, S2 / 2])
    assert m == pytest.approx(S2 / 4, rel=RTOL)
    assert group_std_stats(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 0]))[1] is None
    assert std_keep(torch.tensor([0.1, 0.2]), None, beta=9.0).all()


def test_warm_up_then_ema_worked_sequence():
    # ema_start_step 2, start_step 4, momentum 0.5, beta 1:
    # round 1: mean m1 = √2·0.3 — before the warm-up: not recorded; keep all
    # round 2: m2 = √2·0.1 recorded; round 3: m3 = √2·0.3 recorded; keep all
    # round 4: EMA = (m2 + m3)/2 = √2·0.2; stds √2·(0.1, 0.4): keep group 8 only; m4 = √2·0.25
    # round 5: EMA = 0.5·m4 + 0.5·EMA = √2·0.225; stds √2·(0.3, 0.2): keep group 5 only
    f = StdEMA(beta=1.0, momentum=0.5, ema_start_step=2, start_step=4)
    keeps, emas = [], []
    for a, b in [(0.2, 0.4), (0.1, 0.1), (0.3, 0.3), (0.1, 0.4), (0.3, 0.2)]:
        traj, outcome = round_of(a, b)
        keep, loss_mask, m = f(traj, outcome)
        assert torch.equal(loss_mask, traj.loss_mask)
        keeps.append(keep.tolist())
        emas.append(m["ema"])
        assert m["mean_std"] == pytest.approx(S2 * (a + b) / 2, rel=RTOL)
    assert keeps[:3] == [[True] * 4] * 3
    assert keeps[3] == [False, True, False, True] and keeps[4] == [True, False, True, False]
    assert emas[:3] == [0.0, 0.0, 0.0]
    assert emas[3] == pytest.approx(S2 * 0.2, rel=RTOL) and emas[4] == pytest.approx(S2 * 0.225, rel=RTOL)
    assert f.rounds == 5 and f.warmup_count == 2


def test_reference_defaults_filter_from_round_11():
    f = StdEMA()
    actives = [f(*round_of(0.1, 0.2))[2]["active"] for _ in range(11)]
    assert actives == [0.0] * 10 + [1.0]
    assert f.warmup_count == 5 and f.ema == pytest.approx(S2 * 0.15, rel=RTOL)   # rounds 6..10


def test_an_empty_warm_up_starts_from_the_previous_round():
    f = StdEMA(beta=1.0, ema_start_step=3, start_step=2)
    f(*round_of(0.1, 0.3))                   # round 1: nothing recorded (warm-up 3..1 is empty)
    _, _, m = f(*round_of(0.5, 0.5))          # round 2: EMA = round 1's mean
    assert m["ema"] == pytest.approx(S2 * 0.2, rel=RTOL) and m["active"] == 1.0
    g = StdEMA(beta=1.0, ema_start_step=1, start_step=1)
    keep, _, m = g(*round_of(0.1, 0.3))       # no earlier round: this one's own mean
    assert m["ema"] == pytest.approx(S2 * 0.2, rel=RTOL) and keep.tolist() == [False, True, False, True]


def test_state_dict_round_trip_continues_exactly():
    rounds = [round_of(a, b) for a, b in [(0.2, 0.4), (0.1, 0.1), (0.3, 0.3), (0.1, 0.4), (0.3, 0.2), (0.25, 0.1)]]
    full = StdEMA(beta=0.9, momentum=0.3, ema_start_step=1, start_step=3)
    want = [full(*r) for r in rounds]
    first = StdEMA(beta=0.9, momentum=0.3, ema_start_step=1, start_step=3)
    for r in rounds[:3]:
        first(*r)
    resumed = StdEMA(beta=0.9, momentum=0.3, ema_start_step=1, start_step=3)
    resumed.load_state_dict(first.state_dict())
    for r, (keep, _, m) in zip(rounds[3:], want[3:]):
        got_keep, _, got_m = resumed(*r)
        assert got_keep.tolist() == keep.tolist() and got_m == m
    assert resumed.state_dict() == full.state_dict()
    with pytest.raises(ValueError, match="not finite"):
        StdEMA().load_state_dict({**full.state_dict(), "ema": float("inf")})


def test_permuting_rows_permutes_keep_and_a_group_of_one_is_finite():
    traj, outcome = round_of(0.1, 0.4)
    f = StdEMA(beta=1.0, ema_start_step=1, start_step=1)
    keep, _, _ = f(traj, outcome)
    perm = [3, 1, 0, 2]
    g = StdEMA(beta=1.0, ema_start_step=1, start_step=1)
    keep_p, _, _ = g(traj.select(perm), outcome[perm])
    assert keep_p.tolist() == keep[perm].tolist()
    assert g.ema == pytest.approx(f.ema, rel=RTOL)           # the same up to summation order
    one = traj_from([0.3, 0.1, 0.9], [0, 1, 1])
    _, _, m = StdEMA(ema_start_step=1, start_step=1)(one, torch.tensor([0.3, 0.1, 0.9]))
    assert all(math.isfinite(float(v)) for v in m.values())


def test_registered_entry_is_the_stateful_class():
    # the trainer builds one object per run from the kwargs (finegrain/train/stages.py::build_run)
    meta = FILTERS.meta("std_ema")
    assert meta["needs_groups"] and meta["stateful"] and FILTERS.get("std_ema") is StdEMA
    a, b = StdEMA(start_step=2, ema_start_step=1), StdEMA(start_step=2, ema_start_step=1)
    traj, outcome = round_of(0.1, 0.4)
    a(traj, outcome)
    assert a(traj, outcome)[2]["active"] == 1.0 and b(traj, outcome)[2]["active"] == 0.0   # no shared state


@pytest.mark.parametrize("override, match", [
    ("filters.filters=[{name: std_ema, kwargs: {beta: -1}}]",
     r"^filters.filters\[0\].kwargs.beta: expected a number in \[0, inf\)"),
    ("filters.filters=[{name: std_ema, kwargs: {momentum: 1.5}}]", r"^filters.filters\[0\].kwargs.momentum"),
    ("filters.filters=[{name: std_ema, kwargs: {start_step: 0}}]", r"^filters.filters\[0\].kwargs.start_step"),
    ("filters.filters=[{name: std_ema, kwargs: {beta: 0.5, window: 3}}]", r"unknown key 'window' for filter 'std_ema'"),
])
def test_kwargs_are_validated(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])
    with pytest.raises(ValueError, match=r"'std_ema' compares samples of a prompt"):
        load_config(None, ["filters.filters=[{name: std_ema}]", "rollout.group_size=1"])
    load_config(None, ["filters.filters=[{name: std_ema, kwargs: {beta: 0.9, ema_start_step: 2, start_step: 5}}]"])
