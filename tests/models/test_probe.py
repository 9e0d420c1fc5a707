"""finegrain.models.probe: packed (shared-prefix) probes against one plain forward per probe.

Tolerance: float32 models, atol 1e-5 and rtol 1e-5 on per-token log-probs (observed differences
are ~5e-7: the packed row sums the same terms in another order). A mask or position error moves
log-probs by ~1e-2 or more on these random models.
"""

from __future__ import annotations

import math
import string

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen3Config

from finegrain.models.probe import PACKED_FAMILIES, mean_logprob, pack_probes, packs, probe_logprobs
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from tests.helpers import RTOL

ATOL_LP = 1e-5
TOK = char_tokenizer(string.ascii_letters + string.digits + " <>/():,._-\n")
V = len(TOK)
PROBE_PREFIX = [TOK.convert_tokens_to_ids(c) for c in "A: "]


def model_of(family: str, attn: str = "sdpa", **extra):
    """A micro random model of ``family``; mistral and qwen3 use one KV head (grouped queries)."""
    if family in ("qwen2", "llama"):
        model = tiny_causal_lm(TOK, family=family, size="micro", seed=3)
    else:
        cfg_cls = {"mistral": MistralConfig, "qwen3": Qwen3Config}[family]
        cfg = cfg_cls(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=512, **extra)
        with torch.random.fork_rng():
            torch.manual_seed(3)
            model = AutoModelForCausalLM.from_config(cfg)
    model.config._attn_implementation = attn
    return model.eval()


def plain(model, context, continuation) -> torch.Tensor:
    """The reference: one unpadded forward over context + continuation, no mask, no position ids."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([context + continuation])).logits[0].float(), -1)
    return torch.stack([logp[len(context) - 1 + j, t] for j, t in enumerate(continuation)])


def igpo_like(seed: int, responses: int = 3, K: int = 4, prompt_len: int = 6, response_len: int = 30):
    """K probes per response (prompt + response[:n_k] + "A: ", answer after it) plus two unrelated
    probes and one duplicate: the shapes the reward signals produce."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(4, V, (n,), generator=g).tolist()
    contexts, continuations = [], []
    for _ in range(responses):
        prompt, response, answer = rand(prompt_len), rand(response_len), rand(int(torch.randint(1, 4, (1,), generator=g)))
        cuts = sorted({0, *torch.randint(1, response_len, (K - 1,), generator=g).tolist()})
        for n in cuts:
            contexts.append(prompt + response[:n] + PROBE_PREFIX)
            continuations.append(answer)
    contexts += [rand(5), rand(9), list(contexts[1])]
    continuations += [rand(2), rand(1), list(continuations[1])]
    return contexts, continuations


def mask_dims(model):
    """Records, per forward of ``model``, the number of dims of its attention mask (4 = a packed row)."""
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["attention_mask"].dim()),
                                    with_kwargs=True)
    return seen


def assert_all_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL_LP)


# ================================================================================ reference equivalence

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", PACKED_FAMILIES)
def test_packed_probes_match_one_plain_forward_each(family, attn):
    model = model_of(family, attn)
    contexts, continuations = igpo_like(seed=0)
    want = [plain(model, c, a) for c, a in zip(contexts, continuations)]
    seen = mask_dims(model)
    got = probe_logprobs(model, contexts, continuations, pad_token_id=TOK.pad_token_id, micro_batch=2)
    assert seen and set(seen) == {4}                           # the packed path ran, nothing else
    assert_all_close(got, want)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_path_equals_naive_path(seed):
    model = model_of("qwen2")
    contexts, continuations = igpo_like(seed, responses=4, K=5)
    shared = probe_logprobs(model, contexts, continuations, pad_token_id=TOK.pad_token_id, micro_batch=3)
    naive = probe_logprobs(model, contexts, continuations, pad_token_id=TOK.pad_token_id, micro_batch=3,
                           share_prefix=False)
    assert_all_close(shared, naive)
    close_means = mean_logprob(shared) - mean_logprob(naive)
    assert close_means.abs().max() < ATOL_LP


def test_empty_response_prefix_equals_scoring_right_after_the_prompt():
    # the probe before turn 0 has context = prompt only; packed with the later probes of the same
    # response it must give what the continuation gets right after the prompt, scored alone
    model = model_of("llama")
    g = torch.Generator().manual_seed(7)
    prompt, response, answer = (torch.randint(4, V, (n,), generator=g).tolist() for n in (5, 20, 3))
    contexts = [prompt + response[:n] for n in (0, 4, 11, 20)]
    got = probe_logprobs(model, contexts, [answer] * 4, pad_token_id=TOK.pad_token_id)
    assert len(pack_probes(contexts, [answer] * 4)) == 1            # really packed together
    alone = probe_logprobs(model, [prompt], [answer], pad_token_id=TOK.pad_token_id)[0]
    torch.testing.assert_close(got[0], alone, rtol=RTOL, atol=ATOL_LP)
    torch.testing.assert_close(got[0], plain(model, prompt, answer), rtol=RTOL, atol=ATOL_LP)


# ================================================================================ invariances

@pytest.mark.parametrize("share_prefix", [True, False])
def test_permuting_probes_permutes_outputs_and_batch_mates_change_nothing(share_prefix):
    model = model_of("qwen2")
    contexts, continuations = igpo_like(seed=3)
    base = probe_logprobs(model, contexts, continuations, pad_token_id=TOK.pad_token_id, share_prefix=share_prefix)
    perm = torch.randperm(len(contexts), generator=torch.Generator().manual_seed(0)).tolist()
    permuted = probe_logprobs(model, [contexts[i] for i in perm], [continuations[i] for i in perm],
                              pad_token_id=TOK.pad_token_id, share_prefix=share_prefix)
    assert_all_close(permuted, [base[i] for i in perm])
    # other batch mates, another micro-batch size and another pad id: the first probes do not move
    more_c, more_a = igpo_like(seed=9, responses=2)
    mixed = probe_logprobs(model, contexts + more_c, continuations + more_a, pad_token_id=5, micro_batch=1,
                           share_prefix=share_prefix)
    assert_all_close(mixed[:len(contexts)], base)


def test_empty_continuation_gives_an_empty_tensor_and_empty_context_is_refused():
    model = model_of("qwen2")
    for share in (True, False):
        out = probe_logprobs(model, [[5, 6], [7]], [[], [8, 9]], pad_token_id=0, share_prefix=share)
        assert out[0].shape == (0,) and out[0].dtype == torch.float32 and out[1].shape == (2,)
        assert math.isnan(float(mean_logprob(out)[0]))
    assert probe_logprobs(model, [[5]], [[]], pad_token_id=0)[0].numel() == 0
    assert probe_logprobs(model, [], [], pad_token_id=0) == []
    with pytest.raises(ValueError, match=r"contexts\[1\] is empty"):
        probe_logprobs(model, [[5], []], [[6], [7]], pad_token_id=0)
    with pytest.raises(ValueError, match="2 contexts but 1 continuations"):
        probe_logprobs(model, [[5], [6]], [[7]], pad_token_id=0)
    with pytest.raises(ValueError, match="micro_batch"):
        probe_logprobs(model, [[5]], [[6]], pad_token_id=0, micro_batch=0)


# ================================================================================ cost and grouping

def test_the_probes_of_one_response_pack_into_one_row_of_L_plus_K_m_tokens():
    P, n, m = 6, [0, 5, 12, 30], len(PROBE_PREFIX) + 2
    # token ids far from the probe prefix's, so no branch coincides with the response by chance
    prompt, response, answer = list(range(4, 4 + P)), [100 + i % 20 for i in range(30)], [140, 141]
    contexts = [prompt + response[:k] + PROBE_PREFIX for k in n]
    rows = pack_probes(contexts, [answer] * len(n))
    assert len(rows) == 1 and sorted(rows[0].probes) == [0, 1, 2, 3]
    assert len(rows[0].tokens) == P + max(n) + len(n) * m              # naive: Σ_k (P + n_k + m)
    # an identical probe costs nothing; a probe sharing one token does not join the row
    contexts += [contexts[2], [4, 160, 161]]
    rows = pack_probes(contexts, [answer] * 5 + [[162]])
    assert sorted(len(r.tokens) for r in rows) == [4, P + max(n) + len(n) * m]
    # each continuation token is predicted from the node of the token before it, at its depth
    row = max(rows, key=lambda r: len(r.tokens))
    assert sorted(row.probes) == [0, 1, 2, 3, 4]
    for probe, pred in zip(row.probes, row.predictors):
        assert [row.tokens[q] for q in pred] == contexts[probe][-1:] + answer[:-1]
        assert [row.depth[q] for q in pred] == list(range(len(contexts[probe]) - 1, len(contexts[probe]) + 1))


def test_packed_rows_are_capped_at_twice_the_longest_probe():
    # 10 probes of 41 tokens that share a 22-token prompt (over half of each): a row takes the first
    # (41 tokens) and then 19 per probe, so 3 probes fit under 2·41 = 82
    contexts = [[4] * 22 + [6 + i] + [30] * 17 for i in range(10)]
    rows = pack_probes(contexts, [[5]] * 10)
    assert [len(r.probes) for r in rows] == [3, 3, 3, 1] and max(len(r.tokens) for r in rows) == 79
    assert sorted(p for r in rows for p in r.probes) == list(range(10))


# ================================================================================ which models pack

class Stub(torch.nn.Module):
    """A causal LM without a config: logits = one-hot of the current token."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
        assert attention_mask.dim() == 2
        return type("Out", (), {"logits": torch.nn.functional.one_hot(input_ids, V).float() * 2.0})


def test_models_that_cannot_pack_take_the_naive_path_with_the_same_numbers():
    assert packs(model_of("qwen2")) and not packs(Stub())
    stub_lp = probe_logprobs(Stub(), [[5, 6]], [[6, 7]], pad_token_id=0)[0]
    z = math.log(math.exp(2.0) + V - 1)
    torch.testing.assert_close(stub_lp, torch.tensor([2.0 - z, -z]), rtol=RTOL, atol=ATOL_LP)
    flash = model_of("qwen2")
    flash.config._attn_implementation = "flash_attention_2"
    assert not packs(flash)
    # a sliding window shorter than the longest probe would be ignored by a packed mask: naive path
    windowed = model_of("mistral", sliding_window=8)
    assert packs(windowed, longest=8) and not packs(windowed, longest=9)
    contexts, continuations = igpo_like(seed=4, responses=1, response_len=12)
    want = [plain(windowed, c, a) for c, a in zip(contexts, continuations)]
    seen = mask_dims(windowed)
    got = probe_logprobs(windowed, contexts, continuations, pad_token_id=TOK.pad_token_id)
    assert seen and set(seen) == {2}
    assert_all_close(got, want)


# ================================================================================ worked example

def test_worked_example_on_a_repeat_the_last_token_model():
    # Llama with zero attention and MLP outputs and embeddings α·I (hidden = vocab = 8): the final
    # RMSNorm maps token t to √8·e_t, so with tied weights logit_t = α√8 for the current token and
    # 0 for the others: p(next = current) = e^β / (e^β + 7), p(other) = 1 / (e^β + 7), β = α√8.
    cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, rms_norm_eps=0.0, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    alpha = 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                p.zero_()
        model.model.embed_tokens.weight.copy_(alpha * torch.eye(8))
    assert packs(model)
    beta = alpha * math.sqrt(8)
    z = math.log(math.exp(beta) + 7)
    # contexts [1, 2] and [1, 2, 3] share a row; continuation [2, 2, 5] after [.., 2]: same, same, other
    got = probe_logprobs(model, [[1, 2], [1, 2, 3]], [[2, 2, 5], [3]], pad_token_id=0)
    assert len(pack_probes([[1, 2], [1, 2, 3]], [[2, 2, 5], [3]])) == 1
    torch.testing.assert_close(got[0], torch.tensor([beta - z, beta - z, -z]), rtol=RTOL, atol=ATOL_LP)
    torch.testing.assert_close(got[1], torch.tensor([beta - z]), rtol=RTOL, atol=ATOL_LP)


# ================================================================================ entropies (return_entropy)

def plain_entropy(model, context, continuation) -> torch.Tensor:
    """The reference: entropy of the full next-token distribution at each position predicting a
    continuation token, from one unpadded forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([context + continuation])).logits[0].float(), -1)
    rows = logp[len(context) - 1: len(context) - 1 + len(continuation)]
    return -(rows.exp() * rows).sum(-1)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_entropies_match_one_plain_forward_each_and_log_probs_do_not_change(share_prefix):
    model = model_of("qwen2")
    contexts, continuations = igpo_like(seed=5)
    lps, ents = probe_logprobs(model, contexts, continuations, pad_token_id=TOK.pad_token_id, micro_batch=2,
                               share_prefix=share_prefix, return_entropy=True)
    alone = probe_logprobs(model, contexts, continuations, pad_token_id=TOK.pad_token_id, micro_batch=2,
                           share_prefix=share_prefix)
    assert isinstance(alone, list)                                   # the default return is unchanged
    assert_all_close(lps, alone)
    assert_all_close(ents, [plain_entropy(model, c, a) for c, a in zip(contexts, continuations)])


def test_entropy_worked_example_on_the_repeat_the_last_token_model():
    # the model of test_worked_example_on_a_repeat_the_last_token_model: after any token, the same
    # token has p = e^β / (e^β + 7) and each of the 7 others 1 / (e^β + 7), whatever the context, so
    # H = −p log p − 7 q log q at every position
    cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, rms_norm_eps=0.0, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    alpha = 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                p.zero_()
        model.model.embed_tokens.weight.copy_(alpha * torch.eye(8))
    beta = alpha * math.sqrt(8)
    p, q = math.exp(beta) / (math.exp(beta) + 7), 1 / (math.exp(beta) + 7)
    H = -p * math.log(p) - 7 * q * math.log(q)
    _, ents = probe_logprobs(model, [[1, 2], [1, 2, 3]], [[2, 2, 5], [3]], pad_token_id=0, return_entropy=True)
    torch.testing.assert_close(ents[0], torch.full((3,), H), rtol=RTOL, atol=ATOL_LP)
    torch.testing.assert_close(ents[1], torch.full((1,), H), rtol=RTOL, atol=ATOL_LP)


def test_entropy_on_the_naive_path_and_of_an_empty_continuation():
    # Stub: logits 2 on the current token, 0 elsewhere; Z = e² + V − 1, H = log Z − 2e²/Z
    z = math.exp(2.0) + V - 1
    lps, ents = probe_logprobs(Stub(), [[5, 6], [7]], [[6, 7], []], pad_token_id=0, return_entropy=True)
    torch.testing.assert_close(ents[0], torch.full((2,), math.log(z) - 2 * math.exp(2.0) / z), rtol=RTOL, atol=ATOL_LP)
    assert ents[1].shape == (0,) and lps[1].shape == (0,)
    assert probe_logprobs(model_of("qwen2"), [], [], pad_token_id=0, return_entropy=True) == ([], [])
