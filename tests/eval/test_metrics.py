"""Tests for finegrain.eval.metrics: pass@k, maj@k, Wilson / bootstrap intervals."""

import itertools
import math

import numpy as np
import pytest

from finegrain.eval.metrics import (
    accuracy_with_ci,
    bootstrap_ci,
    maj_at_k,
    majority_correct,
    mean_pass_at_k,
    pass_at_k,
    wilson_interval,
)

# ---------------------------------------------------------------- pass@k


def test_pass_at_k_worked_example():
    # n=5, c=2, k=2: 1 − C(3,2)/C(5,2) = 1 − 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, rel=1e-12)
    # k=1 is the plain success rate c/n
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8, rel=1e-12)
    # n − c < k: every k-subset holds a correct sample
    assert pass_at_k(5, 4, 2) == 1.0
    assert pass_at_k(5, 0, 3) == 0.0


def test_pass_at_k_matches_binomial_closed_form():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-9, abs=1e-12), (n, c, k)


def test_pass_at_k_is_probability_over_k_subsets():
    # Definition: P(a uniform k-subset of the n samples holds at least one correct one).
    correct = [True, False, False, True, False, False]
    n, c = len(correct), sum(correct)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        brute = np.mean([any(correct[i] for i in s) for s in subsets])
        assert pass_at_k(n, c, k) == pytest.approx(brute, rel=1e-12)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows float; the product form does not.
    v = pass_at_k(1000, 1, 500)
    assert v == pytest.approx(0.5, rel=1e-9)  # one correct sample, half of them drawn


@pytest.mark.parametrize("n,c,k", [(3, 1, 5), (4, 5, 2), (4, -1, 2), (4, 1, 0)])
def test_pass_at_k_bad_args_raise_naming_them(n, c, k):
    with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
        pass_at_k(n, c, k)


def test_mean_pass_at_k():
    # pass@2(4,1) = 1 − C(3,2)/C(4,2) = 0.5 ; pass@2(4,2) = 1 − C(2,2)/C(4,2) = 5/6
    assert mean_pass_at_k([4, 4], [1, 2], 2) == pytest.approx((0.5 + 5 / 6) / 2, rel=1e-12)
    with pytest.raises(ValueError):
        mean_pass_at_k([], [], 1)
    with pytest.raises(ValueError):
        mean_pass_at_k([4], [1, 2], 1)


# ---------------------------------------------------------------- maj@k


def test_majority_correct_worked_example():
    answers = [
        ["4", "5", "4", "5"],    # k=3: 4 has 2 votes → right
        ["4", "5", "5", "4"],    # k=3: 5 has 2 votes → wrong; k=4: 2–2 tie → '4' first → right
        [None, None, "9", "4"],  # k=2: no votes → wrong; k=3: '9' → wrong; k=4: 1–1 tie → '9' → wrong
        [None, "4", None, "9"],  # None casts no vote: k=3 → '4' → right
    ]
    refs = ["4", "4", "4", "4"]
    assert majority_correct(answers, 3, references=refs) == [True, False, False, True]
    assert majority_correct(answers, 4, references=refs) == [True, True, False, True]
    assert majority_correct(answers, 2, references=refs) == [True, True, False, True]  # row 2: '4','5' tie → '4'
    assert maj_at_k(answers, 3, references=refs) == 0.5


def test_maj_at_k_correct_flags_equal_references():
    rng = np.random.default_rng(0)
    answers = [[str(x) if x >= 0 else None for x in rng.integers(-1, 4, size=7)] for _ in range(30)]
    refs = [str(x) for x in rng.integers(0, 4, size=30)]
    flags = [[a == r for a in row] for row, r in zip(answers, refs)]
    for k in range(1, 8):
        assert maj_at_k(answers, k, correct=flags) == maj_at_k(answers, k, references=refs)


def test_maj_at_k_errors():
    with pytest.raises(ValueError, match="exactly one"):
        maj_at_k([["1"]], 1)
    with pytest.raises(ValueError, match="exactly one"):
        maj_at_k([["1"]], 1, correct=[[True]], references=["1"])
    with pytest.raises(ValueError, match="n >= k"):
        maj_at_k([["1", "2"]], 3, references=["1"])
    with pytest.raises(ValueError, match="both correct and wrong"):
        maj_at_k([["1", "1"]], 2, correct=[[True, False]])
    with pytest.raises(ValueError, match="no problems"):
        maj_at_k([], 1, references=[])


# ---------------------------------------------------------------- intervals


def test_wilson_worked_example():
    # 5/10, z=1.96: centre = 0.5, half = (1.96/1.38416)·sqrt(0.025 + 3.8416/400) = 0.263410
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.5 - 0.263410, abs=1e-6)
    assert hi == pytest.approx(0.5 + 0.263410, abs=1e-6)
    # 0/10: lo = 0 exactly (centre = half), hi = 2·0.19208/1.38416 = 0.277540
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx(0.277540, abs=1e-6)


def test_wilson_properties():
    for n in (1, 2, 7, 50):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            lo2, hi2 = wilson_interval(n - k, n)
            assert lo == pytest.approx(1 - hi2, abs=1e-12)  # symmetric under success ↔ failure
    wide, narrow = wilson_interval(5, 10), wilson_interval(50, 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_bootstrap_ci_deterministic_and_close_to_normal_interval():
    values = np.array([1.0] * 200 + [0.0] * 200)
    lo, hi = bootstrap_ci(values, n_boot=4000, seed=1)
    assert (lo, hi) == bootstrap_ci(values, n_boot=4000, seed=1)
    half = 1.96 * 0.5 / math.sqrt(400)  # normal approximation, 0.049
    assert lo == pytest.approx(0.5 - half, abs=1e-2)
    assert hi == pytest.approx(0.5 + half, abs=1e-2)
    assert bootstrap_ci([2.0, 2.0], stat=np.median) == (2.0, 2.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_accuracy_with_ci():
    r = accuracy_with_ci([True, True, False, True])
    assert r["mean"] == 0.75 and r["n"] == 4
    assert (r["lo"], r["hi"]) == wilson_interval(3, 4)
    with pytest.raises(ValueError):
        accuracy_with_ci([])
