"""The reward contract: every signal returns a ``RewardOutput`` at a declared level."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from finegrain.registry import Registry
from finegrain.shapes import check_mask

Level = Literal["outcome", "step", "token"]
LEVELS: tuple[str, ...] = ("outcome", "step", "token")

# Reward signals are classes (they may hold models); entries are constructed as
# ``REWARDS.get(name)(ctx, **kwargs)`` where ctx is a RewardContext.
REWARDS = Registry("reward signal")


@dataclass
class RewardOutput:
    """Values of one signal for a batch.

    values: (B,) for level 'outcome', (B, S) for 'step', (B, L) for 'token'.
    mask:   same shape, bool; False = not applicable (not the same as a zero reward).
    level:  'outcome' | 'step' | 'token'.
    components: extra per-row (B,) tensors for logging only (e.g. 'format', 'accuracy').
    """

    values: torch.Tensor
    mask: torch.Tensor
    level: Level
    components: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"RewardOutput.level: expected one of {LEVELS}, got '{self.level}'")
        want = {"outcome": 1, "step": 2, "token": 2}[self.level]
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


def level_rank(level: str) -> int:
    return LEVELS.index(level)
