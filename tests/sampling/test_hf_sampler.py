"""The HF sampler through a single-turn Rollout: seeding, greedy independence of the seed, masks, log-probs, step ids."""

import pytest
import torch

from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.envs import hf_rollout
from finegrain.sampling import SamplingParams
from finegrain.segment import newline, spans_to_token_step_ids, token_char_offsets
from finegrain.tasks.base import Example
from finegrain.train.update import batch_logprobs

ALPHABET = "0123456789+-*=:QA \n"


@pytest.fixture(scope="module")
def engine():
    tok = char_tokenizer(ALPHABET)
    model = tiny_causal_lm(tok, size="micro", seed=0)
    return hf_rollout(model, tok, segmenter="newline")


EXAMPLES = [Example(id="a", prompt="Q: 7 +5\n", answer="12"), Example(id="b", prompt="Q: 13 *2 -4\n", answer="22")]


def test_same_seed_same_tokens_and_different_seed_differs(engine):
    sp = SamplingParams(temperature=1.0, max_new_tokens=16)
    a = engine.generate(EXAMPLES, 3, sp, seed=5)
    b = engine.generate(EXAMPLES, 3, sp, seed=5)
    c = engine.generate(EXAMPLES, 3, sp, seed=6)
    assert torch.equal(a.response_ids, b.response_ids) and a.response_texts == b.response_texts
    assert not torch.equal(a.response_ids, c.response_ids)


def test_greedy_does_not_depend_on_seed(engine):
    sp = SamplingParams(temperature=0.0, max_new_tokens=16)
    a = engine.generate(EXAMPLES, 2, sp, seed=1)
    b = engine.generate(EXAMPLES, 2, sp, seed=999)
    assert torch.equal(a.response_ids, b.response_ids)


def test_caller_rng_is_untouched(engine):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine.generate(EXAMPLES, 2, SamplingParams(max_new_tokens=8), seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_groups_masks_and_logprobs(engine):
    sp = SamplingParams(temperature=1.0, max_new_tokens=16)
    t = engine.generate(EXAMPLES, 3, sp, seed=2, group_offset=10)
    assert t.group_ids.tolist() == [10, 10, 10, 11, 11, 11]
    tok = engine.tokenizer
    for b in range(t.batch_size):
        n = int(t.response_mask[b].sum())
        assert t.response_mask[b, :n].all() and not t.response_mask[b, n:].any()  # a prefix
        ids = t.response_ids[b, :n].tolist()
        if t.truncated[b]:
            assert n == 16 and tok.eos_token_id not in ids
        else:
            assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
        assert t.response_texts[b] == tok.decode(ids, skip_special_tokens=True)
    # behaviour log-probs equal a fresh forward pass over prompt + response at the same temperature
    recomputed = batch_logprobs(engine.model, t, 1.0, micro_batch=4)
    torch.testing.assert_close(recomputed[t.response_mask], t.behavior_logprobs[t.response_mask], rtol=1e-4, atol=1e-4)
    assert t.behavior_logprobs[~t.response_mask].eq(0).all()


def test_step_ids_follow_newline_spans(engine):
    t = engine.generate(EXAMPLES, 4, SamplingParams(max_new_tokens=20), seed=3)
    tok = engine.tokenizer
    for b in range(t.batch_size):
        n = int(t.response_mask[b].sum())
        text, offs = token_char_offsets(tok, t.response_ids[b, :n].tolist())
        assert t.step_ids[b, :n].tolist() == spans_to_token_step_ids(newline(text), offs)
        assert t.step_ids[b, n:].eq(-1).all()


def test_step_ids_worked_example_bpe_like_offsets():
    # tokens "7+5", "=12\n", "12", "*2=24", "\n", "" (EOS): newline steps are [0, 8) and [8, 15)
    text = "7+5=12\n12*2=24\n"
    offs = [(0, 3), (3, 7), (7, 9), (9, 14), (14, 15), (15, 15)]
    assert spans_to_token_step_ids(newline(text), offs) == [0, 0, 1, 1, 1, -1]


def test_logprobs_from_a_forward_pass_match_generate_logits(engine):
    # a large vocabulary would not keep generate's (B, L, V) logits; the forward-pass path must agree
    sp = SamplingParams(temperature=0.7, max_new_tokens=12)
    a = engine.generate(EXAMPLES, 3, sp, seed=4)
    big = hf_rollout(engine.model, engine.tokenizer, logits_budget_bytes=0, forward_micro_batch=2)
    b = big.generate(EXAMPLES, 3, sp, seed=4)
    assert torch.equal(a.response_ids, b.response_ids)
    torch.testing.assert_close(a.behavior_logprobs, b.behavior_logprobs, rtol=1e-4, atol=1e-4)


def test_chat_template_is_applied_when_the_tokenizer_has_one():
    from finegrain.envs.runner import render_prompt

    tok = char_tokenizer(ALPHABET + "<>|usertaisnm")
    assert render_prompt(tok, "Q: 1 +2\n") == "Q: 1 +2\n"  # no template: the raw prompt
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    assert render_prompt(tok, "Q: 1 +2\n") == "<|user|>Q: 1 +2\n<|assistant|>"
    assert render_prompt(tok, "Q: 1 +2\n", use_chat_template=False) == "Q: 1 +2\n"
    model = tiny_causal_lm(tok, size="micro", seed=0)
    t = hf_rollout(model, tok).generate(EXAMPLES[:1], 1, SamplingParams(max_new_tokens=4), seed=0)
    assert t.prompt_texts == ["<|user|>Q: 7 +5\n<|assistant|>"]
    assert tok.decode(t.prompt_ids[0], skip_special_tokens=True) == "<|user|>Q: 7 +5\n<|assistant|>"
