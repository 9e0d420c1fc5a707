"""Outcome-level evaluation metrics: pass@k, maj@k, and the confidence intervals every reported
accuracy carries.

Shape letters: ``P`` problems, ``n`` samples drawn per problem, ``k`` the budget being scored.

Where this departs from the sources:

1. pass@k with n < k raises. Chen et al.'s reference snippet returns 1.0 there (its
   ``n - c < k`` early exit), which silently reports a budget that was never sampled.
2. maj@k follows self-consistency (Wang et al. 2022) with two rules the paper leaves open: a
   sample with no extracted answer (None) casts no vote, and if none of the first k samples has
   an answer the problem counts as wrong; ties go to the answer whose first sample comes first.
3. Empty inputs raise instead of returning NaN, so an empty evaluation split is loud.

>>> round(pass_at_k(10, 3, 1), 12)   # k = 1: just c / n
0.3
>>> maj_at_k([["4", "5", "4"], [None, "2", "3"]], 3, references=["4", "3"])
0.5
>>> accuracy_with_ci([True, True, False, True])["mean"]
0.75
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from finegrain.eval.selection import answer_correctness, weighted_majority


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k (P(at least one of k samples is correct)) from n ≥ k samples.

    pass@k = 1 − C(n − c, k) / C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i)
    The product form avoids huge binomials; it is 1 exactly when n − c < k.

    Source: Chen et al. 2021, "Evaluating Large Language Models Trained on Code",
    arXiv 2107.03374, §2.1 (estimator and its numerically stable numpy form).

    Args:
        n: samples drawn for the problem, n ≥ k.
        c: correct samples among them, 0 ≤ c ≤ n.
        k: budget, k ≥ 1.
    Returns:
        float in [0, 1].

    >>> pass_at_k(4, 1, 2)   # 1 − C(3,2)/C(4,2) = 1 − 3/6
    0.5
    >>> pass_at_k(3, 1, 5)
    Traceback (most recent call last):
    ...
    ValueError: pass_at_k needs n >= k >= 1 and 0 <= c <= n, got n=3, c=1, k=5
    """
    if not (1 <= k <= n and 0 <= c <= n):
        raise ValueError(f"pass_at_k needs n >= k >= 1 and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(ns: Sequence[int], cs: Sequence[int], k: int) -> float:
    """(1/P) Σ_p pass@k(n_p, c_p): pass@k averaged over P problems.

    Args:
        ns: (P,) samples per problem; cs: (P,) correct samples per problem.
    For a confidence interval, pass the per-problem values to :func:`bootstrap_ci`.

    >>> mean_pass_at_k([4, 4], [1, 0], 2)
    0.25
    """
    if len(ns) != len(cs) or len(ns) == 0:
        raise ValueError(f"mean_pass_at_k: ns and cs must be non-empty and equally long, got {len(ns)} and {len(cs)}")
    return float(np.mean([pass_at_k(n, c, k) for n, c in zip(ns, cs)]))


def majority_correct(answers: Sequence[Sequence[Hashable | None]], k: int, *,
                     correct: Sequence[Sequence[bool]] | None = None,
                     references: Sequence[Hashable] | None = None) -> list[bool]:
    """Per problem: is the majority answer of the first k samples correct?

    â_p = argmax_a #{i ≤ k : a_{p,i} = a} (None does not vote; ties → earliest first occurrence),
    then correct_p = [â_p is right], False when no sample among the first k has an answer.

    Give exactly one of
        correct: (P, n) bool per sample; the voted answer takes the flag of its samples
            (one answer string must not be both right and wrong within a problem), or
        references: (P,) reference answers; right means ``â_p == reference`` (normalise first).

    Args:
        answers: P lists of n_p ≥ k extracted answers (None = no answer).
    Returns:
        list of P bools (feed to :func:`accuracy_with_ci`).
    """
    if (correct is None) == (references is None):
        raise ValueError("majority_correct: give exactly one of correct= or references=")
    if len(answers) == 0:
        raise ValueError("majority_correct: no problems")
    targets = correct if correct is not None else references
    if len(targets) != len(answers):
        raise ValueError(f"majority_correct: {len(answers)} problems but {len(targets)} correct/references")
    out = []
    for p, a in enumerate(answers):
        if not 1 <= k <= len(a):
            raise ValueError(f"majority_correct: problem {p} has n={len(a)} samples, needs n >= k={k} >= 1")
        voted = weighted_majority(a[:k])
        if voted is None:
            out.append(False)
        elif correct is not None:
            out.append(answer_correctness(a, correct[p])[voted])
        else:
            out.append(voted == references[p])
    return out


def maj_at_k(answers: Sequence[Sequence[Hashable | None]], k: int, *,
             correct: Sequence[Sequence[bool]] | None = None,
             references: Sequence[Hashable] | None = None) -> float:
    """maj@k: fraction of problems whose majority answer over the first k samples is right.

    maj@k = (1/P) Σ_p [ majority(a_{p,1..k}) is right ]   (see :func:`majority_correct`)

    Source: self-consistency, Wang et al. 2022, arXiv 2203.11171. Uses the first k samples as
    drawn; for the expectation over all k-subsets use ``selection.majority_curve``.

    >>> maj_at_k([["7", "9", "9"]], 3, correct=[[True, False, False]])
    0.0
    """
    return float(np.mean(majority_correct(answers, k, correct=correct, references=references)))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion p̂ = successes / n.

    centre = (p̂ + z²/2n) / (1 + z²/n),  half = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²),
    interval = [centre − half, centre + half] (inside [0, 1]; never degenerate at p̂ = 0 or 1).

    Source: Wilson 1927, "Probable inference, the law of succession, and statistical
    inference", JASA 22(158):209–212. z = 1.96 gives a ~95 % interval.

    Args:
        successes: 0 ≤ successes ≤ n.  n: trials, n ≥ 1.
    Returns:
        (lo, hi).

    >>> lo, hi = wilson_interval(0, 10)
    >>> (lo, round(hi, 4))
    (0.0, 0.2775)
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs n >= 1 and 0 <= successes <= n, got successes={successes}, n={n}")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean,
                 n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(values)``.

    Draw n_boot resamples of the n values with replacement, compute the statistic on each,
    return its α/2 and 1 − α/2 quantiles (Efron & Tibshirani 1993, "An Introduction to the
    Bootstrap", ch. 13). Randomness comes only from ``numpy.random.default_rng(seed)``.

    Args:
        values: (n,) float, n ≥ 1 (e.g. per-problem accuracies from a ``Curve``).
        stat: function of a 1-D array returning a float.
    Returns:
        (lo, hi).

    >>> bootstrap_ci([0.5, 0.5, 0.5])
    (0.5, 0.5)
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci: values must be a non-empty 1-D list, got shape {x.shape}")
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError(f"bootstrap_ci: needs 0 < alpha < 1 and n_boot >= 1, got alpha={alpha}, n_boot={n_boot}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))  # (n_boot, n)
    stats = np.array([stat(x[row]) for row in idx])  # (n_boot,)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def accuracy_with_ci(correct: Sequence[bool], z: float = 1.96) -> dict[str, float]:
    """Accuracy of a list of right/wrong outcomes with its Wilson interval.

    Returns {"mean": k/n, "lo": …, "hi": …, "n": n}; use it for every reported accuracy.

    >>> r = accuracy_with_ci([True, False])
    >>> r["mean"], round(r["lo"], 4), round(r["hi"], 4), r["n"]
    (0.5, 0.0945, 0.9055, 2)
    """
    n = len(correct)
    if n == 0:
        raise ValueError("accuracy_with_ci: no outcomes")
    k = int(sum(bool(c) for c in correct))
    lo, hi = wilson_interval(k, n, z)
    return {"mean": k / n, "lo": lo, "hi": hi, "n": n}
