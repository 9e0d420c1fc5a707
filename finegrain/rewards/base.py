"""The reward contract: every signal returns a ``RewardOutput`` at a declared level."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from finegrain.registry import Registry
from finegrain.shapes import check_mask

Level = Literal["outcome", "turn", "step", "token"]
# coarsest to finest: an estimator that consumes a level takes every coarser one too
LEVELS: tuple[str, ...] = ("outcome", "turn", "step", "token")

# Reward signals are classes (they may hold models); entries are constructed as
# ``REWARDS.get(name).from_context(ctx, **kwargs)`` where ctx is a ``train.stages.RewardContext``
# (task, tokenizer, policy, config); ``kwargs`` come from ``rewards[i].kwargs``.
REWARDS = Registry("reward signal")


@dataclass
class RewardOutput:
    """Values of one signal for a batch.

    values: (B,) for level 'outcome', (B, T) for 'turn', (B, S) for 'step', (B, L) for 'token'.
    mask:   same shape, bool; False = not applicable (not the same as a zero reward).
    level:  'outcome' | 'turn' | 'step' | 'token'.
    components: extra per-row (B,) tensors for logging only (e.g. 'format', 'accuracy').
    """

    values: torch.Tensor
    mask: torch.Tensor
    level: Level
    components: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"RewardOutput.level: expected one of {LEVELS}, got '{self.level}'")
        want = {"outcome": 1, "turn": 2, "step": 2, "token": 2}[self.level]
        if self.values.dim() != want:
            raise ValueError(f"RewardOutput.values: level '{self.level}' needs {want} dims, got {tuple(self.values.shape)}")
        if self.mask.shape != self.values.shape:
            raise ValueError(f"RewardOutput.mask: shape {tuple(self.mask.shape)} != values {tuple(self.values.shape)}")
        check_mask("RewardOutput.mask", self.mask)


@runtime_checkable
class RewardSignal(Protocol):
    name: str
    level: Level

    def __call__(self, traj) -> RewardOutput: ...


def level_of(name: str, kwargs: dict | None = None) -> str:
    """The level a configured signal gives: its kwargs' ``level`` if set, else its registry level."""
    return (kwargs or {}).get("level", REWARDS.meta(name)["level"])


def level_rank(level: str) -> int:
    return LEVELS.index(level)


def select_output(out: RewardOutput, rows: torch.Tensor) -> RewardOutput:
    """The rows ``rows`` (indices or a (B,) bool mask) of an outcome-level output."""
    if out.level != "outcome":
        raise ValueError(f"select_output: only outcome-level outputs, got '{out.level}'")
    return RewardOutput(out.values[rows], out.mask[rows], out.level, {k: v[rows] for k, v in out.components.items()})


def cat_outputs(outs: list[RewardOutput]) -> RewardOutput:
    """Row-wise concatenation of outcome-level outputs (same component keys)."""
    if any(o.level != "outcome" for o in outs):
        raise ValueError("cat_outputs: only outcome-level outputs")
    return RewardOutput(torch.cat([o.values for o in outs]), torch.cat([o.mask for o in outs]), "outcome",
                        {k: torch.cat([o.components[k] for o in outs]) for k in outs[0].components})
