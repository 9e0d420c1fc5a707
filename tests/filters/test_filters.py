"""Filters: worked examples, and the trainer's oversample + refill keeping the batch size."""

import torch

from finegrain.config import load_config
from finegrain.filters import FILTERS
from finegrain.tasks.base import Example
from finegrain.train.stages import collect_batch
from finegrain.trajectory import Trajectory


def traj_from(outcomes, group_ids, truncated=None, L=3):
    B = len(outcomes)
    return Trajectory(
        prompt_ids=torch.ones(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
        response_ids=torch.ones(B, L, dtype=torch.long), response_mask=torch.ones(B, L, dtype=torch.bool),
        loss_mask=torch.ones(B, L, dtype=torch.bool), group_ids=torch.tensor(group_ids),
        step_ids=torch.zeros(B, L, dtype=torch.long), behavior_logprobs=torch.zeros(B, L),
        truncated=torch.tensor(truncated or [False] * B),
        prompt_texts=["p"] * B, response_texts=[str(o) for o in outcomes],
        examples=[Example(id=str(g), prompt="p", answer="1") for g in group_ids])


def test_accuracy_band_worked_example():
    # groups (non-contiguous): 7 -> [1, 1, 1, 1] acc 1.0 (out); 3 -> [1, 0, 0, 0] acc 0.25 (in);
    # 5 -> [0, 0, 0, 0] acc 0 (out); 9 -> [1, 1, 1, 0] acc 0.75 (in); 2 -> [1, 0, 0, 0, 0] acc 0.2 (edge: in)
    g = [7, 3, 5, 9, 7, 3, 5, 9, 7, 3, 5, 9, 7, 3, 5, 9, 2, 2, 2, 2, 2]
    o = [1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0]
    t = traj_from(o, g)
    keep, loss_mask, m = FILTERS.get("accuracy_band")(t, torch.tensor(o, dtype=torch.float), low=0.2, high=0.8)
    want = [gid in (3, 9, 2) for gid in g]
    assert keep.tolist() == want and torch.equal(loss_mask, t.loss_mask)
    assert abs(m["kept_frac"].item() - sum(want) / len(want)) < 1e-6


def test_zero_variance_and_singleton():
    g, o = [0, 0, 1, 1, 2], [1.0, 1.0, 0.0, 1.0, 1.0]
    keep, _, _ = FILTERS.get("zero_variance")(traj_from(o, g), torch.tensor(o))
    assert keep.tolist() == [False, False, True, True, False]


def test_truncated_modes():
    g, o, tr = [0, 0, 1, 1], [1.0, 0.0, 1.0, 0.0], [False, True, False, False]
    t = traj_from(o, g, tr)
    keep, lm, m = FILTERS.get("truncated")(t, torch.tensor(o), mode="mask")
    assert keep.all() and lm[1].eq(False).all() and lm[[0, 2, 3]].all() and m["truncated_frac"].item() == 0.25
    keep, lm, _ = FILTERS.get("truncated")(t, torch.tensor(o), mode="drop")
    assert keep.tolist() == [True, False, True, True]
    keep, _, _ = FILTERS.get("truncated")(t, torch.tensor(o), mode="drop_group")
    assert keep.tolist() == [False, False, True, True]


class ScriptedEngine:
    """Test double: every prompt's group gets outcomes from a script keyed by the example id."""

    class tokenizer:
        pad_token_id = 0

    def __init__(self, script):
        self.script, self.calls = script, 0

    def generate(self, examples, n, sampling, seed, group_offset=0):
        self.calls += 1
        outs, gids, exs = [], [], []
        for i, ex in enumerate(examples):
            outs += self.script[ex.id][:n]
            gids += [group_offset + i] * n
            exs += [ex] * n
        t = traj_from(outs, gids)
        # every row's text is unique ("outcome:group:sample") so row alignment can be checked
        texts = [f"{o}:{g}:{k % n}" for k, (o, g) in enumerate(zip(outs, gids))]
        return t.replace(examples=exs, response_texts=texts)


class Verifier:
    level = "outcome"

    def __call__(self, traj):
        from finegrain.rewards.base import RewardOutput

        v = torch.tensor([float(s.split(":")[0]) for s in traj.response_texts])
        code = torch.tensor([int(s.split(":")[1]) * 100 + int(s.split(":")[2]) for s in traj.response_texts])
        return RewardOutput(v, torch.ones_like(v, dtype=torch.bool), "outcome", {"code": code})


def test_refill_keeps_batch_size_and_only_in_band_groups():
    # 40 prompts: every 3rd is in band (2 of 4 right), the rest all right (out of band)
    pool = [Example(id=f"e{i}", prompt="p", answer="1") for i in range(40)]
    script = {f"e{i}": ([1, 0, 1, 0] if i % 3 == 0 else [1, 1, 1, 1]) for i in range(40)}
    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.group_size=4", "filters.oversample=1.0",
                             "filters.max_refills=5", "filters.filters=[{name: accuracy_band}]"])
    engine = ScriptedEngine(script)
    filters = [("accuracy_band", FILTERS.get("accuracy_band"), {})]
    traj, pre_scored, metrics = collect_batch(cfg, engine, pool, {"verifier": Verifier()}, filters, step=0)
    assert traj.batch_size == 16 and metrics["kept_prompts"] == 4
    # the verifier output handed back lines up with the kept rows (across refill rounds)
    # sampled accuracy counts the dropped all-right groups; the kept rows are exactly half right
    assert metrics["sampled_accuracy"] > 0.6 and pre_scored["verifier"].values.mean().item() == 0.5
    codes = [int(s.split(":")[1]) * 100 + int(s.split(":")[2]) for s in traj.response_texts]
    assert pre_scored["verifier"].components["code"].tolist() == codes
    assert pre_scored["verifier"].values.tolist() == [float(s.split(":")[0]) for s in traj.response_texts]
    assert engine.calls > 1  # one round cannot give 4 in-band prompts from 4 with p = 1/3
    for gid in traj.group_ids.unique():
        outs = [float(s.split(":")[0]) for s, g in zip(traj.response_texts, traj.group_ids) if g == gid]
        assert 0.2 <= sum(outs) / len(outs) <= 0.8
    assert len(set(traj.group_ids.tolist())) == 4


def test_refill_gives_up_after_max_refills():
    pool = [Example(id=f"e{i}", prompt="p", answer="1") for i in range(10)]
    script = {f"e{i}": [1, 1, 1, 1] for i in range(10)}
    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.group_size=4", "filters.max_refills=2",
                             "filters.filters=[{name: accuracy_band}]"])
    engine = ScriptedEngine(script)
    traj, _, metrics = collect_batch(cfg, engine, pool, {"verifier": Verifier()},
                                  [("accuracy_band", FILTERS.get("accuracy_band"), {})], step=0)
    assert traj is None and engine.calls == 3


class TruncatingEngine(ScriptedEngine):
    """Rows whose scripted outcome is 0 come back truncated."""

    def generate(self, examples, n, sampling, seed, group_offset=0):
        t = super().generate(examples, n, sampling, seed, group_offset)
        return t.replace(truncated=torch.tensor([s.startswith("0") for s in t.response_texts]))


def test_a_row_filter_drops_rows_not_only_groups():
    """truncated(mode='drop') keeps a per-row mask; the batch used to keep whole groups with any
    kept row, so it dropped nothing."""
    pool = [Example(id=f"e{i}", prompt="p", answer="1") for i in range(4)]
    script = {f"e{i}": [1, 0, 1, 1] for i in range(4)}
    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.group_size=4",
                             "filters.filters=[{name: truncated, kwargs: {mode: drop}}]"])
    traj, pre, metrics = collect_batch(cfg, TruncatingEngine(script), pool, {"verifier": Verifier()},
                                       [("truncated", FILTERS.get("truncated"), {"mode": "drop"})], step=0)
    assert traj.batch_size == 12 and not traj.truncated.any() and metrics["kept_prompts"] == 4
    assert pre["verifier"].values.tolist() == [1.0] * 12
    assert all(s.startswith("1") for s in traj.response_texts)


def test_the_outcome_signal_is_declared_not_found_by_name():
    """Filters read the configured outcome signal; with none named 'verifier' they used to see all
    zeros and drop every group."""
    pool = [Example(id=f"e{i}", prompt="p", answer="1") for i in range(4)]
    script = {f"e{i}": [1, 0, 1, 0] for i in range(4)}
    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.group_size=4",
                             "filters.filters=[{name: accuracy_band}]"])
    traj, pre, metrics = collect_batch(cfg, ScriptedEngine(script), pool, {"judge": Verifier()},
                                       [("accuracy_band", FILTERS.get("accuracy_band"), {})], step=0, outcome="judge")
    assert traj is not None and traj.batch_size == 16 and list(pre) == ["judge"]
    assert metrics["sampled_accuracy"] == 0.5


def test_filters_without_an_outcome_level_signal_are_refused():
    import pytest

    with pytest.raises(ValueError, match="^filters.filters: filters judge groups by an outcome"):
        load_config(None, ["rewards=[{name: implicit_prm}]", "advantage.name=prime_rloo",
                           "filters.filters=[{name: zero_variance}]"])
    with pytest.raises(ValueError, match="^filters.outcome: 'overlong' is not an outcome-level signal in rewards"):
        load_config(None, ["filters.outcome=overlong"])
