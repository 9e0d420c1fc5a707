"""Tests for finegrain.eval.selection: step aggregation, best-of-N, weighted votes and their curves."""

import itertools

import numpy as np
import pytest

from finegrain.eval.metrics import maj_at_k, pass_at_k
from finegrain.eval.selection import (
    STEP_AGGREGATIONS,
    _subsets,
    aggregate_steps,
    best_of_n,
    bon_curve,
    bon_rank_probs,
    majority_curve,
    random_curve,
    weighted_majority,
    weighted_vote_curve,
)

# ---------------------------------------------------------------- brute-force references


def brute_bon(scores, correct, N, tie):
    """Average over every N-subset of the correctness of the best-of-N pick."""
    accs = []
    for s in itertools.combinations(range(len(scores)), N):
        top = max(scores[i] for i in s)
        winners = [i for i in s if scores[i] == top]
        accs.append(correct[winners[0]] if tie == "first" else np.mean([correct[i] for i in winners]))
    return float(np.mean(accs))


def brute_vote(answers, weights, correct, N):
    """Average over every N-subset (original order kept) of the correctness of the weighted vote."""
    ok = {a: c for a, c in zip(answers, correct) if a is not None}
    accs = []
    for s in itertools.combinations(range(len(answers)), N):
        voted = weighted_majority([answers[i] for i in s], [weights[i] for i in s])
        accs.append(voted is not None and ok[voted])
    return float(np.mean(accs))


def random_problems(rng, P, n, n_answers=3, none_rate=0.2):
    """Answers drawn from a few strings (so votes tie), '0' is the right one."""
    answers = [[None if rng.random() < none_rate else str(rng.integers(n_answers)) for _ in range(n)]
               for _ in range(P)]
    correct = np.array([[a == "0" for a in row] for row in answers])
    return answers, correct


# ---------------------------------------------------------------- step aggregation


def test_aggregate_steps_worked_examples():
    x = [0.9, 0.5, 0.8]
    assert aggregate_steps(x, "min") == 0.5
    assert aggregate_steps(x, "sum") == pytest.approx(2.2, rel=1e-12)
    assert aggregate_steps(x, "mean") == pytest.approx(2.2 / 3, rel=1e-12)
    assert aggregate_steps(x, "last") == 0.8
    assert aggregate_steps(x, "product") == pytest.approx(0.36, rel=1e-12)  # 0.9·0.5·0.8


def test_aggregate_steps_registry_and_edge_cases():
    assert STEP_AGGREGATIONS.names() == ["last", "mean", "min", "product", "sum"]
    for how in STEP_AGGREGATIONS.names():
        assert aggregate_steps([], how) == float("-inf")  # no steps: ranked below everything
        assert "source" in STEP_AGGREGATIONS.meta(how)
    with pytest.raises(KeyError, match="available: last, mean, min, product, sum"):
        aggregate_steps([1.0], "median")
    with pytest.raises(ValueError, match="NaN"):
        aggregate_steps([1.0, float("nan")], "min")


# ---------------------------------------------------------------- best_of_n / weighted_majority


def test_best_of_n_ties():
    assert best_of_n([0.3, 0.9, 0.9, 0.1]) == 1
    rng = np.random.default_rng(0)
    picks = {best_of_n([0.3, 0.9, 0.9, 0.1], tie="random", rng=rng) for _ in range(50)}
    assert picks == {1, 2}
    assert best_of_n([float("-inf"), -5.0]) == 1
    with pytest.raises(ValueError, match="rng"):
        best_of_n([1.0], tie="random")
    with pytest.raises(ValueError):
        best_of_n([])
    with pytest.raises(ValueError, match="NaN"):
        best_of_n([float("nan")])


def test_weighted_majority_worked_examples():
    # '5' has two votes but total weight 0.3 + 0.4 = 0.7 < 0.9 for '4'
    assert weighted_majority(["4", "5", None, "5"], [0.9, 0.3, 1.0, 0.4]) == "4"
    # unweighted: '5' wins 2–1
    assert weighted_majority(["4", "5", None, "5"]) == "5"
    # tie 0.5 = 0.5: 'b' occurs first
    assert weighted_majority(["b", "a"], [0.5, 0.5]) == "b"
    # all-zero weights: every answer ties at 0 → first one
    assert weighted_majority([None, "x", "y"], [1.0, 0.0, 0.0]) == "x"
    assert weighted_majority([None]) is None
    assert weighted_majority([]) is None
    with pytest.raises(ValueError, match=">= 0"):
        weighted_majority(["a"], [-1.0])
    with pytest.raises(ValueError):
        weighted_majority(["a", "b"], [1.0])


# ---------------------------------------------------------------- best-of-N curve


def test_bon_rank_probs_sum_to_one():
    for n in range(1, 10):
        for N in range(1, n + 1):
            p = bon_rank_probs(n, N)
            assert p.sum() == pytest.approx(1.0, rel=1e-12)
            assert (np.diff(p) <= 0).all()  # better ranks are picked at least as often


def test_bon_curve_worked_example():
    # Scores 0.9 (wrong), 0.7 (right), 0.7 (wrong), 0.1 (right); n = 4, ranks 1..4 in that order.
    # p_r = C(4 − r, N − 1)/C(4, N):  N=1: ¼ each;  N=2: (3, 2, 1, 0)/6;  N=3: (3, 1, 0, 0)/4;  N=4: (1, 0, 0, 0)
    # tie="first"  (correctness by rank 0, 1, 0, 1):   N=1 ½, N=2 2/6 = ⅓, N=3 ¼, N=4 0
    # tie="random" (the 0.7 pair gets ½, ½: 0, ½, ½, 1): N=1 ½, N=2 ½·2/6 + ½·1/6 = ¼, N=3 ½·¼ = ⅛, N=4 0
    scores = [[0.9, 0.7, 0.7, 0.1]]
    correct = [[False, True, False, True]]
    first = bon_curve(scores, correct, Ns=[1, 2, 3, 4], tie="first").as_dict()
    rand = bon_curve(scores, correct, Ns=[1, 2, 3, 4], tie="random").as_dict()
    np.testing.assert_allclose(list(first.values()), [0.5, 1 / 3, 1 / 4, 0.0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(list(rand.values()), [0.5, 1 / 4, 1 / 8, 0.0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("tie", ["first", "random"])
def test_bon_curve_exact_equals_enumeration(tie):
    rng = np.random.default_rng(1)
    for n in range(1, 8):
        scores = rng.integers(0, 3, size=(6, n)).astype(float)  # few levels → many ties
        scores[0, 0] = -np.inf
        correct = rng.random((6, n)) < 0.5
        curve = bon_curve(scores, correct, Ns=range(1, n + 1), tie=tie)
        expected = [[brute_bon(s, c, N, tie) for N in range(1, n + 1)] for s, c in zip(scores, correct)]
        np.testing.assert_allclose(curve.per_problem, expected, rtol=1e-12, atol=1e-12)


def test_bon_curve_oracle_scorer_gives_pass_at_N():
    rng = np.random.default_rng(2)
    correct = rng.random((20, 16)) < 0.3
    Ns = [1, 2, 4, 8, 16]
    for tie in ("first", "random"):
        curve = bon_curve(correct.astype(float), correct, Ns, tie=tie)
        expected = [np.mean([pass_at_k(16, int(c.sum()), N) for c in correct]) for N in Ns]
        np.testing.assert_allclose(curve.mean, expected, rtol=1e-10)


def test_bon_curve_baselines_and_invariances():
    rng = np.random.default_rng(3)
    scores, correct = rng.normal(size=(15, 8)), rng.random((15, 8)) < 0.4
    curve = bon_curve(scores, correct)
    assert curve.Ns == (1, 2, 4, 8)
    # N = 1 is the random selector; a constant scorer with random ties is the random selector at every N
    np.testing.assert_allclose(curve.per_problem[:, 0], correct.mean(1), rtol=1e-12)
    np.testing.assert_allclose(bon_curve(np.zeros((15, 8)), correct).per_problem,
                               random_curve(correct).per_problem, rtol=1e-12)
    # permuting problems permutes per_problem and keeps the mean
    perm = rng.permutation(15)
    permuted = bon_curve(scores[perm], correct[perm])
    np.testing.assert_allclose(permuted.per_problem, curve.per_problem[perm], rtol=1e-12)
    np.testing.assert_allclose(permuted.mean, curve.mean, rtol=1e-12)
    # permuting samples inside a problem changes nothing (random ties are symmetric)
    sperm = rng.permutation(8)
    np.testing.assert_allclose(bon_curve(scores[:, sperm], correct[:, sperm]).per_problem,
                               curve.per_problem, rtol=1e-12)


def test_bon_curve_errors():
    with pytest.raises(ValueError, match="N=5"):
        bon_curve([[0.1, 0.2]], [[True, False]], Ns=[5])
    with pytest.raises(ValueError, match="same"):
        bon_curve([[0.1]], [[True, False]])
    with pytest.raises(ValueError, match="NaN"):
        bon_curve([[np.nan, 0.2]], [[True, False]])
    with pytest.raises(ValueError, match="non-empty"):
        bon_curve(np.zeros((0, 3)), np.zeros((0, 3), bool))


def test_random_curve():
    curve = random_curve([[True, False, False, False], [True, True, False, False]], Ns=[1, 4])
    np.testing.assert_allclose(curve.per_problem, [[0.25, 0.25], [0.5, 0.5]])
    assert curve.as_dict() == {1: 0.375, 4: 0.375}


# ---------------------------------------------------------------- vote curves


def test_vote_curves_exact_equal_enumeration():
    rng = np.random.default_rng(4)
    for n in range(1, 8):
        answers, correct = random_problems(rng, 5, n)
        weights = rng.choice([0.0, 0.25, 0.5, 1.0], size=(5, n))  # ties between weighted totals
        curve = weighted_vote_curve(answers, weights, correct, Ns=range(1, n + 1))
        expected = [[brute_vote(a, w, c, N) for N in range(1, n + 1)]
                    for a, w, c in zip(answers, weights, correct)]
        np.testing.assert_allclose(curve.per_problem, expected, rtol=1e-12, atol=1e-12)
        maj = majority_curve(answers, correct, Ns=range(1, n + 1))
        expected = [[brute_vote(a, [1.0] * n, c, N) for N in range(1, n + 1)] for a, c in zip(answers, correct)]
        np.testing.assert_allclose(maj.per_problem, expected, rtol=1e-12, atol=1e-12)


def test_vote_curve_worked_example():
    # answers 7 7 9 None, 7 right. N=2 (6 subsets):
    #   {7,7}✓, {7,9}→7 first ✓ ×2, {7,None}✓ ×2, {9,None}✗ → 5/6
    # weighted, w = 0.1 0.1 0.9 0.5: {7,7}: 0.2 ✓, {7,9}: 9 wins ✗ ×2, {7,None}✓ ×2, {9,None}✗ → 3/6
    answers, correct = [["7", "7", "9", None]], [[True, True, False, False]]
    assert majority_curve(answers, correct, Ns=[2]).as_dict() == pytest.approx({2: 5 / 6}, rel=1e-12)
    w = [[0.1, 0.1, 0.9, 0.5]]
    assert weighted_vote_curve(answers, w, correct, Ns=[2]).as_dict() == pytest.approx({2: 0.5}, rel=1e-12)


def test_majority_curve_endpoints_match_maj_at_k():
    rng = np.random.default_rng(5)
    answers, correct = random_problems(rng, 12, 9)
    curve = majority_curve(answers, correct, Ns=[1, 9], n_resamples=5)  # N = 1 and N = n are always enumerated exactly
    assert curve.per_problem[:, 1].mean() == pytest.approx(maj_at_k(answers, 9, correct=correct), rel=1e-12)
    has_right_answer = np.array([[a is not None and c for a, c in zip(r, cr)] for r, cr in zip(answers, correct)])
    np.testing.assert_allclose(curve.per_problem[:, 0], has_right_answer.mean(1), rtol=1e-12)


def test_monte_carlo_vote_curve_reproduces_weighted_majority_on_its_subsets():
    rng = np.random.default_rng(6)
    n, N, R = 12, 6, 50  # C(12, 6) = 924 > 50 → Monte Carlo
    answers, correct = random_problems(rng, 4, n)
    weights = rng.random((4, n))
    pos = _subsets(n, N, R, seed=11)
    assert pos.shape == (R, N) and (np.diff(pos, axis=1) > 0).all()
    curve = weighted_vote_curve(answers, weights, correct, Ns=[N], n_resamples=R, seed=11)
    for p in range(4):
        ok = {a: c for a, c in zip(answers[p], correct[p]) if a is not None}
        picks = [weighted_majority([answers[p][i] for i in s], [weights[p][i] for i in s]) for s in pos]
        assert curve.per_problem[p, 0] == np.mean([v is not None and ok[v] for v in picks])


def test_monte_carlo_vote_curve_is_close_to_exact():
    rng = np.random.default_rng(7)
    n, N = 16, 8  # C(16, 8) = 12870 subsets enumerated by brute force
    answers, correct = random_problems(rng, 3, n)
    weights = rng.random((3, n))
    mc = weighted_vote_curve(answers, weights, correct, Ns=[N], n_resamples=40000, seed=0)
    exact = [brute_vote(a, w, c, N) for a, w, c in zip(answers, weights, correct)]
    # Monte Carlo std per problem ≤ 0.5/√40000 = 0.0025
    np.testing.assert_allclose(mc.per_problem[:, 0], exact, atol=1e-2)


def test_vote_curves_invariances():
    rng = np.random.default_rng(8)
    answers, correct = random_problems(rng, 10, 12)
    weights = rng.random((10, 12))
    curve = weighted_vote_curve(answers, weights, correct, Ns=[1, 3, 6, 12], n_resamples=100, seed=3)
    perm = rng.permutation(10)
    permuted = weighted_vote_curve([answers[i] for i in perm], weights[perm], correct[perm],
                                   Ns=[1, 3, 6, 12], n_resamples=100, seed=3)
    # shared subsets: exact equality, even in Monte Carlo mode
    np.testing.assert_array_equal(permuted.per_problem, curve.per_problem[perm])
    again = weighted_vote_curve(answers, weights, correct, Ns=[1, 3, 6, 12], n_resamples=100, seed=3)
    np.testing.assert_array_equal(again.per_problem, curve.per_problem)
    # the draws for one N do not depend on the other Ns asked for
    alone = weighted_vote_curve(answers, weights, correct, Ns=[6], n_resamples=100, seed=3)
    np.testing.assert_array_equal(alone.per_problem[:, 0], curve.per_problem[:, 2])


def test_vote_curve_errors_and_all_none():
    answers = [[None, None], ["1", "1"]]
    curve = majority_curve(answers, [[False, False], [True, True]], Ns=[1, 2])
    np.testing.assert_allclose(curve.per_problem, [[0.0, 0.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="both correct and wrong"):
        majority_curve([["1", "1"]], [[True, False]])
    with pytest.raises(ValueError, match=">= 0"):
        weighted_vote_curve([["1", "2"]], [[1.0, -1.0]], [[True, False]])
    with pytest.raises(ValueError, match=r"\(P, n\)"):
        weighted_vote_curve([["1"]], [[1.0, 1.0]], [[True, False]])
