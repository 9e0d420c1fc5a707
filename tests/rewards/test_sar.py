"""SAR (finegrain/rewards/sar.py): worked examples on the counting stub of test_rlpr (probabilities
known in closed form), one probe call for both perplexities, the empty question as the rollout
renders it, the vectorised reward against a loop, invariances, the shipped config, a micro run.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finegrain.config import RunConfig, load_config, to_dict, validate
from finegrain.envs.runner import TextRenderer
from finegrain.models.tiny import tiny_causal_lm
from finegrain.rewards import REWARDS
from finegrain.rewards.sar import SelfAlignedReward, empty_prompt_ids, self_aligned_reward
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from tests.conftest import tiny_run_overrides
from tests.helpers import RTOL, close
from tests.rewards.test_rlpr import TOK, V, CountingLM, build, p

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BOS = [TOK.bos_token_id]


def sar(model, **kw):
    return SelfAlignedReward(model, TOK, empty_ids=kw.pop("empty_ids", BOS), **kw)


# ================================================================================ the formula

def test_self_aligned_reward_worked_values():
    # row 0: ppl(a|q) = 2, ppl(a) = 4 -> (4 − 2)/4 = 1/2; log: (ln 4 − ln 2)/ln 4 = 1/2
    # row 1: ppl(a|q) = 8, ppl(a) = 2 -> (2 − 8)/2 = −3, clipped to −1; log: (ln 2 − ln 8)/ln 2 = −2 -> −1
    # row 2: no token: not applicable, 0 (the garbage under its mask is never read)
    lp = torch.log(torch.tensor([[0.5, 0.5], [0.125, 0.125], [7.0, 7.0]]))
    lp0 = torch.log(torch.tensor([[0.25, 0.25], [0.5, 0.5], [7.0, 7.0]]))
    mask = torch.tensor([[True, True], [True, True], [False, False]])
    r, ok, nll_q, nll_0 = self_aligned_reward(lp, lp0, mask)
    close(r, [0.5, -1.0, 0.0])
    assert ok.tolist() == [True, True, False]
    close(nll_q, [math.log(2), math.log(8), 0.0])
    close(nll_0, [math.log(4), math.log(2), 0.0])
    r_log, _, _, _ = self_aligned_reward(lp, lp0, mask, use_log=True)
    close(r_log, [0.5, -1.0, 0.0])
    # a long, unlikely response: ppl overflows float32, the reward does not
    r, _, _, _ = self_aligned_reward(torch.full((1, 4), -100.0), torch.full((1, 4), -101.0),
                                     torch.ones(1, 4, dtype=torch.bool))
    close(r, [1 - math.exp(-1.0)])


def _loop(lp, lp0, mask, use_log):
    out = []
    for b in range(lp.shape[0]):
        a, a0 = lp[b][mask[b]].double(), lp0[b][mask[b]].double()
        if not len(a):
            out.append(0.0)
            continue
        ppl_q, ppl_0 = math.exp(-float(a.mean())), math.exp(-float(a0.mean()))
        QA, A = (math.log(ppl_q), math.log(ppl_0)) if use_log else (ppl_q, ppl_0)
        out.append(max((A - QA) / (A + 1e-9), -1.0))   # the reference's compute_ppl_qa_log
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("use_log", [False, True])
def test_vectorised_equals_the_reference_loop(seed, use_log):
    g = torch.Generator().manual_seed(seed)
    B, L = 7, 6
    lp, lp0 = -torch.rand(B, L, generator=g) * 3, -torch.rand(B, L, generator=g) * 3
    mask = torch.arange(L)[None, :] < torch.randint(0, L + 1, (B, 1), generator=g)
    r, _, _, _ = self_aligned_reward(lp, lp0, mask, use_log=use_log)
    torch.testing.assert_close(r, _loop(lp, lp0, mask, use_log), rtol=RTOL, atol=1e-5)


# ================================================================================ worked example

def test_worked_example_on_the_counting_model():
    # empty question = BOS only (no '7'). Response "77":
    #   after "Q7": counts 1, 2 -> ppl(a|q) = (p1 p2)^(−1/2) = √(2V/(V−1))
    #   after BOS:  counts 0, 1 -> ppl(a)   = (p0 p1)^(−1/2) = √(2V)
    #   R = 1 − ppl(a|q)/ppl(a) = 1 − 1/√(V − 1); use_log: ln(V − 1)/ln(2V)
    # Response "7" after "Qx" (a blocker): ppl(a|q) = 1/p(−1) = 1 + (V−1)², ppl(a) = V -> far below −1: −1
    # Response "7" after "Q": the same with and without the question: 0
    model = CountingLM()
    traj = build([("Q7", "77"), ("Qx", "7"), ("Q", "7")], ["-"] * 3)
    out = sar(model)(traj)
    assert out.level == "outcome" and out.mask.all()
    close(out.values, [1 - 1 / math.sqrt(V - 1), -1.0, 0.0])
    close(out.components["log_ppl_q"], [-(math.log(p(1)) + math.log(p(2))) / 2, -math.log(p(-1)), math.log(V)])
    close(out.components["log_ppl_empty"], [-(math.log(p(0)) + math.log(p(1))) / 2, math.log(V), math.log(V)])
    log = sar(model, use_log=True)(traj)
    want = (math.log(V) - math.log(1 + (V - 1) ** 2)) / math.log(V)
    close(log.values, [math.log(V - 1) / math.log(2 * V), max(want, -1.0), 0.0])


def test_both_perplexities_come_from_one_probe_call():
    model = CountingLM()
    traj = build([("Q7", "77"), ("Qx", "7"), ("Q", "7a7")], ["-"] * 3)
    sar(model)(traj)
    assert len(model.calls) == 1 and model.calls[0][0] == 6              # 2B probes, one forward
    sar(model, micro_batch=4)(traj)
    assert [c[0] for c in model.calls[1:]] == [4, 2]


def test_an_empty_response_is_not_applicable():
    out = sar(CountingLM())(build([("Q", ""), ("Q7", "7")], ["-"] * 2))
    assert out.mask.tolist() == [False, True] and float(out.values[0]) == 0.0


# ================================================================================ the empty question

def test_the_empty_question_is_rendered_as_the_rollout_renders_a_prompt():
    assert empty_prompt_ids(TOK, "", True) == TextRenderer(TOK, True).prompt("")[1] == BOS
    assert empty_prompt_ids(TOK, "Q: \n", True) == TextRenderer(TOK, True).prompt("Q: \n")[1]
    chat = copy.deepcopy(TOK)
    chat.chat_template = ("{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
                          "{% if add_generation_prompt %}:{% endif %}")
    assert empty_prompt_ids(chat, "", True) == TextRenderer(chat, True).prompt("")[1] == chat("<>:")["input_ids"]
    assert empty_prompt_ids(chat, "", False) == TextRenderer(chat, False).prompt("")[1] == BOS
    # from_context reads the config's model.use_chat_template
    cfg = RunConfig()
    ctx = SimpleNamespace(cfg=cfg, policy=CountingLM(), tokenizer=chat)
    assert REWARDS.get("sar").from_context(ctx).empty_ids == chat("<>:")["input_ids"]
    cfg.model.use_chat_template = False
    assert REWARDS.get("sar").from_context(ctx, empty_prompt="Q: \n").empty_ids == chat("Q: \n")["input_ids"]


def test_a_tokenizer_without_bos_needs_an_empty_prompt_text():
    with pytest.raises(ValueError, match="sar.empty_prompt: the empty-question prompt has no token"):
        SelfAlignedReward(CountingLM(), TOK, empty_ids=[])
    with pytest.raises(ValueError, match=r"rewards\[1\].kwargs: unknown key 'alpha' for reward signal 'sar'"):
        REWARDS.check_kwargs("sar", {"alpha": 0.2}, "rewards[1].kwargs")   # α is the reward's weight


# ================================================================================ a real tiny model

ROWS = [("Q: 7 +5\n", "7+5=12\nA: 12"), ("Q: 3 *2\n", "3*2=6\nA: 6"), ("Q: 9 -1\n", "garbage"),
        ("Q: 7 +5\n", "7+5=13\nA: 13")]


def plain_nll(model, context, response):
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([context + response])).logits[0].float(), -1)
    return -sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(response)) / len(response)


def test_batched_probes_equal_a_plain_forward_per_row():
    model = tiny_causal_lm(TOK, family="qwen2", size="micro", seed=3).eval()
    empty = TOK("Q: \n")["input_ids"]
    traj = build(ROWS, ["-"] * 4)
    out = SelfAlignedReward(model, TOK, empty_ids=empty)(traj)
    for b, (q, a) in enumerate(ROWS):
        resp = TOK(a, add_special_tokens=False)["input_ids"]
        nq, n0 = plain_nll(model, TOK(q)["input_ids"], resp), plain_nll(model, empty, resp)
        assert float(out.values[b]) == pytest.approx(max(1 - math.exp(nq - n0), -1.0), rel=RTOL, abs=1e-5)
    for b in range(len(ROWS)):
        alone = SelfAlignedReward(model, TOK, empty_ids=empty)(traj.select([b]))
        torch.testing.assert_close(alone.values, out.values[b:b + 1], rtol=RTOL, atol=1e-5)


def test_padding_masks_and_batch_order_change_nothing():
    model = tiny_causal_lm(TOK, family="llama", size="micro", seed=1).eval()
    signal = SelfAlignedReward(model, TOK, empty_ids=BOS)
    traj = build(ROWS, ["-"] * 4)
    base = signal(traj)
    padded = build(ROWS, ["-"] * 4, prompt_pad=2, response_pad=5, garbage=13)
    padded = padded.replace(loss_mask=torch.zeros_like(padded.loss_mask))
    torch.testing.assert_close(signal(padded).values, base.values, rtol=RTOL, atol=1e-5)
    perm = [2, 0, 3, 1]
    permuted = signal(traj.select(perm))
    torch.testing.assert_close(permuted.values, base.values[perm], rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(permuted.components["log_ppl_q"], base.components["log_ppl_q"][perm],
                               rtol=RTOL, atol=1e-5)


# ================================================================================ config and a micro run

def test_shipped_config_is_arith_grpo_plus_sar_at_weight_0_2():
    cfg = load_config(CONFIGS / "arith_sar.yaml")
    validate(cfg)
    assert [(r.name, r.weight) for r in cfg.rewards] == [("verifier", 1.0), ("sar", 0.2)]
    assert cfg.rewards[1].kwargs == {"empty_prompt": "Q: \n"}
    mine, base = to_dict(cfg), to_dict(load_config(CONFIGS / "arith_grpo.yaml"))
    assert mine["rewards"][:1] == base["rewards"]
    for d in (mine, base):
        d.pop("rewards"), d["train"].pop("out_dir")
    assert mine == base      # the accuracy-band filter still reads the verifier (the first outcome signal)


def test_tiny_run_end_to_end(tmp_path, sft_cache):
    overrides = tiny_run_overrides(tmp_path / "run", sft_cache, steps=2, **{"train.save_every": 0})
    cfg = load_config(CONFIGS / "arith_sar.yaml", overrides)
    validate(cfg)
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss/loss"]) and -1.0 <= r["reward/sar/mean"] < 1.0
        assert r["reward/sar/log_ppl_q"] > 0 and r["reward/sar/log_ppl_empty"] > 0
        assert "reward/verifier/accuracy" in r
