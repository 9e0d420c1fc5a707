"""Data parallel over ``torch.distributed``: each rank trains on its shard of the global batch and the
gradients are summed so that every rank takes the optimizer step of the whole batch.

Launched by ``accelerate launch --num_processes N`` or ``torchrun --nproc_per_node N``, which set
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; ``DataParallel.from_env()`` joins the group (gloo
on CPU, nccl on CUDA) or returns the single-process no-op when WORLD_SIZE is unset or 1.

Why the gradients are summed and not averaged (as DDP does): the policy loss is normalised by the
*global* count of trained tokens (token-mean) or rows (seq-* modes). ``policy_update`` divides each
micro-batch's loss by the global minibatch weight W = Σ_ranks w_r (``all_sum``), so the sum over
ranks of the per-rank gradients is exactly the gradient of the global minibatch's loss:

    ∇ L = Σ_r Σ_{micro ∈ r} (w_micro / W) · ∇ agg(ℓ_micro)

Averaging would be right only when every rank holds the same number of trained tokens, which
variable-length responses never do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DataParallel":
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(rank=dist.get_rank(), world=dist.get_world_size())

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of a tensor (a copy; the input is unchanged)."""
        if not self.enabled:
            return x
        import torch.distributed as dist

        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    def sum_grads(self, params) -> None:
        """Replace every parameter's gradient by its sum over ranks (None counts as zeros, so ranks
        whose shard was empty still join the collective)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for p in params:
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def split(self, perm: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """``n`` pieces of ``perm``: ``chunk`` in one process (as before data parallel existed, so
        single-process runs are unchanged), exactly ``n`` (possibly empty) pieces across ranks, so
        every rank runs the same number of optimizer steps and collectives."""
        return perm.chunk(n) if not self.enabled else torch.tensor_split(perm, n)


    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def shard(self, items: list) -> list:
        """This rank's share of a list: items rank, rank + world, ..."""
        return items[self.rank::self.world] if self.enabled else items

    # keys that are counts over the global batch (summed); every other metric is averaged over ranks
    SUMMED = ("rollout/rows", "filter/generated_prompts", "filter/kept_prompts")

    def reduce_metrics(self, row: dict) -> dict:
        """One metrics row for the global batch: counts summed, other scalars averaged over the
        ranks that logged them. The rows are gathered with ``all_gather_object`` (pickled between
        this run's own processes; nothing is read from a file)."""
        if not self.enabled:
            return row
        import torch.distributed as dist

        plain = {k: float(v) for k, v in row.items()}
        rows: list = [None] * self.world
        dist.all_gather_object(rows, plain)
        out: dict = {}
        for k in sorted({k for r in rows for k in r}):
            vals = [r[k] for r in rows if k in r]
            out[k] = sum(vals) if k in self.SUMMED else sum(vals) / len(vals)
        return out


SINGLE = DataParallel()


def check_data_parallel(cfg, dp: DataParallel) -> None:
    """Refuse, before any work, what data parallel does not support yet (one line each)."""
    if cfg.rollout.prompts_per_step % dp.world:
        raise ValueError(f"rollout.prompts_per_step: {cfg.rollout.prompts_per_step} does not split over {dp.world} "
                         f"processes; expected a multiple of {dp.world}")
    if cfg.filters.filters:
        raise ValueError("filters.filters: data parallel does not run filters yet (a rank whose groups are all "
                         "filtered out would skip the gradient sum); use filters.filters=[] or one process")
    if cfg.critic.enabled:
        raise ValueError("critic.enabled: data parallel does not train a critic yet; use one process")
    from finegrain.rewards import REWARDS

    for r in cfg.rewards:
        meta = REWARDS.meta(r.name)
        if meta.get("trainable") or meta.get("stateful"):
            raise ValueError(f"rewards: '{r.name}' learns or keeps state across batches, which data parallel would "
                             "split per rank; use one process")
