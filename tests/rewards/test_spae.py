"""finegrain.rewards.spae: worked examples with a patched probe and with a hand-computable Llama (a),
a plain loop of one probe at a time (b), invariances (c). The estimator, config and run are in
tests/credit/test_spae.py."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import finegrain.rewards.spae as spae_mod
from finegrain.models.probe import probe_logprobs, probe_token_ids
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.rewards import REWARDS
from finegrain.rewards.spae import SPAEPotential, acc_conf, step_end_lengths, step_potential
from finegrain.segment import token_step_ids
from finegrain.tasks.base import Example
from finegrain.trajectory import Trajectory
from tests.helpers import ATOL, RTOL, close

TOK = char_tokenizer("0123456789+-*=\nQA: /")   # 24 tokens: an even vocab for the hand-computable Llama
V = len(TOK)
PROMPT = "Q: 7 +5 *3\n"
EX = Example("p0", PROMPT, "36")


def build_traj(texts, examples=None, groups=None, eos=True, prompt=PROMPT, pad_garbage=None):
    """A Trajectory of ``texts`` (char tokens, EOS appended when ``eos``), newline steps, all trained.
    ``pad_garbage`` writes that token id on the response padding instead of <pad>."""
    examples = examples or [EX] * len(texts)
    B = len(texts)
    p = TOK(prompt, add_special_tokens=False)["input_ids"]
    resp = [TOK(t, add_special_tokens=False)["input_ids"] + ([TOK.eos_token_id] if eos else []) for t in texts]
    L = max(max(len(r) for r in resp), 1)
    response_ids = torch.tensor([r + [pad_garbage if pad_garbage is not None else TOK.pad_token_id] * (L - len(r))
                                 for r in resp])
    response_mask = torch.tensor([[True] * len(r) + [False] * (L - len(r)) for r in resp])
    return Trajectory(prompt_ids=torch.tensor([p] * B), prompt_mask=torch.ones(B, len(p), dtype=torch.bool),
                      response_ids=response_ids, response_mask=response_mask, loss_mask=response_mask.clone(),
                      group_ids=torch.tensor(groups if groups is not None else [0] * B),
                      step_ids=token_step_ids(TOK, response_ids, response_mask, "newline"),
                      behavior_logprobs=torch.zeros(B, L), truncated=torch.zeros(B, dtype=torch.bool),
                      prompt_texts=[prompt] * B, response_texts=list(texts), examples=list(examples))


def decoded_response(context: list[int]) -> str:
    """The response part of a probe context: drop the prompt and the "A: " probe prefix."""
    n_prompt = len(TOK(PROMPT, add_special_tokens=False)["input_ids"])
    return TOK.decode(context[n_prompt:-3])


class FakeProbe:
    """Stands in for probe_logprobs: per-token probabilities and entropies chosen by the response
    prefix of each context; records what was probed."""

    def __init__(self, table):
        self.table, self.seen = table, []

    def __call__(self, model, contexts, continuations, *, pad_token_id, micro_batch, return_entropy):
        assert return_entropy
        lps, ents = [], []
        for c, a in zip(contexts, continuations):
            key = decoded_response(list(c))
            self.seen.append(key)
            probs, H = self.table[key]
            assert len(probs) == len(a)
            lps.append(torch.log(torch.tensor(probs)))
            ents.append(torch.tensor(H))
        return lps, ents


TABLE = {                                  # response prefix -> (p(a*_j), H_j) for the answer "36"
    "": ([0.1, 0.1], [2.0, 2.0]),
    "7+5=12\n": ([0.5, 0.5], [1.0, 1.0]),
    "7+5=12\n12*3=36\n": ([0.9, 1.0], [0.1, 0.0]),
    "7+5=13\n": ([0.2, 0.4], [1.5, 0.5]),
}


def phi(probs, H):
    acc, conf = sum(probs) / len(probs), math.exp(-sum(H) / len(H))
    return 1.5 * acc * conf + 0.5 * acc - conf


def signal(model=None, **kw):
    return SPAEPotential(model if model is not None else torch.nn.Linear(1, 1), TOK, **kw)


# ================================================================================ (a) worked examples

def test_step_potential_corners_and_acc_conf():
    close(step_potential(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])),
          [1.0, -1.0, 0.0, 0.5])                                # confident right / wrong, unsure, lucky
    a, c = acc_conf([torch.log(torch.tensor([0.9, 1.0])), torch.zeros(0)], [torch.tensor([0.1, 0.0]), torch.zeros(0)])
    close(a[:1], [0.95])
    close(c[:1], [math.exp(-0.05)])
    assert math.isnan(float(a[1])) and math.isnan(float(c[1]))
    assert step_end_lengths(torch.tensor([0, 0, 1, 1, 1, 2, -1]), 2) == [2, 5]


def test_worked_example_with_a_patched_probe(monkeypatch):
    fake = FakeProbe(TABLE)
    monkeypatch.setattr(spae_mod, "probe_logprobs", fake)
    traj = build_traj(["7+5=12\n12*3=36\nA: 36", "7+5=13\nA: 13", "A: 1"])
    out = signal()(traj)
    # row 0: 3 steps, probes after the prompt, line 1 and line 2 (never after the answer line)
    p_prompt, p1, p2 = phi(*TABLE[""]), phi(*TABLE["7+5=12\n"]), phi(*TABLE["7+5=12\n12*3=36\n"])
    # hand values: Φ(prompt) = 1.5·0.1·e^−2 + 0.05 − e^−2 = −0.06503,
    # Φ(line 1) = 1.5·0.5·e^−1 + 0.25 − e^−1 = 0.15803, Φ(line 2) = 1.5·0.95·e^−0.05 + 0.475 − e^−0.05 = 0.87927
    assert [round(x, 5) for x in (p_prompt, p1, p2)] == [-0.06503, 0.15803, 0.87927]
    q1 = phi(*TABLE["7+5=13\n"])
    assert out.level == "step" and out.values.shape == (3, 3)
    close(out.values, [[p1 - p_prompt, p2 - p1, 0.0], [q1 - p_prompt, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert out.mask.tolist() == [[True, True, False], [True, False, False], [False, False, False]]
    assert sorted(fake.seen) == sorted(["", "7+5=12\n", "7+5=12\n12*3=36\n", "", "7+5=13\n"])  # row 2: none
    close(out.components["probed_steps"], [2.0, 1.0, 0.0])
    close(out.components["potential_gain"], [p2 - p_prompt, q1 - p_prompt, 0.0])
    close(out.components["saturated"], [0.0, 0.0, 0.0])                          # 0.879 < 0.9


def test_baseline_zero_skips_the_prompt_probe(monkeypatch):
    fake = FakeProbe(TABLE)
    monkeypatch.setattr(spae_mod, "probe_logprobs", fake)
    out = signal(baseline="zero")(build_traj(["7+5=12\n12*3=36\nA: 36"]))
    p1, p2 = phi(*TABLE["7+5=12\n"]), phi(*TABLE["7+5=12\n12*3=36\n"])
    close(out.values, [[p1, p2 - p1, 0.0]])                     # the running sum is Φ itself
    assert "" not in fake.seen


def repeat_last_token_llama(alpha=0.5):
    """Llama whose attention and MLP add nothing and whose embeddings are α·I (hidden = vocab = V):
    the final RMSNorm maps token t to √V·e_t, so p(next = current) = e^β/(e^β + V − 1) and every
    other token 1/(e^β + V − 1), β = α√V, after any context (tests/models/test_probe.py)."""
    cfg = LlamaConfig(vocab_size=V, hidden_size=V, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, rms_norm_eps=0.0, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                p.zero_()
        model.model.embed_tokens.weight.copy_(alpha * torch.eye(V))
    return model, alpha * math.sqrt(V)


def test_worked_example_on_a_hand_computable_llama():
    model, beta = repeat_last_token_llama()
    Z = math.exp(beta) + V - 1
    p, q = math.exp(beta) / Z, 1 / Z
    H = -p * math.log(p) - (V - 1) * q * math.log(q)            # the same at every position
    # answer "33" after the prefix "A: ": '3' after ' ' is "other" (q), the second '3' repeats (p)
    acc, conf = (q + p) / 2, math.exp(-H)
    want = 1.5 * acc * conf + 0.5 * acc - conf
    ex = Example("p1", PROMPT, "33")
    traj = build_traj(["7+5=12\n12*3=36\nA: 33", "1\n2\n3\n"], examples=[ex, ex])
    phis, accs, confs = signal(model).potentials(traj)
    probed = torch.isfinite(phis)
    assert probed.tolist() == [[True, True, True, False], [True, True, True, False]]
    close(phis[probed], [want] * 6)
    close(accs[probed], [acc] * 6)
    close(confs[probed], [conf] * 6)
    out = signal(model)(traj)
    torch.testing.assert_close(out.values, torch.zeros(2, 3), rtol=RTOL, atol=1e-6)   # a flat potential
    assert out.mask.tolist() == [[True, True, False], [True, True, False]]


# ================================================================================ (b) plain loop

def loop_values(model, traj, prefix="A: "):
    """One probe at a time (no packing): Φ after the prompt and after each step but the last."""
    B, S = traj.batch_size, max(int(traj.num_steps.max()), 1)
    values, mask = torch.zeros(B, S), torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        K = int(traj.num_steps[b])
        if K < 2:
            continue
        pre, ans = probe_token_ids(TOK, prefix, str(traj.examples[b].answer))
        prompt = traj.prompt_ids[b][traj.prompt_mask[b]].tolist()
        resp = traj.response_ids[b].tolist()
        ends = [0] + [max(t for t in range(len(resp)) if int(traj.step_ids[b, t]) == k) + 1 for k in range(K - 1)]
        phis = []
        for n in ends:
            lp, h = probe_logprobs(model, [prompt + resp[:n] + pre], [ans], pad_token_id=0, share_prefix=False,
                                   return_entropy=True)
            a = sum(math.exp(x) for x in lp[0].tolist()) / len(ans)
            c = math.exp(-sum(h[0].tolist()) / len(ans))
            phis.append(1.5 * a * c + 0.5 * a - c)
        for k in range(K - 1):
            values[b, k], mask[b, k] = phis[k + 1] - phis[k], True
    return values, mask


def random_model():
    return tiny_causal_lm(TOK, family="qwen2", size="micro", seed=4).eval()


TEXTS = ["7+5=12\n12*3=36\nA: 36", "7+5=13\n13*3=39\n39\nA: 39", "A: 36", "7+5=12\n12*3=3", ""]


def test_packed_signal_equals_a_plain_loop_of_single_probes():
    model = random_model()
    ex2 = Example("p2", "Q: 1 +2\n", "3")
    traj = build_traj(TEXTS, examples=[EX, EX, EX, ex2, EX], groups=[0, 0, 0, 1, 0])
    out = signal(model)(traj)
    want, mask = loop_values(model, traj)
    assert out.mask.tolist() == mask.tolist()
    torch.testing.assert_close(out.values, want, rtol=RTOL, atol=1e-5)


# ================================================================================ (c) invariances

def test_the_empty_prefix_probe_equals_scoring_after_the_prompt_alone():
    model = random_model()
    phis, _, _ = signal(model).potentials(build_traj(TEXTS[:2]))
    pre, ans = probe_token_ids(TOK, "A: ", "36")
    prompt = TOK(PROMPT, add_special_tokens=False)["input_ids"]
    lp, h = probe_logprobs(model, [prompt + pre], [ans], pad_token_id=0, return_entropy=True)
    a, c = acc_conf(lp, h)
    close(phis[:, 0], step_potential(a, c).repeat(2))


def test_padding_garbage_and_the_loss_mask_change_nothing():
    model = random_model()
    base = signal(model)(build_traj(TEXTS))
    garbage = build_traj(TEXTS, pad_garbage=TOK.convert_tokens_to_ids("9"))
    other_mask = garbage.replace(loss_mask=garbage.loss_mask & (torch.rand(garbage.loss_mask.shape) < 0.5))
    for traj in (garbage, other_mask):
        out = signal(model)(traj)
        torch.testing.assert_close(out.values, base.values, rtol=RTOL, atol=ATOL)
        assert out.mask.tolist() == base.mask.tolist()


def test_permuting_the_batch_permutes_the_rewards():
    model = random_model()
    base = signal(model)(build_traj(TEXTS))
    perm = [3, 0, 4, 2, 1]
    out = signal(model)(build_traj([TEXTS[i] for i in perm]))
    torch.testing.assert_close(out.values, base.values[perm], rtol=RTOL, atol=ATOL)
    assert out.mask.tolist() == base.mask[perm].tolist()


def test_registration_and_kwargs():
    meta = REWARDS.meta("spae_potential")
    assert meta["level"] == "step"
    REWARDS.check_kwargs("spae_potential", {"prefix": "A: ", "baseline": "zero", "micro_batch": 4}, "rewards[1].kwargs")
    with pytest.raises(ValueError, match="baseline"):
        REWARDS.check_kwargs("spae_potential", {"baseline": "first"}, "rewards[1].kwargs")
    with pytest.raises(ValueError, match="baseline"):
        signal(baseline="first")
