"""Data parallel: two gloo processes, each updating on its half of a global batch, end with the
parameters of one process updating on the whole batch (float tolerance), for every aggregation,
with gradient accumulation, two PPO epochs and gradient clipping; uneven shards included."""

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finegrain.config import LossConfig
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.train.distributed import DataParallel
from finegrain.train.update import batch_logprobs, policy_update
from tests.train.test_update import make_batch

CASES = [("token-mean", 1, 1), ("token-mean", 2, 2), ("seq-mean-token-mean", 1, 2), ("seq-mean-token-sum", 2, 1)]


def _setup():
    torch.manual_seed(0)
    tok = char_tokenizer("0123456789+=")
    model = tiny_causal_lm(tok, size="micro", seed=1)
    traj = make_batch(tok, B=10, seed=3)  # 10 rows, variable lengths: shards hold different token counts
    adv = torch.randn(traj.response_ids.shape, generator=torch.Generator().manual_seed(2)) * traj.loss_mask
    old = batch_logprobs(model, traj, 1.0, 64)
    return model, traj, adv, old


def _update(model, traj, adv, old, mode, accum, epochs, dp):
    m = copy.deepcopy(model)
    # SGD: the step is linear in the gradient, so the comparison measures the gradient sum itself
    # (Adam's g/√v turns float-noise differences in near-zero gradient entries into O(lr) ones)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    policy_update(m, opt, traj, adv, old_logprobs=old if epochs > 1 else None, ref_logprobs=None,
                  loss_cfg=LossConfig(aggregation=mode), ppo_epochs=epochs, minibatches=1, grad_accum=accum,
                  temperature=1.0, grad_clip=0.5, max_new_tokens=6, generator=torch.Generator().manual_seed(0), dp=dp)
    return [p.detach().clone() for p in m.parameters()]


def _worker(rank, world, init_file, rows_of, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, traj, adv, old = _setup()
        mine = torch.tensor(rows_of[rank])
        results = []
        for mode, accum, epochs in CASES:
            results.append(_update(model, traj.select(mine), adv[mine], old[mine], mode, accum, epochs,
                                   DataParallel(rank=rank, world=world)))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rows_of", [[list(range(0, 10, 2)), list(range(1, 10, 2))],   # interleaved halves
                                     [[0, 1, 2], [3, 4, 5, 6, 7, 8, 9]]],               # uneven shards
                         ids=["halves", "uneven"])
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, rows_of):
    model, traj, adv, old = _setup()
    single = [_update(model, traj, adv, old, mode, accum, epochs, DataParallel()) for mode, accum, epochs in CASES]
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.start_processes(_worker, args=(2, init_file, rows_of, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for case, want, have in zip(CASES, single, got):
            moved = max(float((w - p).abs().max()) for w, p in zip(want, model.parameters()))
            assert moved > 1e-4, case  # the step is large against the tolerance below
            for w, h in zip(want, have):
                torch.testing.assert_close(h, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{case} rank {rank}: {m}")


def test_single_process_split_is_unchanged():
    perm = torch.arange(10)
    assert [len(c) for c in DataParallel().split(perm, 4)] == [3, 3, 3, 1]  # torch.chunk, as before
    assert [len(c) for c in DataParallel(rank=0, world=2).split(perm, 4)] == [3, 3, 2, 2]
    assert [len(c) for c in DataParallel(rank=0, world=2).split(torch.arange(1), 3)] == [1, 0, 0]


def _fsdp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, traj, adv, old = _setup()
        mine = torch.arange(rank, 10, world)  # equal shards: sharded updates need them
        dp = DataParallel(rank=rank, world=world, fsdp=True)
        names = [n for n, _ in model.named_parameters()]
        results = []
        for mode, accum, epochs in CASES:
            m = copy.deepcopy(model)
            dp.shard_model(m)
            opt = torch.optim.SGD(m.parameters(), lr=0.5)
            policy_update(m, opt, traj.select(mine), adv[mine], old_logprobs=old[mine] if epochs > 1 else None,
                          ref_logprobs=None, loss_cfg=LossConfig(aggregation=mode), ppo_epochs=epochs, minibatches=1,
                          grad_accum=accum, temperature=1.0, grad_clip=0.5, max_new_tokens=6,
                          generator=torch.Generator().manual_seed(0), dp=dp)
            full = dp.model_state(m)  # rank 0 only (CPU)
            results.append([full[n].clone() for n in names] if rank == 0 else [])
            # every rank can run a different number of forwards in the rollout state
            with torch.no_grad():
                for _ in range(1 + 2 * rank):
                    m(input_ids=traj.input_ids[:2])
            # what the optimizer holds (and keeps moments of): this rank's shards
            shard_numel = sum(p.to_local().numel() for g in opt.param_groups for p in g["params"])
            results[-1].append(torch.tensor(shard_numel))
        torch.save(results, os.path.join(out_dir, f"fsdp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    """train.fsdp: two ranks each holding about half of every parameter end with the parameters of
    one process updating on the whole batch, for every aggregation, accumulation and epoch case."""
    model, traj, adv, old = _setup()
    single = [_update(model, traj, adv, old, mode, accum, epochs, DataParallel()) for mode, accum, epochs in CASES]
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.start_processes(_fsdp_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    got = torch.load(tmp_path / "fsdp0.pt", weights_only=True)
    total = sum(p.numel() for p in model.parameters())
    for case, want, have in zip(CASES, single, got):
        *params, shard_numel = have
        assert int(shard_numel) < 0.6 * total, case  # rank 0 holds about half of the parameters
        for w, h in zip(want, params, strict=True):
            torch.testing.assert_close(h, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{case}: {m}")
    other = torch.load(tmp_path / "fsdp1.pt", weights_only=True)
    assert all(int(r[-1]) < 0.6 * total for r in other)


@pytest.mark.parametrize("env, fsdp, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, False, r"^accelerate launch: DeepSpeed is not supported"),
    ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, False, r"^train.fsdp: launched with accelerate's FSDP config"),
    ({}, True, r"^train.fsdp: needs 2 or more processes"),
])
def test_launches_finegrain_does_not_honour_are_refused_in_one_line(monkeypatch, env, fsdp, message):
    for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        DataParallel.from_env(fsdp=fsdp)
