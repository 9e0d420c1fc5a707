"""Choosing one answer out of N samples with any scorer: best-of-N and (weighted) majority vote,
plus accuracy-versus-N curves.

Shape letters: ``P`` problems, ``n`` samples drawn per problem, ``N`` samples the selector may
look at (N ≤ n), ``S`` steps in one response, ``K`` values of N on a curve.

A scorer is anything that gives one number per sample, higher = more likely correct: an outcome
reward model, a PRM's step scores reduced by :func:`aggregate_steps`, an implicit PRM's summed
log-ratios, a verifier, or the oracle itself.

Where this departs from the sources:

1. Implicit PRM's ``bon_eval.py`` (methods.md §2) aggregates step rewards with ``min`` / ``sum``
   (and has a ``mean`` branch). Here the aggregations form a registry (``STEP_AGGREGATIONS``) that
   also holds ``last`` (ER-PRM scores a candidate by its last, partial step; methods.md §16) and
   ``product``. A response with no steps gets −inf under every aggregation, so it is picked
   only when every candidate is equally empty.
2. Accuracy at N < n is the *expected* accuracy over all N-subsets of the n drawn samples, not
   one random subset. Best-of-N is computed exactly (closed form below); votes are enumerated
   exactly when there are at most max(``n_resamples``, n) subsets, otherwise estimated on
   ``n_resamples`` random subsets that are the same for every problem and every scorer (common
   random numbers: two scorers compared with one seed are compared on identical draws, and
   permuting problems leaves the curve unchanged).
3. Vote ties go to the answer whose first sample comes first in the original sample order;
   samples whose answer is None (nothing extracted) cast no vote. Weights must be ≥ 0: map raw
   scores first, e.g. ``sigmoid(score)`` as Implicit PRM's weighted vote does.

>>> aggregate_steps([0.9, 0.2, 0.7], "min")
0.2
>>> best_of_n([0.1, 0.8, 0.8])
1
>>> weighted_majority(["4", "5", None, "5"], [0.9, 0.3, 1.0, 0.4])
'4'
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from math import comb

import numpy as np

from finegrain.registry import Registry

STEP_AGGREGATIONS = Registry("step aggregation")
"""name -> fn(step_scores (S,) float array, S ≥ 1) -> float. Called through :func:`aggregate_steps`."""


@STEP_AGGREGATIONS.register("min", source="Implicit PRM bon_eval.py (default); Math-Shepherd, arXiv 2312.08935")
def step_min(step_scores: np.ndarray) -> float:
    """min_s r_s: a response is as good as its weakest step."""
    return float(np.min(step_scores))


@STEP_AGGREGATIONS.register("sum", source="Implicit PRM bon_eval.py")
def step_sum(step_scores: np.ndarray) -> float:
    """Σ_s r_s. For implicit-PRM step rewards this telescopes to the outcome reward β·log π_φ/π_ref."""
    return float(np.sum(step_scores))


@STEP_AGGREGATIONS.register("mean", source="Implicit PRM bon_eval.py ('mean' branch)")
def step_mean(step_scores: np.ndarray) -> float:
    """(1/S) Σ_s r_s."""
    return float(np.mean(step_scores))


@STEP_AGGREGATIONS.register("last", source="ER-PRM (score of the last step); methods.md §16")
def step_last(step_scores: np.ndarray) -> float:
    """r_S, the score of the final step."""
    return float(step_scores[-1])


@STEP_AGGREGATIONS.register("product", source="Lightman et al. 2023, arXiv 2305.20050")
def step_product(step_scores: np.ndarray) -> float:
    """Π_s r_s: for step probabilities, P(every step correct) if steps were independent."""
    return float(np.prod(step_scores))


def aggregate_steps(step_scores: Sequence[float], how: str = "min") -> float:
    """Reduce one response's step scores to one score with the aggregation named ``how``.

    r = min_s r_s | Σ_s r_s | (1/S) Σ_s r_s | r_S | Π_s r_s   for how = min | sum | mean | last | product.
    Sources per entry: ``STEP_AGGREGATIONS.meta(how)["source"]``.

    Args:
        step_scores: (S,) scores of the steps of one response, higher = better. NaN raises.
        how: name in ``STEP_AGGREGATIONS``.
    Returns:
        float. An empty list (S = 0) gives −inf for every ``how``, so a response without steps
        ranks below every response with steps.

    >>> aggregate_steps([0.9, 0.5], "product")
    0.45
    >>> aggregate_steps([], "sum")
    -inf
    """
    fn = STEP_AGGREGATIONS.get(how)
    x = np.asarray(step_scores, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"aggregate_steps: step_scores must be 1-D, got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError("aggregate_steps: step_scores contain NaN")
    if x.size == 0:
        return float("-inf")
    return fn(x)


def best_of_n(scores: Sequence[float], *, tie: str = "first", rng: np.random.Generator | None = None) -> int:
    """Index of the highest-scoring sample.

    i* = argmax_i s_i. ``tie="first"``: the lowest index among the maxima. ``tie="random"``:
    uniform among the maxima, drawn from ``rng`` (required).

    Args:
        scores: (N,) float, N ≥ 1, no NaN (−inf is allowed).
    Returns:
        int index into ``scores``.

    >>> best_of_n([0.2, 0.9, 0.9], tie="random", rng=np.random.default_rng(0)) in (1, 2)
    True
    """
    s = np.asarray(scores, dtype=float)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"best_of_n: scores must be a non-empty 1-D list, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("best_of_n: scores contain NaN")
    winners = np.flatnonzero(s == s.max())
    if tie == "first":
        return int(winners[0])
    if tie == "random":
        if rng is None:
            raise ValueError("best_of_n: tie='random' needs rng (a numpy Generator)")
        return int(winners[rng.integers(len(winners))])
    raise ValueError(f"best_of_n: unknown tie rule {tie!r}; available: first, random")


def weighted_majority(answers: Sequence[Hashable | None], weights: Sequence[float] | None = None
                      ) -> Hashable | None:
    """The answer with the largest total weight.

    a* = argmax_a Σ_{i : a_i = a} w_i, over answers that are not None.

    Answers are compared with ``==`` (normalise them first). Ties go to the answer whose first
    sample comes first in ``answers``. Weights are summed left to right.

    Args:
        answers: (N,) extracted answers; None = no answer, casts no vote.
        weights: (N,) finite weights ≥ 0; None = 1 each (plain majority vote, Wang et al. 2022
            self-consistency, arXiv 2203.11171).
    Returns:
        the winning answer, or None when no sample has an answer.

    >>> weighted_majority(["a", "b", "b", "a"])   # 2–2 tie: 'a' appears first
    'a'
    >>> weighted_majority([None, None]) is None
    True
    """
    if weights is None:
        weights = [1.0] * len(answers)
    if len(weights) != len(answers):
        raise ValueError(f"weighted_majority: {len(answers)} answers but {len(weights)} weights")
    totals: dict[Hashable, float] = {}  # insertion order = order of first occurrence
    for a, w in zip(answers, weights):
        w = float(w)
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"weighted_majority: weights must be finite and >= 0, got {w}")
        if a is not None:
            totals[a] = totals.get(a, 0.0) + w
    if not totals:
        return None
    best = max(totals.values())
    return next(a for a, t in totals.items() if t == best)


def answer_correctness(answers: Sequence[Hashable | None], correct: Sequence[bool]) -> dict[Hashable, bool]:
    """Map each non-None answer of one problem to its correctness; raises if one answer string
    was marked both correct and wrong (the vote would then be ill-defined)."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    out: dict[Hashable, bool] = {}
    for a, c in zip(answers, correct):
        if a is None:
            continue
        if a in out and out[a] != bool(c):
            raise ValueError(f"answer {a!r} is marked both correct and wrong in one problem")
        out[a] = bool(c)
    return out


@dataclass(frozen=True)
class Curve:
    """Expected accuracy of a selector at several N.

    Ns: the K values of N.
    per_problem: (P, K) float, expected accuracy of each problem at each N (average over
        N-subsets of its n samples). For a confidence interval over problems use
        ``bootstrap_ci(curve.per_problem[:, j])`` from ``finegrain.eval.metrics``.
    """

    Ns: tuple[int, ...]
    per_problem: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """(K,) accuracy averaged over problems."""
        return self.per_problem.mean(axis=0)

    def as_dict(self) -> dict[int, float]:
        return {N: float(m) for N, m in zip(self.Ns, self.mean)}


def _check_Ns(Ns: Sequence[int] | None, n: int, where: str) -> tuple[int, ...]:
    if Ns is None:  # 1, 2, 4, ... up to n
        return tuple(2**i for i in range(n.bit_length()) if 2**i <= n)
    Ns = tuple(int(N) for N in Ns)
    for N in Ns:
        if not 1 <= N <= n:
            raise ValueError(f"{where}: every N must satisfy 1 <= N <= n={n}, got N={N}")
    return Ns


def _check_grid(correct, where: str) -> np.ndarray:
    c = np.asarray(correct, dtype=bool)
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"{where}: correct must be a non-empty (P, n) array, got shape {c.shape}")
    return c


def bon_rank_probs(n: int, N: int) -> np.ndarray:
    """P(the sample ranked r-th of n is chosen by best-of-N on a uniform N-subset), r = 1..n.

    p_r = C(n − r, N − 1) / C(n, N): the r-th best is chosen iff it is in the subset and the
    r − 1 better ones are not, i.e. the other N − 1 members come from the n − r worse ones.
    Same counting as pass@k (Chen et al. 2021). Returns (n,) float summing to 1.

    >>> bon_rank_probs(4, 2).tolist()   # C(3,1), C(2,1), C(1,1), C(0,1) over C(4,2) = 6
    [0.5, 0.3333333333333333, 0.16666666666666666, 0.0]
    """
    total = comb(n, N)
    return np.array([comb(n - r, N - 1) / total for r in range(1, n + 1)])


def bon_curve(scores, correct, Ns: Sequence[int] | None = None, *, tie: str = "random") -> Curve:
    """Exact expected best-of-N accuracy when the N candidates are a uniform N-subset of the n samples.

    Sort one problem's samples by score, best first, and let c_(r) be the correctness of rank r:
        acc(N) = Σ_{r=1}^{n} c_(r) · C(n − r, N − 1) / C(n, N)        (see :func:`bon_rank_probs`)
    Ties: ``tie="first"`` breaks them by the lower sample index (a total order, formula as is).
    ``tie="random"`` picks uniformly among the tied maxima of the subset; that equals breaking
    ties by a uniformly random priority, so every member of a tie group spanning ranks
    a+1..a+m gets the group's mean correctness and the formula holds with c_(r) replaced by it.
    The result is exact (no sampling); at N = 1 it is the mean correctness, and an oracle scorer
    (score = correctness) gives pass@N. Derived here; tested against enumeration of all subsets.

    Args:
        scores: (P, n) float, higher = better; NaN raises, ±inf allowed.
        correct: (P, n) bool.
        Ns: values of N (1 ≤ N ≤ n); None = 1, 2, 4, ... ≤ n.
        tie: "random" (default, expectation of ``best_of_n(..., tie="random")``) or "first".
    Returns:
        :class:`Curve` with per_problem (P, K).

    >>> bon_curve([[0.9, 0.1, 0.5]], [[False, True, True]], Ns=[1, 2, 3]).as_dict()
    {1: 0.6666666666666666, 2: 0.3333333333333333, 3: 0.0}
    """
    c = _check_grid(correct, "bon_curve")
    s = np.asarray(scores, dtype=float)
    if s.shape != c.shape:
        raise ValueError(f"bon_curve: scores {s.shape} and correct {c.shape} must have the same (P, n) shape")
    if np.isnan(s).any():
        raise ValueError("bon_curve: scores contain NaN")
    if tie not in ("first", "random"):
        raise ValueError(f"bon_curve: unknown tie rule {tie!r}; available: first, random")
    P, n = c.shape
    Ns = _check_Ns(Ns, n, "bon_curve")
    order = np.argsort(-s, axis=1, kind="stable")  # (P, n) best first; equal scores keep index order
    c_sorted = np.take_along_axis(c, order, axis=1).astype(float)  # (P, n)
    if tie == "random":
        s_sorted = np.take_along_axis(s, order, axis=1)  # (P, n)
        new_group = np.ones((P, n), dtype=bool)
        new_group[:, 1:] = s_sorted[:, 1:] != s_sorted[:, :-1]
        gid = np.cumsum(new_group.ravel()) - 1  # (P·n,) one id per tie group, rows never share
        group_mean = np.bincount(gid, c_sorted.ravel()) / np.bincount(gid)
        c_sorted = group_mean[gid].reshape(P, n)
    per_problem = np.stack([c_sorted @ bon_rank_probs(n, N) for N in Ns], axis=1)  # (P, K)
    return Curve(Ns, per_problem)


def random_curve(correct, Ns: Sequence[int] | None = None) -> Curve:
    """Baseline: pick one of the N candidates uniformly at random.

    acc(N) = (1/n) Σ_i c_i for every N, exactly (each sample is equally likely to be picked).

    Args:
        correct: (P, n) bool.
    Returns:
        :class:`Curve` whose K columns are all the per-problem mean correctness.
    """
    c = _check_grid(correct, "random_curve")
    Ns = _check_Ns(Ns, c.shape[1], "random_curve")
    per_problem = np.repeat(c.mean(axis=1, keepdims=True), len(Ns), axis=1)  # (P, K)
    return Curve(Ns, per_problem)


def _subsets(n: int, N: int, n_resamples: int, seed: int) -> np.ndarray:
    """(R, N) sample indices, each row sorted ascending. All C(n, N) subsets when that is at
    most max(n_resamples, n) (exact; so N = 1, n − 1 and n are always exact), else
    ``n_resamples`` uniform random subsets drawn from ``default_rng([seed, n, N])``,
    so the draws for one N do not depend on the other Ns."""
    if comb(n, N) <= max(n_resamples, n):
        return np.array(list(itertools.combinations(range(n), N)), dtype=np.int64).reshape(-1, N)
    rng = np.random.default_rng([seed, n, N])
    keys = rng.random((n_resamples, n))
    return np.sort(np.argsort(keys, axis=1)[:, :N], axis=1)


def weighted_vote_curve(answers: Sequence[Sequence[Hashable | None]], weights, correct,
                        Ns: Sequence[int] | None = None, *, n_resamples: int = 1000, seed: int = 0) -> Curve:
    """Expected accuracy of :func:`weighted_majority` on N of the n samples, for each N.

    acc_p(N) = E_{S ⊂ {1..n}, |S| = N} [ correct_p( weighted_majority(a_S, w_S) ) ],
    with S uniform; a problem whose subset holds no answer counts as wrong. The expectation is
    exact (all subsets) when C(n, N) ≤ max(n_resamples, n), else a Monte Carlo average over
    ``n_resamples`` subsets shared by all problems (see module note 2). Each subset keeps the
    original sample order, so ties go to the first sample in that order.

    Args:
        answers: P lists of n extracted answers (None = no answer).
        weights: (P, n) finite weights ≥ 0 (e.g. sigmoid of a reward; methods.md §2).
        correct: (P, n) bool; one answer string must have one correctness within a problem.
        Ns: values of N (1 ≤ N ≤ n); None = 1, 2, 4, ... ≤ n.
        n_resamples, seed: Monte Carlo budget and seed.
    Returns:
        :class:`Curve` with per_problem (P, K).

    >>> weighted_vote_curve([["7", "7", "9"]], [[0.1, 0.1, 0.9]], [[True, True, False]], Ns=[3]).as_dict()
    {3: 0.0}
    """
    c = _check_grid(correct, "weighted_vote_curve")
    w = np.asarray(weights, dtype=float)
    P, n = c.shape
    if w.shape != c.shape or len(answers) != P or any(len(a) != n for a in answers):
        raise ValueError(f"weighted_vote_curve: answers, weights {w.shape} and correct {c.shape} must all be (P, n)")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weighted_vote_curve: weights must be finite and >= 0")
    if n_resamples < 1:
        raise ValueError(f"weighted_vote_curve: n_resamples must be >= 1, got {n_resamples}")
    Ns = _check_Ns(Ns, n, "weighted_vote_curve")
    per_problem = np.zeros((P, len(Ns)))
    subsets = [_subsets(n, N, n_resamples, seed) for N in Ns]  # K arrays (R_j, N)
    for p in range(P):
        answer_ok = answer_correctness(answers[p], c[p])  # first-occurrence order
        code_of = {a: i for i, a in enumerate(answer_ok)}
        codes = np.array([code_of[a] if a is not None else -1 for a in answers[p]])  # (n,)
        code_ok = np.array(list(answer_ok.values()) + [False])  # (A+1,) last slot: no answer
        A = len(answer_ok)
        for j, pos in enumerate(subsets):
            cs, ws = codes[pos], w[p][pos]  # (R, N) each
            valid = cs >= 0
            cs = np.where(valid, cs, A)  # None votes go to an ignored column
            totals = np.zeros((len(pos), A + 1))  # (R, A+1)
            np.add.at(totals, (np.arange(len(pos))[:, None], cs), ws)  # sums left to right, like weighted_majority
            best = totals[:, :A].max(axis=1, initial=0.0)  # (R,) weights ≥ 0, so absent answers never win
            is_win = valid & (np.take_along_axis(totals, cs, axis=1) == best[:, None])  # (R, N)
            first_win = np.argmax(is_win, axis=1)  # (R,) first winning position (any valid one if all 0)
            win_code = np.where(valid.any(axis=1), cs[np.arange(len(pos)), first_win], A)
            per_problem[p, j] = code_ok[win_code].mean()
    return Curve(Ns, per_problem)


def majority_curve(answers: Sequence[Sequence[Hashable | None]], correct, Ns: Sequence[int] | None = None,
                   *, n_resamples: int = 1000, seed: int = 0) -> Curve:
    """Expected maj@N accuracy: :func:`weighted_vote_curve` with every weight 1.

    >>> majority_curve([["7", "9", "7"]], [[True, False, True]], Ns=[1, 3]).as_dict()
    {1: 0.6666666666666666, 3: 1.0}
    """
    c = _check_grid(correct, "majority_curve")
    return weighted_vote_curve(answers, np.ones(c.shape), c, Ns, n_resamples=n_resamples, seed=seed)
