"""Plain-Python loop references used as oracles for the vectorized code (test kind (b)).

Everything here works on nested lists of Python floats/bools/ints (double precision), one row and
one token at a time, written to be read against the formulas in the docstrings of
``finegrain.credit.outcome`` and ``finegrain.losses``. No torch.
"""

from __future__ import annotations

import math

WHITEN_EPS = 1e-8
LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------- credit/outcome.py

def seq_rewards(token_rewards, loss_mask):
    """R_i = sum of the rewards on trained tokens; has_i = row has a trained token."""
    R, has = [], []
    for row, mrow in zip(token_rewards, loss_mask):
        total = 0.0
        for r, m in zip(row, mrow):
            if m:
                total += r
        R.append(total)
        has.append(any(mrow))
    return R, has


def groups_of(group_ids, has):
    """group id -> list of row indices (rows without trained tokens left out)."""
    groups = {}
    for i, g in enumerate(group_ids):
        if has[i]:
            groups.setdefault(g, []).append(i)
    return groups


def broadcast(seq_values, loss_mask):
    return [[seq_values[i] if m else 0.0 for m in mrow] for i, mrow in enumerate(loss_mask)]


def outcome_advantages(token_rewards, loss_mask, group_ids, kind, scale_by_std=True, eps=1e-6):
    """kind in {"grpo", "dr_grpo", "rloo", "centered"}; returns per-token advantages (B, L)."""
    R, has = seq_rewards(token_rewards, loss_mask)
    adv = [0.0] * len(R)
    for rows in groups_of(group_ids, has).values():
        vals = [R[i] for i in rows]
        n = len(vals)
        if n == 1 or all(v == vals[0] for v in vals):
            continue                                  # group of one / constant group: 0
        mean = sum(vals) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        for i in rows:
            if kind == "grpo":
                adv[i] = (R[i] - mean) / (std + eps) if scale_by_std else R[i] - mean
            elif kind in ("dr_grpo", "centered"):
                adv[i] = R[i] - mean
            elif kind == "rloo":
                others = [R[j] for j in rows if j != i]
                adv[i] = R[i] - sum(others) / len(others)
            else:
                raise ValueError(kind)
    return broadcast(adv, loss_mask)


def whiten(values, loss_mask):
    """(x − mean)/sqrt(var + 1e-8) over the trained tokens of the whole batch; unbiased var."""
    xs = [v for row, mrow in zip(values, loss_mask) for v, m in zip(row, mrow) if m]
    n = len(xs)
    mean = sum(xs) / n if n else 0.0
    var = sum((x - mean) ** 2 for x in xs) / max(n - 1, 1)
    return [[(v - mean) / math.sqrt(var + WHITEN_EPS) if m else 0.0 for v, m in zip(row, mrow)]
            for row, mrow in zip(values, loss_mask)]


def returns_to_go(token_rewards, loss_mask, gamma):
    """G_t = r_t + γ G_{next trained token}, skipping untrained positions entirely."""
    out = []
    for row, mrow in zip(token_rewards, loss_mask):
        G = [0.0] * len(row)
        running = 0.0
        for t in reversed(range(len(row))):
            if mrow[t]:
                running = row[t] + gamma * running
                G[t] = running
        out.append(G)
    return out


def reinforce_pp(token_rewards, loss_mask, gamma=1.0):
    return whiten(returns_to_go(token_rewards, loss_mask, gamma), loss_mask)


def reinforce_pp_baseline(token_rewards, loss_mask, group_ids):
    return whiten(outcome_advantages(token_rewards, loss_mask, group_ids, "centered"), loss_mask)


# ----------------------------------------------------------------------------- losses/policy.py

def _masked_mean(pairs):
    """pairs: list of values of trained tokens."""
    return sum(pairs) / len(pairs) if pairs else 0.0


def policy_loss(logprobs, old_logprobs, advantages, loss_mask, kind="ppo_clip",
                clip_low=0.2, clip_high=0.2, dual_clip_c=None):
    """Per-token loss (B, L) and the metrics dict, token by token."""
    loss, ratios, kls, clipped = [], [], [], []
    for b in range(len(logprobs)):
        row = []
        for t in range(len(logprobs[b])):
            if not loss_mask[b][t]:
                row.append(0.0)
                continue
            lr = min(max(logprobs[b][t] - old_logprobs[b][t], -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
            rho = math.exp(lr)
            A = advantages[b][t]
            was_clipped = False
            if kind == "reinforce":
                value = -A * rho
            else:
                unclipped = -A * rho
                clipped_value = -A * min(max(rho, 1 - clip_low), 1 + clip_high)
                value = max(unclipped, clipped_value)
                was_clipped = clipped_value > unclipped
                if dual_clip_c is not None and A < 0 and value > -A * dual_clip_c:
                    value = -A * dual_clip_c
                    was_clipped = True
            row.append(value)
            ratios.append(rho)
            kls.append((rho - 1) - lr)
            clipped.append(1.0 if was_clipped else 0.0)
        loss.append(row)
    metrics = {
        "clipfrac": _masked_mean(clipped),
        "ratio_mean": _masked_mean(ratios),
        "ratio_max": max(ratios) if ratios else 0.0,
        "approx_kl": _masked_mean(kls),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- losses/aggregate.py

def aggregate(per_token_loss, loss_mask, mode, constant=None):
    L = len(per_token_loss[0])
    seq_values, total, count = [], 0.0, 0
    for row, mrow in zip(per_token_loss, loss_mask):
        s = sum(v for v, m in zip(row, mrow) if m)
        n = sum(1 for m in mrow if m)
        total += s
        count += n
        if n == 0:
            continue                                  # empty rows are not sequences of the mean
        if mode == "seq-mean-token-mean":
            seq_values.append(s / n)
        elif mode == "seq-mean-token-sum":
            seq_values.append(s)
        elif mode == "seq-mean-token-sum-norm":
            seq_values.append(s / (L if constant is None else constant))
    if mode == "token-mean":
        return total / count if count else 0.0
    return sum(seq_values) / len(seq_values) if seq_values else 0.0


# ----------------------------------------------------------------------------- losses/kl.py

def kl_estimate(logprobs, ref_logprobs, name):
    out = []
    for row, ref_row in zip(logprobs, ref_logprobs):
        out_row = []
        for lp, ref in zip(row, ref_row):
            lr = lp - ref
            if name == "k1":
                out_row.append(lr)
            elif name == "k2":
                out_row.append(0.5 * lr * lr)
            elif name == "k3":
                lr = min(max(lr, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
                out_row.append(math.exp(-lr) - 1 + lr)
            else:
                raise ValueError(name)
        out.append(out_row)
    return out


# ----------------------------------------------------------------------------- losses/entropy.py

def entropy(logits):
    """logits (B, L, V) nested lists -> (B, L): −Σ p log p with p = softmax, terms with p = 0 dropped."""
    out = []
    for row in logits:
        out_row = []
        for z in row:
            top = max(z)
            weights = [math.exp(v - top) for v in z]
            total = sum(weights)
            H = 0.0
            for w in weights:
                p = w / total
                if p > 0:
                    H -= p * math.log(p)
            out_row.append(H)
        out.append(out_row)
    return out


# ------------------------------------------------------------------------------ eval/scoring.py

def token_scores_reference(values, mask, step_ids, num_steps):
    """Token-level eval scores, one token at a time: step k of a response = Σ of the applicable
    values of its tokens (0 when none is), outcome = Σ of every applicable value (tokens outside
    all steps included). Returns (steps: B lists of num_steps[b] floats, outcome: B floats)."""
    steps, outcome = [], []
    for row, mrow, srow, n in zip(values, mask, step_ids, num_steps):
        per_step = [0.0] * n
        total = 0.0
        for v, m, k in zip(row, mrow, srow):
            if m:
                total += v
                if 0 <= k < n:
                    per_step[k] += v
        steps.append(per_step)
        outcome.append(total)
    return steps, outcome
