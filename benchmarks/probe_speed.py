"""Speed of the probe primitive (``finegrain.models.probe.probe_logprobs``): shared prefixes against the naive paths.

    python benchmarks/probe_speed.py [--models tiny,50m] [--probes 4,8] [--responses 64] [--prompt-len 32] \\
        [--response-len 192] [--answer-len 4] [--micro-batch 16] [--reps 3] [--threads 1] [--no-one-by-one]

Workload (IGPO-shaped, random tokens): ``--responses`` responses of ``--response-len`` tokens after
their own ``--prompt-len``-token prompt, each probed K times (``--probes``): context = prompt +
response[:n_k] + the probe prefix "A: ", continuation = a ``--answer-len``-token answer, with n_0 = 0
and K−1 distinct random cut points. Models, random weights built from configs (nothing is
downloaded): ``tiny`` = the demo's shape (``finegrain.models.tiny``, Qwen2 ``tiny`` preset) and
``50m`` = a Qwen2 of hidden 512, 12 layers, MLP 2048 (~50M parameters), both over a 104-symbol
character vocabulary, float32, sdpa attention.

Three ways to score the same probes, all the library's own calls:
    one-by-one  ``probe_logprobs`` on one probe at a time (a forward per probe)
    naive       ``probe_logprobs(share_prefix=False)``: each probe its own left-padded row,
                ``--micro-batch`` rows per forward
    shared      ``probe_logprobs`` (default): the probes of a response packed into one row
                (``pack_probes``), ``--micro-batch`` rows per forward

Printed: a markdown table (real tokens run: Σ_n |x_n| + |c_n| naive, Σ packed-row tokens shared;
forward passes; median seconds of ``--reps`` timed calls after one warm-up call; speed-ups; the
largest |Δ log-prob| of naive and one-by-one against shared), the torch threads (``--threads``,
set through ``finegrain.threads.configure_threads``) and the load average before and after.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import string
import time

MODELS = ("tiny", "50m")  # presets of finegrain.models.tiny


def build_model(name: str, tok):
    """A float32 causal LM with random (seeded) weights: the ``name`` preset of ``finegrain.models.tiny``."""
    from finegrain.models.tiny import tiny_causal_lm

    return tiny_causal_lm(tok, family="qwen2", size=name, max_positions=2048).eval()


def workload(tok, *, responses: int, K: int, prompt_len: int, response_len: int, answer_len: int, seed: int):
    """IGPO-shaped probes: K per response (module docstring). Returns (contexts, continuations)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    first = len(tok.all_special_ids)                                          # ordinary symbols only
    rand = lambda n: torch.randint(first, len(tok), (n,), generator=g).tolist()
    prefix = tok("A: ", add_special_tokens=False)["input_ids"]
    contexts, continuations = [], []
    for _ in range(responses):
        prompt, response, answer = [tok.bos_token_id] + rand(prompt_len - 1), rand(response_len), rand(answer_len)
        cuts = [0] + sorted(torch.randperm(response_len - 1, generator=g)[:K - 1].add(1).tolist())
        for n in cuts:
            contexts.append(prompt + response[:n] + prefix)
            continuations.append(answer)
    return contexts, continuations


def timed(fn, reps: int) -> tuple[float, object]:
    """Median seconds of ``reps`` calls after one warm-up call, and the last result."""
    out = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b) if x.numel())


def main(argv=None) -> list[dict]:
    """Run the table; returns its rows (for tests)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,50m", help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument("--probes", default="4,8", help="comma-separated K values (probes per response)")
    ap.add_argument("--responses", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--response-len", type=int, default=192)
    ap.add_argument("--answer-len", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--no-one-by-one", action="store_true", help="skip the one-probe-per-call loop (slowest)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    from finegrain.threads import configure_threads, prepare_openmp

    prepare_openmp()
    threads = configure_threads(a.threads)
    import torch

    from finegrain.models.probe import pack_probes, packs, probe_logprobs
    from finegrain.models.tokenizer import char_tokenizer

    tok = char_tokenizer(string.printable)
    load_before = os.getloadavg()
    rows = []
    for name in a.models.split(","):
        model = build_model(name, tok)
        params = sum(p.numel() for p in model.parameters())
        for K in (int(k) for k in a.probes.split(",")):
            contexts, continuations = workload(tok, responses=a.responses, K=K, prompt_len=a.prompt_len,
                                               response_len=a.response_len, answer_len=a.answer_len, seed=a.seed)
            N, pad = len(contexts), tok.pad_token_id
            packed = pack_probes(contexts, continuations)
            run = lambda **kw: probe_logprobs(model, contexts, continuations, pad_token_id=pad,
                                              micro_batch=a.micro_batch, **kw)
            t_shared, shared = timed(lambda: run(), a.reps)
            t_naive, naive = timed(lambda: run(share_prefix=False), a.reps)
            rec = dict(model=name, params=params, K=K, probes=N, packs=packs(model),
                       naive_tokens=sum(len(c) + len(x) for c, x in zip(contexts, continuations)),
                       shared_tokens=sum(len(r.tokens) for r in packed),
                       naive_forwards=math.ceil(N / a.micro_batch), shared_forwards=math.ceil(len(packed) / a.micro_batch),
                       naive_s=t_naive, shared_s=t_shared, naive_diff=max_diff(naive, shared),
                       one_by_one_s=None, one_by_one_diff=None)
            if not a.no_one_by_one:
                one = lambda: [probe_logprobs(model, [c], [x], pad_token_id=pad)[0]
                               for c, x in zip(contexts, continuations)]
                rec["one_by_one_s"], single = timed(one, max(1, a.reps // 3))
                rec["one_by_one_diff"] = max_diff(single, shared)
            rows.append(rec)
            print(f"  {name} K={K}: naive {t_naive:.3f} s, shared {t_shared:.3f} s", flush=True)
    load_after = os.getloadavg()

    fmt = lambda x, spec: "—" if x is None else format(x, spec)
    print()
    print("| model | params | K | probes | tokens naive → shared | forwards naive → shared | one-by-one s | "
          "naive s | shared s | naive / shared | one-by-one / shared | max abs Δ lp (naive, one-by-one) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio_one = None if r["one_by_one_s"] is None else r["one_by_one_s"] / r["shared_s"]
        print(f"| {r['model']}{'' if r['packs'] else ' (no packing)'} | {r['params'] / 1e6:.1f}M | {r['K']} | "
              f"{r['probes']} | {r['naive_tokens']:,} → {r['shared_tokens']:,} | "
              f"{r['naive_forwards']} → {r['shared_forwards']} | {fmt(r['one_by_one_s'], '.2f')} | "
              f"{r['naive_s']:.2f} | {r['shared_s']:.2f} | {r['naive_s'] / r['shared_s']:.2f}x | "
              f"{fmt(ratio_one, '.2f')}{'' if ratio_one is None else 'x'} | "
              f"{r['naive_diff']:.1e}, {fmt(r['one_by_one_diff'], '.1e')} |")
    print()
    print(f"workload: {a.responses} responses x K probes, prompt {a.prompt_len}, response {a.response_len}, "
          f"probe prefix 'A: ' + answer {a.answer_len} tokens; micro-batch {a.micro_batch}; median of {a.reps} "
          f"(one-by-one: {max(1, a.reps // 3)}) after a warm-up")
    print(f"torch {torch.__version__}, {threads} torch threads, {os.cpu_count()} CPUs; "
          f"load average before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}")
    return rows


if __name__ == "__main__":
    main()
