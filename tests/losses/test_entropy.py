"""Tests for finegrain.losses.entropy: worked examples (a), loop reference (b), invariances (c)."""

from __future__ import annotations

import math

import pytest
import torch

from finegrain.losses.entropy import entropy_from_logits
from tests.reference import loops
from tests.helpers import close


def random_logits(seed: int, B: int, L: int, V: int, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, V, generator=gen) * scale


# ------------------------------------------------------------------------------ (a) worked examples

def test_worked_examples():
    # position 0: uniform over 4 -> ln 4 = 1.3862944
    # position 1: logits (0, ln 3, −inf, −inf) -> p = (1/4, 3/4, 0, 0):
    #             H = −(¼ ln ¼ + ¾ ln ¾) = 0.5623351; the −inf entries contribute 0, not NaN
    # position 2: one logit far above the rest -> H ≈ 0
    ninf = float("-inf")
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0],
                            [0.0, math.log(3), ninf, ninf],
                            [100.0, 0.0, 0.0, 0.0]]])
    expected = [[math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), 0.0]]
    close(entropy_from_logits(logits), expected)
    close(entropy_from_logits(logits, chunk_size=1), expected)


# ------------------------------------------------------------------------------ (b) loop reference

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("B,L,V", [(1, 1, 2), (2, 3, 5), (4, 7, 17)])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 1000])
def test_matches_loop(seed, B, L, V, chunk_size):
    logits = random_logits(seed, B, L, V)
    close(entropy_from_logits(logits, chunk_size=chunk_size), loops.entropy(logits.tolist()))


# ------------------------------------------------------------------------------ (c) invariances

def test_matches_torch_categorical():
    logits = random_logits(0, 3, 4, 11)
    close(entropy_from_logits(logits), torch.distributions.Categorical(logits=logits).entropy())


def test_shift_invariant_and_stable_for_huge_logits():
    # float64 so that adding 1e4 does not itself round the logits
    logits = random_logits(1, 2, 3, 7).double()
    base = entropy_from_logits(logits)
    close(entropy_from_logits(logits + 1e4), base)
    big = entropy_from_logits(logits * 1e4)
    assert torch.isfinite(big).all() and (big >= 0).all()


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_chunked_gradient_equals_unchunked(chunk_size):
    logits = random_logits(2, 2, 3, 6).requires_grad_()
    entropy_from_logits(logits).sum().backward()
    full = logits.grad.clone()
    logits.grad = None
    entropy_from_logits(logits, chunk_size=chunk_size).sum().backward()
    close(logits.grad, full)


def test_masked_vocab_gradient_is_finite():
    logits = random_logits(3, 1, 2, 5)
    logits[..., 0] = float("-inf")
    logits.requires_grad_()
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_permuting_positions_permutes_the_output():
    logits = random_logits(4, 3, 5, 4)
    perm = torch.tensor([2, 0, 1])
    close(entropy_from_logits(logits[perm]), entropy_from_logits(logits)[perm])


def test_half_precision_is_computed_in_float32():
    logits = random_logits(5, 2, 2, 9)
    out = entropy_from_logits(logits.bfloat16())
    assert out.dtype == torch.float32
    close(out, entropy_from_logits(logits.bfloat16().float()))


def test_bad_arguments():
    with pytest.raises(ValueError, match="logits"):
        entropy_from_logits(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(torch.zeros(2, 3, 4), chunk_size=0)
