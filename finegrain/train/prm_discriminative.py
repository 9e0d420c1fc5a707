"""Offline discriminative PRM: train a step classifier on step-labelled responses (BCE), save it atomically.

Per batch of rows (``finegrain.models.step_classifier``, ``finegrain.losses.disc_prm``):

    s_{ik} = w · h_{e(i,k)} + b                 logit of step k of row i (read at its last token)
    ℓ      = mean_{(i,k) labelled} BCE(σ(s_{ik}), y_{ik})    y hard (0/1) or soft (in [0, 1])

Label sources (``finegrain.rewards.disc_prm_data``): a task's exact labels, ProcessBench /
PRM800K-style JSONL, Monte-Carlo rollouts (Math-Shepherd, arXiv:2312.08935), optionally HRM's
merged steps (methods.md §19).

Departures from Math-Shepherd's and PRM800K's training recipes:

1. AdamW at a constant learning rate, weight decay 0, gradient-norm clipping; no warm-up, no
   packing, no gradient accumulation. One optimizer step per batch of ``batch_size`` rows.
2. The loss is the mean over every labelled step of the batch (steps after ProcessBench's first
   wrong step are unlabelled and left out).
3. After each epoch (and before training, epoch 0) the training rows, and the held-out rows if
   given, are scored without gradients: BCE, step accuracy, AUROC (positives: labels ≥ ½).
4. Not resumable: the output is written once, at the end, to a temporary directory beside
   ``out_dir`` and renamed onto it, so an interrupted run leaves the previous output (or none),
   never half a model. Row order is a function of (seed, epoch) and the torch RNG is seeded from
   (seed, epoch), so a rerun with the same settings gives the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

from finegrain.eval.process import auroc
from finegrain.guards import check_finite, clip_and_step
from finegrain.losses.disc_prm import step_bce_loss
from finegrain.models.step_classifier import INFO_FILE, StepClassifier, collate, encode_steps, is_disc_prm_dir
from finegrain.progress import Progress
from finegrain.rewards.disc_prm_data import StepRow

METRICS_FILE = "prm_metrics.json"


def _labels(rows: Sequence[StepRow], S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) float labels (0 where unlabelled) and (B, S) bool labelled-mask."""
    y = torch.zeros(len(rows), S)
    m = torch.zeros(len(rows), S, dtype=torch.bool)
    for i, r in enumerate(rows):
        for k, lab in enumerate(r.labels):
            if lab is not None:
                y[i, k], m[i, k] = lab, True
    return y, m


class _Encoded:
    """Rows tokenized once for the PRM (``encode_steps``), batched on demand."""

    def __init__(self, model: StepClassifier, tokenizer, rows: Sequence[StepRow]):
        self.model, self.rows = model, list(rows)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.enc = [encode_steps(tokenizer, r.prompt, r.steps) for r in self.rows]
        limit = model.max_positions
        for r, (ids, _) in zip(self.rows, self.enc):
            if limit is not None and len(ids) > limit:
                raise ValueError(f"{r.where or 'row'}: prompt + steps are {len(ids)} PRM tokens, more than the "
                                 f"PRM's max_position_embeddings ({limit})")

    def batch(self, idx: Sequence[int]):
        """(input_ids, attention_mask, read_pos, labels, labelled mask) of rows ``idx``, on the model's device."""
        ids, am, pos, exists = collate([self.enc[i] for i in idx], self.pad)
        y, m = _labels([self.rows[i] for i in idx], pos.shape[1])
        d = self.model.device
        return ids.to(d), am.to(d), pos.to(d), y.to(d), (m & exists).to(d)


@torch.no_grad()
def evaluate(model: StepClassifier, data: _Encoded, *, batch_size: int) -> dict[str, float]:
    """BCE, step accuracy and AUROC of the PRM on every labelled step of ``data`` (eval mode, restored).

    'bce' = ``step_bce_loss`` over all labelled steps; 'step_acc' = fraction with (s > 0) = (y > ½);
    'step_auroc' = AUROC of s with positives y ≥ ½ (NaN without both kinds); 'n_steps'.
    """
    was = model.training
    model.eval()
    logits, labels = [], []
    try:
        for s in range(0, len(data.rows), batch_size):
            ids, am, pos, y, m = data.batch(range(s, min(s + batch_size, len(data.rows))))
            out = model(ids, am, pos)                                                # (b, S)
            logits.append(out[m].cpu())
            labels.append(y[m].cpu())
    finally:
        model.train(was)
    s_all, y_all = torch.cat(logits), torch.cat(labels)                              # (N,) each
    mask = torch.ones(1, len(s_all), dtype=torch.bool)
    loss, m = step_bce_loss(s_all[None], y_all[None], mask)
    return {"bce": float(loss), "step_acc": float(m["acc"]), "prob_mean": float(m["prob_mean"]),
            "step_auroc": auroc(s_all.tolist(), (y_all >= 0.5).tolist()), "n_steps": int(m["n_steps"])}


def json_safe(value):
    """``value`` with every non-finite float replaced by None (strict JSON: an AUROC without both kinds)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` onto ``out_dir`` (an earlier output there is moved aside first, then removed)."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old)


def check_replaceable_dir(out_dir: str | Path, is_ours, what: str) -> Path:
    """``out_dir`` may not exist, be empty, or hold an earlier output of this kind (``is_ours(path)``;
    it is replaced); anything else is refused (ValueError naming ``what``) so that no unrelated
    directory is ever overwritten."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_ours(out))):
        raise ValueError(f"--out: '{out}' exists and is not an empty directory or {what}; use a new directory")
    return out


def staging_dir(out_dir: Path) -> Path:
    """An empty temporary directory beside ``out_dir`` to write the output into (``replace_dir`` then
    moves it onto ``out_dir``); a stale one from a killed run of this process id is removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def check_disc_out_dir(out_dir: str | Path) -> Path:
    """``check_replaceable_dir`` for a discriminative PRM."""
    return check_replaceable_dir(out_dir, is_disc_prm_dir,
                                 f"a discriminative PRM (no {INFO_FILE} with kind 'discriminative')")


def train_disc_prm(model: StepClassifier, tokenizer, rows: Sequence[StepRow], *, out_dir: str | Path,
                   lr: float = 1e-3, epochs: int = 1, batch_size: int = 16, grad_clip: float = 1.0, seed: int = 0,
                   eval_rows: Sequence[StepRow] = (), info: dict | None = None, progress: bool = True,
                   log=None) -> dict:
    """Train ``model`` in place on ``rows`` and save it to ``out_dir`` (module docstring).

    Args:
        model: a StepClassifier (backbone + zero head), trained in place.
        tokenizer: the PRM's tokenizer (saved with it).
        rows: StepRows with at least one labelled step overall.
        out_dir: output directory (``check_disc_out_dir``): the backbone LM, ``head.safetensors``,
            the tokenizer, ``finegrain_prm.json`` (``info`` + settings + kind) and
            ``prm_metrics.json`` ({"epochs": one row per epoch, epoch 0 before training;
            "final": the last row; "settings"}).
        lr, epochs, batch_size, grad_clip (≤ 0: off), seed: as named.
        eval_rows: held-out rows, scored after each epoch as ``eval/*``.
        info: extra fields for ``finegrain_prm.json`` (segmenter, label source, ...).
        progress: progress bar; log: fn(str) for one line per epoch (None: silent).
    Returns:
        the last epoch's metrics row (keys in docs/prm_offline.md).
    """
    for name, v in (("lr", lr),):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name}: expected a finite number > 0, got {v}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if v < 1:
            raise ValueError(f"{name}: expected >= 1, got {v}")
    if not rows:
        raise ValueError("disc PRM train: no rows")
    n_labelled = sum(lab is not None for r in rows for lab in r.labels)
    if n_labelled == 0:
        raise ValueError("disc PRM train: no row has a labelled step")
    out_dir = check_disc_out_dir(out_dir)
    train = _Encoded(model, tokenizer, rows)
    held = _Encoded(model, tokenizer, eval_rows) if eval_rows else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    settings = {"lr": lr, "epochs": epochs, "batch_size": batch_size, "grad_clip": grad_clip, "seed": seed,
                "n_rows": len(rows), "n_labelled_steps": n_labelled, "n_eval_rows": len(eval_rows)}
    history: list[dict] = []

    def fit_row(epoch: int, extra: dict) -> dict:
        row = {"epoch": epoch, **extra, **{f"fit/{k}": v for k, v in evaluate(model, train, batch_size=batch_size).items()}}
        if held is not None:
            row.update({f"eval/{k}": v for k, v in evaluate(model, held, batch_size=batch_size).items()})
        history.append(row)
        if log is not None:
            keys = [k for k in ("fit/bce", "fit/step_auroc", "eval/step_auroc") if k in row]
            log(f"epoch {epoch}: " + "  ".join(f"{k} {row[k]:.4f}" for k in keys))
        return row

    fit_row(0, {})
    device = model.device
    n_batches = math.ceil(len(rows) / batch_size)
    with Progress("disc PRM train", total=n_batches * epochs, enabled=progress) as bar:
        for epoch in range(1, epochs + 1):
            t0 = time.time()
            model.train()
            order = list(range(len(rows)))
            random.Random(f"disc_prm/{seed}/{epoch}").shuffle(order)
            sums: dict[str, float] = {}
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(int(hashlib.sha1(f"disc_prm/{seed}/{epoch}".encode()).hexdigest()[:8], 16))
                for j, s in enumerate(range(0, len(order), batch_size)):
                    ids, am, pos, y, m = train.batch(order[s:s + batch_size])
                    loss, met = step_bce_loss(model(ids, am, pos), y, m)
                    opt.zero_grad(set_to_none=True)
                    check_finite("disc PRM train: loss", loss)
                    loss.backward()
                    gnorm = clip_and_step(model.parameters(), opt, grad_clip, "disc PRM train: update")
                    for k, v in (("loss", float(loss.detach())), ("grad_norm", gnorm), ("acc", float(met["acc"]))):
                        sums[k] = sums.get(k, 0.0) + v
                    bar.update((epoch - 1) * n_batches + j + 1, info=f"epoch {epoch} loss {float(loss.detach()):.4f}")
            n = math.ceil(len(order) / batch_size)
            fit_row(epoch, {**{f"train/{k}": v / n for k, v in sums.items()}, "train/steps": n,
                            "seconds": time.time() - t0})
    model.eval()
    tmp = staging_dir(out_dir)
    model.save(tmp, tokenizer, {**(info or {}), **settings})
    report = json_safe({"epochs": history, "final": history[-1], "settings": settings})
    (tmp / METRICS_FILE).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    replace_dir(tmp, out_dir)
    return dict(history[-1])
