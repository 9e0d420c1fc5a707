"""Rollout correction (TIS / mask) and the sampler-vs-trainer mismatch metrics: worked values by
hand, a plain loop against the vectorised weights, masking and permutation invariances, and the
effect on a real policy update (weights 1 change nothing; a constant weight scales the step)."""

import copy
import math

import pytest
import torch

from finegrain.config import LossConfig
from finegrain.losses.rollout_correction import mismatch_metrics, rollout_is_weights
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.train.update import batch_logprobs, policy_update
from tests.train.test_update import make_batch


def test_worked_example_by_hand():
    # ratios ρ = π_old/π_rollout: 1, 3, 0.25, and one masked token holding garbage
    old = torch.log(torch.tensor([[0.5, 0.9, 0.1, 0.7]]))
    beh = torch.log(torch.tensor([[0.5, 0.3, 0.4, 0.0]]))  # log 0 = -inf under the mask
    mask = torch.tensor([[True, True, True, False]])
    w, m = rollout_is_weights(old, beh, mask, mode="tis", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 0.25, 0.0]]))
    k3 = [(r - 1 - math.log(r)) for r in (1.0, 3.0, 0.25)]
    assert float(m["mismatch_kl"]) == pytest.approx(sum(k3) / 3, rel=1e-5)
    assert float(m["mismatch_k1"]) == pytest.approx(-(0 + math.log(3) + math.log(0.25)) / 3, rel=1e-5)
    assert float(m["mismatch_max"]) == pytest.approx(math.log(4), rel=1e-5)
    assert float(m["is_clipped_frac"]) == pytest.approx(1 / 3)
    assert float(m["is_weight_mean"]) == pytest.approx((1 + 2 + 0.25) / 3, rel=1e-5)
    w, m = rollout_is_weights(old, beh, mask, mode="mask", cap=2.0, low=0.5)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert float(m["is_clipped_frac"]) == pytest.approx(2 / 3)
    w, m = rollout_is_weights(old, beh, mask, mode="none")
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert float(m["is_clipped_frac"]) == 0.0


def _loop(old, beh, mask, mode, cap, low):
    B, L = old.shape
    w = torch.zeros(B, L)
    for b in range(B):
        for t in range(L):
            if not mask[b, t]:
                continue
            r = math.exp(float(old[b, t]) - float(beh[b, t]))
            if mode == "tis":
                w[b, t] = min(r, cap)
            elif mode == "mask":
                w[b, t] = r if low <= r <= cap else 0.0
            else:
                w[b, t] = 1.0
    return w


@pytest.mark.parametrize("mode", ["none", "tis", "mask"])
def test_loop_matches_vectorised(mode):
    g = torch.Generator().manual_seed(0)
    old, beh = -torch.rand(6, 9, generator=g) * 3, -torch.rand(6, 9, generator=g) * 3
    mask = torch.rand(6, 9, generator=g) > 0.3
    w, _ = rollout_is_weights(old, beh, mask, mode=mode, cap=1.5, low=0.4)
    torch.testing.assert_close(w, _loop(old, beh, mask, mode, 1.5, 0.4), rtol=1e-5, atol=1e-6)


def test_garbage_under_mask_and_batch_permutation():
    g = torch.Generator().manual_seed(1)
    old, beh = -torch.rand(5, 7, generator=g) * 2, -torch.rand(5, 7, generator=g) * 2
    mask = torch.rand(5, 7, generator=g) > 0.4
    mask[0] = True
    w, m = rollout_is_weights(old, beh, mask, mode="tis", cap=1.2)
    junk_old = torch.where(mask, old, torch.full_like(old, float("nan")))
    junk_beh = torch.where(mask, beh, torch.full_like(beh, float("-inf")))
    w2, m2 = rollout_is_weights(junk_old, junk_beh, mask, mode="tis", cap=1.2)
    torch.testing.assert_close(w, w2)
    assert all(torch.equal(m[k], m2[k]) for k in m)
    perm = torch.tensor([3, 0, 4, 1, 2])
    w3, m3 = rollout_is_weights(old[perm], beh[perm], mask[perm], mode="tis", cap=1.2)
    torch.testing.assert_close(w3, w[perm])
    torch.testing.assert_close(m3["mismatch_kl"], m["mismatch_kl"])


def test_agreement_gives_zero_mismatch_and_unit_weights():
    old = -torch.rand(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    w, m = rollout_is_weights(old, old.clone(), mask, mode="tis")
    assert torch.equal(w, torch.ones(3, 4)) and float(m["mismatch_kl"]) == 0.0 and float(m["is_clipped_frac"]) == 0.0
    empty = mismatch_metrics(old, old, torch.zeros(3, 4, dtype=torch.bool))  # no trained token: finite zeros
    assert all(float(v) == 0.0 for v in empty.values())


def test_bad_settings_are_refused():
    x = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="loss.rollout_correction: 'clip'"):
        rollout_is_weights(x, x, mask, mode="clip")
    with pytest.raises(ValueError, match="low <= cap"):
        rollout_is_weights(x, x, mask, mode="mask", cap=1.0, low=2.0)


def _update(model, traj, adv, cfg):
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    metrics = policy_update(m, opt, traj, adv, old_logprobs=None, ref_logprobs=None, loss_cfg=cfg, ppo_epochs=1,
                            minibatches=1, grad_accum=1, temperature=1.0, grad_clip=0.0, max_new_tokens=6,
                            generator=torch.Generator().manual_seed(0))
    return m, metrics


def test_policy_update_with_tis():
    tok = char_tokenizer("0123456789+=")
    model = tiny_causal_lm(tok, size="micro", seed=1)
    traj = make_batch(tok)
    adv = torch.randn(traj.response_ids.shape, generator=torch.Generator().manual_seed(2)) * traj.loss_mask
    lp = batch_logprobs(model, traj, 1.0, 64)  # the trainer's π_old
    same = traj.replace(behavior_logprobs=lp.clone())
    plain, m0 = _update(model, same, adv, LossConfig())
    tis, m1 = _update(model, same, adv, LossConfig(rollout_correction="tis"))
    for a, b in zip(plain.parameters(), tis.parameters()):  # ρ = 1 everywhere: TIS changes nothing
        torch.testing.assert_close(a, b)
    assert m0["mismatch_kl"] < 1e-6 and m1["is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    # behaviour log-probs lower by log 2 → ρ = 2 = cap on every token: with SGD the step doubles
    doubled = traj.replace(behavior_logprobs=lp - math.log(2.0))
    twice, m2 = _update(model, doubled, adv, LossConfig(rollout_correction="tis", rollout_is_cap=4.0))
    biggest = 0.0
    for p0, a, b in zip(model.parameters(), plain.parameters(), twice.parameters()):
        # atol: a few float32 ulps of parameters of size ~1 (the differences are taken after the step)
        torch.testing.assert_close(b - p0, 2 * (a - p0), rtol=1e-4, atol=1e-6)
        biggest = max(biggest, float((a - p0).abs().max()))
    assert biggest > 1e-3  # the step is large against that tolerance
    assert m2["mismatch_kl"] == pytest.approx(2 - 1 - math.log(2), rel=1e-4)
    # mask mode with ρ = 2 outside [0.5, 1.5]: every token dropped, so nothing moves
    masked, m3 = _update(model, doubled, adv, LossConfig(rollout_correction="mask", rollout_is_cap=1.5))
    for p0, b in zip(model.parameters(), masked.parameters()):
        assert torch.equal(p0, b)
    assert m3["is_clipped_frac"] == pytest.approx(1.0)
