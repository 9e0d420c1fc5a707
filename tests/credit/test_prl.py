"""finegrain.credit.prl: worked examples (a), a plain loop of the reference code (b), invariances (c),
the config wiring through the trainer's KL source and a tiny end-to-end run (d)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from finegrain.config import load_config, to_dict, validate
from finegrain.credit import ADVANTAGES
from finegrain.credit.outcome import grpo
from finegrain.credit.prl import fill_from_next_kept, kept_positions, prl, prl_advantages
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from finegrain.train.stages import compute_advantages
from finegrain.trajectory import Trajectory
from tests.conftest import tiny_run_overrides
from tests.helpers import ATOL, RTOL, M, T, close

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
A0 = 0.5 / (math.sqrt(0.5) + 1e-6)          # GRPO of R = (1, 0): ±0.5 / (std + ε), std = √0.5 (unbiased)


# ================================================================================ (a) worked examples

def test_prl_advantages_worked_example_on_finegrain_steps():
    R = T([1.0, 0.0])
    d = T([[0.2, 0.4, -0.2, 0.6], [1.0, 0.0, 0.2, 0.0]])        # log π_old − log π_ref
    ref = torch.zeros(2, 4)
    mask = M([[1, 1, 1, 1], [1, 1, 1, 0]])
    steps = torch.tensor([[0, 0, 1, 1], [0, 1, 1, -1]])
    # D = reverse cumsum of d: row 0 (1.0, 0.8, 0.4, 0.6), row 1 (1.2, 0.2, 0.2); η = 2 halves it
    # kept: row 0 ends of steps at 1 and 3 (3 is also last); row 1 ends at 0 and 2 (2 is last)
    got = prl_advantages(R, d, ref, mask, torch.tensor([3, 3]), steps, eta=2.0)
    close(got, [[A0 - 0.4, A0 - 0.4, A0 - 0.3, A0 - 0.3], [-A0 - 0.6, -A0 - 0.1, -A0 - 0.1, 0.0]])
    # fixed-length chunks of 2: kept columns 1 and 3 (+ last): row 0 the same; row 1 keeps 1 and 2
    got = prl_advantages(R, d, ref, mask, torch.tensor([3, 3]), steps, eta=2.0, step_len=2)
    close(got, [[A0 - 0.4, A0 - 0.4, A0 - 0.3, A0 - 0.3], [-A0 - 0.1, -A0 - 0.1, -A0 - 0.1, 0.0]])
    # step_len = 1 keeps every token: u_t itself (the reference's token-level case)
    got = prl_advantages(R, d, ref, mask, torch.tensor([3, 3]), steps, eta=2.0, step_len=1)
    close(got, [[A0 - 0.5, A0 - 0.4, A0 - 0.2, A0 - 0.3], [-A0 - 0.6, -A0 - 0.1, -A0 - 0.1, 0.0]])


def test_prl_estimator_is_the_filled_return_to_go_of_its_source():
    r = T([[-1.0, -2.0, -3.0, -4.0, 5.0]])                      # 5.0 sits on padding: ignored
    mask = M([[1, 1, 1, 1, 0]])
    steps = torch.tensor([[0, 1, 1, 1, -1]])
    # G = (-10, -9, -7, -4); kept: end of step 0 (col 0), end of step 1 = last (col 3)
    close(prl(r, mask, torch.tensor([0]), steps), [[-10.0, -4.0, -4.0, -4.0, 0.0]])
    close(prl(r, mask, torch.tensor([0]), steps, step_len=3), [[-7.0, -7.0, -7.0, -4.0, 0.0]])


def test_kept_positions_and_fill_helpers():
    mask = M([[1, 1, 0, 1, 1, 0]])                              # a tool token at col 2, padding at 5
    steps = torch.tensor([[0, 0, 0, 1, 1, -1]])
    # step 0's last *trained* token is col 1 (col 2 is not trained); step 1 ends at col 4 = last
    assert kept_positions(mask, steps).int().tolist() == [[0, 1, 0, 0, 1, 0]]
    assert kept_positions(mask, steps, 3).int().tolist() == [[0, 0, 0, 0, 1, 0]]   # col 2 untrained
    out = fill_from_next_kept(T([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]), kept_positions(mask, steps), mask)
    close(out, [[2.0, 2.0, 0.0, 5.0, 5.0, 0.0]])
    with pytest.raises(ValueError, match="step_len"):
        kept_positions(mask, steps, -1)


def test_registration():
    meta = ADVANTAGES.meta("prl")
    assert meta["consumes"] == "token" and not meta.get("needs_groups")
    ADVANTAGES.check_kwargs("prl", {"step_len": 256}, "advantage.kwargs")
    with pytest.raises(ValueError, match="step_len"):
        ADVANTAGES.check_kwargs("prl", {"step_len": -1}, "advantage.kwargs")


# ================================================================================ (b) reference loop

def reference_prl(R, old, ref, response_mask, index, eta, kept_cols):
    """The authors' code path as a plain loop (ray_trainer.py @ 15e42764, core_algos.py @ d4e365b7):
    GRPO with torch.std (a group of one: mean 0, std 1), u = A·mask − D/η, kept = kept_cols ∪ last,
    then left fill by the next *nonzero* value."""
    B, L = old.shape
    A = torch.zeros(B)
    for i in range(B):
        scores = torch.stack([R[j] for j in range(B) if index[j] == index[i]])
        mean, std = (torch.tensor(0.0), torch.tensor(1.0)) if len(scores) == 1 else (scores.mean(), scores.std())
        A[i] = (R[i] - mean) / (std + 1e-6)
    out = torch.zeros(B, L)
    for i in range(B):
        n = int(response_mask[i].sum())
        d = [float(old[i, t] - ref[i, t]) for t in range(n)]
        u = [float(A[i]) - sum(d[t:]) / eta for t in range(n)]
        kept = [t for t in range(n) if kept_cols[i][t] or t == n - 1]
        row = [u[t] if t in kept else 0.0 for t in range(n)]
        for t in range(n):                                       # left_fill_by_next_nonzero
            nxt = next((s for s in range(t, n) if row[s] != 0.0), None)
            out[i, t] = row[nxt] if nxt is not None else 0.0
    return out


def random_batch(seed, B=8, L=12, groups=3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    old = -torch.rand(B, L, generator=g) * 3
    ref = -torch.rand(B, L, generator=g) * 3
    group_ids = torch.arange(B) % groups + 10                     # rows of a group are not contiguous
    R = torch.rand(B, generator=g)
    newline = (torch.rand(B, L, generator=g) < 0.3) & mask
    # step k = the tokens after the k-th newline up to the next one (a newline ends its step)
    steps = torch.where(mask, newline.long().cumsum(1) - newline.long(), torch.full((B, L), -1))
    return R, old, ref, mask, group_ids, steps, newline


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("step_len", [0, 1, 3, 5])
def test_vectorised_equals_the_reference_loop(seed, step_len):
    R, old, ref, mask, group_ids, steps, newline = random_batch(seed)
    eta = [1.0, 100.0, 200.0, 3.0][seed]
    if step_len:
        kept = [[(t + 1) % step_len == 0 for t in range(mask.shape[1])] for _ in range(mask.shape[0])]
    else:
        kept = newline.tolist()                                  # the reference's step_split='n'
    want = reference_prl(R, old, ref, mask, group_ids.tolist(), eta, kept)
    got = prl_advantages(R, old, ref, mask, group_ids, steps, eta=eta, step_len=step_len)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_grpo_on_the_outcome_plus_prl_on_the_kl_source_is_the_whole_estimator(seed):
    R, old, ref, mask, group_ids, steps, _ = random_batch(seed)
    eta = 50.0
    last = mask.long().cumsum(1) == mask.sum(1, keepdim=True)
    outcome = torch.where(last & mask, R[:, None], torch.zeros(()))              # the verifier, placed
    kl_source = torch.where(mask, -(old - ref) / eta, torch.zeros(()))           # −kl_coef · k1
    both = grpo(outcome, mask, group_ids, steps) + prl(kl_source, mask, group_ids, steps)
    torch.testing.assert_close(both, prl_advantages(R, old, ref, mask, group_ids, steps, eta=eta),
                               rtol=RTOL, atol=ATOL)


# ================================================================================ (c) invariances

def test_garbage_under_a_false_mask_changes_nothing():
    R, old, ref, mask, group_ids, steps, _ = random_batch(5)
    want = prl_advantages(R, old, ref, mask, group_ids, steps, eta=7.0)
    junk_old = torch.where(mask, old, torch.full_like(old, float("nan")))
    junk_ref = torch.where(mask, ref, torch.full_like(ref, 1e9))
    got = prl_advantages(R, junk_old, junk_ref, mask, group_ids, steps, eta=7.0)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert torch.all(got[~mask] == 0)
    r = torch.where(mask, old, torch.full_like(old, float("nan")))
    assert torch.isfinite(prl(r, mask, group_ids, steps)).all()


def test_permuting_the_batch_permutes_the_advantages():
    R, old, ref, mask, group_ids, steps, _ = random_batch(6)
    perm = torch.randperm(R.shape[0], generator=torch.Generator().manual_seed(1))
    want = prl_advantages(R, old, ref, mask, group_ids, steps, eta=5.0)[perm]
    got = prl_advantages(R[perm], old[perm], ref[perm], mask[perm], group_ids[perm], steps[perm], eta=5.0)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(prl(old[perm], mask[perm], group_ids[perm], steps[perm]),
                               prl(old, mask, group_ids, steps)[perm], rtol=RTOL, atol=ATOL)


def test_group_of_one_constant_group_and_empty_row_are_finite():
    mask = M([[1, 1, 1], [1, 1, 0], [1, 1, 0], [0, 0, 0]])
    steps = torch.tensor([[0, 0, 1], [0, 1, -1], [0, 1, -1], [-1, -1, -1]])
    old = T([[-1.0, -1.0, -1.0], [-2.0, -1.0, 0.0], [-2.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    ref = torch.zeros(4, 3)
    R = T([1.0, 0.5, 0.5, 1.0])
    # row 0 alone in its group: A = 0 (departure 2), so u = −D/η; rows 1, 2: a constant group, A = 0
    got = prl_advantages(R, old, ref, mask, torch.tensor([0, 1, 1, 2]), steps, eta=1.0)
    assert torch.isfinite(got).all()
    close(got, [[2.0, 2.0, 1.0], [3.0, 1.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 0.0]])


def test_a_kept_zero_is_kept_not_skipped():
    # departure 1: the reference fills from the next *nonzero*; a step whose u is exactly 0 keeps 0
    mask = M([[1, 1, 1, 1]])
    steps = torch.tensor([[0, 0, 1, 1]])
    r = T([[1.0, -2.0, 0.0, 2.0]])                                # G = (1, 0, 2, 2): step 0 ends on 0
    close(prl(r, mask, torch.tensor([0]), steps), [[0.0, 0.0, 2.0, 2.0]])
    want = reference_prl(T([0.0]), -r, torch.zeros(1, 4), mask, [0], 1.0, [[False, True, False, False]])
    close(want, [[2.0, 2.0, 2.0, 2.0]])                           # the reference borrows step 1's value


# ================================================================================ (d) config and run

def tiny_traj(mask, steps, group_ids):
    B, L = mask.shape
    return Trajectory(prompt_ids=torch.ones(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                      response_ids=torch.ones(B, L, dtype=torch.long), response_mask=mask.clone(), loss_mask=mask,
                      group_ids=group_ids, step_ids=steps, behavior_logprobs=torch.zeros(B, L),
                      truncated=torch.zeros(B, dtype=torch.bool))


def test_config_loads_validates_and_the_trainer_path_computes_prl():
    cfg = load_config(CONFIGS / "arith_prl.yaml")
    validate(cfg)
    assert cfg.loss.kl_mode == "reward" and cfg.loss.kl_estimator == "k1" and cfg.loss.kl_coef > 0
    mine, base = to_dict(cfg), to_dict(load_config(CONFIGS / "arith_grpo.yaml"))
    for d in (mine, base):
        d.pop("advantage"), d["train"].pop("out_dir")
        for k in ("kl_coef", "kl_estimator", "kl_mode"):
            d["loss"].pop(k)
    assert mine == base
    # the trainer's sources for this config: the verifier on the last token, −kl_coef·k1 on every
    # trained token (train.stages.score_batch); compute_advantages must give prl_advantages(η = 1/kl_coef)
    R, old, ref, mask, group_ids, steps, _ = random_batch(2)
    last = mask.long().cumsum(1) == mask.sum(1, keepdim=True)
    per_source = {"verifier": torch.where(last & mask, R[:, None], torch.zeros(())),
                  "kl_penalty": -cfg.loss.kl_coef * torch.where(mask, old - ref, torch.zeros(()))}
    got = compute_advantages(cfg, per_source, tiny_traj(mask, steps, group_ids))
    want = prl_advantages(R, old, ref, mask, group_ids, steps, eta=1.0 / cfg.loss.kl_coef)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_tiny_run_end_to_end(tmp_path, sft_cache):
    overrides = tiny_run_overrides(tmp_path / "run", sft_cache, steps=2, **{"train.save_every": 0})
    cfg = load_config(CONFIGS / "arith_prl.yaml", overrides)
    validate(cfg)
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/loss"]) and math.isfinite(r["adv/abs_mean"]) for r in rows)
