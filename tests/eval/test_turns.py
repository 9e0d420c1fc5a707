"""The turn structure of multi-turn episodes in evaluation records (finegrain.eval.turns and the
records of finegrain.eval.experiment): a scripted tool-use episode with known turns, errors, turn
rewards and turn-level scorer values; the chat format; the decoding fallback."""

from __future__ import annotations

import json
import string

import pytest
import torch

from finegrain.envs import Rollout
from finegrain.eval.experiment import _records, turn_metrics
from finegrain.eval.scoring import scores_from_output
from finegrain.eval.turns import run_spans, token_runs
from finegrain.models.tokenizer import char_tokenizer
from finegrain.rewards.agents import EnvTurns
from finegrain.rewards.base import RewardOutput
from finegrain.sampling import SamplingParams
from finegrain.segment import SEGMENTERS
from tests.envs import CALL_TEXT, CalcTask, ScriptedSampler, chat_tokenizer

UNKNOWN = "\n<result>error: unknown tool 'mul'; available: add, boom, hang</result>\n"
RESPONSE = "<call>add(3, 4)</call>\n<result>7</result>\n<call>mul(2)</call>" + UNKNOWN + "A: 7"


def scripted(prefix: str) -> str:
    """Turn 0 calls add, turn 1 an unknown tool, turn 2 answers."""
    return ["<call>add(3, 4)</call>", "<call>mul(2)</call>", "A: 7"][prefix.count("<result>")]


@pytest.fixture(scope="module")
def episode():
    tok = char_tokenizer(string.printable)
    task = CalcTask(turn_rewards=True)  # turn rewards: 1 for a call that returned, -1 for an error, 0.5 for the answer
    traj = Rollout(ScriptedSampler(tok, scripted), env="tool_use", task=task, use_chat_template=False).generate(
        task.examples("train", 1), 1, SamplingParams(max_new_tokens=40), seed=0)
    assert traj.response_texts == [RESPONSE]
    verifier = RewardOutput(torch.tensor([1.0]), torch.tensor([True]), "outcome")
    scores = {"verifier": scores_from_output(verifier, traj, task),
              "env_turns": scores_from_output(EnvTurns()(traj), traj, task)}  # a turn-level scorer
    recs = _records(traj, scores, task, tok, None, {}, keep_tokens=1, multi_turn=True)
    return traj, recs[0], task


def test_turns_of_a_scripted_episode(episode):
    _, rec, _ = episode
    t0, t1, t2 = rec.turns
    assert (t0.text, t0.span, t0.call_span) == ("<call>add(3, 4)</call>", (0, 22), (0, 22))
    assert (t0.call, t0.error, t0.result) == ({"name": "add", "args": ["3", "4"]}, None, "7")
    assert (t0.observation, t0.observation_span) == ("\n<result>7</result>\n", (22, 42))
    assert (t0.n_tokens, t0.n_observation_tokens) == (22, 20)
    assert (t1.text, t1.span, t1.call_span) == ("<call>mul(2)</call>", (42, 61), (42, 61))
    assert (t1.call, t1.error, t1.result) == ({"name": "mul", "args": ["2"]}, "unknown_tool", None)
    assert t1.observation == UNKNOWN and t1.observation_span == (61, 61 + len(UNKNOWN))
    assert (t2.text, t2.call, t2.call_span, t2.error) == ("A: 7", None, None, None)
    assert (t2.observation, t2.observation_span, t2.n_tokens) == ("", None, 5)  # "A: 7" and EOS
    # the environment's own turn rewards, and the turn-level scorer's values; the outcome scorer gives none
    assert [t.env_reward for t in rec.turns] == [1.0, -1.0, 0.5]
    assert [t.scores for t in rec.turns] == [{"env_turns": 1.0}, {"env_turns": -1.0}, {"env_turns": 0.5}]


def test_turn_spans_tile_the_response(episode):
    _, rec, _ = episode
    at = 0
    for t in rec.turns:
        assert t.span[0] == at and rec.response[t.span[0]:t.span[1]] == t.text
        at = t.span[1]
        if t.observation_span:
            assert t.observation_span[0] == at and rec.response[slice(*t.observation_span)] == t.observation
            at = t.observation_span[1]
    assert at == len(rec.response)


def test_steps_go_to_the_turn_whose_model_text_they_overlap(episode):
    _, rec, task = episode
    spans = SEGMENTERS.get(task.segmenter)(rec.response)  # newline steps: lines 1 and 3 are observations
    assert [rec.response[a:b].strip() for a, b in spans][:2] == ["<call>add(3, 4)</call>", "<result>7</result>"]
    assert [t.steps for t in rec.turns] == [[0], [2], [4]]


def test_records_json_carries_turns_only_for_multi_turn(episode):
    traj, rec, task = episode
    d = json.loads(json.dumps(rec.to_json()))
    assert [t["turn"] for t in d["turns"]] == [0, 1, 2]
    assert d["turns"][1]["error"] == "unknown_tool" and d["turns"][0]["observation_span"] == [22, 42]
    single = _records(traj, {}, task, char_tokenizer(string.printable), None, {}, keep_tokens=0)[0]
    assert single.turns is None and "turns" not in single.to_json()


def test_turn_metrics(episode):
    _, rec, _ = episode
    assert turn_metrics([rec]) == {"episodes": 1, "mean_turns": 3.0, "mean_tool_calls": 2.0, "truncated_frac": 0.0,
                                   "error_frac": {"unknown_tool": 1 / 3}}


def test_chat_format_turns():
    tok = chat_tokenizer("bpe")
    task = CalcTask()
    sampler = ScriptedSampler(tok, lambda p: CALL_TEXT if "<tool_response>" not in p else "7")
    traj = Rollout(sampler, env="tool_use", env_kwargs={"format": "chat", "tokenizer": tok}, task=task).generate(
        task.examples("train", 1), 1, SamplingParams(max_new_tokens=200), seed=0)
    rec = _records(traj, {}, task, tok, None, {}, keep_tokens=0, multi_turn=True)[0]
    t0, t1 = rec.turns
    assert t0.text == CALL_TEXT and t0.call_span == (0, len(CALL_TEXT))
    assert t0.call == {"name": "add", "args": ["3", "4"]}
    assert "<tool_response>\n7\n</tool_response>" in t0.observation and t0.n_observation_tokens > 0
    assert t1.text == "7" and t1.call_span is None and t1.observation == ""
    assert rec.response == t0.text + t0.observation + t1.text


class MergingTokenizer:
    """Decodes 'a', 'b', 'c' but writes "ab" as "X": pieces decoded apart do not add up."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("_abc"[i] for i in ids).replace("ab", "X")


def test_run_spans_fall_back_to_prefix_decoding():
    runs = token_runs([0, 0, 0], [True, False, False])
    assert runs == [(0, True, 0, 1), (0, False, 1, 3)]
    assert run_spans(MergingTokenizer(), [1, 2, 3], runs, "Xc") == [(0, 1), (1, 2)]
