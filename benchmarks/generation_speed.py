"""Generation speed: finegrain's vLLM sampler against its HF sampler, and the cost of a weight sync.

    python benchmarks/generation_speed.py [--models tiny,50m] [--batches 128,512] [--samples 8] \\
        [--prompt-len 32] [--max-new-tokens 64] [--reps 2] [--threads 2] [--kv-cache-gib 4] [--engines hf,vllm]

Run it where vllm imports (on CPU: the virtualenv of .ci/vllm.sh, ``.venv-vllm/bin/python``);
without vllm only the HF rows are measured.

Workload: ``batch`` rows = batch / ``--samples`` prompts of ``--prompt-len`` random tokens, each
continued ``--samples`` times (the rollout shape: prompts x group size), ``--max-new-tokens`` new
tokens, temperature 1, top-p 1, no top-k, log-probs on, the same prompts and seed for both
samplers. Models, random weights built from configs (nothing is downloaded), float32, over a
104-symbol character vocabulary: ``tiny`` = the demo's shape (``finegrain.models.tiny`` preset
"tiny", ~0.9M parameters with the demo vocabulary) and ``50m`` = a Qwen2 of hidden 512, 12 layers,
MLP 2048, 8 heads (the "50m" preset, ~50M parameters). Random weights rarely
emit EOS, so rows run to the limit; tokens/s counts the tokens actually returned.

Per (model, sampler, batch): ``start`` = building the sampler (the vLLM engine start: checkpoint
written, engine loaded), ``first`` = the first ``sample`` call, ``median`` = median of ``--reps``
further calls, tokens/s = returned tokens / median. Per model: ``sync_weights()`` median of
``--reps`` calls (the HF sampler's is a no-op). Every row carries the torch thread count and the
1-minute load average when it was measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import string
import time

MODELS = ("tiny", "50m")  # presets of finegrain.models.tiny


def build_model(name: str, tok):
    """A float32 causal LM with random (seeded) weights: the ``name`` preset of ``finegrain.models.tiny``."""
    from finegrain.models.tiny import tiny_causal_lm

    return tiny_causal_lm(tok, family="qwen2", size=name, max_positions=2048).eval()


def prompts(tok, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """``count`` prompts: BOS then ``length`` - 1 random symbol tokens."""
    import random

    rng = random.Random(seed)
    symbols = [tok.convert_tokens_to_ids(c) for c in string.digits + "+-*= "]
    return [[tok.bos_token_id] + [rng.choice(symbols) for _ in range(length - 1)] for _ in range(count)]


def conditions() -> dict:
    import torch

    return {"threads": torch.get_num_threads(), "load1": round(os.getloadavg()[0], 2)}


def time_sampler(engine: str, model, tok, batch: int, a) -> dict:
    """start / first / median seconds and tokens/s of one sampler on one batch size."""
    from finegrain.sampling import SAMPLERS, SamplingParams

    opts = {"kv_cache_gib": a.kv_cache_gib} if engine == "vllm" else {}
    t0 = time.perf_counter()
    s = SAMPLERS.get(engine)(model, tok, max_batch=batch, **opts)
    start = time.perf_counter() - t0
    sp = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=a.max_new_tokens)
    pre = prompts(tok, batch // a.samples, a.prompt_len)
    t0 = time.perf_counter()
    out = s.sample(pre, a.samples, sp, seed=0)
    first = time.perf_counter() - t0
    times, tokens = [], 0
    for r in range(a.reps):
        t0 = time.perf_counter()
        out = s.sample(pre, a.samples, sp, seed=r + 1)
        times.append(time.perf_counter() - t0)
        tokens = sum(map(len, out.token_ids))
    med = statistics.median(times)
    row = {"engine": engine, "batch": batch, "start_s": start, "first_s": first, "median_s": med,
           "tokens": tokens, "tok_per_s": tokens / med, **conditions()}
    if engine == "vllm":
        s.close()
    return row


def time_sync(model, tok, a) -> dict:
    """Median seconds of ``VLLMSampler.sync_weights()`` on ``model``."""
    import torch

    from finegrain.sampling import SAMPLERS

    s = SAMPLERS.get("vllm")(model, tok, max_batch=8, kv_cache_gib=min(a.kv_cache_gib, 1.0))
    times = []
    for _ in range(max(a.reps, 3)):
        with torch.no_grad():  # a fake optimizer step, so every sync moves new weights
            next(model.parameters()).add_(1e-3)
        t0 = time.perf_counter()
        s.sync_weights()
        times.append(time.perf_counter() - t0)
    s.close()
    return {"sync_s": statistics.median(times), **conditions()}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,50m")
    ap.add_argument("--batches", default="128,512")
    ap.add_argument("--samples", type=int, default=8, help="continuations per prompt (group size)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2, help="timed calls after the first (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (finegrain.threads)")
    ap.add_argument("--kv-cache-gib", type=float, default=4.0, help="vLLM CPU KV cache (GiB)")
    ap.add_argument("--engines", default="hf,vllm")
    a = ap.parse_args(argv)

    import torch

    from finegrain.models.tokenizer import char_tokenizer
    from finegrain.threads import configure_threads

    configure_threads(a.threads)
    engines = a.engines.split(",")
    if "vllm" in engines:
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("vllm does not import here: measuring the HF sampler only (see docs/engines.md)")
            engines = [e for e in engines if e != "vllm"]
    tok = char_tokenizer(string.printable)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load before {os.getloadavg()}")
    print("| model | params | sampler | batch (rows) | start s | first batch s | median s | tokens/s | threads | load1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for name in a.models.split(","):
        model = build_model(name, tok)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for batch in map(int, a.batches.split(",")):
            for engine in engines:
                row = {"model": name, "params_m": params, **time_sampler(engine, model, tok, batch, a)}
                rows.append(row)
                print(f"| {name} | {params:.1f}M | {engine} | {batch} | {row['start_s']:.1f} | {row['first_s']:.2f} | "
                      f"{row['median_s']:.2f} | {row['tok_per_s']:.0f} | {row['threads']} | {row['load1']} |", flush=True)
        if "vllm" in engines:
            srow = {"model": name, "params_m": params, **time_sync(model, tok, a)}
            rows.append(srow)
            print(f"| {name} | {params:.1f}M | sync_weights | - | - | - | {srow['sync_s']:.3f} | - | {srow['threads']} | "
                  f"{srow['load1']} |", flush=True)
    print(f"load after {os.getloadavg()}; samples/prompt {a.samples}, prompt {a.prompt_len}, "
          f"max_new_tokens {a.max_new_tokens}, reps {a.reps}")
    return rows


if __name__ == "__main__":
    main()
