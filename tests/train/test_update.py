"""policy_update: gradient accumulation equals one big micro-batch, for every aggregation mode."""

import copy

import pytest
import torch

from finegrain.config import LossConfig
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.train.update import batch_logprobs, policy_update
from finegrain.trajectory import Trajectory


def make_batch(tok, B=8, P=4, L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = len(tok)
    resp_len = torch.randint(2, L + 1, (B,), generator=g)
    rm = torch.arange(L)[None, :] < resp_len[:, None]
    pm = torch.ones(B, P, dtype=torch.bool)
    pm[0, 0] = False  # one left-padded prompt
    return Trajectory(
        prompt_ids=torch.randint(4, V, (B, P), generator=g), prompt_mask=pm,
        response_ids=torch.where(rm, torch.randint(4, V, (B, L), generator=g), torch.zeros(B, L, dtype=torch.long)),
        response_mask=rm, loss_mask=rm.clone(), group_ids=torch.arange(B) // 2,
        step_ids=torch.zeros(B, L, dtype=torch.long), behavior_logprobs=torch.zeros(B, L),
        truncated=torch.zeros(B, dtype=torch.bool))


def run(model, traj, adv, grad_accum, loss_cfg, minibatches=1, epochs=1, old=None, ref=None):
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    metrics = policy_update(m, opt, traj, adv, old_logprobs=old, ref_logprobs=ref, loss_cfg=loss_cfg,
                            ppo_epochs=epochs, minibatches=minibatches, grad_accum=grad_accum, temperature=1.0,
                            grad_clip=0.0, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    return m, metrics


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = char_tokenizer("0123456789+=")
    model = tiny_causal_lm(tok, size="micro", seed=1)
    traj = make_batch(tok)
    adv = torch.randn(traj.response_ids.shape, generator=torch.Generator().manual_seed(2)) * traj.loss_mask
    return model, traj, adv


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_grad_accumulation_matches_single_pass(setup, mode):
    model, traj, adv = setup
    cfg = LossConfig(aggregation=mode)
    ref_model, m1 = run(model, traj, adv, 1, cfg)
    for accum in (2, 4):
        got, _ = run(model, traj, adv, accum, cfg)
        for a, b in zip(ref_model.parameters(), got.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = max((a - b).abs().max().item() for a, b in zip(ref_model.parameters(), model.parameters()))
    assert moved > 0


def test_kl_to_itself_adds_nothing_and_entropy_changes_the_step(setup):
    model, traj, adv = setup
    ref_lp = batch_logprobs(model, traj, 1.0, 8)
    base, _ = run(model, traj, adv, 1, LossConfig())
    with_kl, m = run(model, traj, adv, 1, LossConfig(kl_coef=0.5, kl_estimator="k3"), ref=ref_lp)
    # k3 and its gradient vanish where π_θ = π_ref, so the first step is unchanged
    for a, b in zip(base.parameters(), with_kl.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert abs(m["kl"]) < 1e-6
    with_ent, m = run(model, traj, adv, 1, LossConfig(entropy_coef=0.1))
    assert m["entropy"] > 0
    assert max((a - b).abs().max().item() for a, b in zip(base.parameters(), with_ent.parameters())) > 1e-6


def test_ratio_is_one_on_the_first_pass_and_moves_on_the_second(setup):
    model, traj, adv = setup
    old = batch_logprobs(model, traj, 1.0, 8)
    _, m = run(model, traj, adv, 1, LossConfig(), minibatches=1, epochs=1, old=old)
    # one pass on the batch the old log-probs came from: π_θ = π_old exactly
    assert abs(m["ratio_mean"] - 1.0) < 1e-5 and abs(m["ratio_max"] - 1.0) < 1e-5 and m["clipfrac"] == 0.0
    _, m2 = run(model, traj, adv, 1, LossConfig(), minibatches=1, epochs=2, old=old)
    assert m2["ratio_max"] > 1.0 + 1e-4  # the second epoch sees the updated policy


def test_checkpoints_keep_the_newest_and_latest_points_to_the_last(tmp_path, setup):
    from finegrain.train.checkpoint import latest_checkpoint, load_state, save_checkpoint

    model, _, _ = setup
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, {"policy": (model, None)}, {"x": step}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000004", "step_000006"]
    ck = latest_checkpoint(tmp_path)
    assert ck.name == "step_000006" and load_state(ck)["x"] == 6 and load_state(ck)["step"] == 6
    save_checkpoint(tmp_path, 8, {"policy": (model, None)}, {"x": 8}, keep=1)
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_000008"]
