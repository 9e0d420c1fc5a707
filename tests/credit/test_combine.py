"""Tests for finegrain.credit.combine.combine_source_advantages."""

from __future__ import annotations

import math

import pytest
import torch

from finegrain.credit.combine import combine_source_advantages
from finegrain.credit.prime import prime_loo_exact, prime_rloo
from finegrain.masked import masked_whiten
from tests.helpers import close


MASK = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
PRM = torch.tensor([[1.0, 2.0, float("nan")], [0.0, -1.0, 4.0]])
OUT = torch.tensor([[0.5, 0.5, 7.0], [-0.5, -0.5, -0.5]])


def test_weighted_sum_worked_example():
    # 5·PRM + 2·OUT on trained tokens, 0 elsewhere (the NaN and the 7 sit under a False mask):
    #   row 0: [5 + 1, 10 + 1, 0] = [6, 11, 0]
    #   row 1: [0 − 1, −5 − 1, 20 − 1] = [−1, −6, 19]
    out = combine_source_advantages({"implicit_prm": PRM, "verifier": OUT}, {"implicit_prm": 5.0, "verifier": 2.0},
                                    MASK, whiten=False)
    close(out, [[6, 11, 0], [-1, -6, 19]])


def test_coefficients_are_really_applied():
    base = combine_source_advantages({"a": PRM, "b": OUT}, {"a": 1.0, "b": 1.0}, MASK, whiten=False)
    zero_b = combine_source_advantages({"a": PRM, "b": OUT}, {"a": 1.0, "b": 0.0}, MASK, whiten=False)
    close(base - zero_b, torch.where(MASK, OUT, torch.zeros(())))


def test_whiten_worked_example():
    # Sum on trained tokens (coefs 1): [1.5, 2.5 | −0.5, −1.5, 3.5]; mean = 5.5/5 = 1.1
    # unbiased var = Σ(x − 1.1)² / 4 = (0.16 + 1.96 + 2.56 + 6.76 + 5.76) / 4 = 17.2 / 4 = 4.3
    out = combine_source_advantages({"a": PRM, "b": OUT}, {"a": 1.0, "b": 1.0}, MASK, whiten=True)
    s = math.sqrt(4.3 + 1e-8)
    close(out, [[(1.5 - 1.1) / s, (2.5 - 1.1) / s, 0], [(-0.5 - 1.1) / s, (-1.5 - 1.1) / s, (3.5 - 1.1) / s]])
    raw = combine_source_advantages({"a": PRM, "b": OUT}, {"a": 1.0, "b": 1.0}, MASK, whiten=False)
    close(out, masked_whiten(raw, MASK))


def test_missing_coefficient_names_the_source():
    with pytest.raises(KeyError, match="verifier"):
        combine_source_advantages({"implicit_prm": PRM, "verifier": OUT}, {"implicit_prm": 5.0}, MASK, whiten=False)


def test_coefficient_for_unknown_source_raises():
    with pytest.raises(KeyError, match="verifer"):
        combine_source_advantages({"verifier": OUT}, {"verifier": 1.0, "verifer": 1.0}, MASK, whiten=False)


def test_shape_mismatch_and_empty_raise():
    with pytest.raises(ValueError, match="^a: expected"):
        combine_source_advantages({"a": PRM[:, :2]}, {"a": 1.0}, MASK, whiten=False)
    with pytest.raises(ValueError, match="empty"):
        combine_source_advantages({}, {}, MASK, whiten=False)


def test_prime_pipeline_end_to_end():
    # PRIME's credit for one batch: implicit PRM (every token) + verifier (last token), coefs 5/5,
    # whitened. Checked against the same steps written out by hand with the two estimators.
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    g = torch.tensor([3, 8, 3, 8])
    s = torch.zeros(4, 4, dtype=torch.long)
    prm = torch.where(mask, torch.randn(4, 4, generator=gen), torch.zeros(()))
    acc = torch.tensor([1.0, 0.0, 0.0, 1.0])
    last = (mask.long().cumsum(1) == mask.sum(1, keepdim=True)) & mask
    ver = torch.where(last, acc[:, None], torch.zeros(()))
    per_source = {"implicit_prm": prime_rloo(prm, mask, g, s, reward_at="token"),
                  "verifier": prime_rloo(ver, mask, g, s, reward_at="last")}
    out = combine_source_advantages(per_source, {"implicit_prm": 5.0, "verifier": 5.0}, mask, whiten=True)
    # verifier part: groups {0, 2} and {1, 3}: R − other = [1, −1, −1, 1] on every trained token
    close(per_source["verifier"], torch.where(mask, torch.tensor([1.0, -1.0, -1.0, 1.0])[:, None], torch.zeros(())))
    close(out, masked_whiten(5 * per_source["implicit_prm"] + 5 * per_source["verifier"], mask))
    assert torch.isfinite(out).all()
    # the exact form plugs in the same way
    per_source["implicit_prm"] = prime_loo_exact(prm, mask, g, s)
    assert torch.isfinite(combine_source_advantages(per_source, {"implicit_prm": 5.0, "verifier": 5.0}, mask,
                                                    whiten=True)).all()
