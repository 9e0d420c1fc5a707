"""Length shaping rewards."""

from __future__ import annotations

import torch

from finegrain.rewards.base import REWARDS, RewardOutput


def soft_overlong_penalty(lengths: torch.Tensor, *, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, Eq. 13):

        R(y) = 0                                  if |y| ≤ L_max − L_cache
             = ((L_max − L_cache) − |y|) / L_cache  if L_max − L_cache < |y| ≤ L_max
             = −1                                 if |y| > L_max

    Args: lengths (B,) response lengths in tokens. Returns (B,) float in [−1, 0].

    >>> soft_overlong_penalty(torch.tensor([10, 16, 20, 25]), max_len=20, cache_len=8).tolist()
    [0.0, -0.5, -1.0, -1.0]
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"overlong: expected 0 < cache_len ≤ max_len, got cache_len={cache_len}, max_len={max_len}")
    lengths = lengths.float()
    soft = ((max_len - cache_len) - lengths) / cache_len
    out = torch.where(lengths <= max_len - cache_len, torch.zeros_like(lengths), soft)
    return torch.where(lengths > max_len, torch.full_like(lengths, -1.0), out)


@REWARDS.register("overlong", level="outcome", bounds={"max_len": "[1, inf)", "cache_len": "[0, inf)"})
class OverlongPenalty:
    """Outcome-level soft overlong penalty on the response length (real tokens, EOS included)."""

    name = "overlong"
    level = "outcome"

    def __init__(self, *, max_len: int, cache_len: int):
        self.max_len, self.cache_len = max_len, cache_len
        soft_overlong_penalty(torch.zeros(1), max_len=max_len, cache_len=cache_len)  # validates

    @classmethod
    def from_context(cls, ctx, *, max_len: int | None = None, cache_len: int = 8):
        return cls(max_len=max_len or ctx.cfg.rollout.max_new_tokens, cache_len=cache_len)

    def __call__(self, traj) -> RewardOutput:
        lengths = traj.response_mask.sum(1)
        values = soft_overlong_penalty(lengths, max_len=self.max_len, cache_len=self.cache_len)
        return RewardOutput(values=values, mask=torch.ones_like(values, dtype=torch.bool), level="outcome",
                            components={"length": lengths.float()})
