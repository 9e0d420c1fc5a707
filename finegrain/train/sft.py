"""Supervised warm start: next-token cross-entropy on (prompt, worked solution) pairs.

The loss covers the solution tokens and the final EOS only (the prompt is context), averaged
over all such tokens of the batch.
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable

import torch

from finegrain.models.logprobs import response_logits


def encode_pairs(tokenizer, prompts: list[str], solutions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize prompt + solution + EOS, right-padded.

    Returns input_ids (B, T) long, attention_mask (B, T) bool, target_mask (B, T) bool (True on
    solution tokens and the EOS: the positions that are trained on).
    """
    rows, tmasks = [], []
    for p, s in zip(prompts, solutions):
        p_ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        s_ids = tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p_ids + s_ids)
        tmasks.append([False] * len(p_ids) + [True] * len(s_ids))
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    am = torch.zeros(len(rows), T, dtype=torch.bool)
    tm = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, tmasks)):
        ids[i, :len(r)] = torch.tensor(r)
        am[i, :len(r)] = True
        tm[i, :len(r)] = torch.tensor(m)
    return ids, am, tm


def sft_loss(model, ids: torch.Tensor, am: torch.Tensor, tm: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over target_mask positions. ids/am/tm (B, T)."""
    T = ids.shape[1]
    logits = response_logits(model, ids, am, T - 1)  # (B, T-1, V) predicting tokens 1..T-1
    targets = ids[:, 1:]
    mask = tm[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                           reduction="none").view_as(targets)
    return (ce * mask).sum() / mask.sum().clamp(min=1)


def run_sft(model, tokenizer, pairs: list[tuple[str, str]], *, epochs: int, batch_size: int, lr: float,
            warmup_steps: int, seed: int, progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Train ``model`` in place on (prompt, solution) pairs. Returns metrics (final loss, steps, seconds)."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    total = epochs * math.ceil(len(pairs) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)) *
                                              0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total)))))
    model.train()
    t0, step, ema = time.time(), 0, None
    for _ in range(epochs):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for s in range(0, len(order), batch_size):
            batch = [pairs[i] for i in order[s:s + batch_size]]
            ids, am, tm = encode_pairs(tokenizer, [p for p, _ in batch], [y for _, y in batch])
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
