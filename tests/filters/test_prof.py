"""PROF, the process-consistency filter (finegrain/filters/prof.py): the README example with
hand-derived scores, the removal counts, both variants against a loop, invariances, the trainer
handing it a process signal, bad kwargs, the shipped config and a tiny end-to-end run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from finegrain.config import load_config
from finegrain.filters import FILTERS
from finegrain.filters.prof import ProcessConsistencyFilter, consistency_scores, prof_keep, removal_counts, step_values_of
from finegrain.rewards.base import RewardOutput
from finegrain.tasks.base import Example
from finegrain.train.stages import RoundSignals, collect_batch
from tests.filters.test_filters import ScriptedEngine, Verifier, traj_from
from tests.helpers import close

ROOT = Path(__file__).resolve().parents[2]


def step_signal(values, mask=None):
    v = torch.tensor(values, dtype=torch.float32)
    m = torch.ones_like(v, dtype=torch.bool) if mask is None else torch.tensor(mask)
    return RewardOutput(v, m, "step")


# ---------------------------------------------------------------------------------------------
# worked examples


def test_readme_example_five_correct_three_wrong_remove_four():
    # One group of 8, two steps per row, both steps of a row valued the row's mean m_i below.
    #   correct c1..c5: m = 1, 0.875, 0.75, 0.625, 0.5      (sum 3.75)
    #   wrong   w1..w3: m = 0, 0.0625, 0.1875               (sum 0.25)
    # v̄ = (2·3.75 + 2·0.25)/16 = 0.5, so s_i = 2 (m_i − 0.5)·(±1):
    #   correct: 1, 0.75, 0.5, 0.25, 0       wrong: 1, 0.875, 0.625
    # n⁺ = 5, n⁻ = 3, N = 4: δ = 2, k⁺ = min(4, round(6/2)) = 3, k⁻ = 4 − 3 = 1
    # -> drop c3, c4, c5 (lowest s among the correct) and w3 (lowest s among the wrong, i.e. the
    #    wrong answer the PRM liked best): keep c1, c2, w1, w2 — two correct and two wrong.
    m = [1.0, 0.875, 0.75, 0.625, 0.5, 0.0, 0.0625, 0.1875]
    outcome = torch.tensor([1.0] * 5 + [0.0] * 3)
    traj = traj_from(outcome.tolist(), [7] * 8)
    signals = {"prm": step_signal([[x, x] for x in m])}
    s = consistency_scores(signals["prm"].values, signals["prm"].mask, outcome > 0.5)
    close(s, [1.0, 0.75, 0.5, 0.25, 0.0, 1.0, 0.875, 0.625])
    keep, loss_mask, metrics = ProcessConsistencyFilter(process="prm", remove=4)(traj, outcome, signals=signals)
    assert keep.tolist() == [True, True, False, False, False, True, True, False]
    assert int(keep[:5].sum()) == 2 and int(keep[5:].sum()) == 2
    assert torch.equal(loss_mask, traj.loss_mask)
    assert metrics["kept_frac"].item() == 0.5 and metrics["removed_correct"] == 3 / 8
    assert metrics["removed_incorrect"] == 1 / 8 and metrics["step_value_mean"].item() == 0.5
    # the 'correct' variant ranks the correct side the same way and drops one wrong row at random
    keep_c, _, _ = ProcessConsistencyFilter(process="prm", remove=4, variant="correct")(traj, outcome, signals=signals)
    assert keep_c[:5].tolist() == [True, True, False, False, False] and int(keep_c[5:].sum()) == 2


def test_removal_counts_worked_examples():
    # (n⁺, n⁻, N) -> δ, (δ + N)/2 -> k⁺ -> k⁻
    # (5, 3, 4): 2, 3 -> 3 -> 1          (8, 0, 4): 8, 6 -> min(4, 6) = 4 -> 0
    # (0, 8, 4): -8, -2 -> 0 -> 4        (4, 3, 4): 1, 2.5 -> 2 (half to even) -> 2
    # (3, 4, 4): -1, 1.5 -> 2 -> 2       (6, 1, 4): 5, 4.5 -> 4 (half to even) -> 0
    # (1, 0, 4): a group of one, 1, 2.5 -> 2 capped at n⁺ = 1 -> 0 (everything goes)
    n_pos, n_neg = torch.tensor([5, 8, 0, 4, 3, 6, 1]), torch.tensor([3, 0, 8, 3, 4, 1, 0])
    k_pos, k_neg = removal_counts(n_pos, n_neg, 4)
    assert k_pos.tolist() == [3, 4, 0, 2, 2, 4, 1] and k_neg.tolist() == [1, 0, 4, 2, 2, 0, 0]
    assert [round(2.5), round(1.5), round(4.5)] == [2, 2, 4]  # the reference's Python round agrees
    k_pos, k_neg = removal_counts(n_pos, n_neg, 0)
    assert k_pos.eq(0).all() and k_neg.eq(0).all()


def test_consistency_scores_length_penalty_and_no_steps():
    # v̄ = (0.5 + 0.5 + 1 + 1 + 0.5)/5 = 0.7 over the valid steps of rows 0-1 (row 2 has none)
    # row 0: correct, K = 2: 2·(0.5 − 0.7) = −0.4
    # row 1: wrong, K = 3 > max_steps = 2: −2·(2.5/3 − 0.7) − λ = −0.2667 − 3
    # row 2: correct, K = 0 < min_steps: 0 − λ = −3
    v = torch.tensor([[0.5, 0.5, 9.0], [1.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    m = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    s = consistency_scores(v, m, torch.tensor([True, False, True]), length_coef=3.0, min_steps=2, max_steps=2)
    close(s, [-0.4, -2 * (2.5 / 3 - 0.7) - 3.0, -3.0])


# ---------------------------------------------------------------------------------------------
# loop reference


def loop_keep(scores, correct, group_ids, remove, incorrect_keys=None):
    keep = [True] * len(scores)
    for g in set(group_ids):
        rows = [i for i, x in enumerate(group_ids) if x == g]
        pos = [i for i in rows if correct[i]]
        neg = [i for i in rows if not correct[i]]
        k_pos = min(remove, round((len(pos) - len(neg) + remove) / 2))
        k_pos = min(max(k_pos, 0), len(pos))
        k_neg = min(max(remove - k_pos, 0), len(neg))
        neg_key = scores if incorrect_keys is None else incorrect_keys
        for i in sorted(pos, key=lambda i: (scores[i], i))[:k_pos]:
            keep[i] = False
        for i in sorted(neg, key=lambda i: (neg_key[i], i))[:k_neg]:
            keep[i] = False
    return keep


def random_case(seed):
    rng = random.Random(seed)
    n_groups = rng.randint(1, 6)
    sizes = [rng.choice([1, 2, 3, 5, 8]) for _ in range(n_groups)]
    gids = [g * 11 + 3 for g, n in enumerate(sizes) for _ in range(n)]
    rng.shuffle(gids)
    B = len(gids)
    scores = [rng.uniform(-1, 1) for _ in range(B)]
    if seed % 2:  # ties too (broken by row order)
        scores = [round(x, 1) for x in scores]
    correct = [rng.random() < 0.5 for _ in range(B)]
    return gids, scores, correct, rng.randint(0, 6)


@pytest.mark.parametrize("seed", range(12))
def test_vectorised_keep_matches_loop(seed):
    gids, scores, correct, remove = random_case(seed)
    got = prof_keep(torch.tensor(scores), torch.tensor(correct), torch.tensor(gids), remove=remove)
    assert got.tolist() == loop_keep(scores, correct, gids, remove)
    keys = [random.Random(seed + 100).random() for _ in gids]
    got = prof_keep(torch.tensor(scores), torch.tensor(correct), torch.tensor(gids), remove=remove,
                    incorrect_keys=torch.tensor(keys))
    assert got.tolist() == loop_keep(scores, correct, gids, remove, keys)


def loop_scores(values, mask, correct, coef, lo, hi):
    valid = [v for row, mrow in zip(values, mask) for v, m in zip(row, mrow) if m]
    v_bar = sum(valid) / len(valid) if valid else 0.0
    out = []
    for row, mrow, c in zip(values, mask, correct):
        steps = [v for v, m in zip(row, mrow) if m]
        s = sum(2 * (v - v_bar) * (1 if c else -1) for v in steps) / max(len(steps), 1)
        out.append(s - coef * (len(steps) < lo or len(steps) > hi))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_scores_match_loop(seed):
    g = torch.Generator().manual_seed(seed)
    B, S = 7, 5
    values = torch.rand(B, S, generator=g, dtype=torch.float64)
    mask = torch.rand(B, S, generator=g) < 0.6
    correct = torch.rand(B, generator=g) < 0.5
    got = consistency_scores(values, mask, correct, length_coef=2.0, min_steps=2, max_steps=3)
    want = loop_scores(values.tolist(), mask.tolist(), correct.tolist(), 2.0, 2, 3)
    close(got, want)


# ---------------------------------------------------------------------------------------------
# invariances


def batch(seed=0, B=12, S=4):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(B, S, generator=g)
    mask = torch.rand(B, S, generator=g) < 0.8
    outcome = (torch.rand(B, generator=g) < 0.5).float()
    gids = [5, 2, 9, 5, 2, 9, 5, 2, 9, 5, 2, 9][:B]
    return values, mask, outcome, gids


def test_garbage_under_a_false_mask_changes_nothing():
    values, mask, outcome, gids = batch()
    traj = traj_from(outcome.tolist(), gids)
    f = ProcessConsistencyFilter(process="prm", remove=2)
    keep, _, m = f(traj, outcome, signals={"prm": RewardOutput(values, mask, "step")})
    for junk in (float("nan"), 1e30, -float("inf")):
        dirty = torch.where(mask, values, torch.full_like(values, junk))
        keep2, _, m2 = f(traj, outcome, signals={"prm": RewardOutput(dirty, mask, "step")})
        assert torch.equal(keep, keep2) and m["score_mean"].item() == m2["score_mean"].item()


def test_permuting_the_batch_permutes_the_keep_mask():
    values, mask, outcome, gids = batch(seed=3)
    traj = traj_from(outcome.tolist(), gids)
    keep, _, _ = ProcessConsistencyFilter(process="prm", remove=2)(traj, outcome, signals={"prm": RewardOutput(values, mask, "step")})
    perm = torch.randperm(len(gids), generator=torch.Generator().manual_seed(1))
    traj_p = traj_from(outcome[perm].tolist(), [gids[i] for i in perm])
    keep_p, _, _ = ProcessConsistencyFilter(process="prm", remove=2)(
        traj_p, outcome[perm], signals={"prm": RewardOutput(values[perm], mask[perm], "step")})
    assert torch.equal(keep_p, keep[perm])


def test_a_group_of_one_is_finite():
    outcome = torch.tensor([1.0, 0.0, 1.0])
    traj = traj_from(outcome.tolist(), [4, 6, 6])
    signals = {"prm": step_signal([[0.3, 0.1], [0.2, 0.9], [0.5, 0.5]])}
    s = consistency_scores(signals["prm"].values, signals["prm"].mask, outcome > 0.5)
    assert torch.isfinite(s).all()
    keep, _, m = ProcessConsistencyFilter(process="prm", remove=0)(traj, outcome, signals=signals)
    assert keep.all() and all(torch.isfinite(torch.as_tensor(v)).all() for v in m.values())
    # with N = 1 the lone row goes (a group of at most N rows is removed whole); the pair loses one
    keep, _, _ = ProcessConsistencyFilter(process="prm", remove=1)(traj, outcome, signals=signals)
    assert keep.tolist()[0] is False and int(keep[1:].sum()) == 1


def test_token_level_values_are_summed_within_steps():
    # tokens 0-1 are step 0, tokens 2-3 step 1, token 4 outside any step (ignored), token 5 masked
    token_v = torch.tensor([[0.1, 0.2, 0.3, 0.4, 9.0, float("nan")]])
    token_m = torch.tensor([[True, True, True, True, True, False]])
    step_ids = torch.tensor([[0, 0, 1, 1, -1, 1]])
    values, mask = step_values_of(RewardOutput(token_v, token_m, "token"), step_ids, "prof.process")
    close(values, [[0.1 + 0.2, 0.3 + 0.4]])
    assert mask.tolist() == [[True, True]]
    with pytest.raises(ValueError, match=r"^prof.process: PROF needs step or token values, but the signal gives 'outcome'"):
        step_values_of(RewardOutput(torch.zeros(1), torch.ones(1, dtype=torch.bool), "outcome"), step_ids, "prof.process")


def test_correct_variant_is_seeded_by_round_and_resumes():
    values, mask, outcome, gids = batch(seed=5)
    traj = traj_from(outcome.tolist(), gids)
    sig = {"prm": RewardOutput(values, mask, "step")}
    a = ProcessConsistencyFilter(process="prm", remove=2, variant="correct", seed=3)
    runs_a = [a(traj, outcome, signals=sig)[0] for _ in range(3)]
    b = ProcessConsistencyFilter(process="prm", remove=2, variant="correct", seed=3)
    b(traj, outcome, signals=sig)
    c = ProcessConsistencyFilter(process="prm", remove=2, variant="correct", seed=3)
    c.load_state_dict(b.state_dict())      # a resumed filter draws what the uninterrupted one draws
    assert [torch.equal(x, y) for x, y in zip(runs_a[1:], [c(traj, outcome, signals=sig)[0] for _ in range(2)])] == [True, True]
    assert a.state_dict() == {"rounds": 3}
    # the correct side never depends on the randomness
    both = ProcessConsistencyFilter(process="prm", remove=2)(traj, outcome, signals=sig)[0]
    right = outcome > 0.5
    assert all(torch.equal(k[right], both[right]) for k in runs_a)


# ---------------------------------------------------------------------------------------------
# the trainer hands PROF the process signal


class CountingSteps:
    """A step-level signal: every row's two steps valued by its scripted outcome; counts calls."""

    level = "step"

    def __init__(self):
        self.calls = 0

    def __call__(self, traj):
        self.calls += 1
        o = torch.tensor([float(s.split(":")[0]) for s in traj.response_texts])
        v = torch.stack([o, o], dim=1) + 0.01 * torch.arange(traj.batch_size, dtype=torch.float32)[:, None]
        return RewardOutput(v, torch.ones_like(v, dtype=torch.bool), "step")


class Unused:
    level = "outcome"

    def __call__(self, traj):
        raise AssertionError("a signal no filter reads must not be scored in collect_batch")


def test_collect_batch_gives_the_process_signal_to_filters_that_declare_needs_signals():
    pool = [Example(id=f"e{i}", prompt="p", answer="1") for i in range(4)]
    script = {f"e{i}": [1, 1, 1, 0] for i in range(4)}
    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.group_size=4", "filters.max_refills=0",
                             "filters.filters=[{name: zero_variance}, {name: prof, kwargs: {process: prm, remove: 2}}]"])
    prm = CountingSteps()
    filters = [("zero_variance", FILTERS.get("zero_variance"), {}),  # no signals kwarg: it would raise TypeError
               ("prof", ProcessConsistencyFilter(process="prm", remove=2), {})]
    signals = {"verifier": Verifier(), "prm": prm, "judge": Unused()}
    traj, pre, metrics = collect_batch(cfg, ScriptedEngine(script), pool, signals, filters, step=0)
    # each group: 3 right, 1 wrong; N = 2: δ = 2, k⁺ = 2, k⁻ = 0 -> the two right rows the PRM values
    # least go (the earlier samples: values grow with the row index), the wrong one stays
    assert prm.calls == 1 and traj.batch_size == 8 and metrics["prof/kept_frac"] == 0.5
    outs = [float(s.split(":")[0]) for s in traj.response_texts]
    assert outs == [1.0, 0.0] * 4 and pre["verifier"].values.tolist() == outs
    assert [int(s.split(":")[2]) for s in traj.response_texts] == [2, 3] * 4


def test_round_signals_score_lazily_and_once():
    traj = traj_from([1.0, 0.0], [0, 0])
    prm, verifier_out = CountingSteps(), Verifier()(traj.replace(response_texts=["1:0:0", "0:0:1"]))
    rs = RoundSignals({"verifier": Verifier(), "prm": prm, "judge": Unused()},
                      traj.replace(response_texts=["1:0:0", "0:0:1"]), {"verifier": verifier_out})
    assert "prm" in rs and "nope" not in rs and prm.calls == 0 and sorted(rs) == ["judge", "prm", "verifier"]
    assert rs["verifier"] is verifier_out and rs["prm"] is rs["prm"] and prm.calls == 1


# ---------------------------------------------------------------------------------------------
# contract and config


def test_registered_as_a_stateful_group_filter_that_needs_signals():
    meta = FILTERS.meta("prof")
    assert FILTERS.get("prof") is ProcessConsistencyFilter
    assert meta["needs_signals"] and meta["stateful"] and meta["needs_groups"]


@pytest.mark.parametrize("kwargs,match", [
    ("{process: prm, remove: -1}", r"^filters.filters\[1\].kwargs.remove: expected a number in \[0, inf\), got -1"),
    ("{process: prm, variant: sideways}", r"^filters.filters\[1\].kwargs.variant: expected one of both \| correct"),
    ("{proces: prm}", r"^filters.filters\[1\].kwargs: unknown key 'proces' for filter 'prof'; allowed: process, remove"),
    ("{process: prm, length_coef: many}", r"^filters.filters\[1\].kwargs.length_coef: expected float, got 'many'"),
])
def test_bad_kwargs_give_one_line_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        load_config(None, [f"filters.filters=[{{name: zero_variance}}, {{name: prof, kwargs: {kwargs}}}]"])
    assert "\n" not in str(e.value)


def test_missing_or_unknown_process_signal_is_one_line():
    with pytest.raises(ValueError, match=r"^prof.process: name the reward signal"):
        ProcessConsistencyFilter()
    traj = traj_from([1.0, 0.0], [0, 0])
    with pytest.raises(ValueError, match=r"^prof.process: 'prm' is not a reward signal of this run; signals: verifier$"):
        ProcessConsistencyFilter(process="prm")(traj, torch.tensor([1.0, 0.0]), signals={"verifier": None})
    bad = {"prm": step_signal([[float("nan")], [0.0]])}
    with pytest.raises(ValueError, match=r"^prof.process: 'prm' gave non-finite step values$"):
        ProcessConsistencyFilter(process="prm")(traj, torch.tensor([1.0, 0.0]), signals=bad)
    with pytest.raises(ValueError, match=r"^prof: expected remove ≥ 0"):
        ProcessConsistencyFilter(process="prm", min_steps=5, max_steps=2)


def test_shipped_config_loads():
    cfg = load_config(ROOT / "configs" / "arith_prof.yaml")
    names = [f["name"] for f in cfg.filters.filters]
    assert names == ["accuracy_band", "prof"] and cfg.filters.filters[1]["kwargs"]["process"] == "implicit_prm"
    assert {r.name for r in cfg.rewards} == {"verifier", "implicit_prm"}


# ---------------------------------------------------------------------------------------------
# end to end


def test_tiny_prof_run_trains_on_the_kept_rows(tmp_path, sft_cache):
    from finegrain.train.logging import read_log
    from finegrain.train.loop import train
    from tests.conftest import tiny_run_overrides

    # a micro model rarely answers right, so the accuracy band would keep nothing: PROF alone,
    # removing 2 of every 4 rows
    prof = [{"name": "prof", "kwargs": {"process": "implicit_prm", "remove": 2}}]
    ov = tiny_run_overrides(tmp_path / "run", sft_cache, steps=2, **{"filters.filters": prof, "filters.max_refills": 0,
                                                                     "train.save_every": 0})
    cfg = load_config(ROOT / "configs" / "arith_prof.yaml", ov)
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss/loss"])) for r in rows)
    assert all(r["filter/prof/kept_frac"] == 0.5 and r["rollout/rows"] == 8 for r in rows)
    assert all("reward/implicit_prm/prm_loss" in r for r in rows)
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_000002" / "state.pt", weights_only=True)
    assert state["filter_state"]["0:prof"] == {"rounds": 2}
