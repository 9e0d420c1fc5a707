"""The Sampler contract on the HF sampler: prefix-major rows, stops (EOS, stop tokens, stop
strings) kept and cut, finish reasons, log-probs on request, the context check, seeding."""

import pytest
import torch

from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.sampling import SAMPLERS, SamplingParams
from finegrain.train.update import batch_logprobs  # noqa: F401  (the trainer's recomputation, used below)

ALPHABET = "0123456789+-*=:QA \n"


@pytest.fixture(scope="module")
def sampler():
    tok = char_tokenizer(ALPHABET)
    return SAMPLERS.get("hf")(tiny_causal_lm(tok, size="micro", seed=0), tok)


def enc(sampler, text):
    return sampler.tokenizer(text, add_special_tokens=True)["input_ids"]


def test_rows_are_prefix_major_and_seeded(sampler):
    prefixes = [enc(sampler, "Q: 1 +2\n"), enc(sampler, "Q: 3 *4\n")]
    sp = SamplingParams(max_new_tokens=10)
    a = sampler.sample(prefixes, 3, sp, seed=7)
    b = sampler.sample([prefixes[0]] * 3 + [prefixes[1]] * 3, 1, sp, seed=7)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6
    assert a.token_ids != sampler.sample(prefixes, 3, sp, seed=8).token_ids


def test_stop_tokens_and_strings_end_a_continuation_and_are_kept(sampler):
    tok = sampler.tokenizer
    prefixes = [enc(sampler, "Q: 1 +2\n")] * 8
    newline = tok.convert_tokens_to_ids("\n")
    by_token = sampler.sample(prefixes, 1, SamplingParams(max_new_tokens=24, stop_token_ids=(newline,)), seed=1)
    by_string = sampler.sample(prefixes, 1, SamplingParams(max_new_tokens=24, stop_strings=("\n",)), seed=1)
    stops = {newline, tok.eos_token_id}
    for ids, fin in zip(by_token.token_ids, by_token.finish):
        assert all(t not in stops for t in ids[:-1])
        assert (fin == "stop") == (ids[-1] in stops) and (fin == "stop" or len(ids) == 24)
    # the same draws, cut at the same places, whether the stop is given as a token or as a string
    assert by_token.token_ids == by_string.token_ids and by_token.finish == by_string.finish


def test_logprobs_match_a_forward_pass_and_can_be_skipped(sampler):
    prefix = enc(sampler, "Q: 5 -3\n")
    sp = SamplingParams(temperature=0.8, max_new_tokens=12)
    out = sampler.sample([prefix], 4, sp, seed=3)
    model = sampler.model
    for ids, lps in zip(out.token_ids, out.logprobs):
        seq = torch.tensor([prefix + ids])
        logits = model(input_ids=seq).logits[0, len(prefix) - 1:-1].float() / 0.8
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lps), want, rtol=1e-4, atol=1e-4)
    bare = sampler.sample([prefix], 4, SamplingParams(temperature=0.8, max_new_tokens=12, logprobs=False), seed=3)
    assert bare.token_ids == out.token_ids and bare.logprobs == [None] * 4


def test_prefix_longer_than_the_context_is_refused(sampler):
    ctx = sampler.context_length
    with pytest.raises(ValueError, match=rf"^prefix 1: {ctx} tokens plus max_new_tokens=4 exceeds the model's context"):
        sampler.sample([[1, 2], [3] * ctx], 1, SamplingParams(max_new_tokens=4), seed=0)


def test_greedy_ignores_the_seed(sampler):
    prefix = enc(sampler, "Q: 2 +2\n")
    sp = SamplingParams(temperature=0.0, max_new_tokens=10)
    assert sampler.sample([prefix], 2, sp, seed=1).token_ids == sampler.sample([prefix], 2, sp, seed=99).token_ids
