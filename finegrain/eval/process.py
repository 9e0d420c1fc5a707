"""Process-level evaluation against exact step labels: does a scorer find the wrong steps?

Inputs are per response: ``step_scores`` (S,) floats, higher = more likely correct (a PRM's step
probabilities, implicit-PRM step rewards, ...), and the step labels of
``finegrain.tasks.base.StepLabels`` (``labels``: 1 correct, 0 wrong, −1 unparseable;
``first_error``: index of the first step that is not correct, None when all are correct).
Pass ``[sl.labels for sl in step_labels]`` / ``[sl.first_error for sl in step_labels]``.

Where this departs from the sources:

1. ProcessBench (Zheng et al. 2024) marks an error-free sample with label −1; here that is None,
   matching ``StepLabels.first_error``. Accuracies and F1 are fractions in [0, 1], not percent.
2. ProcessBench's F1 = 2·a·b/(a + b) divides by zero when both accuracies are 0; here it is 0
   (the limit). When one of the two subsets is empty its accuracy and the F1 are NaN.
3. Step AUROC pools the steps of all responses and leaves out unparseable (−1) steps: they are
   neither right nor wrong.

>>> first_error_prediction([0.9, 0.4, 0.8], threshold=0.5)
1
>>> processbench_f1([1, None, 2], [1, None, None])["f1"]
0.6666666666666666
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from finegrain.eval.metrics import accuracy_with_ci, wilson_interval

# Same values as finegrain.tasks.base (a test checks they agree). Not imported from there so that
# evaluation does not load the tasks package (and, through it, tokenizers and torch).
STEP_CORRECT, STEP_WRONG = 1, 0


def _flat(step_scores: Sequence[Sequence[float]], step_labels: Sequence[Sequence[int]]):
    if len(step_scores) != len(step_labels):
        raise ValueError(f"{len(step_scores)} responses of scores but {len(step_labels)} of labels")
    for b, (s, l) in enumerate(zip(step_scores, step_labels)):
        if len(s) != len(l):
            raise ValueError(f"response {b}: {len(s)} step scores but {len(l)} step labels")
    s = np.array([x for r in step_scores for x in r], dtype=float)
    l = np.array([x for r in step_labels for x in r], dtype=int)
    if np.isnan(s).any():
        raise ValueError("step scores contain NaN")
    return s, l


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve, via the Mann–Whitney U statistic with mid-ranks for ties.

    AUROC = (R₊ − n₊(n₊ + 1)/2) / (n₊ n₋) = P(s₊ > s₋) + ½ P(s₊ = s₋),
    R₊ = sum of the (mid-)ranks of the positives in the pooled sample (tied scores share the
    average of their ranks, so a tied pair counts ½). Mann & Whitney 1947; Hanley & McNeil 1982.

    Args:
        scores: (M,) float, no NaN.  positive: (M,) bool.
    Returns:
        float in [0, 1]; NaN when there are no positives or no negatives.

    >>> auroc([0.1, 0.5, 0.5, 0.9], [False, False, True, True])   # pairs: 1, 1, ½, 1 of 4
    0.875
    """
    s = np.asarray(scores, dtype=float)
    pos = np.asarray(positive, dtype=bool)
    if s.shape != pos.shape or s.ndim != 1:
        raise ValueError(f"auroc: scores {s.shape} and positive {pos.shape} must be the same 1-D shape")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0  # (U,) average 1-based rank of each tie group
    rank_sum_pos = mid_rank[inv][pos].sum()
    return float((rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def step_auroc(step_scores: Sequence[Sequence[float]], step_labels: Sequence[Sequence[int]]) -> float:
    """AUROC of step scores for telling CORRECT (1) steps from WRONG (0) steps, pooled over responses.

    Positives are steps labelled 1, negatives steps labelled 0; unparseable steps (−1) are left
    out. See :func:`auroc` for the formula (ties count ½).

    Args:
        step_scores: B lists of S_b floats (higher = more likely correct).
        step_labels: B lists of S_b labels in {1, 0, −1}.
    Returns:
        float in [0, 1]; NaN if no step is correct or none is wrong.

    >>> step_auroc([[0.9, 0.2], [0.7, 0.7, 0.1]], [[1, 0], [1, 0, -1]])   # 1 + 1 + 1 + ½ of 4 pairs
    0.875
    """
    s, l = _flat(step_scores, step_labels)
    keep = (l == STEP_CORRECT) | (l == STEP_WRONG)
    return auroc(s[keep], l[keep] == STEP_CORRECT)


def first_error_prediction(step_scores: Sequence[float], threshold: float) -> int | None:
    """Predicted first wrong step: the first step whose score is below ``threshold``.

    ê = min{ s : r_s < threshold }, None if no such step (predicts an error-free response).
    This is how ProcessBench turns step scores into a prediction (first step judged wrong;
    ``find_first_zero`` in QwenLM/ProcessBench code/run_eval_prm_trl.py).

    Args:
        step_scores: (S,) float of one response.
    Returns:
        int step index or None.

    >>> first_error_prediction([0.9, 0.8], threshold=0.5) is None
    True
    """
    for i, x in enumerate(step_scores):
        if x < threshold:
            return i
    return None


def first_wrong_step_accuracy(pred_first: Sequence[int | None], true_first: Sequence[int | None]
                              ) -> dict[str, float]:
    """Fraction of responses whose predicted first error equals the true one (None == None counts).

    acc = (1/B) Σ_b [ê_b = e_b], with its Wilson interval (:func:`~finegrain.eval.metrics.accuracy_with_ci`).

    Args:
        pred_first, true_first: (B,) step index or None.
    Returns:
        {"mean", "lo", "hi", "n"}.

    >>> first_wrong_step_accuracy([0, None, 2], [0, None, 1])["mean"]
    0.6666666666666666
    """
    if len(pred_first) != len(true_first):
        raise ValueError(f"first_wrong_step_accuracy: {len(pred_first)} predictions but {len(true_first)} labels")
    return accuracy_with_ci([p == t for p, t in zip(pred_first, true_first)])


def processbench_f1(pred_first: Sequence[int | None], true_first: Sequence[int | None]) -> dict:
    """ProcessBench score: harmonic mean of the accuracy on erroneous and on error-free responses.

    error_acc   = mean over responses with e_b ≠ None of [ê_b = e_b]   (exact first-error index)
    correct_acc = mean over responses with e_b = None of [ê_b = None]
    F1 = 2 · error_acc · correct_acc / (error_acc + correct_acc)   (0 when both are 0)

    Source: Zheng et al. 2024, "ProcessBench: Identifying Process Errors in Mathematical
    Reasoning", arXiv 2412.06559; checked against QwenLM/ProcessBench
    code/run_eval_prm_trl.py @ 04d347e7282ce12124be7b0a9cc2fa4d7c562d53 and
    code/run_eval_prm_rlhflow.py @ 1aad79913ab9ca8d1ae5fcb4f52620210b05e7b3 (``data1`` = label ≠ −1,
    ``data2`` = label = −1, ``f1 = 2*acc1*acc2/(acc1+acc2)``).

    Args:
        pred_first, true_first: (B,) first-error index or None (no error).
    Returns:
        {"error_acc", "correct_acc", "f1", "n_error", "n_correct",
         "error_acc_ci": (lo, hi), "correct_acc_ci": (lo, hi)}; an accuracy (and the F1) is NaN
        and its interval (nan, nan) when its subset is empty.

    >>> r = processbench_f1([2, 0, None, 1], [2, 1, None, None])   # error 1/2, correct 1/2
    >>> r["error_acc"], r["correct_acc"], r["f1"]
    (0.5, 0.5, 0.5)
    """
    if len(pred_first) != len(true_first):
        raise ValueError(f"processbench_f1: {len(pred_first)} predictions but {len(true_first)} labels")
    err = [p == t for p, t in zip(pred_first, true_first) if t is not None]
    ok = [p is None for p, t in zip(pred_first, true_first) if t is None]

    def acc(x):
        return (sum(x) / len(x), wilson_interval(sum(x), len(x))) if x else (float("nan"), (float("nan"),) * 2)

    (a, a_ci), (b, b_ci) = acc(err), acc(ok)
    f1 = 0.0 if a + b == 0 else 2 * a * b / (a + b)  # NaN propagates when a subset is empty
    return {"error_acc": a, "correct_acc": b, "f1": f1, "n_error": len(err), "n_correct": len(ok),
            "error_acc_ci": a_ci, "correct_acc_ci": b_ci}


def best_threshold(step_scores: Sequence[Sequence[float]], true_first: Sequence[int | None]) -> dict:
    """The threshold for :func:`first_error_prediction` that maximises the ProcessBench F1.

    Only the order of a threshold among the step scores matters, so the candidates are every
    distinct step score (the smallest predicts no error anywhere) and +inf (error at step 0
    whenever there is a step). Ties go to the smallest threshold. Tune on a split you do not
    report: the F1 at the chosen threshold is optimistic on the split it was tuned on.

    A response's prediction at t is the number of steps whose running minimum is ≥ t (None if
    that is all of them), found by binary search: O(U log S) per response for U candidates.

    Args:
        step_scores: B lists of S_b floats.  true_first: (B,) first-error index or None.
    Returns:
        {"threshold": float, **processbench_f1(...)} at the chosen threshold.

    >>> best_threshold([[0.9, 0.2], [0.8, 0.7]], [1, None])["threshold"]
    0.7
    """
    if len(step_scores) != len(true_first):
        raise ValueError(f"best_threshold: {len(step_scores)} responses but {len(true_first)} labels")
    flat = np.array([x for r in step_scores for x in r], dtype=float)
    if np.isnan(flat).any():
        raise ValueError("best_threshold: step scores contain NaN")
    cand = np.append(np.unique(flat), np.inf)  # (U,)
    n_err_hit = np.zeros(len(cand))  # per candidate: erroneous responses with ê = e
    n_ok_hit = np.zeros(len(cand))  # per candidate: error-free responses with ê = None
    for r, e in zip(step_scores, true_first):
        run_min = np.minimum.accumulate(np.asarray(r, dtype=float))  # (S,) non-increasing
        pred = np.searchsorted(-run_min, -cand, side="right")  # (U,) #steps with run_min ≥ t = ê, or S
        if e is None:
            n_ok_hit += pred == len(run_min)  # ê = None
        else:
            n_err_hit += (pred == e) & (pred < len(run_min))  # pred = S means ê = None, never a match
    n_err = sum(e is not None for e in true_first)
    n_ok = len(true_first) - n_err
    with np.errstate(invalid="ignore", divide="ignore"):
        a, b = n_err_hit / n_err, n_ok_hit / n_ok
        f1 = np.where(a + b == 0, 0.0, 2 * a * b / (a + b))
    if np.isnan(f1).all():
        raise ValueError("best_threshold: needs at least one erroneous and one error-free response")
    t = float(cand[int(np.nanargmax(f1))])
    pred_first = [first_error_prediction(r, t) for r in step_scores]
    return {"threshold": t, **processbench_f1(pred_first, true_first)}


def miracle_step_rate(final_correct: Sequence[bool], first_error: Sequence[int | None]) -> dict:
    """How often a right final answer comes with reasoning that has a non-correct step.

    miracle_b = final_correct_b ∧ (first_error_b ≠ None)
    among_correct = Σ miracle / Σ final_correct     (NaN when no answer is right)
    overall       = Σ miracle / B
    "Miracle steps" as in Rubric Reward Models, arXiv 2510.07774 (methods.md §18a). A step
    counts as non-correct when it is wrong or unparseable, exactly as ``StepLabels.first_error``.

    Args:
        final_correct: (B,) bool.  first_error: (B,) index or None.
    Returns:
        {"among_correct", "overall", "n_miracle", "n_correct", "n"}.

    >>> r = miracle_step_rate([True, True, False, True], [None, 2, 0, 1])
    >>> r["among_correct"], r["overall"]
    (0.6666666666666666, 0.5)
    """
    if len(final_correct) != len(first_error) or len(final_correct) == 0:
        raise ValueError(f"miracle_step_rate: needs equally long non-empty inputs, got {len(final_correct)} "
                         f"and {len(first_error)}")
    n_correct = sum(bool(c) for c in final_correct)
    n_miracle = sum(bool(c) and e is not None for c, e in zip(final_correct, first_error))
    n = len(final_correct)
    return {"among_correct": n_miracle / n_correct if n_correct else float("nan"),
            "overall": n_miracle / n, "n_miracle": n_miracle, "n_correct": n_correct, "n": n}
