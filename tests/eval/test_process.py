"""Tests for finegrain.eval.process: step AUROC, first-error prediction, ProcessBench F1, miracle steps."""

import itertools

import numpy as np
import pytest

from finegrain.eval import process
from finegrain.eval.process import (
    auroc,
    best_threshold,
    first_error_prediction,
    first_wrong_step_accuracy,
    miracle_step_rate,
    processbench_f1,
    step_auroc,
)
from finegrain.tasks import base as task_base
from finegrain.tasks.base import StepLabels


def brute_auroc(scores, positive):
    """Fraction of (positive, negative) pairs ranked right, ties counting ½."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    return np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)])


# ---------------------------------------------------------------- AUROC


def test_auroc_hand_cases():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [True, False, False]) == 0.5  # all tied
    # pos {0.5, 0.9}, neg {0.1, 0.5}: pairs 0.5>0.1 (1), 0.5=0.5 (½), 0.9>0.1 (1), 0.9>0.5 (1) → 3.5/4
    assert auroc([0.1, 0.5, 0.5, 0.9], [False, False, True, True]) == 0.875
    # mid-ranks: scores 1,2,2,2,3 → ranks 1,3,3,3,5; positives at the two 2s and the 3: R₊ = 11,
    # AUROC = (11 − 3·4/2)/(3·2) = 5/6; pairwise: (2 vs 1)=1 ×2, (2 vs 2)=½ ×2, (3 vs 1, 3 vs 2)=2 → 5/6
    assert auroc([1, 2, 2, 2, 3], [False, True, True, False, True]) == pytest.approx(5 / 6, rel=1e-12)


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = int(rng.integers(2, 40))
        scores = rng.integers(0, 5, size=m).astype(float)  # many ties
        positive = rng.random(m) < 0.5
        if positive.all() or not positive.any():
            continue
        assert auroc(scores, positive) == pytest.approx(brute_auroc(scores, positive), rel=1e-12)


def test_auroc_matches_scipy_mann_whitney():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=60), 1)
    positive = rng.random(60) < 0.4
    u = stats.mannwhitneyu(scores[positive], scores[~positive]).statistic
    assert auroc(scores, positive) == pytest.approx(u / (positive.sum() * (~positive).sum()), rel=1e-12)


def test_auroc_single_class_is_nan():
    assert np.isnan(auroc([0.1, 0.2], [True, True]))
    assert np.isnan(auroc([], []))


def test_label_values_agree_with_tasks():
    assert (process.STEP_CORRECT, process.STEP_WRONG) == (task_base.STEP_CORRECT, task_base.STEP_WRONG)


def test_step_auroc_ignores_unparseable_and_pools_responses():
    scores = [[0.9, 0.2], [0.7, 0.7]]
    labels = [[1, 0], [1, 0]]
    # correct {0.9, 0.7}, wrong {0.2, 0.7}: 1 + 1 + 1 + ½ of 4
    assert step_auroc(scores, labels) == 0.875
    # unparseable steps with any score change nothing
    assert step_auroc([[0.9, 0.2, 0.0], [0.7, 0.7], [1.0]], [[1, 0, -1], [1, 0], [-1]]) == 0.875
    # works straight from StepLabels
    sl = [StepLabels([1, 0], [(0, 1), (1, 2)], 1), StepLabels([1, 0], [(0, 1), (1, 2)], 1)]
    assert step_auroc(scores, [x.labels for x in sl]) == 0.875
    assert np.isnan(step_auroc([[0.1, 0.2]], [[1, -1]]))  # no wrong step
    with pytest.raises(ValueError, match="response 0"):
        step_auroc([[0.1]], [[1, 0]])
    with pytest.raises(ValueError, match="NaN"):
        step_auroc([[np.nan, 0.1]], [[1, 0]])


# ---------------------------------------------------------------- first error


def test_first_error_prediction():
    assert first_error_prediction([0.9, 0.4, 0.1], 0.5) == 1
    assert first_error_prediction([0.9, 0.5], 0.5) is None  # strict: a score equal to the threshold passes
    assert first_error_prediction([], 0.5) is None
    assert first_error_prediction([0.1], float("inf")) == 0


def test_first_wrong_step_accuracy():
    # matches: 0==0 ✓, None==None ✓, 2 vs 1 ✗, None vs 3 ✗ → 2/4
    r = first_wrong_step_accuracy([0, None, 2, None], [0, None, 1, 3])
    assert r["mean"] == 0.5 and r["n"] == 4 and r["lo"] < 0.5 < r["hi"]
    with pytest.raises(ValueError):
        first_wrong_step_accuracy([0], [0, 1])


# ---------------------------------------------------------------- ProcessBench


def test_processbench_f1_hand_case():
    # erroneous (true ≠ None): (1,1)✓ (0,2)✗ (None,3)✗ (3,3)✓ → error_acc = 2/4 = ½
    # error-free (true = None): None✓ None✓ 4✗ → correct_acc = ⅔
    # F1 = 2·½·⅔ / (½ + ⅔) = (2/3)/(7/6) = 4/7
    pred = [1, 0, None, 3, None, None, 4]
    true = [1, 2, 3, 3, None, None, None]
    r = processbench_f1(pred, true)
    assert r["error_acc"] == 0.5 and r["correct_acc"] == pytest.approx(2 / 3, rel=1e-12)
    assert r["f1"] == pytest.approx(4 / 7, rel=1e-12)
    assert (r["n_error"], r["n_correct"]) == (4, 3)
    assert r["error_acc_ci"][0] < 0.5 < r["error_acc_ci"][1]
    # ProcessBench's own code works in percent: f1 = 2·acc1·acc2/(acc1+acc2) with acc in %
    acc1, acc2 = 50.0, 200 / 3
    assert r["f1"] * 100 == pytest.approx(2 * acc1 * acc2 / (acc1 + acc2), rel=1e-12)


def test_processbench_f1_edges():
    assert processbench_f1([None, 0], [1, None])["f1"] == 0.0  # both accuracies 0
    r = processbench_f1([1], [1])  # no error-free sample
    assert r["error_acc"] == 1.0 and np.isnan(r["correct_acc"]) and np.isnan(r["f1"])
    with pytest.raises(ValueError):
        processbench_f1([1], [1, None])


def test_best_threshold_hand_case_and_grid_search():
    scores = [[0.9, 0.2, 0.8], [0.8, 0.7], [0.6, 0.3], [0.95]]
    true = [1, None, 0, None]
    # t ∈ (0.6, 0.7]: preds 1, None, 0, None → all right, F1 = 1; the smallest candidate is 0.7
    r = best_threshold(scores, true)
    assert r["threshold"] == 0.7 and r["f1"] == 1.0
    # it is the best over a fine grid of thresholds
    rng = np.random.default_rng(2)
    scores = [list(np.round(rng.random(int(rng.integers(0, 6))), 2)) for _ in range(40)]
    true = [None if rng.random() < 0.4 else int(rng.integers(0, max(len(s), 1))) for s in scores]
    r = best_threshold(scores, true)
    grid = np.linspace(-0.01, 1.01, 205)
    best_grid = max(processbench_f1([first_error_prediction(s, t) for s in scores], true)["f1"] for t in grid)
    assert r["f1"] == pytest.approx(best_grid, rel=1e-12)
    assert r["f1"] == processbench_f1([first_error_prediction(s, r["threshold"]) for s in scores], true)["f1"]


def test_best_threshold_needs_both_kinds():
    with pytest.raises(ValueError, match="erroneous and one error-free"):
        best_threshold([[0.1]], [None])


# ---------------------------------------------------------------- miracle steps


def test_miracle_step_rate():
    # right answers at 0, 1, 3, 4; of these 1 and 4 have a non-correct step → 2/4 ; overall 2/6
    final = [True, True, False, True, True, False]
    first = [None, 0, 2, None, 3, None]
    r = miracle_step_rate(final, first)
    assert r["among_correct"] == 0.5 and r["overall"] == pytest.approx(1 / 3, rel=1e-12)
    assert (r["n_miracle"], r["n_correct"], r["n"]) == (2, 4, 6)
    r = miracle_step_rate([False, False], [0, None])
    assert np.isnan(r["among_correct"]) and r["overall"] == 0.0
    with pytest.raises(ValueError):
        miracle_step_rate([], [])
