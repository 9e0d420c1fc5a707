"""Reward placement: every level lands on a trained token, so no estimator can lose it.

Worked examples by hand, a plain loop against the vectorised placement, and invariances."""

import pytest
import torch

from finegrain.credit import ADVANTAGES
from finegrain.rewards.base import RewardOutput
from finegrain.rewards.combine import combine, to_token_rewards
from finegrain.trajectory import Trajectory, last_trained_positions
from tests.helpers import M, T, close


def traj(response_mask, loss_mask, step_ids=None, turn_ids=None, groups=None):
    rm, lm = M(response_mask), M(loss_mask)
    B, L = rm.shape
    return Trajectory(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
        response_ids=torch.zeros(B, L, dtype=torch.long), response_mask=rm, loss_mask=lm,
        group_ids=torch.tensor(groups or [0] * B), step_ids=torch.tensor(step_ids) if step_ids else torch.where(rm, 0, -1),
        behavior_logprobs=torch.zeros(B, L), truncated=torch.zeros(B, dtype=torch.bool),
        turn_ids=torch.tensor(turn_ids) if turn_ids else None)


# a two-turn episode: model tokens 0-1 (turn 0), observation 2-3 (turn 0, untrained), model 4-5 (turn 1),
# observation 6 (turn 1, untrained: the episode ended on a tool output), padding 7
AGENT = dict(response_mask=[[1, 1, 1, 1, 1, 1, 1, 0]], loss_mask=[[1, 1, 0, 0, 1, 1, 0, 0]],
             turn_ids=[[0, 0, 0, 0, 1, 1, 1, -1]], step_ids=[[0, 0, 0, 1, 1, 1, 2, -1]])


def test_outcome_lands_on_the_last_trained_token_not_the_last_real_one():
    t = traj(**AGENT)
    r = to_token_rewards(RewardOutput(T([2.0]), M([1]), "outcome"), t)
    close(r, [[0, 0, 0, 0, 0, 2.0, 0, 0]])  # token 6 is an observation: the reward moves to token 5


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp", "prime_rloo", "prime_loo_exact", "dr_grpo"])
def test_no_estimator_loses_an_outcome_reward_after_an_untrained_last_token(name):
    """Before the fix the reward sat on token 6 (loss_mask False) and every estimator gave 0."""
    t = traj(response_mask=AGENT["response_mask"] * 2, loss_mask=AGENT["loss_mask"] * 2,
             turn_ids=AGENT["turn_ids"] * 2, step_ids=AGENT["step_ids"] * 2)
    out = RewardOutput(T([1.0, 0.0]), M([1, 1]), "outcome")  # one right, one wrong: a group of 2
    r = to_token_rewards(out, t)
    adv = ADVANTAGES.get(name)(r, t.loss_mask, t.group_ids, t.step_ids)
    assert adv[0][t.loss_mask[0]].abs().sum() > 0
    assert adv[0][t.loss_mask[0]].gt(0).all() and adv[1][t.loss_mask[1]].lt(0).all()


def test_turn_rewards_land_on_each_turns_last_trained_token():
    t = traj(**AGENT)
    r = to_token_rewards(RewardOutput(T([[0.5, -1.0]]), M([[1, 1]]), "turn"), t)
    close(r, [[0, 0.5, 0, 0, 0, -1.0, 0, 0]])
    masked = to_token_rewards(RewardOutput(T([[0.5, -1.0]]), M([[0, 1]]), "turn"), t)
    close(masked, [[0, 0, 0, 0, 0, -1.0, 0, 0]])  # not applicable is not zero: nothing placed


def test_step_rewards_land_on_the_last_trained_token_of_each_step():
    t = traj(**AGENT)
    r = to_token_rewards(RewardOutput(T([[1.0, 2.0, 3.0]]), M([[1, 1, 1]]), "step"), t)
    # step 0 = tokens 0-2 (last trained: 1); step 1 = tokens 3-5 (5); step 2 = token 6 (untrained: dropped)
    close(r, [[0, 1.0, 0, 0, 0, 2.0, 0, 0]])


def test_single_turn_batches_place_as_before():
    """Without turn ids and with loss_mask = response_mask, the last trained token is the last real one."""
    t = traj(response_mask=[[1, 1, 1, 0], [1, 1, 0, 0]], loss_mask=[[1, 1, 1, 0], [1, 1, 0, 0]])
    close(to_token_rewards(RewardOutput(T([1.0, 3.0]), M([1, 1]), "outcome"), t), [[0, 0, 1.0, 0], [0, 3.0, 0, 0]])
    close(to_token_rewards(RewardOutput(T([[4.0], [5.0]]), M([[1], [1]]), "turn"), t), [[0, 0, 4.0, 0], [0, 5.0, 0, 0]])


def test_last_trained_positions_loop_against_vectorised():
    g = torch.Generator().manual_seed(0)
    B, L, S = 7, 13, 4
    seg = torch.randint(-1, S, (B, L), generator=g)
    trained = torch.rand(B, L, generator=g) > 0.4
    got = last_trained_positions(seg, trained, S)
    for b in range(B):
        for s in range(S):
            ts = [t for t in range(L) if seg[b, t] == s and trained[b, t]]
            assert got[b, s] == (max(ts) if ts else -1)


def test_garbage_under_untrained_tokens_and_permutation():
    t = traj(**AGENT)
    out = RewardOutput(T([[0.5, -1.0]]), M([[1, 1]]), "turn")
    base = to_token_rewards(out, t)
    tok = RewardOutput(torch.randn(1, 8), M(AGENT["loss_mask"]), "token")
    close(to_token_rewards(tok, t) * t.loss_mask, tok.values * t.loss_mask)
    two = traj(response_mask=AGENT["response_mask"] + [[1, 1, 0, 0, 0, 0, 0, 0]],
               loss_mask=AGENT["loss_mask"] + [[1, 1, 0, 0, 0, 0, 0, 0]],
               turn_ids=AGENT["turn_ids"] + [[0, 0, -1, -1, -1, -1, -1, -1]])
    vals = RewardOutput(T([[0.5, -1.0], [2.0, 0.0]]), M([[1, 1], [1, 0]]), "turn")
    fwd = to_token_rewards(vals, two)
    perm = torch.tensor([1, 0])
    swapped = to_token_rewards(RewardOutput(vals.values[perm], vals.mask[perm], "turn"), two.select(perm))
    close(swapped, fwd[perm])
    close(fwd[0], base[0])


def test_combine_applies_weights():
    t = traj(**AGENT)
    outs = {"a": RewardOutput(T([1.0]), M([1]), "outcome"), "b": RewardOutput(T([[1.0, 1.0]]), M([[1, 1]]), "turn")}
    per = combine(outs, {"a": 0.5, "b": -2.0}, t)
    close(per["a"], [[0, 0, 0, 0, 0, 0.5, 0, 0]])
    close(per["b"], [[0, -2.0, 0, 0, 0, -2.0, 0, 0]])
    with pytest.raises(KeyError, match="no weight for signal"):
        combine(outs, {"a": 1.0}, t)
