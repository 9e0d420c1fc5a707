"""finegrain.rewards.r3: worked examples with a patched probe and a hand-computable Llama (a), a plain
loop of single probes (b), invariances (c), the shipped config and a tiny end-to-end run (d)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import finegrain.rewards.r3 as r3_mod
from finegrain.config import load_config, to_dict, validate
from finegrain.models.probe import probe_logprobs, probe_token_ids
from finegrain.rewards import REWARDS
from finegrain.rewards.r3 import ReasoningReflectionReward, r3_reward, reflection_weights
from finegrain.tasks.base import Example
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from tests.conftest import tiny_run_overrides
from tests.helpers import ATOL, RTOL, M, T, close
from tests.rewards.test_spae import EX, PROMPT, TOK, build_traj, decoded_response, random_model, repeat_last_token_llama

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# ================================================================================ (a) worked examples

def test_reflection_weights_and_r3_by_hand():
    lp = T([[-0.1, -0.2, 0.0], [-1.0, -0.2, 0.0], [-3.0, -9.0, -9.0]])
    mask = M([[1, 1, 0], [1, 1, 0], [1, 1, 1]])
    groups = torch.tensor([5, 5, 6])
    sigma, w = reflection_weights(lp, mask, groups, delta=0.5)
    # group 5: σ = (0.45, 0) (population std of (−0.1, −1.0) and of (−0.2, −0.2)); row 2 alone: σ = 0
    close(sigma, [[0.45, 0.0, 0.0], [0.45, 0.0, 0.0], [0.0, 0.0, 0.0]])
    e = math.exp(0.9)
    close(w, [[e / (e + 1), 1 / (e + 1), 0.0], [e / (e + 1), 1 / (e + 1), 0.0], [1 / 3, 1 / 3, 1 / 3]])
    base = T([[-2.0, -0.5, 0.0], [-2.0, -0.5, 0.0], [-1.0, -1.0, -1.0]])
    r, max_sigma = r3_reward(lp, base, mask, groups, delta=0.5)
    # 0.71095·1.9 + 0.28905·0.3 = 1.43753;  0.71095·1.0 + 0.28905·0.3 = 0.79767;  (−2 − 8 − 8)/3 = −6
    close(r, [1.43753, 0.79767, -6.0])
    close(max_sigma, [0.45, 0.45, 0.0])
    r, _ = r3_reward(lp, None, mask, groups, delta=0.5)                 # basic R3: no baseline
    close(r, [-0.1 * e / (e + 1) - 0.2 / (e + 1), -1.0 * e / (e + 1) - 0.2 / (e + 1), -7.0])
    with pytest.raises(ValueError, match="delta"):
        reflection_weights(lp, mask, groups, delta=0.0)


class FakeProbe:
    """probe_logprobs stand-in: answer log-probs chosen by the CoT of each context."""

    def __init__(self, table):
        self.table, self.seen = table, []

    def __call__(self, model, contexts, continuations, *, pad_token_id, micro_batch):
        out = []
        for c, a in zip(contexts, continuations):
            key = decoded_response(list(c))
            self.seen.append(key)
            assert len(self.table[key]) == len(a)
            out.append(torch.tensor(self.table[key]))
        return out


def test_worked_example_with_a_patched_probe(monkeypatch):
    fake = FakeProbe({"7+5=12\n12*3=36\n": [-0.1, -0.2], "7+5=13\n": [-1.0, -0.2], "": [-2.0, -0.5],
                      "7+5=12\n1": [-0.5, -0.2]})
    monkeypatch.setattr(r3_mod, "probe_logprobs", fake)
    # the model's own answers are replaced by the reference "36"; row 2 has no answer line: all CoT
    traj = build_traj(["7+5=12\n12*3=36\nA: 36", "7+5=13\nA: 13", "7+5=12\n1"], groups=[0, 0, 1])
    out = ReasoningReflectionReward(torch.nn.Linear(1, 1), TOK)(traj)
    assert out.level == "outcome" and out.mask.tolist() == [True, True, True]
    close(out.values, [1.43753, 0.79767, 0.5 * 1.5 + 0.5 * 0.3])       # row 2 alone: uniform weights
    assert fake.seen == ["7+5=12\n12*3=36\n", "", "7+5=13\n", "", "7+5=12\n1", ""]   # EOS never in a context
    close(out.components["max_sigma"], [0.45, 0.45, 0.0])
    close(out.components["marker_found"], [1.0, 1.0, 0.0])
    close(out.components["cot_tokens"], [15.0, 7.0, 8.0])
    fake.seen.clear()
    out = ReasoningReflectionReward(torch.nn.Linear(1, 1), TOK, baseline="none")(traj)
    assert "" not in fake.seen                                          # no masked-CoT probe


def test_worked_example_on_a_hand_computable_llama():
    model, beta = repeat_last_token_llama()
    Z = math.exp(beta) + len(TOK) - 1
    lp = [math.log(1 / Z), math.log(math.exp(beta) / Z)]     # "33" after "A: ": other, then repeat
    ex = Example("p1", PROMPT, "33")
    traj = build_traj(["7+5=12\nA: 12", "1\n2\n"], examples=[ex, ex])
    # every CoT gives the same log-probs: σ = 0, uniform weights; the masked-CoT baseline cancels them
    close(ReasoningReflectionReward(model, TOK)(traj).values, [0.0, 0.0])
    close(ReasoningReflectionReward(model, TOK, baseline="none")(traj).values, [sum(lp) / 2] * 2)


# ================================================================================ (b) plain loop

TEXTS = ["7+5=12\n12*3=36\nA: 36", "7+5=13\n13*3=39\nA: 39", "7+5=12\n12*3=36\n36", "A: 36", "3\nA: 3", ""]
GROUPS = [0, 0, 0, 0, 1, 1]


def loop_r3(model, traj, delta, baseline=True):
    """One probe at a time; σ and the weights in plain Python."""
    B = traj.batch_size
    lps, bases = [], []
    for b in range(B):
        pre, ans = probe_token_ids(TOK, "A: ", str(traj.examples[b].answer))
        prompt = traj.prompt_ids[b][traj.prompt_mask[b]].tolist()
        text = traj.response_texts[b]
        cot = text[:text.index("A: ")] if "A: " in text else text
        cot_ids = TOK(cot, add_special_tokens=False)["input_ids"]
        lps.append(probe_logprobs(model, [prompt + cot_ids + pre], [ans], pad_token_id=0, share_prefix=False)[0].tolist())
        bases.append(probe_logprobs(model, [prompt + pre], [ans], pad_token_id=0, share_prefix=False)[0].tolist())
    out = []
    for b in range(B):
        mates = [i for i in range(B) if traj.group_ids[i] == traj.group_ids[b]]
        sig = []
        for j in range(len(lps[b])):
            col = [lps[i][j] for i in mates]
            mean = sum(col) / len(col)
            sig.append(math.sqrt(sum((x - mean) ** 2 for x in col) / len(col)))
        z = sum(math.exp(s / delta) for s in sig)
        out.append(sum(math.exp(sig[j] / delta) / z * (lps[b][j] - (bases[b][j] if baseline else 0.0))
                       for j in range(len(sig))))
    return torch.tensor(out)


@pytest.mark.parametrize("delta,baseline", [(0.5, "masked_cot"), (0.05, "none"), (3.0, "masked_cot")])
def test_packed_signal_equals_a_plain_loop_of_single_probes(delta, baseline):
    model = random_model()
    ex2 = Example("p2", PROMPT, "3")
    traj = build_traj(TEXTS, examples=[EX] * 4 + [ex2] * 2, groups=GROUPS)
    got = ReasoningReflectionReward(model, TOK, delta=delta, baseline=baseline)(traj).values
    torch.testing.assert_close(got, loop_r3(model, traj, delta, baseline == "masked_cot"), rtol=RTOL, atol=1e-5)


# ================================================================================ (c) invariances

def test_an_empty_cot_scores_like_the_prompt_alone():
    # "A: 36" has an empty CoT: its probe is the masked-CoT probe itself, so its R3 term is 0 token by token
    model = random_model()
    traj = build_traj(["A: 36", "A: 36"])
    close(ReasoningReflectionReward(model, TOK)(traj).values, [0.0, 0.0])
    pre, ans = probe_token_ids(TOK, "A: ", "36")
    alone = probe_logprobs(model, [TOK(PROMPT, add_special_tokens=False)["input_ids"] + pre], [ans], pad_token_id=0)[0]
    close(ReasoningReflectionReward(model, TOK, baseline="none")(traj).values, [float(alone.mean())] * 2)


def test_padding_garbage_and_the_loss_mask_change_nothing():
    model = random_model()
    want = ReasoningReflectionReward(model, TOK)(build_traj(TEXTS, groups=GROUPS)).values
    garbage = build_traj(TEXTS, groups=GROUPS, pad_garbage=TOK.convert_tokens_to_ids("7"))
    other = garbage.replace(loss_mask=torch.zeros_like(garbage.loss_mask))
    for traj in (garbage, other):
        torch.testing.assert_close(ReasoningReflectionReward(model, TOK)(traj).values, want, rtol=RTOL, atol=ATOL)


def test_permuting_the_batch_permutes_the_rewards():
    model = random_model()
    want = ReasoningReflectionReward(model, TOK)(build_traj(TEXTS, groups=GROUPS)).values
    perm = [5, 2, 0, 4, 1, 3]
    got = ReasoningReflectionReward(model, TOK)(build_traj([TEXTS[i] for i in perm], groups=[GROUPS[i] for i in perm])).values
    torch.testing.assert_close(got, want[perm], rtol=RTOL, atol=ATOL)


def test_a_group_of_one_is_finite_and_an_empty_answer_is_masked():
    model = random_model()
    out = ReasoningReflectionReward(model, TOK)(build_traj(["7+5=12\nA: 12"], groups=[3]))
    assert torch.isfinite(out.values).all() and out.mask.tolist() == [True]
    empty = ReasoningReflectionReward(model, TOK)(build_traj(["7+5=12\n"], examples=[Example("e", PROMPT, "")]))
    assert empty.mask.tolist() == [False] and empty.values.tolist() == [0.0]


def test_scorer_choice_and_kwargs():
    policy, initial = random_model(), repeat_last_token_llama()[0]
    ctx = SimpleNamespace(policy=policy, tokenizer=TOK, initial_policy=lambda: initial)
    assert REWARDS.get("r3").from_context(ctx).model is policy
    assert REWARDS.get("r3").from_context(ctx, scorer="initial").model is initial
    REWARDS.check_kwargs("r3", {"delta": 1.0, "baseline": "none", "scorer": "initial", "prefix": "A: "}, "rewards[1].kwargs")
    for bad in ({"delta": 0.0}, {"scorer": "lagged"}, {"baseline": "propagation"}):
        with pytest.raises(ValueError):
            REWARDS.check_kwargs("r3", bad, "rewards[1].kwargs")


# ================================================================================ (d) config and run

def test_config_loads_validates_and_only_swaps_the_reward():
    cfg = load_config(CONFIGS / "arith_r3.yaml")
    validate(cfg)
    assert [(r.name, r.weight) for r in cfg.rewards] == [("verifier", 0.0), ("r3", 1.0)]
    assert cfg.filters.outcome == "verifier" and cfg.filters.filters
    mine, base = to_dict(cfg), to_dict(load_config(CONFIGS / "arith_grpo.yaml"))
    for d in (mine, base):
        d.pop("rewards"), d["filters"].pop("outcome"), d["train"].pop("out_dir")
    assert mine == base


def test_tiny_run_end_to_end(tmp_path, sft_cache):
    overrides = tiny_run_overrides(tmp_path / "run", sft_cache, steps=2, **{"train.save_every": 0})
    cfg = load_config(CONFIGS / "arith_r3.yaml", overrides)
    validate(cfg)
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/loss"]) and math.isfinite(r["reward/r3/mean"]) for r in rows)
    assert all(r["reward/r3/max_sigma"] > 0 for r in rows)           # sampled CoTs differ
