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

Sharded (``train.fsdp``, FSDP2's ``fully_shard``; Zhao et al. 2023, "PyTorch FSDP", arXiv:2304.11277):
every decoder layer and then the root module are sharded, so each rank keeps 1/world of the
parameters, gradients and AdamW moments. The gradient reduce-scatter is told to sum, not average
(divide factor 1), for the reason above. The policy lives in two states:

* **rollout** (``for_rollout``): every FSDP module is unsharded (all-gathered once) and kept so, so
  generation, scoring and evaluation run forwards on full weights without any collective; ranks
  may then run different numbers of forwards (generation stops at different lengths, rank 0
  alone evaluates). This is the colocated layout of verl's hybrid engine: full weights for the
  rollout, shards for the update.
* **update** (``for_update``, inside ``policy_update``): resharded; each forward/backward
  all-gathers a layer and reduce-scatters its gradient, so every rank must run the same number of
  micro-batches. ``check_data_parallel`` guarantees it: equal prompts per rank, no filters, a fixed
  group size, so every rank holds the same number of rows, and ``policy_update`` checks that too.

Checkpoints hold the full model and the full optimizer state (gathered from the shards, keyed by
parameter name), written by rank 0; a resume reads them on every rank and each keeps its shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world: int = 1
    fsdp: bool = False  # the policy is sharded over the ranks (train.fsdp)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, fsdp: bool = False) -> "DataParallel":
        """Join the process group the launcher describes (WORLD_SIZE > 1), or the single process.
        ``fsdp``: ``train.fsdp``. Refused in one line: DeepSpeed launches, accelerate's FSDP launch
        without ``train.fsdp``, and ``train.fsdp`` in one process."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if _env_true("ACCELERATE_USE_DEEPSPEED"):
            raise ValueError("accelerate launch: DeepSpeed is not supported by finegrain's trainer; shard with "
                             "train.fsdp=true (examples/accelerate/gpu_fsdp.yaml) or replicate "
                             "(examples/accelerate/gpu_ddp.yaml)")
        if _env_true("ACCELERATE_USE_FSDP") and not fsdp:
            raise ValueError("train.fsdp: launched with accelerate's FSDP config (ACCELERATE_USE_FSDP=true) but "
                             "train.fsdp is false; add train.fsdp=true")
        if fsdp and world <= 1:
            raise ValueError("train.fsdp: needs 2 or more processes (accelerate launch --config_file "
                             "examples/accelerate/cpu_2proc.yaml -m finegrain train CONFIG train.fsdp=true)")
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), fsdp=fsdp)

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
        if not self.enabled or self.fsdp:  # FSDP summed them in its reduce-scatter (divide factor 1)
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


    # ---- sharded policy (train.fsdp)

    def shard_model(self, model):
        """Shard ``model`` in place with FSDP2 (each decoder layer, then the root), gradients summed
        over ranks. Build the optimizer now, while ``model.parameters()`` are the shards (DTensors),
        then call ``for_rollout``: in the rollout state the modules hold plain unsharded tensors."""
        from torch.distributed.fsdp import fully_shard

        layers = getattr(getattr(model, "model", None), "layers", None)  # Llama / Qwen2 / Mistral layout
        for layer in layers if layers is not None else []:
            fully_shard(layer)
        fully_shard(model)
        for m in _fsdp_modules(model):
            m.set_gradient_divide_factor(1.0)         # sum, not average (module docstring)
            m.set_force_sum_reduction_for_comms(True)  # as a plain SUM: gloo has no pre-multiplied sum
        return model

    def for_update(self, model) -> None:
        """Sharded: the unsharded weights are freed; forwards gather layer by layer (a collective)."""
        if self.fsdp:
            for m in _fsdp_modules(model):
                m.reshard()
                m.set_reshard_after_forward(True)

    def for_rollout(self, model) -> None:
        """Full weights on every rank (one all-gather, on every rank at the same point), kept until
        ``for_update``: forwards then need no collective."""
        if self.fsdp:
            mods = _fsdp_modules(model)
            for m in mods:
                m.set_reshard_after_forward(False)
            for m in mods:
                m.unshard()

    def model_state(self, model) -> dict | None:
        """The full state dict of a sharded ``model`` on rank 0 (CPU tensors; {} on the other
        ranks, which must call too: it is a collective); None when not sharded."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.for_update(model)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        self.for_rollout(model)
        return state

    def load_model_state(self, model, state: dict) -> None:
        """Load a full state dict (read on every rank) into sharded ``model``; each rank keeps its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        self.for_update(model)
        missing, unexpected = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                                          strict=False))
        self.for_rollout(model)
        missing = [m for m in missing if m != "lm_head.weight"]  # tied embeddings are saved once
        if missing or unexpected:
            raise RuntimeError(f"checkpoint: weights missing {missing[:3]}, unexpected {unexpected[:3]}")

    def optimizer_state(self, model, optimizer) -> dict:
        """What a checkpoint saves of ``optimizer``: its state dict, or for a sharded model the full
        state gathered from the shards, keyed by parameter name (a collective; complete on rank 0)."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        self.for_update(model)  # the modules must hold the shards the optimizer holds (names → parameters)
        state = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        self.for_rollout(model)
        return state

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        """Inverse of ``optimizer_state`` (every rank passes the full state it read)."""
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        self.for_update(model)
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        self.for_rollout(model)

    def check_same_rows(self, rows: int) -> None:
        """Sharded updates need the same number of micro-batches on every rank: refuse unequal shards
        (one line) instead of hanging in a collective."""
        if self.fsdp:
            total = int(self.all_sum(torch.tensor(rows)))
            if total != rows * self.world:
                raise RuntimeError(f"train.fsdp: this rank holds {rows} rows of {total} across {self.world} "
                                   f"processes; sharded updates need equal shards")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


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
    if dp.fsdp and cfg.model.lora.enabled:
        raise ValueError("train.fsdp: not supported with model.lora.enabled (the reference shares the LoRA "
                         "policy's base modules); use plain data parallel")
    from finegrain.rewards import REWARDS

    for r in cfg.rewards:
        meta = REWARDS.meta(r.name)
        if meta.get("trainable") or meta.get("stateful"):
            raise ValueError(f"rewards: '{r.name}' learns or keeps state across batches, which data parallel would "
                             "split per rank; use one process")
