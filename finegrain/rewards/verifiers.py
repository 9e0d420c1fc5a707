"""Outcome rewards from a task's verifier."""

from __future__ import annotations

import torch

from finegrain.rewards.base import REWARDS, RewardOutput


@REWARDS.register("verifier", level="outcome", needs="verify", vote="identity", center=0.5, search_value="last")
class TaskVerifier:
    """r_i = task.verify(example_i, response_i) ∈ [0, 1], one value per response (level 'outcome').

    Optional shaping: ``correct`` / ``wrong`` map the verifier's 1 / 0 to other values (DAPO uses
    +1 / −1); values in between are interpolated linearly.

    In ``finegrain eval`` (registry metadata ``vote``/``center``/``search_value``) it is the outcome
    oracle: best-of-N with it picks a correct sample whenever there is one, so its curve is pass@N.
    """

    name = "verifier"
    level = "outcome"

    def __init__(self, task, *, correct: float = 1.0, wrong: float = 0.0):
        self.task, self.correct, self.wrong = task, correct, wrong

    @classmethod
    def from_context(cls, ctx, *, correct: float = 1.0, wrong: float = 0.0):
        return cls(ctx.task, correct=correct, wrong=wrong)

    def __call__(self, traj) -> RewardOutput:
        acc = torch.tensor([self.task.verify(ex, text) for ex, text in zip(traj.examples, traj.response_texts)],
                           dtype=torch.float32, device=traj.response_ids.device)
        values = self.wrong + (self.correct - self.wrong) * acc
        return RewardOutput(values=values, mask=torch.ones_like(acc, dtype=torch.bool), level="outcome",
                            components={"accuracy": acc})
