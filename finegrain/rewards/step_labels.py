"""Exact process rewards from a task that can label steps (an upper bound for any PRM).

For tasks with exact step labels (``arith``; ``gsm8k``'s arithmetic checks), each step of each
response gets ``correct`` if the task labels it correct and ``wrong`` otherwise (wrong or
unparseable). Level 'step': values (B, S), placed by the combiner on each step's last token.
This is process supervision with ground truth (as in Lightman et al. 2023, arXiv:2305.20050,
where humans give the labels), useful to measure how much an exact process signal helps before
asking whether a learned PRM recovers it.

Step k of the labels is step k of ``Trajectory.step_ids`` because both come from the task's
segmenter; rows where the counts differ (e.g. a response cut mid-step) keep only the common
prefix of steps.
"""

from __future__ import annotations

import torch

from finegrain.rewards.base import REWARDS, RewardOutput
from finegrain.tasks.base import STEP_CORRECT


# In ``finegrain eval`` the exact labels are a process oracle on a 1 = correct, 0 = wrong scale
# (``eval_kwargs``), so vote weights are the scores themselves and 0.5 is the neutral colour.
@REWARDS.register("step_labels", level="step", vote="identity", center=0.5, search_value="min",
                  eval_kwargs={"correct": 1.0, "wrong": 0.0})
class TaskStepLabels:
    """r_{i,k} = correct if the task labels step k of response i correct, else wrong."""

    name = "step_labels"
    level = "step"

    def __init__(self, task, *, correct: float = 0.0, wrong: float = -1.0):
        if not hasattr(task, "label_steps"):
            raise ValueError(f"reward 'step_labels': task '{task.name}' cannot label steps (no label_steps)")
        self.task, self.correct, self.wrong = task, correct, wrong

    @classmethod
    def from_context(cls, ctx, *, correct: float = 0.0, wrong: float = -1.0):
        return cls(ctx.task, correct=correct, wrong=wrong)

    def __call__(self, traj) -> RewardOutput:
        S = int(traj.step_ids.max().clamp(min=-1)) + 1
        B = traj.batch_size
        values = torch.zeros(B, S)
        mask = torch.zeros(B, S, dtype=torch.bool)
        n_wrong = torch.zeros(B)
        for i, (ex, text) in enumerate(zip(traj.examples, traj.response_texts)):
            labels = self.task.label_steps(ex, text).labels
            k = min(len(labels), int(traj.step_ids[i].max()) + 1)
            for s in range(k):
                values[i, s] = self.correct if labels[s] == STEP_CORRECT else self.wrong
                mask[i, s] = True
            n_wrong[i] = sum(lab != STEP_CORRECT for lab in labels[:k])
        device = traj.response_ids.device
        return RewardOutput(values.to(device), mask.to(device), "step", {"wrong_steps": n_wrong.to(device)})
