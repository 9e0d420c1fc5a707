"""Tests for finegrain.rewards.pear (PEAR): the reward formula and the phase split by hand, the
policy entropies against a one-row-at-a-time loop, invariances and kwarg refusals. The policy is
a micro Qwen2-shaped model built from a config (random init, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from finegrain.config import RunConfig
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer, train_bpe_tokenizer
from finegrain.rewards.base import REWARDS
from finegrain.rewards.pear import (marker_boundaries, marker_boundary, pear_reward, phase_masks,
                                    response_entropies)
from finegrain.train.stages import RewardContext
from finegrain.trajectory import Trajectory
from tests.helpers import close

NAN = float("nan")
TOK = char_tokenizer("0123456789+-*=\nAQ: ")
EOS = TOK.eos_token_id


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(TOK, family="qwen2", size="micro", seed=0).eval()


class FakeTask:
    """verify(example, text) = example: each row's example *is* its verifier score."""

    def verify(self, example, text):
        return float(example)


def make_traj(prompts, responses, acc, *, extra_pad=0, garbage=False, seed=0):
    """Left-padded prompts, right-padded responses (EOS appended); ``garbage``: random real-vocab
    ids under every False mask (prompt and response padding)."""
    p_ids = [TOK(p)["input_ids"] for p in prompts]
    r_ids = [TOK(r, add_special_tokens=False)["input_ids"] + [EOS] for r in responses]
    B, P, L = len(prompts), max(map(len, p_ids)), max(map(len, r_ids)) + extra_pad
    gen = torch.Generator().manual_seed(seed)
    fill = (lambda *s: torch.randint(4, len(TOK), s, generator=gen)) if garbage else \
        (lambda *s: torch.full(s, TOK.pad_token_id))
    prompt_ids, resp = fill(B, P), fill(B, L)
    prompt_mask, mask = torch.zeros(B, P, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(p_ids, r_ids)):
        prompt_ids[i, P - len(p):], prompt_mask[i, P - len(p):] = torch.tensor(p), True
        resp[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    return Trajectory(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=resp, response_mask=mask,
                      loss_mask=mask.clone(), group_ids=torch.zeros(B, dtype=torch.long),
                      step_ids=torch.where(mask, 0, -1), behavior_logprobs=torch.zeros(B, L),
                      truncated=torch.zeros(B, dtype=torch.bool), prompt_texts=list(prompts),
                      response_texts=list(responses), examples=list(acc))


def build(model, tok=TOK, temperature=1.0, max_batch=256, **kw):
    cfg = RunConfig()
    cfg.rollout.temperature, cfg.rollout.max_batch = temperature, max_batch
    return REWARDS.get("pear").from_context(RewardContext(cfg, FakeTask(), tok, model, lambda: None), **kw)


PROMPTS = ["Q: 7 +5\n", "Q: 3 *4 -2\n", "Q: 9 -1\n", "Q: 2 +2\n"]
RESPONSES = ["7+5=12\nA: 12", "3*4=12\n12-2=10\nA: 10", "9-1=7\n", "A: 4"]  # row 2 has no answer line


# ----------------------------------------------------------------------------- worked examples (a)


# entropies of 4 rows, L = 5; row 3 has 4 real tokens (NaN in its padding must not leak)
H = torch.tensor([[1.0, 2.0, 9.0, 0.5, 0.5],
                  [0.2, 0.2, 9.0, 0.5, 0.5],
                  [1.0, 2.0, 9.0, 0.5, 0.5],
                  [2.0, 2.0, 1.0, 1.0, NAN]])
REAL = torch.tensor([[True] * 5, [True] * 5, [True] * 5, [True] * 4 + [False]])
# rows 0–2: marker is token 2 (think = tokens 0, 1; answer = 3, 4); row 3 has no marker (k = T = 4)
K_THINK, K_ANSWER = torch.tensor([2, 2, 2, 4]), torch.tensor([3, 3, 3, 4])
RIGHT = torch.tensor([True, True, False, True])


@pytest.mark.parametrize("kw,expected", [
    # H_think = [1.5, 0.2, 1.5, 1.5], H_answer = [0.5, 0.5, 0.5, 0] (no answer phase: 0)
    ({}, [0.0, 1.0, 0.0, -0.5]),              # α=1: P = [1, 0 (max with 0), ·, 1.5]; r = min(1, 1 − P); row 2 wrong → 0
    ({"alpha": 2.0}, [0.5, 1.0, 0.0, -0.5]),  # P = [1.5 − 1 = 0.5, 0, ·, 1.5]
    ({"alpha": 0.0}, [-0.5, 0.8, 0.0, -0.5]),  # P = H_think
    ({"alpha": -1.0}, [-1.0, 0.3, 0.0, -0.5]),  # P = H_think + H_answer = [2, 0.7, ·, 1.5]
    ({"score": 1.5}, [0.5, 1.0, 0.0, 0.0]),   # min(1, 1.5 − P): row 1 capped at 1
    ({"score": 0.8}, [-0.2, 0.8, 0.0, -0.7]),  # s < 1: row 1's P is 0, not −0.3 (the max with 0 shows)
    ({"format_score": 0.25}, [0.0, 1.0, 0.25, -0.5]),  # the wrong row gets r_fmt
])
def test_pear_reward_worked_examples(kw, expected):
    think, answer = phase_masks(K_THINK, K_ANSWER, REAL)
    values, parts = pear_reward(H, think, answer, RIGHT, **kw)
    close(values, expected)
    close(parts["h_think"], [1.5, 0.2, 1.5, 1.5])
    close(parts["h_answer"], [0.5, 0.5, 0.5, 0.0])


def test_phase_masks_count_real_tokens_only():
    think, answer = phase_masks(K_THINK, K_ANSWER, REAL)
    assert think.int().tolist() == [[1, 1, 0, 0, 0]] * 3 + [[1, 1, 1, 1, 0]]
    assert answer.int().tolist() == [[0, 0, 0, 1, 1]] * 3 + [[0, 0, 0, 0, 0]]


def test_marker_boundary_worked_examples():
    ids = lambda s: TOK(s, add_special_tokens=False)["input_ids"] + [EOS]  # noqa: E731
    # "7+5=12\nA: 12<eos>": "A: " starts at character 7 = token 7; tokens 7–9 are the marker,
    # 10, 11 and EOS (12) the answer phase
    assert marker_boundary(TOK, ids("7+5=12\nA: 12"), "A: ") == (7, 10, True)
    assert marker_boundary(TOK, ids("A: 4"), "A: ") == (0, 3, True)           # no think phase
    assert marker_boundary(TOK, ids("9-1=7\n"), "A: ") == (7, 7, False)       # none: k = T
    assert marker_boundary(TOK, ids("A: 1\nA: 2"), "A: ") == (0, 3, True)     # the first occurrence
    # a special token is found too (the text is decoded with special tokens): "7+5<eos>"
    assert marker_boundary(TOK, ids("7+5"), "<eos>") == (3, 4, True)


def loop_boundary(tok, ids, marker):
    """Every prefix decoded (O(T²)): think = tokens ending at or before the marker, answer = tokens
    starting at or after its end."""
    dec = lambda x: tok.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    text, T = dec(ids), len(ids)
    c = text.find(marker)
    if c < 0:
        return T, T, False
    e = [len(dec(ids[:t])) for t in range(T + 1)]
    think = [t for t in range(T) if e[t + 1] <= c]
    answer = [t for t in range(T) if e[t] >= c + len(marker)]
    assert think == list(range(len(think)))  # a prefix
    return len(think), (answer[0] if answer else T), True


def test_marker_boundary_matches_prefix_loop_with_bpe_and_unusual_tokenizations():
    corpus = [f"let me think {a}+{b}={a + b} ok</think>The answer is A: {a + b}" for a in range(30) for b in range(9)]
    bpe = train_bpe_tokenizer(corpus, vocab_size=160)
    gen = torch.Generator().manual_seed(0)
    pieces = ["let me ", "think", " 3+4", "=7", " ok", "</", "think>", "</think>", "The answer", " is ", "A", ": ",
              "A: ", "7", "\n", "ü", "é!"]
    for _ in range(60):
        # tokenize random pieces separately: token sequences the tokenizer would not produce itself
        seq = [pieces[int(i)] for i in torch.randint(0, len(pieces), (int(torch.randint(1, 9, (1,), generator=gen)),),
                                                     generator=gen)]
        ids = [t for p in seq for t in bpe(p, add_special_tokens=False)["input_ids"]] + [bpe.eos_token_id]
        for marker in ("</think>", "A: ", "think"):
            assert marker_boundary(bpe, ids, marker) == loop_boundary(bpe, ids, marker), (seq, marker)


# ----------------------------------------------------------------------------- entropies vs loop (b)


def loop_entropies(model, traj, temperature):
    """One row at a time, no padding at all, default positions; H = −Σ p log p by hand."""
    out = torch.full(traj.response_ids.shape, NAN)
    with torch.no_grad():
        for i in range(traj.batch_size):
            p = traj.prompt_ids[i][traj.prompt_mask[i]]
            r = traj.response_ids[i][traj.response_mask[i]]
            logits = model(torch.cat([p, r])[None]).logits[0].float() / temperature  # (P_i + T_i, V)
            logp = torch.log_softmax(logits[len(p) - 1: len(p) - 1 + len(r)], -1)
            out[i, :len(r)] = -(logp.exp() * logp).sum(-1)
    return out


@pytest.mark.parametrize("temperature,micro_batch", [(1.0, 256), (0.7, 1), (1.3, 3)])
def test_response_entropies_match_loop(model, temperature, micro_batch):
    traj = make_traj(PROMPTS, RESPONSES, [1, 1, 0, 1], garbage=True)
    got = response_entropies(model, traj.input_ids, traj.attention_mask, traj.response_ids.shape[1],
                             temperature=temperature, micro_batch=micro_batch)
    want = loop_entropies(model, traj, temperature)
    m = traj.response_mask
    close(got[m], want[m])


def loop_pear(model, traj, acc, marker, temperature, alpha=1.0, score=1.0, format_score=0.0):
    Hs = loop_entropies(model, traj, temperature)
    out = []
    for i in range(traj.batch_size):
        ids = traj.response_ids[i][traj.response_mask[i]].tolist()
        k_think, k_answer, _ = loop_boundary(TOK, ids, marker)
        h = Hs[i, :len(ids)].tolist()
        think, answer = h[:k_think], h[k_answer:]
        h_think = sum(think) / len(think) if think else 0.0
        h_answer = sum(answer) / len(answer) if answer else 0.0
        P = max(0.0, h_think - alpha * h_answer)
        out.append(min(1.0, score - P) if acc[i] >= 1.0 else format_score)
    return out


@pytest.mark.parametrize("kw", [{}, {"alpha": 0.5, "score": 1.2, "format_score": 0.1}, {"marker": "\n"}])
def test_signal_matches_loop(model, kw):
    acc = [1.0, 1.0, 1.0, 0.0]
    sig = build(model, temperature=0.8, **kw)
    out = sig(make_traj(PROMPTS, RESPONSES, acc))
    want = loop_pear(model, make_traj(PROMPTS, RESPONSES, acc), acc, kw.get("marker", "A: "), 0.8,
                     **{k: v for k, v in kw.items() if k != "marker"})
    close(out.values, want)
    assert out.level == "outcome" and out.mask.all()
    close(out.components["marker_found"], [1.0, 1.0, 0.0, 1.0] if "marker" not in kw else [1.0, 1.0, 1.0, 0.0])
    close(out.components["accuracy"], acc)
    assert not out.values.requires_grad and all(p.grad is None for p in model.parameters())


def test_signal_uses_the_rollout_temperature_and_micro_batches_change_nothing(model):
    traj = make_traj(PROMPTS, RESPONSES, [1, 1, 1, 1])
    hot = build(model, temperature=2.0)(traj)
    cold = build(model, temperature=0.5)(traj)
    assert not torch.allclose(hot.components["h_think"], cold.components["h_think"])
    one = build(model, temperature=2.0, micro_batch=1)(traj)
    close(one.values, hot.values)
    assert build(model, max_batch=7).micro_batch == 7 and build(model, temperature=0.3).temperature == 0.3


# ----------------------------------------------------------------------------- invariances (c)


def test_padding_and_masked_tokens_change_nothing(model):
    clean = build(model)(make_traj(PROMPTS, RESPONSES, [1, 1, 0, 1]))
    noisy = build(model)(make_traj(PROMPTS, RESPONSES, [1, 1, 0, 1], extra_pad=6, garbage=True, seed=4))
    close(noisy.values, clean.values)
    for k in clean.components:
        close(noisy.components[k], clean.components[k])


def test_permuting_the_batch_permutes_the_output(model):
    perm = [2, 0, 3, 1]
    acc = [1, 0, 1, 1]
    out = build(model)(make_traj(PROMPTS, RESPONSES, acc))
    out_p = build(model)(make_traj([PROMPTS[i] for i in perm], [RESPONSES[i] for i in perm], [acc[i] for i in perm]))
    close(out_p.values, out.values[perm])
    for k in out.components:
        close(out_p.components[k], out.components[k][perm])


def test_a_single_row_and_an_empty_response_are_finite(model):
    out = build(model)(make_traj(["Q: 1 +1\n", "Q: 2 +2\n"], ["", "A: 4"], [1, 1]))
    assert torch.isfinite(out.values).all()
    close(out.components["think_tokens"], [1.0, 0.0])  # the empty response is its EOS only
    single = build(model)(make_traj(["Q: 1 +1\n"], ["1+1=2\nA: 2"], [1]))
    assert torch.isfinite(single.values).all() and single.values.shape == (1,)


def test_marker_boundaries_batch_matches_rows():
    traj = make_traj(PROMPTS, RESPONSES, [1] * 4, extra_pad=3, garbage=True)
    k_think, k_answer, found = marker_boundaries(TOK, traj.response_ids, traj.response_mask, "A: ")
    rows = [marker_boundary(TOK, r[m].tolist(), "A: ") for r, m in zip(traj.response_ids, traj.response_mask)]
    assert list(zip(k_think.tolist(), k_answer.tolist(), found.tolist())) == rows


# ----------------------------------------------------------------------------- kwargs


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.0}, r"^rewards\[0\]\.kwargs\.temperature: expected a number in \(0, inf\), got 0.0$"),
    ({"micro_batch": 0}, r"^rewards\[0\]\.kwargs\.micro_batch: expected a number in \[1, inf\), got 0$"),
    ({"marker": 3}, r"^rewards\[0\]\.kwargs\.marker: expected str, got 3$"),
    ({"alpha": float("nan")}, r"^rewards\[0\]\.kwargs\.alpha: expected a finite number"),
    ({"boundary": "</think>"}, r"^rewards\[0\]\.kwargs: unknown key 'boundary' for reward signal 'pear'"),
])
def test_bad_kwargs_are_refused_by_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        REWARDS.check_kwargs("pear", kwargs, "rewards[0].kwargs")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs,match", [
    ({"marker": ""}, r"^pear\.marker: expected a non-empty string, got ''$"),
    ({"temperature": -1.0}, r"^pear\.temperature: expected a number > 0, got -1.0$"),
    ({"micro_batch": 0}, r"^pear\.micro_batch: expected an integer ≥ 1, got 0$"),
])
def test_bad_kwargs_are_refused_on_construction(model, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        build(model, **kwargs)
    assert "\n" not in str(e.value)


def test_a_context_without_a_policy_is_refused():
    with pytest.raises(ValueError, match=r"^pear: needs the sampling policy and its tokenizer"):
        build(None)
