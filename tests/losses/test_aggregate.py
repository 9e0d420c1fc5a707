"""Tests for finegrain.losses.aggregate: worked examples (a), loop references (b), invariances (c)."""

from __future__ import annotations

import pytest
import torch

from finegrain.losses import AGGREGATIONS
from finegrain.losses.aggregate import aggregate
from tests.reference import loops
from tests.helpers import close

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def random_batch(seed: int, B: int, L: int):
    gen = torch.Generator().manual_seed(seed)
    loss = torch.randn(B, L, generator=gen)
    lengths = torch.randint(0, L + 1, (B,), generator=gen)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    mask &= torch.rand(B, L, generator=gen) < 0.85
    return loss, mask


# ------------------------------------------------------------------------------ (a) worked examples

# Row 0: 3 trained tokens with loss 1, 2, 3 (sum 6); row 1: 1 trained token with loss 4 (sum 4);
# row 2: no trained token (its loss entries are never read). L = 4, so B⁺ = 2.
WORKED_L = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
WORKED_M = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("mode,kw,expected", [
    ("token-mean", {}, (6 + 4) / 4),                          # 10 / 4 tokens = 2.5
    ("seq-mean-token-mean", {}, (6 / 3 + 4 / 1) / 2),         # (2 + 4)/2 = 3
    ("seq-mean-token-sum", {}, (6 + 4) / 2),                  # 5
    ("seq-mean-token-sum-norm", {}, (6 + 4) / (2 * 4)),       # C defaults to L = 4: 1.25
    ("seq-mean-token-sum-norm", {"constant": 10.0}, (6 + 4) / (2 * 10)),   # 0.5
])
def test_worked_examples(mode, kw, expected):
    close(aggregate(WORKED_L, WORKED_M, mode, **kw), expected)
    close(AGGREGATIONS.get(mode)(WORKED_L, WORKED_M, **kw), expected)


@pytest.mark.parametrize("mode,weights", [
    # ∂loss/∂l_{i,t} for row 0 (3 tokens) and row 1 (1 token): the length bias of each mode.
    ("token-mean", (1 / 4, 1 / 4)),                   # every token 1/N
    ("seq-mean-token-mean", (1 / (2 * 3), 1 / 2)),    # 1/(B⁺ n_i): the long row's tokens weigh less
    ("seq-mean-token-sum", (1 / 2, 1 / 2)),           # 1/B⁺
    ("seq-mean-token-sum-norm", (1 / 8, 1 / 8)),      # 1/(B⁺ C), C = L = 4
])
def test_token_weights_show_length_bias(mode, weights):
    l = WORKED_L.clone().requires_grad_()
    aggregate(l, WORKED_M, mode).backward()
    w0, w1 = weights
    close(l.grad, [[w0, w0, w0, 0], [w1, 0, 0, 0], [0, 0, 0, 0]])


# ------------------------------------------------------------------------------ (b) loop references

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("B,L", [(1, 1), (3, 4), (8, 9), (16, 5)])
@pytest.mark.parametrize("mode,kw", [(m, {}) for m in MODES] + [("seq-mean-token-sum-norm", {"constant": 3000.0})])
def test_matches_loop(seed, B, L, mode, kw):
    loss, mask = random_batch(seed, B, L)
    expected = loops.aggregate(loss.tolist(), mask.tolist(), mode, **kw)
    close(aggregate(loss, mask, mode, **kw), expected)


# ------------------------------------------------------------------------------ (c) invariances

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e30])
def test_garbage_under_mask_changes_nothing_and_gets_no_gradient(mode, garbage):
    loss, mask = random_batch(3, 6, 7)
    clean = aggregate(loss, mask, mode)
    dirty_in = torch.where(mask, loss, torch.full_like(loss, garbage)).requires_grad_()
    dirty = aggregate(dirty_in, mask, mode)
    assert torch.equal(clean, dirty)
    dirty.backward()
    assert torch.isfinite(dirty_in.grad).all()
    assert torch.equal(dirty_in.grad[~mask], torch.zeros_like(dirty_in.grad[~mask]))


@pytest.mark.parametrize("mode", MODES)
def test_empty_rows_do_not_count(mode):
    loss, mask = random_batch(4, 5, 6)
    mask[:, 0] = True
    padded_loss = torch.cat([loss, torch.full((2, 6), float("nan"))])
    padded_mask = torch.cat([mask, torch.zeros(2, 6, dtype=torch.bool)])
    close(aggregate(padded_loss, padded_mask, mode), aggregate(loss, mask, mode))


@pytest.mark.parametrize("mode", MODES)
def test_all_false_mask_gives_zero_not_nan(mode):
    l = torch.randn(3, 4, requires_grad=True)
    out = aggregate(l, torch.zeros(3, 4, dtype=torch.bool), mode)
    assert torch.equal(out.detach(), torch.tensor(0.0))
    out.backward()
    assert torch.equal(l.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("mode", MODES)
def test_permuting_rows_changes_nothing(mode):
    loss, mask = random_batch(5, 9, 4)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    close(aggregate(loss[perm], mask[perm], mode), aggregate(loss, mask, mode))


@pytest.mark.parametrize("mode", MODES)
def test_scalar_output(mode):
    loss, mask = random_batch(6, 3, 3)
    assert aggregate(loss, mask, mode).dim() == 0


# ------------------------------------------------------------------------------ registry and contract

def test_registry_names():
    assert set(MODES) <= set(AGGREGATIONS.names())


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(KeyError, match="seq-mean-token-mean"):
        aggregate(WORKED_L, WORKED_M, "seq-sum")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_constant_only_for_the_norm_mode(mode):
    with pytest.raises(ValueError, match="takes no constant"):
        aggregate(WORKED_L, WORKED_M, mode, constant=4.0)


def test_bad_constant_and_shapes():
    with pytest.raises(ValueError, match="constant"):
        aggregate(WORKED_L, WORKED_M, "seq-mean-token-sum-norm", constant=0.0)
    with pytest.raises(ValueError, match="loss_mask"):
        aggregate(WORKED_L, WORKED_M[:2], "token-mean")
    with pytest.raises(TypeError, match="bool"):
        aggregate(WORKED_L, WORKED_M.float(), "token-mean")
