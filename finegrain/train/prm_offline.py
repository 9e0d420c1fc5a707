"""Offline implicit PRM: train π_φ on outcome-labelled responses (CE or DPO), then score responses.

The implicit PRM is a causal LM π_φ whose summed log-ratio to a frozen reference π_ref,
z = β Σ_t (log π_φ(y_t|·) − log π_ref(y_t|·)), is trained to predict response labels; every
token's β·log-ratio is then a process reward (arXiv:2412.01981; formulas in
``finegrain.losses.prm`` and ``finegrain.rewards.implicit_prm``, methods.md §2).

Where this recipe departs from ImplicitPRM's training scripts (train/tasks/run_{ce,dpo}.sh,
OpenRLHF trainers):

1. One optimizer step per batch of ``batch_size`` rows, AdamW (weight decay 0) at a constant
   learning rate with gradient-norm clipping; no warm-up, no gradient accumulation, no packing.
2. DPO batches hold whole groups (all responses with one ``group`` key), so every pair of a group
   is in one batch; a group larger than ``batch_size`` is a batch on its own. Groups without a
   label difference (no pair) are left out of DPO training. The reference trains on
   pre-built (chosen, rejected) pairs instead; here every higher-labelled response of a group is
   paired with every lower-labelled one (``implicit_prm_dpo_loss``).
3. The EOS appended to each response is scored like any other token (it is part of z).
4. After each epoch (and once before training, epoch 0) the whole training set is scored without
   gradients and its CE loss, accuracy and pair accuracy are logged, so the log shows the fit.
5. Row order per epoch is a function of (seed, epoch), and the torch RNG (dropout) is re-seeded
   from (seed, epoch) inside the epoch, so resuming from a checkpoint reproduces an
   uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from finegrain.losses.prm import implicit_prm_ce_loss, implicit_prm_dpo_loss
from finegrain.rewards.implicit_prm import STEP_SCORE_AGGREGATIONS, ImplicitPRM, implicit_step_rewards, sequence_score
from finegrain.rewards.prm_data import PRMRow, group_index, labels_tensor, to_trajectory
from finegrain.segment import SEGMENTERS, Spans, token_char_offsets
from finegrain.models.load import load_weights_into
from finegrain.train.checkpoint import find_checkpoint, save_checkpoint
from finegrain.guards import check_finite, clip_and_step
from finegrain.lock import RunLock
from finegrain.progress import Progress

LOSSES = ("ce", "dpo")
METRICS_FILE = "prm_metrics.jsonl"
INFO_FILE = "finegrain_prm.json"


# ----------------------------------------------------------------------------- batching

def row_batches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle row indices 0..n−1 with ``rng`` and cut them into batches of ``batch_size``
    (the last one may be smaller)."""
    order = list(range(n))
    rng.shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def group_batches(group_ids: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of row indices that never split a group.

    Groups are shuffled with ``rng`` and packed in that order: a group joins the current batch
    if the batch stays ≤ ``batch_size`` rows, otherwise it starts a new batch. A group larger
    than ``batch_size`` is one batch on its own. Rows keep file order inside a group.

    >>> group_batches([0, 1, 0, 2, 1, 2], 4, random.Random(0))
    [[0, 2, 3, 5], [1, 4]]
    """
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    keys = list(members)
    rng.shuffle(keys)
    batches: list[list[int]] = []
    cur: list[int] = []
    for g in keys:
        rows = members[g]
        if cur and len(cur) + len(rows) > batch_size:
            batches.append(cur)
            cur = []
        cur = cur + rows
    if cur:
        batches.append(cur)
    return batches


def groups_with_pairs(rows: Sequence[PRMRow]) -> list[int]:
    """Indices of the rows whose group has at least two different labels (a DPO pair)."""
    labels: dict = {}
    for r in rows:
        labels.setdefault(r.group, set()).add(r.label)
    return [i for i, r in enumerate(rows) if len(labels[r.group]) > 1]


# ----------------------------------------------------------------------------- scoring helpers

def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_length(traj, model, rows: Sequence[PRMRow]) -> None:
    """ValueError naming the first row longer than the model's position limit."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return
    lengths = traj.prompt_mask.sum(1) + traj.response_mask.sum(1)                   # (B,)
    for i in (lengths > limit).nonzero().flatten().tolist():
        raise ValueError(f"{rows[i].where or 'row'}: prompt + response is {int(lengths[i])} tokens, "
                         f"more than the model's max_position_embeddings ({limit})")


def _batch(signal: ImplicitPRM, tokenizer, rows: Sequence[PRMRow], segmenter):
    traj = to_trajectory(tokenizer, rows, segmenter)
    _check_length(traj, signal.prm_model, rows)
    return traj.to(_device(signal.prm_model))


@torch.no_grad()
def response_scores(signal: ImplicitPRM, tokenizer, rows: Sequence[PRMRow], *, batch_size: int,
                    segmenter="newline") -> torch.Tensor:
    """z_i = β Σ_t (log π_φ − log π_ref) over each response (EOS included): (N,) float32, on CPU."""
    out = []
    for s in range(0, len(rows), batch_size):
        traj = _batch(signal, tokenizer, rows[s:s + batch_size], segmenter)
        q = signal.log_ratio(traj)                                                   # (B, L), 0 on padding
        out.append(signal.beta * q.sum(1).float().cpu())                             # (B,)
    return torch.cat(out)


def fit_metrics(z: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor) -> dict[str, float]:
    """CE loss, accuracy and DPO pair metrics of response scores against labels.

    Args: z (N,) float, response scores; labels (N,) float in [0, 1]; group_ids (N,) long.
    Returns: 'ce_loss', 'acc', 'score_mean' (``implicit_prm_ce_loss``), and 'dpo_loss',
    'pair_acc', 'n_pairs' (``implicit_prm_dpo_loss`` over every pair of every group; dpo_loss
    is 0 when there is no pair). Each response is handed to the losses as a single "token" whose
    log-ratio is z (PRM log-prob z, reference 0, β = 1), so the losses see exactly z.
    """
    lp = z[:, None]                                                                  # (N, 1)
    ref, mask = torch.zeros_like(lp), torch.ones_like(lp, dtype=torch.bool)
    ce, m_ce = implicit_prm_ce_loss(lp, ref, mask, labels, beta=1.0)
    dpo, m_dpo = implicit_prm_dpo_loss(lp, ref, mask, labels, group_ids, beta=1.0)
    return {"ce_loss": float(ce), "acc": float(m_ce["acc"]), "score_mean": float(m_ce["score_mean"]),
            "dpo_loss": float(dpo), "pair_acc": float(m_dpo["pair_acc"]), "n_pairs": int(m_dpo["n_pairs"])}


def evaluate_prm(prm_model, ref_model, tokenizer, rows: Sequence[PRMRow], *, beta: float = 0.05,
                 batch_size: int = 8, segmenter="newline") -> dict[str, float]:
    """``fit_metrics`` of the PRM on labelled ``rows`` (no gradients; models put in eval mode
    and restored)."""
    modes = prm_model.training, ref_model.training
    prm_model.eval()
    ref_model.eval()
    try:
        z = response_scores(ImplicitPRM(prm_model, ref_model, beta=beta), tokenizer, rows,
                            batch_size=batch_size, segmenter=segmenter)
    finally:
        prm_model.train(modes[0])
        ref_model.train(modes[1])
    gids = torch.tensor(group_index([r.group for r in rows]), dtype=torch.long)
    return fit_metrics(z, labels_tensor(rows), gids)


# ----------------------------------------------------------------------------- training

def _run_key(rows: Sequence[PRMRow], **hparams) -> dict:
    """What must match for a checkpoint in out_dir to be resumed (epochs may grow)."""
    h = hashlib.sha1()
    for r in rows:
        h.update(json.dumps([r.prompt, r.response, r.label, str(r.group)]).encode())
    return {**hparams, "n_rows": len(rows), "data_sha1": h.hexdigest()[:16]}


def _read_metrics(path: Path, upto_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def train_prm(prm_model, ref_model, tokenizer, rows: Sequence[PRMRow], *, loss: str = "ce", beta: float = 0.05,
              lr: float = 1e-6, epochs: int = 1, batch_size: int = 8, grad_clip: float = 1.0, seed: int = 0,
              out_dir: str | Path, segmenter: str | Callable[[str], Spans] = "newline",
              progress: bool = True) -> dict[str, float]:
    """Train the implicit PRM ``prm_model`` in place on labelled rows; save it to ``out_dir``.

    Per batch: z_i = β Σ_t (log π_φ(y_t|·) − log π_ref(y_t|·)) over response + EOS, then
    loss 'ce': BCE(σ(z_i), l_i) averaged over rows, or 'dpo': mean over pairs (same group,
    l_w > l_l) of −log σ(z_w − z_l); see ``finegrain.losses.prm``.

    Args:
        prm_model: causal LM π_φ (trained; usually initialised from ref_model's weights).
        ref_model: frozen causal LM π_ref with the same tokenizer (never updated).
        tokenizer: the shared tokenizer (needs an EOS; saved next to the PRM).
        rows: labelled PRMRows (``read_prm_jsonl``).
        loss: 'ce' | 'dpo'. beta: β > 0. lr: AdamW learning rate (constant). epochs: total
        epochs (a resumed run trains only the missing ones). batch_size: rows per step (DPO: at
        most that many unless one group is larger). grad_clip: max gradient norm (≤ 0: off).
        seed: shuffling and dropout. segmenter: fills step_ids (not used by the loss).
        out_dir: the trained PRM (HF dir: config, safetensors, tokenizer), ``prm_metrics.jsonl``
        (one line per epoch, epoch 0 = before training), ``finegrain_prm.json`` (β, loss, ...)
        and ``checkpoints/`` (the last complete epoch: weights, optimizer; resumed from if present).
        progress: show a progress bar.
    Returns:
        the last epoch's metrics line (see docs/prm_offline.md for every key).
    Raises:
        ValueError for a bad hyperparameter, a row without label, no DPO pair at all, or a
        checkpoint in out_dir from a run with other data or hyperparameters.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {', '.join(LOSSES)}, got '{loss}'")
    for name, v in (("beta", beta), ("lr", lr)):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name}: expected a finite number > 0, got {v}")
    if not math.isfinite(grad_clip):
        raise ValueError(f"grad_clip: expected a finite number (≤ 0 turns clipping off), got {grad_clip}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if v < 1:
            raise ValueError(f"{name}: expected ≥ 1, got {v}")
    if prm_model is ref_model:
        raise ValueError("prm_model and ref_model are the same object: training would move the reference; "
                         "load the reference a second time (or deepcopy it)")
    if isinstance(segmenter, str):
        SEGMENTERS.get(segmenter)
    labels_tensor(rows)  # every row labelled
    train_idx = list(range(len(rows)))
    if loss == "dpo":
        train_idx = groups_with_pairs(rows)
        if not train_idx:
            raise ValueError("loss 'dpo': no group has responses with different labels, so there is no pair "
                             "to train on (groups default to the prompt text; set 'group' to pair responses)")
    train_rows = [rows[i] for i in train_idx]
    train_gids = group_index([r.group for r in train_rows])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = _device(prm_model)
    signal = ImplicitPRM(prm_model, ref_model, beta=beta)
    opt = torch.optim.AdamW(prm_model.parameters(), lr=lr, weight_decay=0.0)
    seg_name = segmenter if isinstance(segmenter, str) else getattr(segmenter, "__name__", "custom")
    key = _run_key(rows, loss=loss, beta=beta, lr=lr, batch_size=batch_size, grad_clip=grad_clip, seed=seed,
                   segmenter=seg_name)

    with RunLock(out_dir):  # one process per output directory
        # ---- resume from the last complete epoch, if any
        start = 0
        found = find_checkpoint(out_dir, ("prm",), quarantine=True)
        for line in found.problems:
            print(f"prm train: {line}")
        ck, state = found.path, found.state
        if ck is not None:
            diff = [k for k in key if state["run"].get(k) != key[k]]
            if diff:
                k = diff[0]
                raise ValueError(f"{out_dir}: holds a checkpoint of another run ({k}: {state['run'].get(k)!r} there, "
                                 f"{key[k]!r} now); use a new output directory or delete {ck.parent}")
            load_weights_into(prm_model, ck / "prm")
            opt.load_state_dict(state["optimizer"])
            start = state["epoch"]
        log_path = out_dir / METRICS_FILE
        history = _read_metrics(log_path, start)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in history))

        def log(row: dict) -> None:
            history.append(row)
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

        def fit(prefix: str) -> dict[str, float]:
            m = evaluate_prm(prm_model, ref_model, tokenizer, rows, beta=beta, batch_size=batch_size,
                             segmenter=segmenter)
            return {f"{prefix}/{k}": v for k, v in m.items()}

        if not history or history[-1]["epoch"] != start:  # epoch 0, or a resumed run whose log was lost
            log({"epoch": start, **fit("fit")})
        ref_model.eval()
        make_batches = (lambda rng: group_batches(train_gids, batch_size, rng)) if loss == "dpo" else \
            (lambda rng: row_batches(len(train_rows), batch_size, rng))
        n_steps = sum(len(make_batches(random.Random(f"prm/{seed}/{e}"))) for e in range(start + 1, epochs + 1))
        done = 0
        with Progress(f"PRM train ({loss})", total=n_steps, enabled=progress) as bar:
            for epoch in range(start + 1, epochs + 1):
                t0 = time.time()
                prm_model.train()
                sums: dict[str, float] = {}
                batches = make_batches(random.Random(f"prm/{seed}/{epoch}"))
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(int(hashlib.sha1(f"prm/{seed}/{epoch}".encode()).hexdigest()[:8], 16))
                    for idx in batches:
                        m = _train_step(signal, opt, tokenizer, [train_rows[i] for i in idx], loss=loss,
                                        grad_clip=grad_clip, segmenter=segmenter)
                        for k, v in m.items():
                            sums[k] = sums.get(k, 0.0) + v
                        done += 1
                        bar.update(done, n_steps, f"epoch {epoch} loss {m['loss']:.4f}")
                row = {"epoch": epoch, **{f"train/{k}": v / len(batches) for k, v in sums.items()},
                       "train/steps": len(batches), "train/rows": len(train_rows), **fit("fit"),
                       "seconds": time.time() - t0}
                log(row)
                save_checkpoint(out_dir, epoch, {"prm": (prm_model, tokenizer)},
                                {"epoch": epoch, "optimizer": opt.state_dict(), "run": key}, keep=1)
        prm_model.eval()
        prm_model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        info = {"beta": beta, "loss": loss, "segmenter": seg_name, "epochs": max(start, epochs), "lr": lr,
                "batch_size": batch_size, "seed": seed}
        (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        return dict(history[-1])


def _train_step(signal: ImplicitPRM, opt, tokenizer, rows: Sequence[PRMRow], *, loss: str, grad_clip: float,
                segmenter) -> dict[str, float]:
    """One optimizer step on one batch; returns the batch's loss metrics and pre-clip grad norm."""
    traj = _batch(signal, tokenizer, rows, segmenter)
    labels = labels_tensor(rows).to(traj.response_ids.device)                        # (B,)
    prm_lp, ref_lp = signal.logprobs(traj, grad=True)                                # (B, L) each
    if loss == "ce":
        value, metrics = implicit_prm_ce_loss(prm_lp, ref_lp, traj.response_mask, labels, beta=signal.beta)
    else:
        value, metrics = implicit_prm_dpo_loss(prm_lp, ref_lp, traj.response_mask, labels, traj.group_ids,
                                               beta=signal.beta)
    opt.zero_grad(set_to_none=True)
    check_finite("prm train: loss", value)
    value.backward()
    norm = clip_and_step(signal.prm_model.parameters(), opt, grad_clip, "prm train: update")
    return {"loss": float(value.detach()), "grad_norm": norm, **{k: float(v) for k, v in metrics.items()}}


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def score_prm(prm_model, ref_model, tokenizer, rows: Sequence[PRMRow], *, beta: float = 0.05,
              segmenter: str | Callable[[str], Spans] = "newline", aggregate: str = "min",
              batch_size: int = 8, progress: bool = False) -> list[dict]:
    """Token, step and sequence implicit rewards for each row (labels not needed).

    r_t = β (log π_φ(y_t|·) − log π_ref(y_t|·)) on every response token, EOS included;
    r_k = Σ_{t ∈ step k} r_t for each step of ``segmenter`` (EOS is in no step);
    sequence_score = aggregate_k r_k ('min' | 'sum' | 'mean' | 'last', ``sequence_score``);
    seq_sum = Σ_t r_t over all tokens = β log π_φ(y)/π_ref(y), the training score z.

    Args:
        prm_model, ref_model: causal LMs sharing ``tokenizer`` (put in eval mode, then restored).
        rows: PRMRows (``read_prm_jsonl(..., require_label=False)``).
        beta: β > 0. segmenter: step segmenter name or function. aggregate: see above.
        batch_size: rows per forward.
    Returns:
        one dict per row, in order: 'tokens' (T decoded token strings, special tokens shown),
        'token_rewards' (T floats, aligned with 'tokens'), 'step_spans' (S [start, end)
        character spans of the decoded response), 'step_rewards' (S floats; None for a step that
        holds no token's last character), 'sequence_score' (float; 0 with no step), 'seq_sum'.
    """
    seg = SEGMENTERS.get(segmenter) if isinstance(segmenter, str) else segmenter
    STEP_SCORE_AGGREGATIONS.get(aggregate)
    if not beta > 0:
        raise ValueError(f"beta: expected > 0, got {beta}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected ≥ 1, got {batch_size}")
    signal = ImplicitPRM(prm_model, ref_model, beta=beta)
    modes = prm_model.training, ref_model.training
    prm_model.eval()
    ref_model.eval()
    out: list[dict] = []
    try:
        with Progress("PRM score", total=len(rows), enabled=progress) as bar:
            for s in range(0, len(rows), batch_size):
                out.extend(_score_batch(signal, tokenizer, rows[s:s + batch_size], seg, aggregate))
                bar.update(len(out), len(rows))
    finally:
        prm_model.train(modes[0])
        ref_model.train(modes[1])
    return out


def _score_batch(signal: ImplicitPRM, tokenizer, rows: Sequence[PRMRow], seg, aggregate: str) -> list[dict]:
    traj = _batch(signal, tokenizer, rows, seg)
    mask = traj.response_mask                                                        # (B, L)
    token_r = signal.beta * signal.log_ratio(traj)                                   # (B, L), 0 on padding
    lengths = mask.sum(1).tolist()
    spans = []
    for b, n in enumerate(lengths):
        text, _ = token_char_offsets(tokenizer, traj.response_ids[b, :n].tolist())  # what step_ids saw
        spans.append(seg(text))
    S = max(1, max(len(sp) for sp in spans))  # S ≥ 1: sequence_score("min") fails on (B, 0)
    step_r, step_mask = implicit_step_rewards(token_r, mask, traj.step_ids, S)        # (B, S) each
    seq = sequence_score(step_r, step_mask, aggregate)                               # (B,)
    seq_sum = token_r.sum(1)                                                         # (B,)
    out = []
    for b, n in enumerate(lengths):
        ids = traj.response_ids[b, :n].tolist()
        k = len(spans[b])
        out.append({
            "tokens": [tokenizer.decode([i]) for i in ids],
            "token_rewards": token_r[b, :n].tolist(),
            "step_spans": [list(sp) for sp in spans[b]],
            "step_rewards": [v if ok else None for v, ok in zip(step_r[b, :k].tolist(), step_mask[b, :k].tolist())],
            "sequence_score": float(seq[b]),
            "seq_sum": float(seq_sum[b]),
        })
    return out
