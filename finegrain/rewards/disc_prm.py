"""``disc_prm``: step rewards from a discriminative process reward model (a trained step classifier).

The PRM (``finegrain.models.step_classifier``, trained by ``finegrain prm train --kind
discriminative``) gives each step k of a response the probability that it is correct,

    p_k = σ(s_k),   s_k = w · h_{e(k)} + b     (h at the last token of step k; see step_classifier)

and the reward of step k is, by ``reward``:

    prob      r_k = p_k                     (default; the scale of Math-Shepherd's and
                                             Lightman et al.'s PRM scores)
    centered  r_k = p_k − ½                 (a wrong-looking step is a penalty, a right one a bonus)
    log       r_k = log p_k = log σ(s_k)    (Σ_k r_k = log Π_k p_k, Lightman et al.'s product score)

Sources: Math-Shepherd (Wang et al. 2023, arXiv:2312.08935), PRM800K (Lightman et al. 2023,
arXiv:2305.20050), ProcessBench (Zheng et al. 2024, arXiv:2412.06559) for the first-error reading
of step scores, HRM (methods.md §19) for the merged-step training option.

Text, not tokens. The PRM has its own tokenizer, which need not be the policy's. Every scored
response is rebuilt from text: the prompt text (``task.format_prompt(example)``, else the
trajectory's prompt text) and the response text cut by the task's segmenter into step texts;
the PRM input is encode_steps(prompt, steps). So step k of the output is span k of the task's
segmenter, the spans ``Trajectory.step_ids``, the exact labels and ``finegrain eval`` use.

Output: level 'step', values (B, S) with S = the most steps of any row, mask (B, S) True where
row b has step k and the step's last token fits in the PRM's position limit. Components (B,):
``prob_mean`` (mean p_k over the row's scored steps, 0 without one) and ``prob_min`` (min p_k, 0
without one).

Departures: the PRM is frozen (no online update; train it offline); rows are scored in
micro-batches of ``micro_batch``; the model is kept in eval mode.
"""

from __future__ import annotations

import math

import torch

from finegrain.models.step_classifier import load_step_classifier, step_logits
from finegrain.rewards.base import REWARDS, RewardOutput
from finegrain.segment import SEGMENTERS

REWARD_MAPS = ("prob", "centered", "log")


def map_step_reward(logit: float, how: str) -> float:
    """r_k from s_k: 'prob' σ(s), 'centered' σ(s) − ½, 'log' log σ(s) (computed stably).

    >>> [round(map_step_reward(0.0, h), 4) for h in REWARD_MAPS]
    [0.5, 0.0, -0.6931]
    """
    if how == "prob":
        return 1.0 / (1.0 + math.exp(-logit)) if logit >= 0 else math.exp(logit) / (1.0 + math.exp(logit))
    if how == "centered":
        return map_step_reward(logit, "prob") - 0.5
    if how == "log":
        return -math.log1p(math.exp(-logit)) if logit >= 0 else logit - math.log1p(math.exp(logit))
    raise ValueError(f"disc_prm.reward: expected one of {', '.join(REWARD_MAPS)}, got '{how}'")


# In ``finegrain eval`` and the step searches the PRM's probabilities are the scores (vote weights
# ≥ 0, ½ = no opinion); a partial response is worth its worst step so far ('min'), as for exact labels.
@REWARDS.register("disc_prm", level="step", choices={"reward": REWARD_MAPS}, bounds={"micro_batch": "[1, inf)"},
                  vote="identity", center=0.5, search_value="min", eval_kwargs={"reward": "prob"})
class DiscriminativePRM:
    """r_{b,k} = f(p_{b,k}) for step k of response b (module docstring).

    DiscriminativePRM(model, tokenizer, *, segmenter, task=None, reward='prob', micro_batch=16)
    model: a ``StepClassifier``; tokenizer: the PRM's own. segmenter: name in SEGMENTERS (the task's).
    """

    name = "disc_prm"
    level = "step"

    def __init__(self, model, tokenizer, *, segmenter: str, task=None, reward: str = "prob", micro_batch: int = 16):
        if reward not in REWARD_MAPS:
            raise ValueError(f"disc_prm.reward: expected one of {', '.join(REWARD_MAPS)}, got '{reward}'")
        if micro_batch < 1:
            raise ValueError(f"disc_prm.micro_batch: expected >= 1, got {micro_batch}")
        self.model, self.tokenizer, self.task = model.eval(), tokenizer, task
        self.segment = SEGMENTERS.get(segmenter)
        self.reward, self.micro_batch = reward, micro_batch

    @classmethod
    def from_context(cls, ctx, *, path: str = "", reward: str = "prob", micro_batch: int = 16):
        """Load the PRM saved at ``path`` (required) onto the policy's device."""
        if not path:
            raise ValueError("disc_prm.path: required, the directory of a PRM trained with "
                             "`finegrain prm train --kind discriminative` (rewards[i].kwargs.path, or in "
                             "`finegrain eval` --reward-kwargs '{\"disc_prm\": {\"path\": DIR}}')")
        device = next(ctx.policy.parameters()).device if ctx.policy is not None else "cpu"
        model, tok, _ = load_step_classifier(path, str(device), where="disc_prm.path")
        model.requires_grad_(False)
        return cls(model, tok, segmenter=ctx.task.segmenter, task=ctx.task, reward=reward, micro_batch=micro_batch)

    def prompt_text(self, traj, b: int) -> str:
        """The question text of row b: the task's prompt of its example, else the trajectory's prompt text."""
        if self.task is not None and traj.examples and hasattr(traj.examples[b], "prompt"):
            return self.task.format_prompt(traj.examples[b])
        return traj.prompt_texts[b]

    def step_texts(self, text: str) -> list[str]:
        return [text[a:c] for a, c in self.segment(text)]

    def score_texts(self, prompts: list[str], responses: list[str]) -> list[list[float | None]]:
        """s_k for every step of every response text (None: cut by the PRM's position limit)."""
        return step_logits(self.model, self.tokenizer, prompts, [self.step_texts(r) for r in responses],
                           micro_batch=self.micro_batch)

    def __call__(self, traj) -> RewardOutput:
        B = traj.batch_size
        prompts = [self.prompt_text(traj, b) for b in range(B)]
        logits = self.score_texts(prompts, list(traj.response_texts))
        S = max((len(row) for row in logits), default=0)
        values = torch.zeros(B, S)
        mask = torch.zeros(B, S, dtype=torch.bool)
        prob_mean, prob_min = torch.zeros(B), torch.zeros(B)
        for b, row in enumerate(logits):
            probs = []
            for k, s in enumerate(row):
                if s is None:
                    continue
                values[b, k] = map_step_reward(s, self.reward)
                mask[b, k] = True
                probs.append(map_step_reward(s, "prob"))
            if probs:
                prob_mean[b], prob_min[b] = sum(probs) / len(probs), min(probs)
        device = traj.response_ids.device
        return RewardOutput(values.to(device), mask.to(device), "step",
                            {"prob_mean": prob_mean.to(device), "prob_min": prob_min.to(device)})
