"""Supervised warm start: next-token cross-entropy on (prompt, worked solution) pairs, and the
cached tiny model trained from scratch that way (``warm_started_tiny``).

The loss covers the solution tokens and the final EOS only (the prompt is context), averaged
over all such tokens of the batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import torch

from finegrain.lock import RunLock
from finegrain.models.load import load_causal_lm, load_tokenizer, resolve_device
from finegrain.models.logprobs import response_logits
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.progress import Progress


def _pieces(text: str, untrained: list[tuple[int, int]]) -> list[tuple[str, bool]]:
    """``text`` cut at the untrained character spans: [(piece, trained), ...] in order.

    >>> _pieces("a<r>x</r>b", [(1, 9)])
    [('a', True), ('<r>x</r>', False), ('b', True)]
    """
    out, at = [], 0
    for a, b in sorted(untrained):
        if a > at:
            out.append((text[at:a], True))
        out.append((text[a:b], False))
        at = b
    if at < len(text) or not out:
        out.append((text[at:], True))
    return out


def encode_row(tokenizer, prompt: str, solution: str, untrained: list[tuple[int, int]] = ()) -> tuple[list[int], list[bool]]:
    """Token ids of prompt + solution + EOS and, per token, whether it is trained on (solution
    tokens outside the ``untrained`` character spans, and the EOS; see ``encode_pairs``)."""
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    s_ids, s_mask = [], []
    for piece, trained in _pieces(solution, list(untrained)):
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
        s_ids += ids
        s_mask += [trained] * len(ids)
    return p_ids + s_ids + [tokenizer.eos_token_id], [False] * len(p_ids) + s_mask + [True]


def pad_rows(rows: list[tuple[list[int], list[bool]]], pad_token_id: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``encode_row`` outputs: input_ids (B, T) long, attention_mask (B, T) bool,
    target_mask (B, T) bool, T = the longest row."""
    T = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    am = torch.zeros(len(rows), T, dtype=torch.bool)
    tm = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (r, m) in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        am[i, :len(r)] = True
        tm[i, :len(r)] = torch.tensor(m)
    return ids, am, tm


def encode_pairs(tokenizer, prompts: list[str], solutions: list[str],
                 untrained: list[list[tuple[int, int]]] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize prompt + solution + EOS, right-padded.

    ``untrained[i]`` lists character spans of solution i that are context, not targets (the
    environment's observations inside a tool-use trace). Each piece is tokenized on its own, as
    the episode runner tokenizes model turns and observations separately at RL time.

    Returns input_ids (B, T) long, attention_mask (B, T) bool, target_mask (B, T) bool (True on
    solution tokens outside ``untrained`` and the EOS: the positions that are trained on).
    """
    rows = [encode_row(tokenizer, p, s, untrained[i] if untrained else []) for i, (p, s) in enumerate(zip(prompts, solutions))]
    return pad_rows(rows, tokenizer.pad_token_id)


def sft_loss(model, ids: torch.Tensor, am: torch.Tensor, tm: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over target_mask positions. ids/am/tm (B, T)."""
    T = ids.shape[1]
    logits = response_logits(model, ids, am, T - 1)  # (B, T-1, V) predicting tokens 1..T-1
    targets = ids[:, 1:]
    mask = tm[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                           reduction="none").view_as(targets)
    return (ce * mask).sum() / mask.sum().clamp(min=1)


def batch_order(lengths: list[int], batch_size: int, rng: random.Random, group_by_length: bool = False
                ) -> list[list[int]]:
    """One epoch's batches of row indices.

    Plain: a shuffle cut into consecutive batches. ``group_by_length`` (as Hugging Face
    Trainer's ``group_by_length``): the shuffle is cut into chunks of 50 batches, each chunk is
    sorted by length (longest first) and cut into batches, and the batches are shuffled, so a
    batch holds rows of similar length (little padding) and the order of batches stays random.
    Every row appears exactly once either way.

    >>> sorted(map(len, batch_order([5, 1, 5, 1], 2, random.Random(0), group_by_length=True)))
    [2, 2]
    >>> sorted(sorted([5, 1, 5, 1][i] for i in b) for b in batch_order([5, 1, 5, 1], 2, random.Random(0), True))
    [[1, 1], [5, 5]]
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    chunk, batches = 50 * batch_size, []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: -lengths[i])
        batches += [part[s:s + batch_size] for s in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def run_sft(model, tokenizer, pairs: list[tuple], *, epochs: int, batch_size: int, lr: float,
            warmup_steps: int, seed: int, progress: Callable[[int, int, float], None] | None = None,
            group_by_length: bool = False) -> dict:
    """Train ``model`` in place on (prompt, solution) or (prompt, solution, untrained spans)
    tuples (see ``encode_pairs``), in batches of ``batch_order``. Returns metrics (final loss,
    steps, seconds)."""
    # tokenized once: tokenizing every piece of every trace again each epoch cost as much as the
    # forward and backward passes of the tiny models
    rows = [encode_row(tokenizer, b[0], b[1], b[2] if len(b) > 2 else []) for b in pairs]
    return run_sft_rows(model, tokenizer.pad_token_id, rows, epochs=epochs, batch_size=batch_size, lr=lr,
                        warmup_steps=warmup_steps, seed=seed, progress=progress, group_by_length=group_by_length)


def run_sft_rows(model, pad_token_id: int, rows: list[tuple[list[int], list[bool]]], *, epochs: int,
                 batch_size: int, lr: float, warmup_steps: int, seed: int,
                 progress: Callable[[int, int, float], None] | None = None, group_by_length: bool = False) -> dict:
    """``run_sft`` on rows already encoded as (token ids, trained-on mask) (``encode_row``'s
    output; a caller with its own prompt encoding, e.g. a chat template, builds them itself):
    AdamW (β 0.9, 0.95, weight decay 0.01), linear warm-up then cosine decay, gradient-norm clip 1."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    total = epochs * math.ceil(len(rows) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)) *
                                              0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total)))))
    model.train()
    t0, step, ema = time.time(), 0, None
    lengths = [len(r) for r, _ in rows]
    for _ in range(epochs):
        for batch in batch_order(lengths, batch_size, rng, group_by_length):
            ids, am, tm = pad_rows([rows[i] for i in batch], pad_token_id)
            loss = sft_loss(model, ids.to(device), am.to(device), tm.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if progress:
                progress(step, total, ema)
    model.eval()
    return {"sft/loss": ema, "sft/steps": step, "sft/seconds": time.time() - t0}


def sft_cache_key(payload: dict) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def warm_started_tiny(task, task_kwargs: dict, model_cfg, sft_cfg, log=print):
    """A tiny model for ``task`` trained from scratch on the task's worked solutions, cached on disk.

    The cache key hashes the task, model and SFT settings, so any change retrains; a second call
    with the same settings loads the saved directory. Returns (model, tokenizer, info dict).
    """
    payload = {"task": task.name, "task_kwargs": task_kwargs, "family": model_cfg.family,
               "size": model_cfg.size, "sft": {k: v for k, v in vars(sft_cfg).items() if k != "cache_dir"}, "v": 1}
    cache = Path(os.environ.get("FINEGRAIN_CACHE", sft_cfg.cache_dir)) / f"sft-{task.name}-{sft_cache_key(payload)}"
    device = resolve_device(model_cfg.device)
    with RunLock(cache, wait=True):  # two runs wanting the same cache: one builds it, the other waits
        if (cache / "done.json").exists():
            tok = load_tokenizer(cache)
            model = load_causal_lm(str(cache), model_cfg.dtype, model_cfg.device, where="sft cache")
            info = json.loads((cache / "done.json").read_text())
            log(f"loaded warm-started model from cache {cache}")
            return model, tok, {**info, "cached": True, "path": str(cache)}
        if hasattr(task, "sft_corpus"):
            corpus = task.sft_corpus(sft_cfg.n_examples, sft_cfg.flawed_fraction, sft_cfg.seed)
        else:  # a task without flawed solutions: its gold worked solutions
            corpus = [(ex, ex.solution) for ex in task.examples("train", sft_cfg.n_examples) if ex.solution]
            if not corpus:
                raise ValueError(f"task '{task.name}': no worked solutions to warm-start a tiny model; set model.path")
            if sft_cfg.flawed_fraction > 0:
                log(f"task '{task.name}' has no flawed solutions; sft.flawed_fraction is ignored")
        spans = getattr(task, "observation_spans", None)  # tool-use traces: observations are context only
        pairs = [(task.format_prompt(ex), sol, spans(sol) if spans else []) for ex, sol in corpus]
        alphabet = sorted(set("".join(p + s for p, s, _ in pairs)) | set("0123456789"))
        tok = char_tokenizer(alphabet)
        model = tiny_causal_lm(tok, family=model_cfg.family, size=model_cfg.size, seed=sft_cfg.seed).to(device)
        with Progress("SFT warm start", total=None) as bar:
            info = run_sft(model, tok, pairs, epochs=sft_cfg.epochs, batch_size=sft_cfg.batch_size, lr=sft_cfg.lr,
                           warmup_steps=sft_cfg.warmup_steps, seed=sft_cfg.seed,
                           group_by_length=sft_cfg.group_by_length,
                           progress=lambda s, n, l: bar.update(s, n, f"loss {l:.3f}"))
        cache.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cache)
        tok.save_pretrained(cache)
        (cache / "done.json").write_text(json.dumps(info))
        log(f"SFT done in {info['sft/seconds']:.0f}s (loss {info['sft/loss']:.3f}); cached at {cache}")
        return model, tok, {**info, "cached": False, "path": str(cache)}
