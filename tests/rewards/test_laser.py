"""Tests for finegrain.rewards.laser (LASER, LASER-D, LASER-DE): worked examples, a plain-loop
reference (stateful, over several batches), invariances, kwarg refusals and the state round trip."""

from __future__ import annotations

import io
from collections import Counter
from fractions import Fraction

import pytest
import torch

from finegrain.config import RunConfig
from finegrain.rewards.base import REWARDS
from finegrain.rewards.laser import (Laser, LaserD, LaserDE, choose_targets, difficulty_bands,
                                     has_ngram_repetition, laser_bonus, length_grid)
from finegrain.train.stages import RewardContext
from finegrain.trajectory import Trajectory
from tests.helpers import close

PAD = 0


class FakeTask:
    """verify(example, text) = example: each row's example *is* its verifier score."""

    def verify(self, example, text):
        return float(example)


def make_traj(lengths, group_ids, acc, *, L=None, ids=None, truncated=None, garbage=False, seed=0):
    """A batch with response lengths ``lengths`` (real tokens), verifier scores ``acc``.

    ``ids``: optional list of token lists (one per row, its real tokens); otherwise distinct
    tokens 1..len. ``garbage``: random ids (not PAD) under the False response mask.
    """
    B = len(lengths)
    L = L or max(max(lengths), 1) + 2
    gen = torch.Generator().manual_seed(seed)
    resp = torch.randint(50, 90, (B, L), generator=gen) if garbage else torch.full((B, L), PAD)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, n in enumerate(lengths):
        row = ids[i] if ids is not None else list(range(1, n + 1))
        assert len(row) == n
        resp[i, :n] = torch.tensor(row, dtype=torch.long)
        mask[i, :n] = True
    return Trajectory(
        prompt_ids=torch.ones(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
        response_ids=resp, response_mask=mask, loss_mask=mask.clone(),
        group_ids=torch.tensor(group_ids, dtype=torch.long), step_ids=torch.where(mask, 0, -1),
        behavior_logprobs=torch.zeros(B, L),
        truncated=torch.tensor(truncated if truncated is not None else [False] * B),
        prompt_texts=["q"] * B, response_texts=["r"] * B, examples=list(acc))


def ctx_for(max_new_tokens=12, group_size=4):
    cfg = RunConfig()
    cfg.rollout.max_new_tokens, cfg.rollout.group_size = max_new_tokens, group_size
    return RewardContext(cfg, FakeTask(), None, None, lambda: None)


def build(name, max_new_tokens=12, group_size=4, **kw):
    return REWARDS.get(name).from_context(ctx_for(max_new_tokens, group_size), **kw)


# ----------------------------------------------------------------------------- worked examples (a)


@pytest.mark.parametrize("variant,expected", [
    # rows: correct L=3, correct L=7, wrong L=2, wrong L=9; L_T = 5, α = 0.5, base 1 / −0.5
    ("reward", [1.5, 1.0, -0.5, -0.5]),    # +α only for the short correct one
    ("penalty", [1.0, 0.5, -0.5, -0.5]),   # −α only for the long correct one
    ("hybrid", [1.5, 0.5, -0.5, -0.5]),    # both
])
def test_laser_variants_worked_example(variant, expected):
    sig = build("laser", target_length=5, variant=variant)
    out = sig(make_traj([3, 7, 2, 9], [0, 0, 1, 1], [1.0, 1.0, 0.0, 0.0]))
    close(out.values, expected)
    assert out.level == "outcome" and out.mask.all()
    close(out.components["within_target"], [1.0, 0.0, 1.0, 0.0])
    close(out.components["target"], [5.0] * 4)


def test_laser_partial_credit_interpolates_without_bonus():
    # verify 0.5: base = −0.5 + 1.5·0.5 = 0.25, and it is not "correct" for the length term
    out = build("laser", target_length=5)(make_traj([2], [0], [0.5]))
    close(out.values, [0.25])


def test_laser_default_target_and_grid_follow_max_new_tokens():
    assert build("laser", max_new_tokens=48).target_length == 24          # ⌊48/2⌋
    assert build("laser_d", max_new_tokens=48).thresholds == list(range(12, 49, 3))  # ⌊48/4⌋, ⌊48/16⌋, 48
    assert build("laser_d", max_new_tokens=24).thresholds == list(range(6, 25))      # 6, 1, 24
    assert build("laser_de", max_new_tokens=2).thresholds == [1, 2]                  # floors at 1


def test_difficulty_bands_worked_example():
    # G=3: 2/3 right → high (3·2 ≥ 2·3); 1/3 → medium (3·1 ≥ 3); 0/3 → low. Groups interleaved.
    correct = torch.tensor([True, False, True, True, False, False, False, False, False])
    groups = torch.tensor([0, 1, 0, 1, 0, 2, 2, 2, 1])
    assert difficulty_bands(correct, groups).tolist() == [2, 1, 2, 1, 2, 0, 0, 0, 1]


def test_choose_targets_worked_example():
    # G = 4: lower_n = (1, ⌊4/3⌋ = 1, ⌊8/3⌋ = 2); thresholds 4, 6, 8, 10; L_max = 12.
    # high   [3, 5, 9, 11]: ℓ=4 covers 1 → 1·2 < 4; ℓ=6 covers 2 → 2·2 ≥ 4 → 6
    # medium [2, 7, 8, 10]: needs all 4 covered (·1 ≥ 4) → ℓ=10
    # low    [4, 6, 6, 12]: 12 is never covered below L_max → 12
    lengths = torch.tensor([3, 5, 9, 11, 2, 7, 8, 10, 4, 6, 6, 12])
    bands = torch.tensor([2] * 4 + [1] * 4 + [0] * 4)
    got = choose_targets(lengths, bands, thresholds=[4, 6, 8, 10], group_size=4, max_length=12)
    assert got.tolist() == [12, 10, 6]
    # an empty window: every band falls back to L_max
    assert choose_targets(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), thresholds=[4],
                          group_size=4, max_length=12).tolist() == [12, 12, 12]
    # G = 2: medium's lower_n is ⌊2/3⌋ = 0, so medium never gets a target below L_max
    assert choose_targets(torch.tensor([1, 1]), torch.tensor([1, 1]), thresholds=[4], group_size=2,
                          max_length=12).tolist() == [12, 12, 12]


# batch 1 of the LASER-D worked example: three groups of 4 (ids 7, 2, 5), interleaved
B1_LEN = [3, 4, 2, 5, 6, 7, 9, 6, 8, 11, 12, 10]
B1_GRP = [7, 2, 5, 7, 2, 5, 7, 2, 5, 7, 2, 5]
B1_ACC = [1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0]
# group 7: lengths [3, 5, 9, 11], right [1, 1, 1, 0] → high;  group 2: [4, 6, 6, 12], [1, 0, 0, 0] → low
# group 5: [2, 7, 8, 10], [1, 1, 0, 0] → medium.  Targets from this batch: high 6, medium 10, low 12.
B1_EXPECTED = [1.5, 1.5, 1.5, 1.5, -0.5, 1.5, 1.0, -0.5, -0.5, -0.5, -0.5, -0.5]
# row by row: 7:L3≤6 +α | 2:L4≤12 +α | 5:L2≤10 +α | 7:L5≤6 +α | 2 wrong | 5:L7≤10 +α | 7:L9>6 → 1.0 | wrong ...


def laser_d_worked(**kw):
    return build("laser_d", max_new_tokens=12, group_size=4, lower_bound=4, interval=2, upper_bound=10,
                 monitor_every=2, **kw)


def test_laser_d_worked_example_over_three_batches():
    sig = laser_d_worked()
    out1 = sig(make_traj(B1_LEN, B1_GRP, B1_ACC))
    close(out1.values, B1_EXPECTED)
    close(out1.components["target_high"], [6.0] * 12)
    close(out1.components["target_medium"], [10.0] * 12)
    close(out1.components["target_low"], [12.0] * 12)
    close(out1.components["band_high"].sum(), 4.0)
    # batch 2: one all-right group of 4, every L = 7 > 6 (the targets are not refreshed yet: 1 call of 2)
    out2 = sig(make_traj([7] * 4, [9] * 4, [1] * 4))
    close(out2.values, [1.0] * 4)
    # after 2 calls the window (both batches) sets the targets: high lengths [3, 5, 9, 11, 7, 7, 7, 7],
    # lower_n 2, N 8: ℓ=6 covers 2 (·2 = 4 < 8), ℓ=8 covers 6 (·2 = 12 ≥ 8) → 8; the others unchanged
    assert sig.targets.tolist() == [12, 10, 8]
    out3 = sig(make_traj([7] * 4, [9] * 4, [1] * 4))
    close(out3.values, [1.5] * 4)  # L = 7 ≤ 8 now
    close(out3.components["within_target"], [1.0] * 4)


def test_laser_de_worked_example_exploration_bonus():
    # LASER-DE on batch 1: the wrong rows longer than their target are 7:L11 (> 6) only
    # (2:L12 is not > 12; 5:L8 and 5:L10 are ≤ 10). Its distinct tokens have no repeated 4-gram → +α.
    sig = build("laser_de", max_new_tokens=12, group_size=4, lower_bound=4, interval=2, upper_bound=10, monitor_every=2)
    out = sig(make_traj(B1_LEN, B1_GRP, B1_ACC))
    expected = list(B1_EXPECTED)
    expected[9] = -0.5 + 0.5
    close(out.values, expected)
    close(out.components["explore"].sum(), 1.0)
    # the same row repeating (1, 2, 1, 2) four times, or truncated, gets no bonus
    ids = [list(range(1, n + 1)) for n in B1_LEN]
    ids[9] = [1, 2] * 5 + [1]
    rep = build("laser_de", max_new_tokens=12, group_size=4, lower_bound=4, interval=2, upper_bound=10)
    out = rep(make_traj(B1_LEN, B1_GRP, B1_ACC, ids=ids))
    close(out.values, B1_EXPECTED)
    close(out.components["repeated"].sum(), 1.0)
    trunc = build("laser_de", max_new_tokens=12, group_size=4, lower_bound=4, interval=2, upper_bound=10)
    out = trunc(make_traj(B1_LEN, B1_GRP, B1_ACC, truncated=[i == 9 for i in range(12)]))
    close(out.values, B1_EXPECTED)


def test_laser_de_ignores_the_variant_like_the_reference():
    assert "variant" not in REWARDS.meta("laser_de").get("choices", {})
    with pytest.raises(ValueError, match=r"^rewards\[0\]\.kwargs: unknown key 'variant' for reward signal 'laser_de'"):
        REWARDS.check_kwargs("laser_de", {"variant": "hybrid"}, "rewards[0].kwargs")


def test_ngram_repetition_worked_example():
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6, 0, 0],     # (5, 6) three times
                        [5, 6, 7, 8, 5, 6, 9, 9, 0, 0],     # (5, 6) twice only
                        [5, 6, 0, 5, 6, 0, 5, 6, 0, 0]])    # with mask on ids > 0: 5 6 5 6 5 6 → three times
    mask = ids > 0
    assert has_ngram_repetition(ids, mask, n=2, repeats=3).tolist() == [True, False, True]
    assert has_ngram_repetition(ids, mask, n=3, repeats=2).tolist() == [True, False, True]
    assert has_ngram_repetition(ids, mask, n=9, repeats=2).tolist() == [False, False, False]


# ----------------------------------------------------------------------------- plain-loop reference (b)


def loop_targets(lengths, bands, thresholds, G, max_length, expected=1):
    """The reference's ``_choose_target_length`` as a loop, with exact fractions."""
    lower_n = {2: (2 * G) // 3, 1: G // 3, 0: 1}
    out = []
    for b in (0, 1, 2):
        mine = [l for l, bb in zip(lengths, bands) if bb == b]
        target = max_length
        for ell in thresholds:
            coverage = Fraction(sum(1 for l in mine if l <= ell), len(mine)) if mine else Fraction(0)
            if int(coverage * lower_n[b]) >= expected and ell < target:
                target = ell
        out.append(target)
    return out


class LoopLaserD:
    """LASER-D / LASER-DE written as loops over rows, groups and batches."""

    def __init__(self, thresholds, G, max_length, every, alpha, variant, explore, n=4, repeats=3):
        self.thresholds, self.G, self.max_length, self.every = thresholds, G, max_length, every
        self.alpha, self.variant, self.explore, self.n, self.repeats = alpha, variant, explore, n, repeats
        self.window, self.targets, self.calls = [], None, 0

    def __call__(self, lengths, groups, acc, ids, truncated):
        right = [a >= 1.0 for a in acc]
        by_group = {}
        for g, r in zip(groups, right):
            by_group.setdefault(g, []).append(r)
        bands = []
        for g in groups:
            frac = Fraction(sum(by_group[g]), len(by_group[g]))
            bands.append(2 if frac >= Fraction(2, 3) else 1 if frac >= Fraction(1, 3) else 0)
        if self.targets is None:
            self.targets = loop_targets(lengths, bands, self.thresholds, self.G, self.max_length)
        values = []
        for i in range(len(lengths)):
            t = self.targets[bands[i]]
            v = 1.0 if right[i] else -0.5 + 1.5 * acc[i]
            if right[i]:
                if self.variant in ("reward", "hybrid") and lengths[i] <= t:
                    v += self.alpha
                if self.variant in ("penalty", "hybrid") and lengths[i] > t:
                    v -= self.alpha
            elif self.explore and not truncated[i] and lengths[i] > t:
                grams = Counter(tuple(ids[i][k:k + self.n]) for k in range(len(ids[i]) - self.n + 1))
                if not grams or max(grams.values()) < self.repeats:
                    v += self.alpha
            values.append(v)
        self.window = (self.window + [(lengths, bands)])[-self.every:]
        self.calls += 1
        if self.calls % self.every == 0:
            self.targets = loop_targets([l for w in self.window for l in w[0]], [b for w in self.window for b in w[1]],
                                        self.thresholds, self.G, self.max_length)
        return values


def random_batch(gen, n_groups, G, max_len):
    groups = [int(g) for g in torch.randperm(100, generator=gen)[:n_groups]]
    rows = [g for g in groups for _ in range(G)]
    order = torch.randperm(len(rows), generator=gen).tolist()
    rows = [rows[i] for i in order]                                       # groups not contiguous
    lengths = torch.randint(1, max_len + 1, (len(rows),), generator=gen).tolist()
    acc = [float(a) for a in (torch.rand(len(rows), generator=gen) < 0.5).tolist()]
    ids = [torch.randint(1, 4, (n,), generator=gen).tolist() for n in lengths]  # 3 symbols: repetition happens
    truncated = (torch.rand(len(rows), generator=gen) < 0.2).tolist()
    return lengths, rows, acc, ids, truncated


@pytest.mark.parametrize("name,variant", [("laser_d", "reward"), ("laser_d", "penalty"), ("laser_d", "hybrid"),
                                          ("laser_de", None)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_laser_d_matches_loop_over_batches(name, variant, seed):
    gen = torch.Generator().manual_seed(seed)
    G, M, every = [3, 4, 6][seed], 16, [1, 2, 3][seed]
    kw = dict(lower_bound=2, interval=3, upper_bound=14, monitor_every=every, ngram=2, ngram_repeats=3) \
        if name == "laser_de" else dict(lower_bound=2, interval=3, upper_bound=14, monitor_every=every, variant=variant)
    sig = build(name, max_new_tokens=M, group_size=G, **kw)
    ref = LoopLaserD(list(range(2, 15, 3)), G, M, every, 0.5, variant or "reward", name == "laser_de", n=2, repeats=3)
    for _ in range(6):
        lengths, groups, acc, ids, truncated = random_batch(gen, 3, G, M)
        got = sig(make_traj(lengths, groups, acc, ids=ids, truncated=truncated, garbage=True))
        close(got.values, ref(lengths, groups, acc, ids, truncated))
        assert sig.targets.tolist() == ref.targets


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ngram_repetition_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 4, (12, 15), generator=gen)
    mask = torch.rand(12, 15, generator=gen) < 0.8                        # holes too: real tokens in order
    for n, repeats in [(1, 5), (2, 3), (3, 2), (4, 2)]:
        want = []
        for row, m in zip(ids.tolist(), mask.tolist()):
            real = [t for t, k in zip(row, m) if k]
            grams = Counter(tuple(real[k:k + n]) for k in range(len(real) - n + 1))
            want.append(bool(grams) and max(grams.values()) >= repeats)
        assert has_ngram_repetition(ids, mask, n=n, repeats=repeats).tolist() == want


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_choose_targets_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    for G in (1, 2, 3, 8):
        lengths = torch.randint(1, 30, (40,), generator=gen)
        bands = torch.randint(0, 3, (40,), generator=gen)
        thr = length_grid(3, 4, 27)
        got = choose_targets(lengths, bands, thresholds=thr, group_size=G, max_length=30)
        assert got.tolist() == loop_targets(lengths.tolist(), bands.tolist(), thr, G, 30)


# ----------------------------------------------------------------------------- invariances (c)


@pytest.mark.parametrize("name", ["laser", "laser_d", "laser_de"])
def test_padding_and_masked_tokens_change_nothing(name):
    kw = {"target_length": 6} if name == "laser" else {"lower_bound": 4, "interval": 2, "upper_bound": 10}
    ids = [list(range(1, n + 1)) for n in B1_LEN]
    ids[9] = [1, 2] * 5 + [1]  # a repeating row, so laser_de's n-gram check runs on both kinds
    clean = build(name, **kw)(make_traj(B1_LEN, B1_GRP, B1_ACC, ids=ids))
    noisy = build(name, **kw)(make_traj(B1_LEN, B1_GRP, B1_ACC, ids=ids, L=30, garbage=True, seed=3))
    close(noisy.values, clean.values)
    for k in clean.components:
        close(noisy.components[k], clean.components[k])


@pytest.mark.parametrize("name", ["laser", "laser_d", "laser_de"])
def test_permuting_the_batch_permutes_the_output(name):
    gen = torch.Generator().manual_seed(5)
    kw = {"target_length": 6} if name == "laser" else {"lower_bound": 2, "interval": 3, "upper_bound": 14,
                                                      "monitor_every": 1}
    a, b = build(name, max_new_tokens=16, **kw), build(name, max_new_tokens=16, **kw)
    for _ in range(3):
        lengths, groups, acc, ids, truncated = random_batch(gen, 3, 4, 16)
        perm = torch.randperm(len(lengths), generator=gen).tolist()
        pick = lambda xs: [xs[i] for i in perm]  # noqa: E731
        out = a(make_traj(lengths, groups, acc, ids=ids, truncated=truncated))
        out_p = b(make_traj(pick(lengths), pick(groups), pick(acc), ids=pick(ids), truncated=pick(truncated)))
        close(out_p.values, out.values[perm])
        for k in out.components:
            close(out_p.components[k], out.components[k][perm])


@pytest.mark.parametrize("name", ["laser", "laser_d", "laser_de"])
def test_groups_of_one_are_finite(name):
    # every row its own group: a right row is its group's 1/1 (high), a wrong one 0/1 (low)
    out = build(name)(make_traj([3, 11, 5], [4, 8, 9], [1.0, 0.0, 1.0]))
    assert torch.isfinite(out.values).all()
    if name != "laser":
        close(out.components["band_high"], [1.0, 0.0, 1.0])
        close(out.components["band_low"], [0.0, 1.0, 0.0])


# ----------------------------------------------------------------------------- kwargs and state


@pytest.mark.parametrize("name,kwargs,match", [
    ("laser", {"variant": "bonus"}, r"^rewards\[0\]\.kwargs\.variant: expected one of reward \| penalty \| hybrid"),
    ("laser", {"target_length": 0}, r"^rewards\[0\]\.kwargs\.target_length: expected a number in \[1, inf\)"),
    ("laser", {"alpha": -1.0}, r"^rewards\[0\]\.kwargs\.alpha: expected a number in \[0, inf\)"),
    ("laser_d", {"monitor_every": 0}, r"^rewards\[0\]\.kwargs\.monitor_every: expected a number in \[1, inf\)"),
    ("laser_d", {"interval": 1.5}, r"^rewards\[0\]\.kwargs\.interval: expected int \| None"),
    ("laser_d", {"lower_bonud": 3}, r"^rewards\[0\]\.kwargs: unknown key 'lower_bonud'"),
    ("laser_de", {"ngram_repeats": 1}, r"^rewards\[0\]\.kwargs\.ngram_repeats: expected a number in \[2, inf\)"),
    ("laser_de", {"alpha": float("nan")}, r"^rewards\[0\]\.kwargs\.alpha: expected a finite number"),
])
def test_bad_kwargs_are_refused_by_config_validation(name, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        REWARDS.check_kwargs(name, kwargs, "rewards[0].kwargs")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,kwargs,match", [
    ("laser_d", {"lower_bound": 10, "upper_bound": 4}, r"^laser_d\.upper_bound: expected ≥ lower_bound \(10\), got 4$"),
    ("laser_de", {"lower_bound": 10, "upper_bound": 4}, r"^laser_de\.upper_bound: "),
    ("laser", {"variant": "bonus"}, r"^laser\.variant: expected one of reward \| penalty \| hybrid, got 'bonus'$"),
    ("laser_d", {"monitor_every": 0}, r"^laser_d\.monitor_every: expected ≥ 1, got 0$"),
    ("laser_de", {"ngram": 0}, r"^laser_de\.ngram: expected ≥ 1, got 0$"),
    ("laser_d", {"alpha": -0.5}, r"^laser_d\.alpha: expected a number ≥ 0, got -0.5$"),
])
def test_bad_kwargs_are_refused_on_construction(name, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        build(name, **kwargs)
    assert "\n" not in str(e.value)


def test_registry_declares_level_and_state():
    for name in ("laser", "laser_d", "laser_de", "pear"):
        assert REWARDS.meta(name)["level"] == "outcome"
    assert REWARDS.meta("laser_d")["stateful"] and REWARDS.meta("laser_de")["stateful"]
    assert not REWARDS.meta("laser_d").get("trainable")  # no model: not checkpointed as a trainable signal
    assert issubclass(LaserDE, LaserD) and not issubclass(Laser, LaserD)


@pytest.mark.parametrize("name", ["laser_d", "laser_de"])
def test_state_round_trips_and_a_resumed_signal_continues_identically(name):
    gen = torch.Generator().manual_seed(11)
    batches = [random_batch(gen, 3, 4, 16) for _ in range(7)]
    kw = dict(max_new_tokens=16, lower_bound=2, interval=3, upper_bound=14, monitor_every=3)
    full = build(name, **kw)
    want = [full(make_traj(*b[:3], ids=b[3], truncated=b[4])) for b in batches]
    first = build(name, **kw)
    for b in batches[:4]:
        first(make_traj(*b[:3], ids=b[3], truncated=b[4]))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # what a checkpoint's state.pt would hold
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"calls", "targets", "window_lengths", "window_bands"} and state["calls"] == 4
    resumed = build(name, **kw)
    resumed.load_state_dict(state)
    for b, w in zip(batches[4:], want[4:]):
        got = resumed(make_traj(*b[:3], ids=b[3], truncated=b[4]))
        close(got.values, w.values)
        close(got.components["target"], w.components["target"])
    assert resumed.state_dict()["targets"] == full.state_dict()["targets"]
    assert resumed.calls == full.calls == 7
    # a fresh signal's state and a refused one
    assert build(name, **kw).state_dict() == {"calls": 0, "targets": [], "window_lengths": [], "window_bands": []}
    with pytest.raises(ValueError, match=rf"^{name}\.load_state_dict: expected keys"):
        resumed.load_state_dict({"calls": 1})


def test_laser_bonus_rejects_unknown_variant():
    with pytest.raises(ValueError, match=r"^laser\.variant: expected one of"):
        laser_bonus(torch.tensor([True]), torch.tensor([1]), torch.tensor([2]), alpha=0.5, variant="both")
