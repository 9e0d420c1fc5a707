"""RLPR (finegrain/rewards/rlpr.py): worked examples on a stub LM whose probabilities are known,
the batched probes against a plain forward per row, invariances, the shipped config, a micro run.

The stub (``CountingLM``): uniform logits except for one target token, whose logit is
β · (#target − #blocker) over the tokens seen so far. With β = ln(V − 1), the probability of the
target after a count k is p(k) = (V − 1)^k / ((V − 1)^k + V − 1):
    p(−1) = 1 / (1 + (V − 1)²),  p(0) = 1 / V,  p(1) = 1 / 2,  p(2) = (V − 1) / V.
"""

from __future__ import annotations

import math
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finegrain.config import load_config, to_dict, validate
from finegrain.models.probe import probe_token_ids
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.rewards import REWARDS
from finegrain.rewards.rlpr import ReferenceProbability, answer_cut, answer_scores, rlpr_rewards
from finegrain.tasks.base import Example
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from finegrain.trajectory import Trajectory
from tests.conftest import tiny_run_overrides
from tests.helpers import ATOL, RTOL, close

TOK = char_tokenizer(string.ascii_letters + string.digits + " :-\n")
V = len(TOK)
SEVEN, BLOCK = TOK.convert_tokens_to_ids("7"), TOK.convert_tokens_to_ids("x")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def p(k: int) -> float:
    return (V - 1) ** k / ((V - 1) ** k + V - 1)


class CountingLM(torch.nn.Module):
    """Next-token logits: 0 everywhere, β · (#target − #blocker seen so far) on the target."""

    def __init__(self, beta: float = math.log(V - 1), target: int = SEVEN, blocker: int = BLOCK):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))   # gives the module a device
        self.beta, self.target, self.blocker, self.calls = beta, target, blocker, []

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
        self.calls.append(tuple(input_ids.shape))
        real = attention_mask.bool()
        count = (((input_ids == self.target) & real).long() - ((input_ids == self.blocker) & real).long()).cumsum(1)
        logits = torch.zeros(*input_ids.shape, V)
        logits[..., self.target] = self.beta * count.float()
        return SimpleNamespace(logits=logits)


def build(rows, answers, *, groups=None, prompt_pad=0, response_pad=0, garbage=9):
    """A single-turn Trajectory from (prompt text, response text) rows, char-tokenized; extra
    padding columns on both sides hold ``garbage`` ids under a False mask."""
    B = len(rows)
    prompts = [TOK(q)["input_ids"] for q, _ in rows]
    resps = [TOK(a, add_special_tokens=False)["input_ids"] for _, a in rows]
    P, L = max(map(len, prompts)) + prompt_pad, max(max(map(len, resps)), 1) + response_pad
    prompt_ids = torch.full((B, P), garbage)
    prompt_mask = torch.zeros(B, P, dtype=torch.bool)
    response_ids = torch.full((B, L), garbage)
    response_mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        prompt_ids[b, P - len(prompts[b]):] = torch.tensor(prompts[b])
        prompt_mask[b, P - len(prompts[b]):] = True
        response_ids[b, :len(resps[b])] = torch.tensor(resps[b], dtype=torch.long)
        response_mask[b, :len(resps[b])] = True
    return Trajectory(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                      response_mask=response_mask, loss_mask=response_mask.clone(),
                      group_ids=torch.tensor(groups if groups is not None else list(range(B))),
                      step_ids=torch.where(response_mask, 0, -1), behavior_logprobs=torch.zeros(B, L),
                      truncated=torch.zeros(B, dtype=torch.bool), prompt_texts=[q for q, _ in rows],
                      response_texts=[a for _, a in rows],
                      examples=[Example(id=str(b), prompt=q, answer=y)
                                for b, ((q, _), y) in enumerate(zip(rows, answers))])


# ================================================================================ the statistic

def test_answer_scores_worked_values():
    # lp = ln(1/2), ln(1/4): mean_prob 3/8, mean_logprob −(3/2) ln 2, seq_prob 1/8, geo_mean 1/(2√2)
    lp = [torch.log(torch.tensor([0.5, 0.25]))]
    want = {"mean_prob": 0.375, "mean_logprob": -1.5 * math.log(2), "seq_prob": 0.125, "geo_mean": 0.5 ** 1.5}
    for score, w in want.items():
        close(answer_scores(lp, score=score), [w])
    assert torch.isnan(answer_scores([torch.zeros(0)])).all() and answer_scores([]).shape == (0,)
    with pytest.raises(ValueError, match="rlpr.score: expected one of mean_prob"):
        answer_scores(lp, score="prob")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_answer_scores_vectorised_equals_loop(seed):
    g = torch.Generator().manual_seed(seed)
    lps = [-torch.rand(int(n), generator=g) * 3 for n in torch.randint(0, 6, (9,), generator=g)]
    loop = {"mean_prob": lambda t: t.exp().mean(), "mean_logprob": lambda t: t.mean(),
            "seq_prob": lambda t: t.sum().exp(), "geo_mean": lambda t: t.mean().exp()}
    for score, fn in loop.items():
        want = torch.tensor([float(fn(t)) if t.numel() else float("nan") for t in lps])
        torch.testing.assert_close(answer_scores(lps, score=score), want, rtol=RTOL, atol=ATOL, equal_nan=True)


def test_rlpr_rewards_and_answer_cut():
    close(rlpr_rewards(torch.tensor([0.5, 0.25]), torch.tensor([0.25, 0.5]), torch.tensor([True, True])), [0.25, 0.0])
    close(rlpr_rewards(torch.tensor([0.5, 0.25, 0.9]), torch.tensor([0.25, 0.5, 0.1]),
                       torch.tensor([True, True, False]), clip_low=False), [0.25, -0.25, 0.0])
    assert answer_cut("a\nA: 1\nA: 2", "A: ") == len("a\nA: 1\nA: ")          # the last marker
    assert answer_cut("A: 1\nxA: 2", "A: ") == 3                                # a marker must start a line
    assert answer_cut("no marker", "A: ") is None and answer_cut("A:   \nmore", "A: ") is None


# ================================================================================ worked example

ROWS = [("Q", "a7\nA: 12"),     # one '7' in the reasoning; the model's own answer 12 is replaced by y*
        ("Q", "a7 12"),         # no answer marker: malformed
        ("Q", "x\nA: 5"),       # a blocker in the reasoning: y* less likely than with no reasoning
        ("Q", "a7\nA: ")]       # nothing after the marker: malformed


def test_worked_example_on_the_counting_model():
    # y* = "77". Probe after the reasoning (row 0): the 7s see counts 1, 2 -> p(1), p(2).
    # Baseline (prompt "Q" + "A: " + y*): counts 0, 1 -> p(0), p(1), for every row (same prompt, y*).
    #   mean_prob: score0 = (p1 + p2)/2, baseline = (p0 + p1)/2, R0 = (p2 − p0)/2 = (V − 2)/(2V)
    #   row 2: counts −1, 0 -> score2 = (p(−1) + p0)/2 < baseline -> clipped to 0; unclipped (p(−1) − p1)/2
    model = CountingLM()
    traj = build(ROWS, ["77"] * 4)
    out = ReferenceProbability(model, model, TOK)(traj)
    assert out.level == "outcome" and out.mask.all()
    close(out.values, [(V - 2) / (2 * V), 0.0, 0.0, 0.0])
    close(out.components["well_formed"], [1.0, 0.0, 1.0, 0.0])
    close(out.components["score"], [(p(1) + p(2)) / 2, 0.0, (p(-1) + p(0)) / 2, 0.0])
    close(out.components["baseline"], [(p(0) + p(1)) / 2, 0.0, (p(0) + p(1)) / 2, 0.0])
    unclipped = ReferenceProbability(model, model, TOK, clip_low=False)(traj)
    close(unclipped.values, [(V - 2) / (2 * V), 0.0, (p(-1) - p(1)) / 2, 0.0])
    # the other statistics of row 0, against the baseline's
    lp, lp0 = [math.log(p(1)), math.log(p(2))], [math.log(p(0)), math.log(p(1))]
    stats = {"mean_logprob": lambda v: sum(v) / 2, "seq_prob": lambda v: math.exp(sum(v)),
             "geo_mean": lambda v: math.exp(sum(v) / 2)}
    for score, s in stats.items():
        got = ReferenceProbability(model, model, TOK, score=score)(traj)
        assert float(got.values[0]) == pytest.approx(s(lp) - s(lp0), rel=RTOL, abs=ATOL)


def test_the_baseline_comes_from_the_initial_policy_and_is_computed_once():
    # policy: the counting model; initial: β = 0, uniform, so s(lp0) = 1/V whatever the context
    policy, initial = CountingLM(), CountingLM(beta=0.0)
    signal = ReferenceProbability(policy, initial, TOK)
    traj = build(ROWS[:1] * 3 + [("Qz", "a7\nA: 3")], ["77", "77", "7", "77"])
    out = signal(traj)
    close(out.components["baseline"], [1 / V] * 4)
    close(out.values, [(p(1) + p(2)) / 2 - 1 / V, (p(1) + p(2)) / 2 - 1 / V, p(1) - 1 / V, (p(1) + p(2)) / 2 - 1 / V])
    # three distinct (prompt, y*) pairs, one initial-policy call; seen again: no call at all
    assert len(initial.calls) == 1 and initial.calls[0][0] == 3
    signal(traj.select([3, 0]))
    assert len(initial.calls) == 1
    signal(build([("Q", "b\nA: 1")], ["12"]))                                 # a new y*: one more probe
    assert len(initial.calls) == 2 and initial.calls[1][0] == 1


def test_from_context_takes_the_initial_policy_when_built():
    made = []
    ctx = SimpleNamespace(policy=CountingLM(), tokenizer=TOK, initial_policy=lambda: made.append(1) or CountingLM(0.0))
    signal = REWARDS.get("rlpr").from_context(ctx, score="geo_mean")
    assert made == [1] and signal.score == "geo_mean"
    with pytest.raises(ValueError, match="needs the initial policy"):
        REWARDS.get("rlpr").from_context(SimpleNamespace(policy=CountingLM(), tokenizer=TOK,
                                                         initial_policy=lambda: None))
    with pytest.raises(ValueError, match="rlpr.answer_prefix"):
        ReferenceProbability(CountingLM(), CountingLM(), TOK, answer_prefix="")
    with pytest.raises(ValueError, match=r"rewards\[0\].kwargs.score: expected one of mean_prob"):
        REWARDS.check_kwargs("rlpr", {"score": "prob"}, "rewards[0].kwargs")
    with pytest.raises(ValueError, match=r"micro_batch"):
        REWARDS.check_kwargs("rlpr", {"micro_batch": 0}, "rewards[0].kwargs")


# ================================================================================ a real tiny model

MIXED = [("Q: 7 +5\n", "7+5=12\nA: 12"), ("Q: 3 *2\n", "3*2=5\nA: five"), ("Q: 7 +5\n", "7+5=13\nA: 13"),
         ("Q: 9 -1\n", "9-1=8"), ("Q: 3 *2\n", "garbage\nA: six")]
ANSWERS = ["twelve", "six", "twelve", "eight", "six"]


def plain_score(model, context: list[int], answer: list[int]) -> float:
    """mean_prob from one unpadded forward over context + answer."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([context + answer])).logits[0].float(), -1)
    return sum(math.exp(float(logp[len(context) - 1 + j, t])) for j, t in enumerate(answer)) / len(answer)


def test_batched_probes_equal_a_plain_forward_per_row():
    policy = tiny_causal_lm(TOK, family="qwen2", size="micro", seed=3).eval()
    initial = tiny_causal_lm(TOK, family="qwen2", size="micro", seed=4).eval()
    traj = build(MIXED, ANSWERS)
    out = ReferenceProbability(policy, initial, TOK, clip_low=False)(traj)
    for b, ((q, a), y) in enumerate(zip(MIXED, ANSWERS)):
        if "\nA: " not in a:
            assert float(out.values[b]) == 0.0
            continue
        pre, ans = probe_token_ids(TOK, a[:a.rindex("A: ") + 3], y)
        score = plain_score(policy, TOK(q)["input_ids"] + pre, ans)
        pre0, ans0 = probe_token_ids(TOK, "A: ", y)
        base = plain_score(initial, TOK(q)["input_ids"] + pre0, ans0)
        assert float(out.values[b]) == pytest.approx(score - base, rel=RTOL, abs=1e-5)
    # one row at a time (a fresh signal each, so nothing is cached) gives the same values
    for b in range(len(MIXED)):
        alone = ReferenceProbability(policy, initial, TOK, clip_low=False)(traj.select([b]))
        torch.testing.assert_close(alone.values, out.values[b:b + 1], rtol=RTOL, atol=1e-5)


def test_padding_masks_and_batch_order_change_nothing():
    policy = tiny_causal_lm(TOK, family="llama", size="micro", seed=1).eval()
    initial = tiny_causal_lm(TOK, family="llama", size="micro", seed=2).eval()
    traj = build(MIXED, ANSWERS)
    base = ReferenceProbability(policy, initial, TOK, clip_low=False)(traj)
    padded = build(MIXED, ANSWERS, prompt_pad=3, response_pad=4, garbage=11)
    padded = padded.replace(loss_mask=torch.zeros_like(padded.loss_mask))       # no token trained on
    again = ReferenceProbability(policy, initial, TOK, clip_low=False)(padded)
    torch.testing.assert_close(again.values, base.values, rtol=RTOL, atol=1e-5)
    perm = [4, 2, 0, 3, 1]
    permuted = ReferenceProbability(policy, initial, TOK, clip_low=False)(traj.select(perm))
    torch.testing.assert_close(permuted.values, base.values[perm], rtol=RTOL, atol=1e-5)
    for k in base.components:
        torch.testing.assert_close(permuted.components[k], base.components[k][perm], rtol=RTOL, atol=1e-5)


# ================================================================================ config and a micro run

def test_shipped_config_trains_on_rlpr_alone_with_the_std_filter():
    cfg = load_config(CONFIGS / "arith_words_rlpr.yaml")
    validate(cfg)
    assert cfg.task.name == "arith_words" and [(r.name, r.weight) for r in cfg.rewards] == [("rlpr", 1.0)]
    assert [f["name"] for f in cfg.filters.filters] == ["std_ema"] and cfg.filters.outcome == ""
    mine, base = to_dict(cfg), to_dict(load_config(CONFIGS / "arith_grpo.yaml"))
    for d in (mine, base):
        d.pop("rewards"), d.pop("filters"), d["task"].pop("name"), d["train"].pop("out_dir")
    assert mine == base   # otherwise arith_grpo's settings


def test_tiny_run_end_to_end(tmp_path, sft_cache):
    # the shipped filter, started at round 2 so that it acts within two steps
    std = [{"name": "std_ema", "kwargs": {"beta": 0.5, "ema_start_step": 1, "start_step": 2}}]
    overrides = tiny_run_overrides(tmp_path / "run", sft_cache, steps=2,
                                   **{"train.save_every": 0, "filters.filters": std})
    cfg = load_config(CONFIGS / "arith_words_rlpr.yaml", overrides)
    validate(cfg)
    report = train(cfg, log=lambda s: None)
    log = read_log(tmp_path / "run" / "metrics.jsonl")
    rows = [r for r in log if "filter/std_ema/active" in r]
    assert [r["step"] for r in rows] == [1, 2] and [r["filter/std_ema/active"] for r in rows] == [0.0, 1.0]
    for r in (r for r in rows if "loss/loss" in r):   # a step whose every group is filtered out has no update
        assert math.isfinite(r["loss/loss"]) and 0.0 <= r["reward/rlpr/mean"] <= 1.0
        assert 0.0 <= r["reward/rlpr/well_formed"] <= 1.0
    # accuracy is still measured, by the evaluation-only exact check
    assert 0.0 <= report["eval"]["accuracy_after"] <= 1.0 and "reward/verifier/mean" not in str(log)
