"""Multi-turn episodes end to end through Rollout: masks, log-probs, turn ids, turn info and turn
rewards, with a real tiny model and the HF sampler, and with a scripted sampler for worked values."""

import pytest
import torch

from finegrain.envs import Rollout, hf_rollout
from finegrain.toolcalls import format_result
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.rewards.base import RewardOutput
from finegrain.rewards.combine import to_token_rewards
from finegrain.sampling import SamplingParams
from finegrain.train.update import batch_logprobs
from tests.envs import CALL_TEXT, CalcTask, ScriptedSampler, chat_tokenizer, conversation

ALPHABET = "0123456789+-=:QA <>/(),\nacdelrstu"
KEYS = {"call", "error", "result"}
SOLUTIONS = ["Q: 3+4\n<call>add(3, 4)</call>\n<result>7</result>\nA: 7",
             "Q: 2+5\n<call>add(2, 5)</call>\n<result>7</result>\nA: 7"]


@pytest.fixture(scope="module")
def trained():
    """A micro model overfit (in about a second) on two tool-using solutions, so that it calls
    the tool, stops at </call> and answers after the result."""
    tok = char_tokenizer(ALPHABET)
    model = tiny_causal_lm(tok, size="micro", seed=0)
    x = torch.tensor([tok(t)["input_ids"] + [tok.eos_token_id] for t in SOLUTIONS])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(150):
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def batch(trained):
    model, tok = trained
    task = CalcTask(turn_rewards=True)
    rollout = hf_rollout(model, tok, env="tool_use", task=task, use_chat_template=False)
    traj = rollout.generate(task.examples("train"), 3, SamplingParams(temperature=1.0, max_new_tokens=32), seed=0)
    return rollout, traj


def test_observation_tokens_are_untrained_and_carry_no_logprobs(batch):
    rollout, t = batch
    tok = rollout.tokenizer
    observed = t.response_mask & ~t.loss_mask
    assert observed.any(dim=1).all(), "every episode should have called the tool at least once"
    assert t.behavior_logprobs[observed].eq(0).all() and t.behavior_logprobs[~t.response_mask].eq(0).all()
    for b in range(t.batch_size):
        for k, info in enumerate(t.turn_info[b]):
            obs = observed[b] & (t.turn_ids[b] == k)
            if info["call"] is None and info["error"] is None:  # the final answer: nothing answers it
                assert not obs.any()
                continue
            text = info["result"] if info["error"] is None else None
            decoded = tok.decode(t.response_ids[b][obs].tolist())
            assert decoded == format_result(text) if text is not None else decoded.startswith("\n<result>error: ")


def test_sampled_logprobs_equal_a_fresh_forward_pass(batch):
    rollout, t = batch
    sampled = t.loss_mask & t.response_mask
    recomputed = batch_logprobs(rollout.model, t, 1.0, micro_batch=3)
    torch.testing.assert_close(recomputed[sampled], t.behavior_logprobs[sampled], rtol=1e-4, atol=1e-4)
    assert sampled.sum() > t.response_mask.sum() / 3  # most tokens are the model's own


def test_every_token_carries_its_turn_and_turn_info_has_the_tool_keys(batch):
    rollout, t = batch
    for b in range(t.batch_size):
        n = int(t.response_mask[b].sum())
        turns = t.turn_ids[b, :n].tolist()
        assert t.turn_ids[b, n:].eq(-1).all() and min(turns) == 0
        assert turns == sorted(turns) and set(turns) == set(range(len(t.turn_info[b])))
        for k in set(turns):  # within a turn: the model's tokens first, then the observation's
            trained = t.loss_mask[b, :n][t.turn_ids[b, :n] == k].tolist()
            assert trained == sorted(trained, reverse=True) and trained[0]
        assert all(set(info) == KEYS for info in t.turn_info[b])
    assert any(info["call"] == {"name": "add", "args": ["3", "4"]} and info["result"] == "7"
               for info in t.turn_info[0])


def test_turn_rewards_land_on_the_last_trained_token_of_their_turn(batch):
    _, t = batch
    placed = to_token_rewards(RewardOutput(t.turn_rewards, t.turn_reward_mask, "turn"), t)
    assert t.turn_reward_mask.any()
    for b in range(t.batch_size):
        expected = torch.zeros_like(placed[b])
        for k in range(len(t.turn_info[b])):
            assert bool(t.turn_reward_mask[b, k])  # CalcTask rewards every turn
            last = int(((t.turn_ids[b] == k) & t.loss_mask[b]).nonzero().max())
            expected[last] = t.turn_rewards[b, k]
        torch.testing.assert_close(placed[b], expected)


def test_worked_example_with_a_scripted_sampler():
    # turn 0: "<call>add(3, 4)</call>" (22 tokens), observation "\n<result>7</result>\n" (20 tokens),
    # turn 1: "A: 7" + EOS (5 tokens). Rewards: 1.0 for the call, 0.5 for the answer.
    tok = char_tokenizer(ALPHABET)
    task = CalcTask(turn_rewards=True)
    sampler = ScriptedSampler(tok, lambda p: "<call>add(3, 4)</call>" if "<result>" not in p else "A: 7")
    t = Rollout(sampler, env="tool_use", task=task, use_chat_template=False).generate(
        task.examples("train", 1), 1, SamplingParams(max_new_tokens=30), seed=0)
    assert t.response_mask.sum() == 47 and t.response_texts == ["<call>add(3, 4)</call>\n<result>7</result>\nA: 7"]
    assert t.loss_mask[0].tolist() == [True] * 22 + [False] * 20 + [True] * 5
    assert t.turn_ids[0].tolist() == [0] * 42 + [1] * 5
    expected_lp = [-0.01 - 0.001 * i for i in range(22)] + [0.0] * 20 + [-0.02 - 0.001 * i for i in range(5)]
    torch.testing.assert_close(t.behavior_logprobs[0], torch.tensor(expected_lp))
    assert t.turn_rewards.tolist() == [[1.0, 0.5]] and t.turn_reward_mask.tolist() == [[True, True]]
    placed = to_token_rewards(RewardOutput(t.turn_rewards, t.turn_reward_mask, "turn"), t)[0]
    assert placed.nonzero().flatten().tolist() == [21, 46] and placed[[21, 46]].tolist() == [1.0, 0.5]
    assert not t.truncated[0]
    assert len(sampler.calls) == 2 and sampler.calls[1] == ["Q: 3+4\n<call>add(3, 4)</call>\n<result>7</result>\n"]


def test_chat_format_end_to_end_matches_the_template():
    tok = chat_tokenizer("bpe")
    task = CalcTask()
    sampler = ScriptedSampler(tok, lambda p: CALL_TEXT if "<tool_response>" not in p else "7")
    rollout = Rollout(sampler, env="tool_use", env_kwargs={"format": "chat", "tokenizer": tok, "system": "Be brief."},
                      task=task)
    assert rollout.stop_strings == ("</tool_call>",)
    t = rollout.generate(task.examples("train", 1), 2, SamplingParams(max_new_tokens=200), seed=0)
    full = tok.apply_chat_template(conversation("7"), tools=_schemas(task), tokenize=False, add_generation_prompt=True)
    for b in range(2):
        ids = t.prompt_ids[b][t.prompt_mask[b]].tolist() + t.response_ids[b][t.response_mask[b]].tolist()
        assert ids == tok(full + "7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert '"name": "hang"' in t.prompt_texts[b]  # the episode's tools are in the prompt
        assert t.turn_info[b] == [{"call": {"name": "add", "args": ["3", "4"]}, "error": None, "result": "7"},
                                  {"call": None, "error": None, "result": None}]
        n_call = len(tok(CALL_TEXT, add_special_tokens=False)["input_ids"])
        n_obs = int((t.response_mask[b] & ~t.loss_mask[b]).sum())
        assert t.loss_mask[b, :n_call].all() and not t.loss_mask[b, n_call:n_call + n_obs].any()
        assert t.loss_mask[b, n_call + n_obs:n_call + n_obs + 2].all()  # "7" and EOS


def _schemas(task):
    from finegrain.envs.chat import tool_schemas

    return tool_schemas(task.tools(task.examples("train", 1)[0]))


def test_rollout_metrics_count_turns_calls_and_error_kinds():
    from finegrain.train.stages import rollout_metrics

    class T:  # only turn_info is read
        turn_info = [[{"call": {"name": "f", "args": []}, "error": None, "result": "1"},
                      {"call": None, "error": "malformed", "result": None},
                      {"call": None, "error": None, "result": None}],
                     [{"call": {"name": "g", "args": []}, "error": "timeout", "result": None}]]

    m = rollout_metrics(T())
    assert m == {"rollout/turns": 2.0, "rollout/tool_calls": 1.0,  # 4 turns, 2 calls, 2 episodes
                 "rollout/errors/malformed": 0.25, "rollout/errors/timeout": 0.25}
