"""Several rewards, one advantage: how per-objective rewards are weighted, normalised and combined.

Notation: B rows, K objectives (reward functions); r_{i,k} the reward of objective k for row i,
m_{i,k} True when objective k applies to row i (False = "not applicable", TRL's None/NaN),
w_k the objective weights, g(i) the group (prompt) of row i, ε the std epsilon.

    sum_then_normalize   R_i = Σ_k m_{i,k} w_k r_{i,k};  A_i = (R_i − mean_g R) / (std_g R + ε)   (GRPO)
    normalize_then_sum   z_{i,k} = (r_{i,k} − mean_{g,k} r) / (std_{g,k} r + ε)   per objective, in its group
                         R_i = Σ_k m_{i,k} w_k z_{i,k};  A_i = (R_i − mean_B R) / (std_B R + ε)   (GDPO)
    direction_scalarize  R_i = Σ_k m_{i,k} v_k r_{i,k},  ‖v‖₂ = 1                                  (DPA)
    renorm_step_rewards  r_{i,s} = (p_{i,s} − ½) + (o_i − ½)  on every step s                      (ReNorm)

Summing first lets distinct reward combinations collapse onto one advantage (with two 0/1
rewards, (1, 0) and (0, 1) get the same A); normalising each objective in its group first keeps
them apart (GDPO's "reward advantage collapse").

Sources:
- GDPO, Liu et al. 2026 (arXiv:2601.05242; methods.md §23). TRL GRPOTrainer
  ``multi_objective_aggregation`` ("sum_then_normalize" | "normalize_then_sum"), read in a copy
  of trl/trainer/grpo_trainer.py (``_generate_and_score_completions``: per-function
  ``nanmean``/``nanstd`` over the group, + 1e-4, weighted ``nansum``, then batch mean and
  ``std`` + 1e-4) and trl/trainer/utils.py ``nanstd`` (Bessel-corrected); the pinned upstream
  commit methods.md names (f2cd5771) was not in the index. NVlabs/GDPO's verl version
  (methods.md §23) normalises each reward per group (ε = 1e-6), sums with weight 1 and
  ``masked_whiten``s over the batch's response *tokens*.
- DPA, Wang et al. 2024, Arithmetic Control of LLMs for Diverse User Preferences
  (arXiv:2402.18571; methods.md §24): a user preference is a unit vector v over the objectives
  and the reward is v·r (RLHFlow/Directional-Preference-Alignment README; no training code).
- ReNorm, Xu et al. 2025, Hybrid Reward Normalization for Process-supervised Non-verifiable
  Agentic Tasks (arXiv:2509.25598; methods.md §12, SECONDARY: from a summary and a review, no
  author code; the paper's formula was not readable here, so it is UNVERIFIED).
- methods.md §28a (MAH-DPO, arXiv:2510.01167) trains verifiable and non-verifiable objectives
  together offline, one DPO head per objective, L = mean_k L_k: each objective weighs the same
  whatever the number of examples it applies to. That is not a separate advantage rule; its
  online analogue is ``normalize_then_sum`` with ``reward_mask`` (each objective's statistics
  over the rows it applies to, each normalised to unit spread before weighting).

How the trainer runs them (``train/stages.py::compute_advantages``, which calls no function of
this module; tests/credit/test_multi.py checks each equality):
- sum_then_normalize (scale 'group') = ``advantage.name: grpo`` with ``kwargs: {eps: ...}``
  on the summed token rewards, the weights being ``rewards[i].weight``.
- normalize_then_sum, verl form = ``advantage.per_source``: every source ``grpo`` with
  ``coef: w_k``, and ``advantage.whiten: true`` (token-weighted batch normalisation). The
  sequence-weighted TRL form (``batch_norm=True`` here) has no trainer path yet.
- DPA = either of the two with the weights set to v; ``advantage.preference_direction: true``
  refuses a run whose weights are not a unit vector (``check_direction``).
- ReNorm mixes two signals into one step reward, which is a reward signal's job
  (``finegrain/rewards``), not an estimator's; this function has no trainer path yet.

Departures from TRL:
1. A group whose values are all equal gets exactly 0, not (float rounding of r − mean)/(0 + ε).
2. "Not applicable" is a bool mask, not NaN; a row with no applicable objective gets 0 and is
   left out of every mean and std (TRL's newer versions do the same for all-NaN rows).
3. An objective that applies to a single row of a group gets z = 0 there (std := 0, as TRL's
   G = 1 case).
4. The batch of ``normalize_then_sum`` is the rows given (one process); TRL gathers every process.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from finegrain.masked import group_mean_std, group_min_max, masked_sum
from finegrain.shapes import check_mask, check_shapes

SCALES = ("group", "batch", "none")


def _check(seq_rewards: torch.Tensor, reward_mask: torch.Tensor, group_ids: torch.Tensor,
           weights: torch.Tensor) -> None:
    check_shapes(seq_rewards=(seq_rewards, ("B", "K")), reward_mask=(reward_mask, ("B", "K")),
                 group_ids=(group_ids, ("B",)), weights=(weights, ("K",)))
    check_mask("reward_mask", reward_mask)


def _as_weights(weights, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(weights, dtype=like.dtype, device=like.device)


def _centered_std(values: torch.Tensor, include: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v − mean_key v and the unbiased std_key v over the included entries of each key.

    values, include, keys: (N,). Returns (N,), (N,); 0 and 0 where include is False; centred
    values are exactly 0 in a key whose included values are all equal (a key of one included).
    """
    centered, std = torch.zeros_like(values), torch.zeros_like(values)
    if not bool(include.any()):
        return centered, std
    v, k = values[include], keys[include]                        # (N',)
    mean, sd, _ = group_mean_std(v, k, unbiased=True)            # (N',) each; std 0 for one entry
    lo, hi = group_min_max(v, k)
    centered[include] = torch.where(lo == hi, torch.zeros_like(v), v - mean)
    std[include] = sd
    return centered, std


def _batch_std(values: torch.Tensor, include: torch.Tensor) -> torch.Tensor:
    """Unbiased std of the included entries (a 0-dim tensor); 0 with fewer than two."""
    v = values[include]
    return v.std() if v.numel() > 1 else torch.zeros((), dtype=values.dtype, device=values.device)


@torch.no_grad()
def sum_then_normalize(seq_rewards: torch.Tensor, reward_mask: torch.Tensor, group_ids: torch.Tensor,
                       weights: torch.Tensor | Sequence[float], *, scale: str = "group", eps: float = 1e-4
                       ) -> torch.Tensor:
    """Weighted sum of the objectives, then one group normalisation (GRPO; TRL's default).

    R_i = Σ_k m_{i,k} w_k r_{i,k}
    A_i = (R_i − mean_{j∈g(i)} R_j) / (σ + ε),  σ = std_{j∈g(i)} R_j  (scale 'group'),
          the std of R over the batch ('batch'), or no division ('none'); stds unbiased.

    TRL ``multi_objective_aggregation="sum_then_normalize"`` with ``scale_rewards`` group | batch
    | none and ε = 1e-4 (methods.md §23).

    Args:
        seq_rewards: (B, K) float, one reward per row and objective; garbage where reward_mask is False.
        reward_mask: (B, K) bool, True = objective k applies to row i.
        group_ids: (B,) long, any order.
        weights: (K,) objective weights w_k.
        scale: 'group' | 'batch' | 'none'.
        eps: added to the std.
    Returns:
        advantages (B,); 0 for a row with no applicable objective (left out of every statistic),
        for a group of one and for a group whose R are all equal.
    """
    if scale not in SCALES:
        raise ValueError(f"sum_then_normalize.scale: expected one of {' | '.join(SCALES)}, got '{scale}'")
    w = _as_weights(weights, seq_rewards)
    _check(seq_rewards, reward_mask, group_ids, w)
    R = masked_sum(seq_rewards * w, reward_mask, dim=1)                         # (B,)
    scorable = reward_mask.any(dim=1)                                           # (B,)
    centered, std = _centered_std(R, scorable, group_ids)                       # (B,) each
    if scale == "batch":
        std = _batch_std(R, scorable).expand_as(R)
    adv = centered if scale == "none" else centered / (std + eps)
    return torch.where(scorable, adv, torch.zeros_like(adv))


@torch.no_grad()
def normalize_then_sum(seq_rewards: torch.Tensor, reward_mask: torch.Tensor, group_ids: torch.Tensor,
                       weights: torch.Tensor | Sequence[float], *, eps: float = 1e-4, batch_norm: bool = True
                       ) -> torch.Tensor:
    """Normalise every objective within its group, take the weighted sum, normalise over the batch (GDPO).

    z_{i,k} = (r_{i,k} − mean_{j∈g(i), m_{j,k}} r_{j,k}) / (std_{j∈g(i), m_{j,k}} r_{j,k} + ε)
    R_i     = Σ_k m_{i,k} w_k z_{i,k}
    A_i     = (R_i − mean_B R) / (std_B R + ε)           (batch_norm; else A_i = R_i)

    stds unbiased; the batch B is the rows with at least one applicable objective. TRL
    ``multi_objective_aggregation="normalize_then_sum"`` (methods.md §23).

    Args:
        seq_rewards: (B, K) float; garbage where reward_mask is False.
        reward_mask: (B, K) bool, True = objective k applies to row i (its statistics use only those rows).
        group_ids: (B,) long, any order.
        weights: (K,) objective weights w_k.
        eps: added to every std.
        batch_norm: the final normalisation over the batch (TRL); False returns R.
    Returns:
        advantages (B,); 0 for a row with no applicable objective. z is 0 for an objective that
        applies to one row of a group, or whose values in the group are all equal.
    """
    w = _as_weights(weights, seq_rewards)
    _check(seq_rewards, reward_mask, group_ids, w)
    B, K = seq_rewards.shape
    # one (group, objective) key per entry, so every objective is normalised in one pass
    gidx = torch.unique(group_ids, return_inverse=True)[1]                      # (B,)
    keys = (gidx[:, None] * K + torch.arange(K, device=group_ids.device)[None, :]).flatten()  # (B·K,)
    centered, std = _centered_std(seq_rewards.flatten(), reward_mask.flatten(), keys)        # (B·K,) each
    z = (centered / (std + eps)).view(B, K)                                     # (B, K), 0 where not applicable
    R = masked_sum(z * w, reward_mask, dim=1)                                   # (B,)
    scorable = reward_mask.any(dim=1)                                           # (B,)
    if not batch_norm:
        return torch.where(scorable, R, torch.zeros_like(R))
    one = torch.zeros_like(group_ids)                                           # the whole batch as one group
    centered_b, _ = _centered_std(R, scorable, one)                             # (B,)
    return centered_b / (_batch_std(R, scorable) + eps)


def check_direction(direction, *, names: Sequence[str] | None = None, where: str = "direction",
                    tol: float = 1e-2) -> torch.Tensor:
    """A DPA preference direction v as a float tensor (K,), refused unless ‖v‖₂ = 1 (within ``tol``).

    The default tolerance lets DPA's two-digit weights through (its prompts carry
    round(100 cos θ), round(100 sin θ), e.g. (0.71, 0.70), ‖v‖₂ = 0.997) and refuses a vector
    that was never normalised.

    Args:
        direction: (K,) numbers (a list or a tensor), one per objective.
        names: the objectives' names, for the message.
        where: the field the message names.
    Returns:
        v (K,) float64.
    Raises:
        ValueError, one line naming ``where``: not a non-empty vector of finite numbers, or not unit norm.

    >>> check_direction([0.8, 0.6]).tolist()
    [0.8, 0.6]
    >>> check_direction([1.0, 1.0], names=["verifier", "overlong"], where="rewards[*].weight")
    Traceback (most recent call last):
    ...
    ValueError: rewards[*].weight: a preference direction must have unit length, got ‖v‖₂ = 1.414 for {verifier: 1, overlong: 1}; divide each by 1.414
    """
    try:
        v = torch.as_tensor(direction, dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a vector of numbers, got {direction!r}") from None
    if v.dim() != 1 or v.numel() == 0 or not bool(torch.isfinite(v).all()):
        raise ValueError(f"{where}: expected a non-empty vector of finite numbers, got {direction!r}")
    if names is not None and len(names) != v.numel():
        raise ValueError(f"{where}: {v.numel()} components for {len(names)} objectives ({', '.join(names)})")
    norm = float(v.norm())
    if not math.isclose(norm, 1.0, abs_tol=tol):
        shown = ", ".join(f"{n}: {x:g}" for n, x in zip(names, v.tolist())) if names is not None else \
            ", ".join(f"{x:g}" for x in v.tolist())
        shown = f"{{{shown}}}" if names is not None else f"[{shown}]"
        raise ValueError(f"{where}: a preference direction must have unit length, got ‖v‖₂ = {norm:.4g} for {shown}; "
                         f"divide each by {norm:.4g}")
    return v


@torch.no_grad()
def direction_scalarize(seq_rewards: torch.Tensor, reward_mask: torch.Tensor, direction, *,
                        tol: float = 1e-2) -> torch.Tensor:
    """DPA's linear scalarisation of a vector reward: R_i = Σ_k m_{i,k} v_k r_{i,k}, ‖v‖₂ = 1.

    Args:
        seq_rewards: (B, K) float; garbage where reward_mask is False.
        reward_mask: (B, K) bool, True = objective k applies to row i.
        direction: (K,) the unit preference vector v (``check_direction``).
    Returns:
        R (B,) float, a reward for any outcome estimator; 0 for a row with no applicable objective.
    """
    v = check_direction(direction, tol=tol).to(seq_rewards.dtype).to(seq_rewards.device)
    check_shapes(seq_rewards=(seq_rewards, ("B", "K")), reward_mask=(reward_mask, ("B", "K")), direction=(v, ("K",)))
    check_mask("reward_mask", reward_mask)
    return masked_sum(seq_rewards * v, reward_mask, dim=1)                       # (B,)


@torch.no_grad()
def renorm_step_rewards(step_rewards: torch.Tensor, step_mask: torch.Tensor, outcome: torch.Tensor,
                        outcome_mask: torch.Tensor, *, center: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """ReNorm: centre a process reward and the outcome, and give every step their sum.

    r_{i,s} = (p_{i,s} − c) + (o_i − c)      with c = ½ and p, o ∈ [0, 1]: r = p + o − 1

    With a wrong answer (o = 0) no step reward is positive, with a right one (o = 1) none is
    negative, so the process reward can reorder steps but never reverses the outcome's sign.
    (methods.md §12, SECONDARY; placement and scaling UNVERIFIED.)

    Args:
        step_rewards: (B, S) float p, in [0, 1]; garbage where step_mask is False.
        step_mask: (B, S) bool, True = the step exists.
        outcome: (B,) float o, in [0, 1]; garbage where outcome_mask is False.
        outcome_mask: (B,) bool, True = the row has an outcome.
        center: c.
    Returns:
        values (B, S), mask (B, S) = step_mask ∧ outcome_mask; values are 0 where mask is False.
        A row with no step gets nothing (its outcome has no step to sit on).
    """
    check_shapes(step_rewards=(step_rewards, ("B", "S")), step_mask=(step_mask, ("B", "S")),
                 outcome=(outcome, ("B",)), outcome_mask=(outcome_mask, ("B",)))
    check_mask("step_mask", step_mask)
    check_mask("outcome_mask", outcome_mask)
    mask = step_mask & outcome_mask[:, None]                                     # (B, S)
    values = (step_rewards - center) + (outcome[:, None] - center)               # (B, S)
    return torch.where(mask, values, torch.zeros_like(values)), mask
