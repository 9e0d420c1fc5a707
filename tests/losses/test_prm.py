"""Tests for finegrain.losses.prm: implicit-PRM CE and DPO losses."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finegrain.losses.prm import implicit_prm_ce_loss, implicit_prm_dpo_loss
from finegrain.models.logprobs import response_logprobs
from tests.helpers import close

NAN = float("nan")


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- CE (a)

# Log-ratios (prm − ref): row 0 = [0.2, 0.4, (masked)] → Σ 0.6; row 1 = [−1.0, 0.6, −0.4] → Σ −0.8
CE_PRM = torch.tensor([[0.2, 0.4, NAN], [-1.0, 0.6, -0.4]])
CE_REF = torch.zeros(2, 3)
CE_MASK = torch.tensor([[True, True, False], [True, True, True]])


def test_ce_worked_example():
    # β = 0.5 → z = [0.3, −0.4]; labels [1, 0]
    # row 0: −log σ(0.3) = log(1 + e^−0.3) ≈ 0.554355
    # row 1: −log(1 − σ(−0.4)) = log(1 + e^−0.4) ≈ 0.513015
    # mean ≈ 0.533685; both signs agree with the labels → acc 1; score_mean = (0.3 − 0.4)/2 = −0.05
    loss, metrics = implicit_prm_ce_loss(CE_PRM, CE_REF, CE_MASK, torch.tensor([1.0, 0.0]), beta=0.5)
    close(loss, (softplus(-0.3) + softplus(-0.4)) / 2)
    close(loss, 0.533685)
    close(metrics["acc"], 1.0)
    close(metrics["score_mean"], -0.05)
    # flipped labels: row 0: log(1 + e^0.3), row 1: log(1 + e^0.4); acc 0
    loss, metrics = implicit_prm_ce_loss(CE_PRM, CE_REF, CE_MASK, torch.tensor([0.0, 1.0]), beta=0.5)
    close(loss, (softplus(0.3) + softplus(0.4)) / 2)
    close(metrics["acc"], 0.0)


def test_ce_soft_labels_and_gradient():
    # label 0.25 on z = 0.3: −[0.25 log σ(0.3) + 0.75 log σ(−0.3)]; d loss / d z = σ(z) − l
    prm = CE_PRM.clone().requires_grad_(True)
    labels = torch.tensor([0.25, 1.0])
    loss, _ = implicit_prm_ce_loss(prm, CE_REF, CE_MASK, labels, beta=0.5)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = (-(0.25 * math.log(sig(0.3)) + 0.75 * math.log(sig(-0.3))) + softplus(0.4)) / 2
    close(loss, expected)
    loss.backward()
    # d loss / d prm_{i,t} = (1/B)·β·(σ(z_i) − l_i) on real tokens, 0 on the masked one (no NaN)
    g0 = 0.5 * 0.5 * (sig(0.3) - 0.25)
    g1 = 0.5 * 0.5 * (sig(-0.4) - 1.0)
    close(prm.grad, [[g0, g0, 0.0], [g1, g1, g1]])


def test_ce_matches_the_reference_formula():
    # PRIME's compute_ce_dpo_loss_rm: BCE(sigmoid(β Σ q·mask), acc), written with the same torch ops
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(6, 5, generator=gen)
    mask = torch.rand(6, 5, generator=gen) < 0.7
    acc = torch.randint(0, 2, (6,), generator=gen).float()
    ref_value = torch.nn.functional.binary_cross_entropy(((q * mask).sum(1) * 0.05).sigmoid(), acc)
    loss, _ = implicit_prm_ce_loss(q, torch.zeros_like(q), mask, acc, beta=0.05)
    close(loss, ref_value)


def test_ce_garbage_under_mask_changes_nothing():
    labels = torch.tensor([1.0, 0.0])
    a, _ = implicit_prm_ce_loss(CE_PRM, CE_REF, CE_MASK, labels, beta=0.5)
    dirty_ref = torch.where(CE_MASK, CE_REF, torch.full_like(CE_REF, 1e30))
    b, _ = implicit_prm_ce_loss(CE_PRM, dirty_ref, CE_MASK, labels, beta=0.5)
    assert torch.equal(a, b)


def test_ce_rejects_bad_inputs():
    with pytest.raises(TypeError, match="float"):
        implicit_prm_ce_loss(CE_PRM, CE_REF, CE_MASK, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="labels"):
        implicit_prm_ce_loss(CE_PRM, CE_REF, CE_MASK, torch.tensor([1.0, 0.0, 1.0]))


# ----------------------------------------------------------------------------- DPO (a)

# Six rows; groups are non-contiguous: 7 = {0, 2, 4}, 3 = {1, 3}, 9 = {5}.
DPO_GROUPS = torch.tensor([7, 3, 7, 3, 7, 9])
DPO_LABELS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
DPO_MASK = torch.tensor([[True, True]] * 6)


def scores_to_logprobs(z, beta):
    """Put z_i / β on the first token of each row (second token: equal prm and ref)."""
    prm = torch.zeros(len(z), 2)
    prm[:, 0] = torch.tensor(z) / beta
    return prm, torch.zeros(len(z), 2)


def test_dpo_worked_example():
    # Pairs (w, l) with the same group and l_w > l_l: group 7 → (0, 2), (4, 2); groups 3, 9 → none.
    # z = [0.5, ·, −0.5, ·, 0.0, ·]: margins 1.0 and 0.5
    # loss = [log(1 + e^−1) + log(1 + e^−0.5)] / 2 ≈ (0.313262 + 0.474077) / 2 ≈ 0.393669; both right
    beta = 0.1
    prm, ref = scores_to_logprobs([0.5, 3.0, -0.5, -2.0, 0.0, 4.0], beta)
    loss, metrics = implicit_prm_dpo_loss(prm, ref, DPO_MASK, DPO_LABELS, DPO_GROUPS, beta=beta)
    close(loss, (softplus(-1.0) + softplus(-0.5)) / 2)
    close(loss, 0.393669)
    assert int(metrics["n_pairs"]) == 2
    close(metrics["pair_acc"], 1.0)
    # z_4 = −1.0: pair (4, 2) has margin −0.5 → log(1 + e^0.5) ≈ 0.974077; pair_acc 1/2
    prm, ref = scores_to_logprobs([0.5, 3.0, -0.5, -2.0, -1.0, 4.0], beta)
    loss, metrics = implicit_prm_dpo_loss(prm, ref, DPO_MASK, DPO_LABELS, DPO_GROUPS, beta=beta)
    close(loss, (softplus(-1.0) + softplus(0.5)) / 2)
    close(metrics["pair_acc"], 0.5)
    # a tie counts ½: z_4 = z_2 = −0.5 → pair_acc (1 + ½)/2
    prm, ref = scores_to_logprobs([0.5, 3.0, -0.5, -2.0, -0.5, 4.0], beta)
    _, metrics = implicit_prm_dpo_loss(prm, ref, DPO_MASK, DPO_LABELS, DPO_GROUPS, beta=beta)
    close(metrics["pair_acc"], 0.75)


def test_dpo_matches_a_pair_loop():
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        B, L = 9, 4
        prm = torch.randn(B, L, generator=gen)
        ref = torch.randn(B, L, generator=gen)
        mask = torch.rand(B, L, generator=gen) < 0.8
        labels = torch.randint(0, 2, (B,), generator=gen).float()
        groups = torch.randint(0, 3, (B,), generator=gen) * 11 + 5
        loss, metrics = implicit_prm_dpo_loss(prm, ref, mask, labels, groups, beta=0.05)
        z = [0.05 * sum(float(prm[i, t] - ref[i, t]) for t in range(L) if mask[i, t]) for i in range(B)]
        terms = [softplus(-(z[w] - z[l])) for w in range(B) for l in range(B)
                 if groups[w] == groups[l] and labels[w] > labels[l]]
        assert int(metrics["n_pairs"]) == len(terms)
        if terms:
            close(loss, sum(terms) / len(terms))


def test_dpo_permutation_invariant():
    beta = 0.1
    prm, ref = scores_to_logprobs([0.5, 3.0, -0.5, -2.0, -1.0, 4.0], beta)
    perm = torch.tensor([3, 5, 0, 1, 4, 2])
    a, ma = implicit_prm_dpo_loss(prm, ref, DPO_MASK, DPO_LABELS, DPO_GROUPS, beta=beta)
    b, mb = implicit_prm_dpo_loss(prm[perm], ref[perm], DPO_MASK, DPO_LABELS[perm], DPO_GROUPS[perm], beta=beta)
    close(a, b)
    assert ma["n_pairs"] == mb["n_pairs"] and ma["pair_acc"] == mb["pair_acc"]


def test_dpo_without_pairs_is_zero_and_differentiable():
    # every group all-correct, all-wrong or of one → no pair
    prm = torch.randn(4, 2, requires_grad=True)
    labels = torch.tensor([1.0, 1.0, 0.0, 1.0])
    groups = torch.tensor([1, 1, 2, 3])
    loss, metrics = implicit_prm_dpo_loss(prm, torch.zeros(4, 2), torch.ones(4, 2, dtype=torch.bool), labels, groups)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(prm.grad, torch.zeros(4, 2))
    assert int(metrics["n_pairs"]) == 0
    close(metrics["pair_acc"], 0.5)


# ----------------------------------------------------------------------------- training a tiny PRM (d)

def tiny_lm(seed: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("loss_name", ["ce", "dpo"])
def test_a_few_gradient_steps_lower_the_loss(loss_name):
    torch.manual_seed(0)
    prm = tiny_lm(0)
    ref = copy.deepcopy(prm).eval().requires_grad_(False)
    # 6 rows, prompts left-padded (lengths 2–3), responses right-padded (lengths 2–4), 2 groups
    ids = torch.tensor([[0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 9, 9, 0, 0], [0, 5, 5, 1, 2, 3, 0],
                        [2, 2, 2, 7, 6, 5, 4], [0, 4, 1, 8, 8, 0, 0], [3, 1, 4, 1, 5, 9, 0]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    L = 4
    mask = attn[:, -L:]
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([4, 4, 8, 8, 4, 8])
    with torch.no_grad():
        ref_lp = response_logprobs(ref, ids, attn, L)
    opt = torch.optim.Adam(prm.parameters(), lr=1e-2)

    def loss_fn():
        lp = response_logprobs(prm, ids, attn, L)
        if loss_name == "ce":
            return implicit_prm_ce_loss(lp, ref_lp, mask, labels, beta=0.5)
        return implicit_prm_dpo_loss(lp, ref_lp, mask, labels, groups, beta=0.5)

    first, _ = loss_fn()
    for _ in range(5):
        opt.zero_grad()
        loss, _ = loss_fn()
        loss.backward()
        opt.step()
    last, metrics = loss_fn()
    assert torch.isfinite(last)
    assert last.item() < first.item() - 0.05
    if loss_name == "ce":
        close(metrics["acc"], 1.0)
    else:
        close(metrics["pair_acc"], 1.0)
