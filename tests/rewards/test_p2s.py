"""finegrain.rewards.p2s: worked examples with a patched probe and with a hand-computable Llama (a),
a plain loop of one probe at a time (b), invariances (c), the gold-chain synthesis, arith_words,
the shipped config and tiny end-to-end runs (d). The estimator is in tests/credit/test_p2s.py."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import finegrain.rewards.p2s as p2s_mod
from finegrain.config import load_config, to_dict, validate
from finegrain.models.probe import probe_logprobs, probe_token_ids
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.rewards import REWARDS
from finegrain.rewards.base import RewardOutput
from finegrain.rewards.p2s import (GoldChain, GoldChainSynthesizer, PathFaithfulness, candidate_reasoning,
                                   gold_chain_text, gold_seed, gold_suffixes, hierarchical_rewards, max_suffix_gain,
                                   select_gold, step_weights)
from finegrain.sampling import Completions
from finegrain.sampling.hf import HFSampler
from finegrain.segment import token_step_ids
from finegrain.tasks.arith_words import ArithWordsTask
from finegrain.tasks.base import Example
from finegrain.trajectory import Trajectory
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from tests.conftest import tiny_run_overrides
from tests.helpers import ATOL, RTOL, M, T, close

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TOK = char_tokenizer("0123456789+-*=\nQA: /")   # 24 tokens: an even vocab for the hand-computable Llama
V = len(TOK)
PROMPT = "Q: 7 +5 *3\n"
GOLD = "7+5=12\n12*3=36\nA: 36"
EX = Example("p0", PROMPT, "36", solution=GOLD)


def ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def build_traj(texts, examples=None, groups=None, eos=True, pad_garbage=None):
    """A Trajectory of ``texts`` (char tokens, EOS appended when ``eos``), newline steps, all trained;
    each row's prompt is its example's. ``pad_garbage`` writes that token id on the padding."""
    examples = examples or [EX] * len(texts)
    B = len(texts)
    prompts = [ids(ex.prompt) for ex in examples]
    P = max(len(p) for p in prompts)
    resp = [ids(t) + ([TOK.eos_token_id] if eos else []) for t in texts]
    L = max(max(len(r) for r in resp), 1)
    pad = pad_garbage if pad_garbage is not None else TOK.pad_token_id
    response_ids = torch.tensor([r + [pad] * (L - len(r)) for r in resp])
    response_mask = torch.tensor([[True] * len(r) + [False] * (L - len(r)) for r in resp])
    prompt_ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
    return Trajectory(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                      response_ids=response_ids, response_mask=response_mask, loss_mask=response_mask.clone(),
                      group_ids=torch.tensor(groups if groups is not None else [0] * B),
                      step_ids=token_step_ids(TOK, response_ids, response_mask, "newline"),
                      behavior_logprobs=torch.zeros(B, L), truncated=torch.zeros(B, dtype=torch.bool),
                      prompt_texts=[ex.prompt for ex in examples], response_texts=list(texts), examples=list(examples))


class FakeProbe:
    """Stands in for probe_logprobs: the total log-prob of each (response part of the context,
    continuation) pair from a table, as one token; records the pairs probed."""

    def __init__(self, table, prompt=PROMPT):
        self.table, self.n_prompt, self.seen = table, len(ids(prompt)), []

    def __call__(self, model, contexts, continuations, *, pad_token_id, micro_batch):
        out = []
        for c, a in zip(contexts, continuations):
            key = (TOK.decode(list(c)[self.n_prompt:]), TOK.decode(list(a)))
            self.seen.append(key)
            out.append(torch.tensor([self.table[key]]))
        return out


S0, S1, S2 = GOLD, "12*3=36\nA: 36", "A: 36"                     # the gold suffixes s_{0:}, s_{1:}, s_{2:}
TABLE = {
    ("", S0): -6.0, ("", S1): -9.0, ("", S2): -3.0,                                  # the baseline lp(s_t | q)
    ("7+5=12\n", S0): -10.0, ("7+5=12\n", S1): -4.0, ("7+5=12\n", S2): -2.5,         # gains −4, 5, 0.5 → 5
    ("7+5=12\n12*3=36\n", S0): -12.0, ("7+5=12\n12*3=36\n", S1): -8.0,
    ("7+5=12\n12*3=36\n", S2): -0.5,                                                 # gains −6, 1, 2.5 → 2.5
    ("7+5=12\n12*3=36\nA: ", "36"): -0.2,                                             # last step: lp(y* | q, z)
    ("7+5=13\n", S0): -11.0, ("7+5=13\n", S1): -10.0, ("7+5=13\n", S2): -3.5,        # gains −5, −1, −0.5 → −0.5
    ("7+5=13\nA: ", "36"): -5.0,
    ("A: ", "36"): -7.0,                                                             # a one-step response
}


def sig(x):
    return 1 / (1 + math.exp(-x))


def w(k, K, slope=4.0):
    return sig(slope * ((k + 1) / K - 0.5)) / sig(slope / 2)


class FixedOutcome:
    """An outcome signal with given values (and an 'accuracy' component)."""

    def __init__(self, values, accuracy=None):
        self.values, self.accuracy = values, accuracy

    def __call__(self, traj):
        comps = {} if self.accuracy is None else {"accuracy": T(self.accuracy)}
        return RewardOutput(T(self.values), torch.ones(len(self.values), dtype=torch.bool), "outcome", comps)


def signal(model=None, **kw):
    return PathFaithfulness(model if model is not None else torch.nn.Linear(1, 1), TOK, **kw)


# ================================================================================ (a) worked examples

def test_gold_chain_pure_functions():
    assert candidate_reasoning("7+5=12\nA: 12\nA: 13", "A: ") == "7+5=12\n"     # before the *first* answer line
    assert candidate_reasoning("7+5=12\nDATA: 1", "A: ") is None                # "A: " must start a line
    assert gold_chain_text("7+5=12", "A: ", "12") == "7+5=12\nA: 12"
    assert gold_suffixes(GOLD) == [S0, S1, S2]
    assert select_gold(T([-3.0, -1.0, -1.0, 0.0]), M([1, 1, 1, 0])) == 1          # tie: the first; 0.0 is malformed
    assert select_gold(T([float("nan"), -2.0]), M([0, 1])) == 1
    assert gold_seed(3, [1, 2], "4") != gold_seed(3, [1, 2], "5")


def test_max_suffix_gain_and_weights_by_hand():
    lp = T([[-10.0, -4.0, -2.5], [-12.0, -8.0, -0.5]])
    base = T([[-6.0, -9.0, -3.0]] * 2)
    gain, best = max_suffix_gain(lp, base, M([[1, 1, 1], [1, 1, 1]]))
    close(gain, [5.0, 2.5])                                  # max(−4, 5, 0.5), max(−6, 1, 2.5)
    assert best.tolist() == [1, 2]
    gain, best = max_suffix_gain(lp, None, M([[1, 1, 0], [0, 0, 0]]))
    close(gain[:1], [-4.0])                                  # no baseline: the best raw suffix among t < 2
    assert math.isnan(float(gain[1])) and best.tolist() == [1, -1]
    # w_k = σ(4((k+1)/K − ½))/σ(2): K = 3 → σ(−2/3), σ(2/3), σ(2) over σ(2) = 0.385155, 0.750180, 1
    close(step_weights(torch.tensor([3, 1, 0]), 3, slope=4.0),
          [[0.385155, 0.750180, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(step_weights(torch.tensor([3]), 3, slope=0.0), [[1.0, 1.0, 1.0]])


def test_hierarchical_integration_branches():
    pfr = T([[1.0, 2.0, -1.0], [3.0, -2.0, 0.0], [4.0, -3.0, 0.0], [5.0, 6.0, -4.0], [0.0, 0.0, 0.0]])
    pfr_mask = M([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]])
    weights = T([[0.5, 0.75, 1.0], [0.5, 1.0, 0.0], [0.5, 1.0, 0.0], [0.5, 0.75, 1.0], [0.0, 0.0, 0.0]])
    K = torch.tensor([3, 2, 2, 3, 0])
    well = M([1, 1, 0, 1, 1])
    groups = torch.tensor([0, 0, 0, 1, 1])
    outcome, correct = T([1.0, 0.0, 1.0, 0.0, 0.0]), M([1, 0, 1, 0, 0])
    v, mask, uses_pfr, group_correct = hierarchical_rewards(pfr, pfr_mask, weights, K, well, groups, outcome, correct)
    # group 0 has a correct row: outcomes on the last steps (row 2 is malformed: −1, and its
    # "correct" does not count); group 1: nobody correct → weighted PFR; row 4 has no step: nothing
    close(v, [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, -1.0, 0.0], [2.5, 4.5, -4.0], [0.0, 0.0, 0.0]])
    assert mask.tolist() == [[False, False, True], [False, True, False], [False, True, False],
                             [True, True, True], [False, False, False]]
    assert uses_pfr.tolist() == [False, False, False, True, True] and group_correct.tolist() == [True] * 3 + [False] * 2
    # the malformed row is the only correct one: the group is judged all-wrong
    _, _, uses_pfr, _ = hierarchical_rewards(pfr, pfr_mask, weights, K, well, groups, outcome, M([0, 0, 1, 0, 0]))
    assert uses_pfr.tolist() == [True, True, False, True, True]
    # no outcome source: every well-formed row takes the PFR
    v, mask, uses_pfr, _ = hierarchical_rewards(pfr, pfr_mask, weights, K, well, groups)
    close(v[:2], [[0.5, 1.5, -1.0], [1.5, -2.0, 0.0]])
    with pytest.raises(ValueError, match="both outcome and correct"):
        hierarchical_rewards(pfr, pfr_mask, weights, K, well, groups, outcome)


def test_worked_example_with_a_patched_probe(monkeypatch):
    fake = FakeProbe(TABLE)
    monkeypatch.setattr(p2s_mod, "probe_logprobs", fake)
    traj = build_traj(["7+5=12\n12*3=36\nA: 36", "7+5=13\nA: 13", "7+5=12\n12", "A: 36"], groups=[0, 0, 0, 1])
    out = signal()(traj)                                     # outcome 'none' (no signal): PFR wherever well-formed
    assert out.level == "step" and out.values.shape == (4, 3)
    close(out.values, [[5.0 * w(0, 3), 2.5 * w(1, 3), -0.2],            # r = (5, 2.5) then lp(y* | q, z) = −0.2
                       [-0.5 * w(0, 2), -5.0, 0.0],                      # r_0 = −0.5, last −5
                       [0.0, -1.0, 0.0],                                 # malformed (no answer line): −1
                       [-7.0, 0.0, 0.0]])                                # one step: lp(y* | q, "A: ")
    assert out.mask.tolist() == [[True, True, True], [True, True, False], [False, True, False], [True, False, False]]
    # rows 0, 1: 2·3 + 1 and 1·3 + 1 probes, the three baseline probes once (they share prompt and
    # gold chain), row 3 its last step only; the malformed row 2 is not probed
    assert len(fake.seen) == 7 + 4 + 3 + 1
    assert sum(k[0] == "" and k[1] != "36" for k in fake.seen) == 3
    close(out.components["pfr_mean"], [3.75, -0.5, 0.0, 0.0])
    close(out.components["answer_logprob"], [-0.2, -5.0, 0.0, -7.0])
    close(out.components["uses_pfr"], [1.0, 1.0, 0.0, 1.0])
    close(out.components["malformed"], [0.0, 0.0, 1.0, 0.0])
    close(out.components["gold_steps"], [3.0, 3.0, 0.0, 3.0])


def test_gating_by_the_outcome_probes_only_the_pfr_rows(monkeypatch):
    fake = FakeProbe(TABLE)
    monkeypatch.setattr(p2s_mod, "probe_logprobs", fake)
    traj = build_traj(["7+5=12\n12*3=36\nA: 36", "7+5=13\nA: 13", "7+5=13\nA: 13"], groups=[0, 0, 1])
    out = signal(outcome_signal=FixedOutcome([1.0, 0.0, 0.0], accuracy=[1.0, 0.0, 0.0]))(traj)
    close(out.values, [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-0.5 * w(0, 2), -5.0, 0.0]])
    assert out.mask.tolist() == [[False, False, True], [False, True, False], [True, True, False]]
    assert {k[0] for k in fake.seen} == {"", "7+5=13\n", "7+5=13\nA: "}          # group 0 is not probed
    close(out.components["group_correct"], [1.0, 1.0, 0.0])
    # "correct" is read from the accuracy component when the signal has one, else from its value
    out = signal(outcome_signal=FixedOutcome([0.9, 0.2, 0.0]), correct_threshold=0.5)(traj)
    close(out.values[:2], [[0.0, 0.0, 0.9], [0.0, 0.2, 0.0]])


def test_a_prompt_without_a_gold_chain_keeps_only_the_last_step(monkeypatch):
    monkeypatch.setattr(p2s_mod, "probe_logprobs", FakeProbe(TABLE))
    ex = Example("p0", PROMPT, "36")                                               # no solution
    out = signal()(build_traj(["7+5=13\nA: 13"], examples=[ex]))
    close(out.values, [[0.0, -5.0]])
    assert out.mask.tolist() == [[False, True]]


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


EX33 = Example("p1", "Q: 7 +4 *3\n", "33", solution="7+4=11\n11*3=33\nA: 33")


def test_worked_example_on_a_hand_computable_llama():
    model, beta = repeat_last_token_llama()
    Z = math.exp(beta) + V - 1
    lp, lq = beta - math.log(Z), -math.log(Z)                  # log p (repeat the last token), log q (any other)
    traj = build_traj(["7+4=11\n11*3=33\nA: 33", "7+4=11\nA: 33"], examples=[EX33, EX33])
    # Every context ends with "\n", so each suffix's first token is "other" (q); then a token
    # repeating the one before it is p. s_0 = "7+4=11\n11*3=33\nA: 33": 4 repeats, 16 others;
    # s_1 = "11*3=33\nA: 33": 3 and 10; s_2 = "A: 33": 1 and 4. The scores do not depend on the
    # response prefix at all, so with the prompt baseline every gain is 0, and without it the max
    # is the shortest suffix, lp + 4·lq. The last step scores "33" after "A: ": lq + lp.
    out = signal(model, weight_slope=0.0)(traj)
    close(out.values, [[0.0, 0.0, lq + lp], [0.0, lq + lp, 0.0]])
    out = signal(model, weight_slope=0.0, baseline="none")(traj)
    close(out.values, [[lp + 4 * lq, lp + 4 * lq, lq + lp], [lp + 4 * lq, lq + lp, 0.0]])
    step_lp, step_mask, baseline, last_lp = signal(model).suffix_logprobs(traj, [0, 1], [GoldChain(EX33.solution, "solution")] * 2)
    close(step_lp[0, 0], [4 * lp + 16 * lq, 3 * lp + 10 * lq, lp + 4 * lq])
    close(baseline[0, 0], [4 * lp + 16 * lq, 3 * lp + 10 * lq, lp + 4 * lq])
    assert step_mask.tolist() == [[[True] * 3, [True] * 3, [False] * 3], [[True] * 3, [False] * 3, [False] * 3]]


# ================================================================================ (b) plain loop

def random_model():
    return tiny_causal_lm(TOK, family="qwen2", size="micro", seed=4).eval()


def one(model, context, continuation):
    lp = probe_logprobs(model, [context], [continuation], pad_token_id=TOK.pad_token_id, share_prefix=False)[0]
    return float(lp.sum())


def loop_pfr(model, traj, baseline=True, prefix="A: "):
    """r_k one probe at a time (no packing), straight from the module docstring's equations."""
    B, S = traj.batch_size, max(int(traj.num_steps.max()), 1)
    values, mask = torch.zeros(B, S), torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        K = int(traj.num_steps[b])
        if K < 1:
            continue
        ex = traj.examples[b]
        prompt = traj.prompt_ids[b][traj.prompt_mask[b]].tolist()
        resp = traj.response_ids[b].tolist()
        ends = [max(t for t in range(len(resp)) if int(traj.step_ids[b, t]) == k) + 1 for k in range(K)]
        if ex.solution:
            suffixes = [ids(s) for s in gold_suffixes(ex.solution)]
            for k in range(K - 1):
                values[b, k] = max(one(model, prompt + resp[:ends[k]], s) - (one(model, prompt, s) if baseline else 0.0)
                                   for s in suffixes)
                mask[b, k] = True
        pre, ans = probe_token_ids(TOK, prefix, ex.answer)
        values[b, K - 1] = one(model, prompt + resp[:ends[K - 2] if K >= 2 else 0] + pre, ans)
        mask[b, K - 1] = True
    return values, mask


TEXTS = ["7+5=12\n12*3=36\nA: 36", "7+5=13\n13*3=39\n39\nA: 39", "A: 36", "7+4=11\nA: 33", "7+5=12\n12*3=36\nA: 36"]
EXAMPLES = [EX, EX, EX, EX33, Example("p2", PROMPT, "36")]


@pytest.mark.parametrize("baseline", ["prompt", "none"])
def test_packed_signal_equals_a_plain_loop_of_single_probes(baseline):
    model = random_model()
    traj = build_traj(TEXTS, examples=EXAMPLES, groups=[0, 0, 0, 1, 2])
    out = signal(model, weight_slope=0.0, baseline=baseline)(traj)            # weights 1: values are r_k
    want, mask = loop_pfr(model, traj, baseline=baseline == "prompt")
    assert out.mask.tolist() == mask.tolist()
    torch.testing.assert_close(out.values, want, rtol=RTOL, atol=1e-5)


# ================================================================================ (c) invariances

def test_the_empty_prefix_probe_equals_scoring_after_the_prompt_alone():
    model = random_model()
    traj = build_traj(["A: 36", "7+5=12\n12*3=36\nA: 36"])
    prompt = ids(PROMPT)
    pre, ans = probe_token_ids(TOK, "A: ", "36")
    step_lp, _, baseline, last_lp = signal(model).suffix_logprobs(traj, [0, 1], [GoldChain(GOLD, "solution")] * 2)
    # a one-step response: its last step is y* after the prompt alone (p_{−1} is empty)
    close(last_lp[:1], [one(model, prompt + pre, ans)])
    # the masked-prefix baseline is each suffix after the prompt alone
    close(baseline[1, 0], [one(model, prompt, ids(s)) for s in gold_suffixes(GOLD)])
    close(baseline[1, 1], baseline[1, 0])


def test_padding_garbage_and_the_loss_mask_change_nothing():
    model = random_model()
    base = signal(model)(build_traj(TEXTS, examples=EXAMPLES, groups=[0, 0, 0, 1, 2]))
    garbage = build_traj(TEXTS, examples=EXAMPLES, groups=[0, 0, 0, 1, 2], pad_garbage=TOK.convert_tokens_to_ids("9"))
    g = torch.Generator().manual_seed(0)
    other_mask = garbage.replace(loss_mask=garbage.loss_mask & (torch.rand(garbage.loss_mask.shape, generator=g) < 0.5))
    for traj in (garbage, other_mask):
        out = signal(model)(traj)
        torch.testing.assert_close(out.values, base.values, rtol=RTOL, atol=ATOL)
        assert out.mask.tolist() == base.mask.tolist()


def hf_synth(model, **kw):
    return GoldChainSynthesizer(HFSampler(model, TOK), model, TOK, hint="", candidates=3, max_new_tokens=16, **kw)


class SeededSampler:
    """Deterministic candidates that depend on the seed only (as a real sampler's do)."""

    def sample(self, prefixes, n, params, seed):
        texts = [f"7+5=1{seed % 7}\n", f"7+5=12\n12*3=3{seed % 5}\nA: 1", "zz"][:n]
        return Completions([ids(t) for _ in prefixes for t in texts], [None] * (len(prefixes) * n),
                           ["stop"] * (len(prefixes) * n))


@pytest.mark.parametrize("gold", ["solution", "synthesize"])
def test_permuting_the_batch_permutes_the_rewards(gold):
    model = random_model()
    synth = (lambda: GoldChainSynthesizer(SeededSampler(), model, TOK, candidates=3)) if gold == "synthesize" \
        else (lambda: None)
    groups = [0, 0, 0, 1, 2]
    s = signal(model, synthesizer=synth())
    base = s(build_traj(TEXTS, examples=EXAMPLES, groups=groups))
    if gold == "synthesize":
        assert all(g is not None for g in s.gold_chains(build_traj(TEXTS, examples=EXAMPLES, groups=groups)))
    perm = [3, 0, 4, 2, 1]
    traj = build_traj([TEXTS[i] for i in perm], examples=[EXAMPLES[i] for i in perm], groups=[groups[i] for i in perm])
    out = signal(model, synthesizer=synth())(traj)
    torch.testing.assert_close(out.values, base.values[perm], rtol=RTOL, atol=ATOL)
    assert out.mask.tolist() == base.mask[perm].tolist()


def test_a_group_of_one_is_finite():
    model = random_model()
    traj = build_traj(TEXTS, examples=EXAMPLES, groups=[0, 1, 2, 3, 4])
    for outcome in (None, FixedOutcome([1.0, 0.0, 0.0, 1.0, 0.0])):
        out = signal(model, outcome_signal=outcome)(traj)
        assert torch.isfinite(out.values).all() and out.mask.any(dim=1).all()


# ================================================================================ (d) gold-chain synthesis

class FakeSampler:
    """Returns the given texts as the C continuations of every prefix; records each call."""

    def __init__(self, texts):
        self.texts, self.calls = texts, []

    def sample(self, prefixes, n, params, seed):
        self.calls.append(([list(p) for p in prefixes], n, params, seed))
        return Completions([ids(t) for _ in prefixes for t in self.texts[:n]], [None] * (len(prefixes) * n),
                           ["stop"] * (len(prefixes) * n))


def test_synthesis_keeps_the_candidate_under_which_the_answer_is_most_probable(monkeypatch):
    fake = FakeProbe({("7+5=12\n12*3=36\nA: ", "36"): -0.5, ("7+5=11\nA: ", "36"): -3.0, ("A: ", "36"): -0.5})
    monkeypatch.setattr(p2s_mod, "probe_logprobs", fake)
    sampler = FakeSampler(["7+5=12\n12*3=36\nA: 37", "7+5=11\nA: 11", "no answer", "A: 36"])
    synth = GoldChainSynthesizer(sampler, None, TOK, candidates=4, hint="A: {answer}\n", seed=5)
    gold = synth(ids(PROMPT), "36")
    # scores −0.5, −3, (malformed), −0.5: the first of the tie; its own answer 37 is replaced by y*
    assert (gold.text, gold.source) == ("7+5=12\n12*3=36\nA: 36", "synthesized")
    assert gold.candidates == ("7+5=12\n12*3=36\n", "7+5=11\n", None, "")
    (prefixes, n, params, seed), = sampler.calls
    assert prefixes == [ids(PROMPT) + ids("A: 36\n")] and n == 4 and seed == gold_seed(5, ids(PROMPT), "36")
    assert math.isnan(gold.scores[2]) and (gold.scores[0], gold.scores[1], gold.scores[3]) == (-0.5, -3.0, -0.5)
    # the hint is not in the scoring context
    assert all(not k[0].startswith("A: 36\n") for k in fake.seen)
    assert GoldChainSynthesizer(FakeSampler(["x", "y"]), None, TOK, candidates=2)(ids(PROMPT), "36") is None


def test_the_reward_uses_the_synthesized_chain(monkeypatch):
    monkeypatch.setattr(p2s_mod, "probe_logprobs", FakeProbe(TABLE))
    sampler = FakeSampler(["7+5=12\n12*3=36\nA: 35"])
    synth = GoldChainSynthesizer(sampler, None, TOK, candidates=1)
    ex = Example("p0", PROMPT, "36", solution="ignored\nA: 36")      # the solution is not read
    out = signal(synthesizer=synth)(build_traj(["7+5=12\n12*3=36\nA: 36", "7+5=13\nA: 13"], examples=[ex, ex]))
    close(out.values, [[5.0 * w(0, 3), 2.5 * w(1, 3), -0.2], [-0.5 * w(0, 2), -5.0, 0.0]])   # as with GOLD
    assert len(sampler.calls) == 1                                                           # once per prompt


def test_synthesis_with_the_hf_sampler_is_reproducible():
    model = random_model()
    texts = hf_synth(model, seed=1).sample(ids(PROMPT), "36")
    assert len(texts) == 3 and texts == hf_synth(model, seed=1).sample(ids(PROMPT), "36")
    assert texts != hf_synth(model, seed=2).sample(ids(PROMPT), "36")
    a, b = hf_synth(model, seed=1)(ids(PROMPT), "36"), hf_synth(model, seed=1)(ids(PROMPT), "36")
    assert (a.text if a else None) == (b.text if b else None)


# ================================================================================ (e) registration, config, runs

def test_registration_and_kwargs():
    meta = REWARDS.meta("p2s")
    assert meta["level"] == "step"
    REWARDS.check_kwargs("p2s", {"outcome": "rlpr", "gold": "solution", "candidates": 2, "baseline": "none",
                                 "weight_slope": 0.0, "malformed_reward": -1.0}, "rewards[1].kwargs")
    for bad, match in (({"gold": "oracle"}, "gold"), ({"baseline": "masked"}, "baseline"),
                       ({"candidates": 0}, "candidates"), ({"weight_slope": -1.0}, "weight_slope")):
        with pytest.raises(ValueError, match=match):
            REWARDS.check_kwargs("p2s", bad, "rewards[1].kwargs")
    with pytest.raises(ValueError, match="baseline"):
        signal(baseline="masked")


def context(task, engine="hf"):
    model = random_model()
    cfg = SimpleNamespace(rollout=SimpleNamespace(engine=engine, max_batch=8, max_new_tokens=12))
    return SimpleNamespace(cfg=cfg, task=task, tokenizer=TOK, policy=model, initial_policy=lambda: model)


def test_arith_words_needs_a_verifier_free_outcome():
    task = ArithWordsTask()
    with pytest.raises(ValueError, match="train_verifier"):
        PathFaithfulness.from_context(context(task), outcome="verifier", gold="solution")
    with pytest.raises(ValueError, match="outcome-level"):
        PathFaithfulness.from_context(context(task), outcome="p2s", gold="solution")
    ex = Example("w0", PROMPT, "thirty-six", solution="7+5=12\n12*3=36\nA: thirty-six")
    for outcome in ("rlpr", "none"):
        sig_ = PathFaithfulness.from_context(context(task), outcome=outcome, gold="solution")
        out = sig_(build_traj(["7+5=12\n12*3=36\nA: 36", "7+5=12\n"], examples=[ex, ex]))
        assert torch.isfinite(out.values).all()
        assert out.mask[1].tolist() == [True, False, False] and float(out.values[1, 0]) == -1.0   # malformed


def test_config_loads_validates_and_only_swaps_the_method():
    cfg = load_config(CONFIGS / "arith_p2s.yaml")
    validate(cfg)
    assert [(r.name, r.weight) for r in cfg.rewards] == [("verifier", 0.0), ("p2s", 1.0)]
    assert cfg.rewards[1].kwargs == {"outcome": "verifier", "gold": "solution"}
    assert cfg.advantage.name == "p2s" and cfg.filters.outcome == "verifier"
    # the accuracy band keeps all-wrong groups (low 0): they are where the PFR acts
    assert cfg.filters.filters == [{"name": "accuracy_band", "kwargs": {"low": 0.0, "high": 0.8}}]
    mine, base = to_dict(cfg), to_dict(load_config(CONFIGS / "arith_grpo.yaml"))
    for d in (mine, base):
        d.pop("rewards"), d["advantage"].pop("name"), d["filters"].pop("outcome"), d["train"].pop("out_dir")
        d["filters"]["filters"][0]["kwargs"].pop("low")
    assert mine == base


# an SFT warm start long enough (~3 s) for the micro model to write answer lines, so rows are
# well-formed and the PFR branch runs; arith_words trains with rlpr as the outcome side
RUNS = {
    "arith": {},
    "arith_words": {"task.name": "arith_words", "rewards.0.name": "rlpr", "rewards.1.kwargs.outcome": "rlpr",
                    "filters.outcome": ""},
}


@pytest.mark.parametrize("task", RUNS)
def test_tiny_run_end_to_end(tmp_path, sft_cache, task):
    overrides = tiny_run_overrides(tmp_path / "run", sft_cache, steps=2, **{
        "train.save_every": 0, "sft.n_examples": 6000, "sft.batch_size": 32, "sft.lr": 1e-2, "sft.warmup_steps": 10,
        **RUNS[task]})
    cfg = load_config(CONFIGS / "arith_p2s.yaml", overrides)
    validate(cfg)
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/loss"]) and math.isfinite(r["reward/p2s/mean"]) for r in rows)
    assert any(r["reward/p2s/uses_pfr"] > 0 for r in rows)                    # some group took the dense PFR
    assert any(r["reward/p2s/gold_steps"] > 0 for r in rows)
    assert all(r["adv/abs_mean"] > 0 for r in rows)
