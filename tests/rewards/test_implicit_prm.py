"""Tests for finegrain.rewards.implicit_prm: pure functions (worked examples) and the ImplicitPRM
signal on tiny Llama-shaped models built from a config (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finegrain.models.logprobs import response_logprobs
from finegrain.rewards.base import REWARDS
from finegrain.rewards.implicit_prm import (STEP_SCORE_AGGREGATIONS, ImplicitPRM, implicit_step_rewards,
                                            implicit_token_rewards, sequence_score)
from finegrain.trajectory import Trajectory, token_to_step_sum
from tests.helpers import RTOL, ATOL, close

NAN = float("nan")


# ----------------------------------------------------------------------------- pure functions (a)

def test_token_rewards_worked_example():
    # β = 0.1: r = 0.1·(lp_prm − lp_ref) = [0.1·0.5, 0.1·(−1), masked → 0]
    prm = torch.tensor([[-1.0, -2.0, NAN]])
    ref = torch.tensor([[-1.5, -1.0, 3.0]])
    mask = torch.tensor([[True, True, False]])
    close(implicit_token_rewards(prm, ref, mask, beta=0.1), [[0.05, -0.1, 0.0]])


def test_token_rewards_carry_gradient_only_on_real_tokens():
    prm = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    r = implicit_token_rewards(prm, torch.zeros(1, 3), torch.tensor([[True, False, True]]), beta=0.5)
    r.sum().backward()
    close(prm.grad, [[0.5, 0.0, 0.5]])


def test_step_rewards_worked_example():
    # step ids [0, 0, 1, −1, 2] with the last token masked:
    #   step 0 = 1 + 2 = 3;  step 1 = 3;  token 3 is outside any step;  step 2's only token is masked
    token_r = torch.tensor([[1.0, 2.0, 3.0, 4.0, NAN]])
    mask = torch.tensor([[True, True, True, True, False]])
    step_ids = torch.tensor([[0, 0, 1, -1, 2]])
    values, step_mask = implicit_step_rewards(token_r, mask, step_ids, 3)
    close(values, [[3.0, 3.0, 0.0]])
    assert step_mask.tolist() == [[True, True, False]]


# rows: three steps [3, −1, 2]; one step [5] (NaN in an absent slot); no step at all
STEP_V = torch.tensor([[3.0, -1.0, 2.0], [5.0, NAN, 1e30], [NAN, 7.0, 7.0]])
STEP_M = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])


@pytest.mark.parametrize("how,expected", [
    ("min", [-1.0, 5.0, 0.0]),        # min(3, −1, 2) = −1
    ("sum", [4.0, 5.0, 0.0]),         # 3 − 1 + 2 = 4
    ("mean", [4.0 / 3.0, 5.0, 0.0]),  # 4 / 3
    ("last", [2.0, 5.0, 0.0]),        # the last existing step
])
def test_sequence_score_worked_examples(how, expected):
    # A row with no step scores 0 for every aggregation.
    close(sequence_score(STEP_V, STEP_M, how), expected)


def test_sequence_score_aggregations_are_registered():
    assert STEP_SCORE_AGGREGATIONS.names() == ["last", "mean", "min", "sum"]
    with pytest.raises(KeyError, match="available: last, mean, min, sum"):
        sequence_score(STEP_V, STEP_M, "median")


def test_sequence_score_loop_reference():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        v = torch.randn(6, 4, generator=gen)
        m = torch.rand(6, 4, generator=gen) < 0.6
        for how in STEP_SCORE_AGGREGATIONS.names():
            got = sequence_score(v, m, how)
            for i in range(6):
                vals = [float(v[i, k]) for k in range(4) if m[i, k]]
                ref = 0.0 if not vals else {"min": min(vals), "sum": sum(vals), "mean": sum(vals) / len(vals),
                                            "last": vals[-1]}[how]
                assert abs(float(got[i]) - ref) <= ATOL + RTOL * abs(ref)


# ----------------------------------------------------------------------------- the signal on tiny models

def tiny_lm(seed: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      initializer_range=0.3, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()


PROMPTS = [[3, 5, 7], [2, 9, 4, 1], [6], [8, 8], [4, 4, 4]]
RESPONSES = [[1, 2, 3, 4, 5], [7, 7], [3, 1, 4], [], [9, 2, 2, 6]]
STEPS = [[0, 0, 1, 1, 2], [0, 0], [-1, 0, 0], [], [0, 1, 1, 1]]


def make_traj(behavior_logprobs=None) -> Trajectory:
    """Left-padded prompts and right-padded responses of different lengths (one response empty)."""
    B, P, L = len(PROMPTS), max(map(len, PROMPTS)), max(map(len, RESPONSES))
    prompt_ids = torch.zeros(B, P, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.bool)
    response_ids = torch.zeros(B, L, dtype=torch.long)
    response_mask = torch.zeros(B, L, dtype=torch.bool)
    step_ids = torch.full((B, L), -1, dtype=torch.long)
    for i, (p, r, s) in enumerate(zip(PROMPTS, RESPONSES, STEPS)):
        prompt_ids[i, P - len(p):] = torch.tensor(p)
        prompt_mask[i, P - len(p):] = True
        response_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, :len(r)] = True
        step_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    if behavior_logprobs is None:
        behavior_logprobs = torch.zeros(B, L)
    return Trajectory(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                      response_mask=response_mask, loss_mask=response_mask.clone(),
                      group_ids=torch.tensor([0, 1, 0, 1, 0]), step_ids=step_ids,
                      behavior_logprobs=behavior_logprobs, truncated=torch.zeros(B, dtype=torch.bool))


def per_row_logprobs(model, i: int) -> torch.Tensor:
    """Unbatched, unpadded: log π(y_t | x, y_<t) for row i alone. (l_i,)"""
    ids = torch.tensor([PROMPTS[i] + RESPONSES[i]])
    with torch.no_grad():
        return response_logprobs(model, ids, torch.ones_like(ids, dtype=torch.bool), len(RESPONSES[i]))[0]


@pytest.fixture(scope="module")
def models():
    return tiny_lm(1), tiny_lm(2)


@pytest.mark.parametrize("micro_batch", [None, 1, 2])
def test_token_rewards_match_an_unbatched_loop(models, micro_batch):
    prm, ref = models
    beta = 0.05
    out = ImplicitPRM(prm, ref, beta=beta, micro_batch=micro_batch)(make_traj())
    assert out.level == "token" and out.values.shape == (5, 5)
    assert torch.equal(out.mask, make_traj().response_mask)
    for i, r in enumerate(RESPONSES):
        n = len(r)
        if n:
            expected = beta * (per_row_logprobs(prm, i) - per_row_logprobs(ref, i))   # (l_i,)
            close(out.values[i, :n], expected)
            close(out.components["seq_sum"][i], expected.sum())
        assert torch.all(out.values[i, n:] == 0)
    assert out.values.abs().max() > 1e-3          # the two random models really differ


def test_same_model_gives_exactly_zero(models):
    prm, _ = models
    out = ImplicitPRM(prm, prm, beta=0.05)(make_traj())
    assert torch.equal(out.values, torch.zeros_like(out.values))
    # ref_model=None: π_ref is the rollout's behavior_logprobs; here they are the PRM's own
    traj = make_traj()
    with torch.no_grad():
        lp = response_logprobs(prm, traj.input_ids, traj.attention_mask, traj.response_ids.shape[1])
    out = ImplicitPRM(prm, None, beta=0.05)(make_traj(behavior_logprobs=torch.where(traj.response_mask, lp, 0.0)))
    assert torch.equal(out.values, torch.zeros_like(out.values))


def test_whole_granularity_puts_the_sum_on_the_last_token(models):
    prm, ref = models
    traj = make_traj()
    tok = ImplicitPRM(prm, ref)(traj)
    whole = ImplicitPRM(prm, ref, granularity="whole")(traj)
    last = [len(r) - 1 for r in RESPONSES]
    for i, t in enumerate(last):
        if t < 0:
            assert not whole.mask[i].any() and torch.all(whole.values[i] == 0)
            continue
        assert whole.mask[i].nonzero().flatten().tolist() == [t]
        close(whole.values[i, t], tok.values[i].sum())
    assert torch.all(whole.values[~whole.mask] == 0)


def test_step_level_sums_token_rewards_per_step(models):
    prm, ref = models
    traj = make_traj()
    tok = ImplicitPRM(prm, ref)(traj)
    step = ImplicitPRM(prm, ref, level="step")(traj)
    assert step.level == "step" and step.values.shape == (5, 3)
    values, mask = token_to_step_sum(tok.values, traj.response_mask, traj.step_ids, 3)
    close(step.values, values)
    assert torch.equal(step.mask, mask)
    # row 0: steps {0, 1}, {2, 3}, {4}
    close(step.values[0], [tok.values[0, :2].sum(), tok.values[0, 2:4].sum(), tok.values[0, 4]])
    close(step.components["seq_sum"], tok.components["seq_sum"])


def test_reusing_the_update_forward_gives_the_same_rewards(models):
    prm, ref = models
    traj = make_traj()
    signal = ImplicitPRM(prm, ref, beta=0.05)
    prm_lp, ref_lp = signal.logprobs(traj, grad=True)
    assert prm_lp.requires_grad and not ref_lp.requires_grad
    from_update = signal.output_from_log_ratio(prm_lp - ref_lp, traj)
    assert not from_update.values.requires_grad
    torch.testing.assert_close(from_update.values, signal(traj).values, rtol=RTOL, atol=ATOL)
    q = signal.log_ratio(traj)
    close(q * 0.05, signal(traj).values)


def test_registered_and_validated(models):
    prm, ref = models
    from finegrain.rewards.online_prm import OnlineImplicitPRM

    assert issubclass(REWARDS.get("implicit_prm"), ImplicitPRM) and REWARDS.get("implicit_prm") is OnlineImplicitPRM
    REWARDS.check_kwargs("implicit_prm", {"level": "step", "micro_batch": 4}, "rewards.kwargs")
    with pytest.raises(ValueError, match="level"):
        ImplicitPRM(prm, ref, level="outcome")
    with pytest.raises(ValueError, match="granularity"):
        ImplicitPRM(prm, ref, granularity="step")
    with pytest.raises(ValueError, match="whole"):
        ImplicitPRM(prm, ref, level="step", granularity="whole")
    with pytest.raises(ValueError, match="beta"):
        ImplicitPRM(prm, ref, beta=0.0)


@pytest.mark.parametrize("how", ["min", "sum", "mean", "last"])
def test_sequence_score_with_no_steps_in_batch(how):
    out = sequence_score(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool), how)
    assert out.tolist() == [0.0, 0.0, 0.0]
