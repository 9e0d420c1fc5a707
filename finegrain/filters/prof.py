"""PROF, the PRocess cOnsistency Filter: per prompt, drop the responses whose process values
disagree with their outcome, the same number from every group, so that correct and incorrect
responses stay balanced. GRPO (or any estimator) then runs on the rows that are left.

Consistency score of response i, with K_i valid steps valued v_{i,k} by a process reward and
outcome o_i ∈ {0, 1}:

    v̄    = mean of every valid step value of the batch (all rows, all steps)
    s_i  = (1/K_i) Σ_k 2 (v_{i,k} − v̄) (2 o_i − 1)                 (s_i = 0 when K_i = 0)
    s_i ← s_i − λ · 1[K_i < min_steps  or  K_i > max_steps]         λ = length_coef

so a correct response scores high when its steps are valued above the batch mean and a wrong
one when its steps are valued below it. Removal in each group g, with n⁺ correct and n⁻
incorrect rows, δ = n⁺ − n⁻ and N = ``remove``:

    k⁺ = clip(min(N, round((δ + N) / 2)), 0, n⁺)       round: half to even, as Python's round
    k⁻ = clip(N − k⁺, 0, n⁻)
    drop the k⁺ correct rows with the lowest s_i, and k⁻ incorrect rows:
        variant 'both'     the k⁻ with the lowest s_i (the highest process values)
        variant 'correct'  k⁻ chosen at random (the reference's prof_grpo_correct)

Worked example (the PROF README figure): n⁺ = 5, n⁻ = 3, N = 4 → δ = 2, k⁺ = round(3) = 3,
k⁻ = 1: two correct and two incorrect responses are kept.

Source: Ye et al. 2025, "Beyond Correctness: Harmonizing Process and Outcome Rewards through RL
Training" (arXiv:2509.03403; methods.md §3). Reference code: amazon-science/PROF-GRPO
prof_grpo/prof_grpo_both/prof_ray_trainer.py (``filter_trajectories``,
``compute_verify_step_level_score``) and prof_grpo/scripts/run_prof_grpo.sh (prof_filter=4 of
n=8, len_step_reward_coef=10.0, max_step=30). Those files were not in the code index this was
written against: the formulas follow methods.md §3, and ``compute_verify_step_level_score`` was
checked against a third-party copy of it (padding value −99 marks missing steps; the same v̄,
factor 2 and (2o − 1)); the run script was read in a public copy.

Shapes: B rows; S steps; L tokens. The process signal gives values (B, S) at level 'step' or
(B, L) at level 'token'; outcome (B,) float; group_ids (B,) long, groups need not be contiguous.

Departures:
1. The process values come from any reward signal of the run, named by ``process``: a
   step-level signal is used as it is; a token-level one is summed within each step of
   ``Trajectory.step_ids`` (for the implicit PRM this is its step reward r_k = Σ_{t∈k} r_t, the
   same as its ``level: step`` output). The reference uses Qwen2.5-Math-PRM-7B's probability at
   each "\\n\\n" step separator, in [0, 1]; other scales change nothing in the ranking (v̄ is
   subtracted first) but change how the length penalty λ compares with s.
2. Correct means outcome ≥ ``threshold`` (0.5); (2 o_i − 1) is then ±1. The reference reads
   0/1 outcomes, for which the two agree.
3. v̄ is over the batch the filter is given: one generate round of ``collect_batch``, before
   other filters drop rows.
4. The 'correct' variant draws its random order from a generator seeded by (``seed``, round);
   the round count is this object's state, saved with the checkpoints (registry metadata
   ``stateful=True``), so a resumed run draws what an uninterrupted one would.
5. Ties in s_i are broken by row order (the earlier row is dropped first).
6. A group with at most N rows is removed whole (the reference always has n = 8 > N = 4).
7. No truncation of the batch to a multiple of the number of GPUs.
8. The length rule is the code's (K_i < 2 or K_i > 30, subtracted after the sign is applied);
   the paper's text, as a review quotes it (SECONDARY), writes the penalty inside the product
   with the outcome and the bounds as H_i = 1 or H_i ≥ H_λ.
"""

from __future__ import annotations

import torch

from finegrain.filters import FILTERS
from finegrain.masked import group_index, group_sum, masked_mean
from finegrain.shapes import check_mask, check_shapes
from finegrain.trajectory import token_to_step_sum

VARIANTS = ("both", "correct")


@torch.no_grad()
def consistency_scores(step_values: torch.Tensor, step_mask: torch.Tensor, correct: torch.Tensor, *,
                       length_coef: float = 10.0, min_steps: int = 2, max_steps: int = 30) -> torch.Tensor:
    """PROF's consistency score s_i (module docstring), from step values and correctness.

    Args:
        step_values: (B, S) float, the process value of each step; garbage where step_mask is False.
        step_mask: (B, S) bool, True = the step exists.
        correct: (B,) bool, the outcome.
        length_coef: λ, subtracted when the row's step count K_i is outside [min_steps, max_steps].
    Returns:
        s (B,) float.

    v̄ = (1 + 0.5 + 0 + 0.5 + 0.5)/5 = 0.5; row 0: 2·(0.75 − 0.5) = 0.5; row 1: 2·(0.25 − 0.5) = −0.5;
    row 2 is wrong and has one step (K < 2): −2·(0.5 − 0.5) − λ = −1 (its NaN is not a step):

    >>> v = torch.tensor([[1.0, 0.5], [0.0, 0.5], [0.5, float("nan")]])
    >>> m = torch.tensor([[True, True], [True, True], [True, False]])
    >>> consistency_scores(v, m, torch.tensor([True, True, False]), length_coef=1.0).tolist()
    [0.5, -0.5, -1.0]
    """
    check_shapes(step_values=(step_values, ("B", "S")), step_mask=(step_mask, ("B", "S")), correct=(correct, ("B",)))
    check_mask("step_mask", step_mask)
    check_mask("correct", correct)
    v_bar = masked_mean(step_values, step_mask)                                 # () over the batch
    sign = correct.to(step_values.dtype) * 2 - 1                                # (B,) ±1
    K = step_mask.sum(dim=1)                                                    # (B,)
    s = masked_mean(2 * (step_values - v_bar), step_mask, dim=1) * sign         # (B,); 0 when K = 0
    off = (K < min_steps) | (K > max_steps)
    return s - length_coef * off.to(s.dtype)


def removal_counts(n_correct: torch.Tensor, n_incorrect: torch.Tensor, remove: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k⁺, k⁻): how many correct and incorrect rows a group loses.

    k⁺ = clip(min(N, round((n⁺ − n⁻ + N)/2)), 0, n⁺),  k⁻ = clip(N − k⁺, 0, n⁻),  N = remove;
    ``torch.round`` rounds half to even, like the reference's Python ``round``.

    >>> [t.tolist() for t in removal_counts(torch.tensor([5, 8, 0, 4]), torch.tensor([3, 0, 8, 3]), 4)]
    [[3, 4, 0, 2], [1, 0, 4, 2]]
    """
    delta = (n_correct - n_incorrect).to(torch.float64)
    k_pos = torch.round((delta + remove) / 2).clamp(max=remove).long()
    k_pos = torch.minimum(k_pos.clamp(min=0), n_correct.long())
    k_neg = torch.minimum((remove - k_pos).clamp(min=0), n_incorrect.long())
    return k_pos, k_neg


@torch.no_grad()
def prof_keep(scores: torch.Tensor, correct: torch.Tensor, group_ids: torch.Tensor, *, remove: int,
              incorrect_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row keep mask: in each group drop the k⁺ correct rows with the lowest score and the k⁻
    incorrect rows with the lowest key (``removal_counts``).

    Args:
        scores: (B,) float, the consistency scores s_i.
        correct: (B,) bool.
        group_ids: (B,) long, any order.
        remove: N, rows dropped per group (fewer when the group is smaller).
        incorrect_keys: (B,) float ranking the incorrect rows instead of ``scores`` (random keys
            give the 'correct' variant); None = rank them by ``scores`` (the 'both' variant).
    Returns:
        keep (B,) bool. Ties are broken by row order: the earlier row is dropped first.
    """
    check_shapes(scores=(scores, ("B",)), correct=(correct, ("B",)), group_ids=(group_ids, ("B",)),
                 incorrect_keys=(incorrect_keys, ("B",)))
    check_mask("correct", correct)
    B = scores.shape[0]
    if B == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device)
    gidx, _ = group_index(group_ids)                                            # (B,) dense 0..G−1
    n_pos, _ = group_sum(correct.to(torch.float64), group_ids)                  # (B,) n⁺ of the row's group
    n_all, _ = group_sum(torch.ones(B, dtype=torch.float64, device=scores.device), group_ids)
    k_pos, k_neg = removal_counts(n_pos.long(), (n_all - n_pos).long(), remove)  # (B,) each
    key = scores if incorrect_keys is None else torch.where(correct, scores, incorrect_keys.to(scores.dtype))
    side = (~correct).long()                                                    # 0 correct, 1 incorrect
    # order rows by (group, side, key), ties by row index: three stable sorts, least significant first
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(side[order], stable=True)]
    order = order[torch.argsort(gidx[order], stable=True)]                      # (B,)
    segment = (gidx * 2 + side)[order]                                          # (B,) nondecreasing
    pos = torch.arange(B, device=scores.device)
    first = torch.full((int(segment.max()) + 1,), B, dtype=torch.long, device=scores.device)
    first.scatter_reduce_(0, segment, pos, reduce="amin")
    rank = torch.empty(B, dtype=torch.long, device=scores.device)
    rank[order] = pos - first[segment]                                          # rank within (group, side)
    return rank >= torch.where(correct, k_pos, k_neg)


def step_values_of(out, step_ids: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, S), mask (B, S)) of a step- or token-level ``RewardOutput``; a token-level one
    is summed within each step of ``step_ids`` (B, L) (tokens outside every step are ignored)."""
    if out.level == "step":
        return out.values, out.mask
    if out.level == "token":
        S = int(step_ids.max().clamp(min=-1)) + 1 if step_ids.numel() else 0
        return token_to_step_sum(out.values, out.mask, step_ids, S)
    raise ValueError(f"{where}: PROF needs step or token values, but the signal gives '{out.level}' values")


@FILTERS.register("prof", needs_groups=True, needs_signals=True, stateful=True, choices={"variant": VARIANTS},
                  bounds={"remove": "[0, inf)", "length_coef": "[0, inf)", "min_steps": "[0, inf)",
                          "max_steps": "[0, inf)", "seed": "[0, inf)"})
class ProcessConsistencyFilter:
    """PROF as a filter (module docstring): ``keep, loss_mask, metrics = f(traj, outcome, signals=...)``.

    The trainer gives filters registered with ``needs_signals=True`` a ``signals`` mapping
    {reward name: RewardOutput on this batch}; this one reads ``signals[process]``. The loss mask
    is passed through. The object counts the rounds it has filtered (its checkpointed state; the
    'correct' variant seeds its random order with it).

    Keyword args (``filters.filters[i].kwargs``): process (the reward signal with step or token
    values, e.g. implicit_prm or step_labels), remove (N, rows dropped per group; 4 of 8 in the
    reference), variant ('both' | 'correct'), length_coef (λ = 10), min_steps (2), max_steps (30),
    threshold (correct iff outcome ≥ threshold), seed (the 'correct' variant's random order).
    """

    def __init__(self, *, process: str = "", remove: int = 4, variant: str = "both", length_coef: float = 10.0,
                 min_steps: int = 2, max_steps: int = 30, threshold: float = 0.5, seed: int = 0):
        if not process:
            raise ValueError("prof.process: name the reward signal whose step or token values PROF reads "
                             "(e.g. implicit_prm or step_labels)")
        if variant not in VARIANTS:
            raise ValueError(f"prof.variant: expected one of {' | '.join(VARIANTS)}, got '{variant}'")
        if remove < 0 or length_coef < 0 or min_steps < 0 or max_steps < min_steps or seed < 0:
            raise ValueError(f"prof: expected remove ≥ 0, length_coef ≥ 0, 0 ≤ min_steps ≤ max_steps and seed ≥ 0, "
                             f"got {remove}, {length_coef}, {min_steps}, {max_steps}, {seed}")
        self.process, self.remove, self.variant = process, remove, variant
        self.length_coef, self.min_steps, self.max_steps = length_coef, min_steps, max_steps
        self.threshold, self.seed = threshold, seed
        self.rounds = 0

    @torch.no_grad()
    def __call__(self, traj, outcome: torch.Tensor, *, signals):
        if self.process not in signals:
            raise ValueError(f"prof.process: '{self.process}' is not a reward signal of this run; "
                             f"signals: {', '.join(signals) or '(none)'}")
        values, mask = step_values_of(signals[self.process], traj.step_ids, "prof.process")   # (B, S) each
        if not bool(torch.isfinite(values[mask]).all()):
            raise ValueError(f"prof.process: '{self.process}' gave non-finite step values")
        correct = outcome.to(values.device) >= self.threshold                                    # (B,)
        scores = consistency_scores(values, mask, correct, length_coef=self.length_coef,
                                    min_steps=self.min_steps, max_steps=self.max_steps)          # (B,)
        self.rounds += 1
        keys = None
        if self.variant == "correct":
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rounds)
            keys = torch.rand(traj.batch_size, generator=gen).to(scores.device)
        keep = prof_keep(scores, correct, traj.group_ids.to(scores.device), remove=self.remove, incorrect_keys=keys)
        n = max(traj.batch_size, 1)
        metrics = {"kept_frac": keep.float().mean() if traj.batch_size else 0.0,
                   "removed_correct": float((~keep & correct).sum()) / n,
                   "removed_incorrect": float((~keep & ~correct).sum()) / n,
                   "score_mean": scores.mean() if traj.batch_size else 0.0,
                   "step_value_mean": masked_mean(values, mask)}
        return keep, traj.loss_mask, metrics

    def state_dict(self) -> dict:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = int(state["rounds"])
