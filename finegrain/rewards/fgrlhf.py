"""``fg_rlhf``: Fine-Grained RLHF's dense reward from several segment-level reward models.

Fine-Grained RLHF (Wu et al. 2023, arXiv:2306.01693; methods.md §11) scores a response with one
reward model per error kind, each at its own granularity, and places each score on the last
token of its segment. The token reward before the KL term is the sum over kinds:

    r_t = Σ_{steps k ending at t} [ f_k ] + Σ_{steps k ending at t} [ g_k ] + [t = last token] · c

    factuality   f_k = +0.5 if s^F_k > 0 else −0.5   (s^F_k: factuality RM's logit for line k)
    relevance    g_k = +0.3 if s^R_k > 0 else −0.3   (s^R_k: relevance RM's logit for line k)
    completeness c   = 0.3 · (s^C − μ) / σ + 0.0     (s^C: completeness RM's logit for the response)

The trainer then subtracts the KL term per token (``loss.kl_mode: reward``: r_t − β·KL_t, a
separate source ``kl_penalty``) and PPO with GAE and a critic (``gae``) turns the sum into
advantages. The reward models are discriminative step classifiers
(``finegrain.models.step_classifier``) trained from the testbed's exact labels
(``finegrain.rewards.fgrlhf_labels``) by ``finegrain prm train --kind discriminative --label-kind
KIND``. Scoring is through text, as ``disc_prm``: each RM has its own tokenizer; the response text
is cut by the task's segmenter into the lines that ``Trajectory.step_ids`` also marks.

Constants (kwargs; defaults are the paper's QA-Feedback values, allenai/FineGrainedRLHF
``tasks/qa_feedback/training/fine_grained_config.yml`` and ``reward.py``):

    factuality_positive / factuality_negative     +0.5 / −0.5   (paper: the same)
    relevance_positive / relevance_negative       +0.3 / −0.3   (paper: the same)
    completeness_scale / completeness_shift        0.3 / 0.0    (paper: the same)
    completeness_mean / completeness_std           from the completeness RM's directory (the mean
        and standard deviation of its logits over its training rows, written by ``prm train``);
        the paper's −0.4468 / 8.3012 are statistics of its own preference RM, meaningless here.

Where this departs from the paper:

1. The RMs are step classifiers (a causal LM with a scalar head read at each segment's last token;
   ``s > 0`` is the class "no error"), not Longformer token classifiers read at inserted "</s>"
   separators; the completeness RM is a binary classifier of the exact "complete" label, not a
   preference RM trained on pairwise comparisons, so its logit plays the preference score's part.
2. Relevance and factuality are both judged per line (the testbed's step), where the paper uses
   sub-sentences for relevance and sentences for factuality; an arith line is both.
3. A kind is optional: an empty ``<kind>_path`` leaves that kind out (at least one is needed).
4. A segment the RM cannot read (its last token beyond the RM's position limit) gets no reward
   of that kind; an empty response gets no completeness reward (there is no text to classify).
5. No reward whitening (the paper's ``whiten_rewards``, shift_mean=False); advantages are whitened
   by ``advantage.whiten`` as in the paper.

Output: level 'token', values (B, L) = r_t above, mask (B, L) True on the tokens where at least
one kind placed a value (each line's last trained token, the row's last trained token); every
placement is the combiner's own (``combine.to_token_rewards``: a step value on its step's last
trained token, the completeness value on the row's last trained token), so ``fg_rlhf`` puts
values exactly where separate step- and outcome-level signals would. Components (B,):
``<kind>_reward`` (the kind's reward summed over the row), ``factuality_ok`` / ``relevance_ok``
(fraction of the row's scored lines the RM judges free of that error; 0 without one) and
``completeness_ok`` (1 if s^C > 0, else 0; 0 when unscored).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from finegrain.models.step_classifier import INFO_FILE, load_step_classifier, step_logits
from finegrain.rewards.base import REWARDS, RewardOutput
from finegrain.rewards.combine import to_token_rewards
from finegrain.rewards.fgrlhf_labels import KIND_LEVELS, KINDS
from finegrain.segment import SEGMENTERS


def segment_value(logit: float, positive: float, negative: float) -> float:
    """The paper's class reward of one segment: ``positive`` if the RM says "no error" (s > 0), else ``negative``.

    >>> segment_value(1.2, 0.5, -0.5), segment_value(0.0, 0.3, -0.3)
    (0.5, -0.3)
    """
    return positive if logit > 0 else negative


def normalised_value(logit: float, *, mean: float, std: float, scale: float, shift: float) -> float:
    """The paper's sequence reward: ((s − μ) / σ) · scale + shift.

    >>> normalised_value(2.0, mean=1.0, std=4.0, scale=0.3, shift=0.0)
    0.075
    """
    return (logit - mean) / std * scale + shift


def record_logit_stats(model, tokenizer, rows, out_dir, *, micro_batch: int = 16) -> dict[str, float]:
    """Mean and (population) standard deviation of ``model``'s logits over every labelled step of
    ``rows``, added as ``logit_mean`` / ``logit_std`` to ``out_dir/finegrain_prm.json`` (written to a
    temporary file and renamed). ``fg_rlhf`` reads them as the completeness RM's μ and σ."""
    was = model.training
    model.eval()
    try:
        logits = step_logits(model, tokenizer, [r.prompt for r in rows], [list(r.steps) for r in rows],
                             micro_batch=micro_batch)
    finally:
        model.train(was)
    vals = [s for r, row in zip(rows, logits) for lab, s in zip(r.labels, row) if lab is not None and s is not None]
    if not vals:
        raise ValueError("logit stats: no labelled step fits in the PRM's position limit")
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    path = Path(out_dir) / INFO_FILE
    info = {**json.loads(path.read_text()), "logit_mean": mean, "logit_std": std, "logit_n": len(vals)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)
    return {"logit_mean": mean, "logit_std": std}


_BOUNDS = {"micro_batch": "[1, inf)", "completeness_std": "(0, inf)"}


@REWARDS.register("fg_rlhf", level="token", bounds=_BOUNDS)
class FineGrainedRLHF:
    """r_t = Σ_kinds (each kind's segment rewards on its segments' last trained tokens); module docstring.

    FineGrainedRLHF(models, *, segmenter, task=None, values=None, completeness_norm=(0, 1, 0.3, 0), micro_batch=16)
    models: {kind: (StepClassifier, its tokenizer)} for kinds in KINDS. values: {kind: (positive,
    negative)} for the step kinds (default the paper's). completeness_norm: (μ, σ, scale, shift).
    """

    name = "fg_rlhf"
    level = "token"

    def __init__(self, models: dict, *, segmenter: str, task=None, values: dict | None = None,
                 completeness_norm: tuple[float, float, float, float] = (0.0, 1.0, 0.3, 0.0), micro_batch: int = 16):
        unknown = [k for k in models if k not in KIND_LEVELS]
        if unknown or not models:
            raise ValueError(f"fg_rlhf: expected reward models for some of {', '.join(KINDS)}, got {list(models)}")
        if micro_batch < 1:
            raise ValueError(f"fg_rlhf.micro_batch: expected >= 1, got {micro_batch}")
        if not completeness_norm[1] > 0:
            raise ValueError(f"fg_rlhf.completeness_std: expected > 0, got {completeness_norm[1]}")
        self.models = {k: (m.eval(), tok) for k, (m, tok) in models.items()}
        self.values = {"factuality": (0.5, -0.5), "relevance": (0.3, -0.3), **(values or {})}
        self.norm = completeness_norm
        self.segment = SEGMENTERS.get(segmenter)
        self.task, self.micro_batch = task, micro_batch

    @classmethod
    def from_context(cls, ctx, *, factuality_path: str = "", relevance_path: str = "", completeness_path: str = "",
                     factuality_positive: float = 0.5, factuality_negative: float = -0.5,
                     relevance_positive: float = 0.3, relevance_negative: float = -0.3,
                     completeness_scale: float = 0.3, completeness_shift: float = 0.0,
                     completeness_mean: float | None = None, completeness_std: float | None = None,
                     micro_batch: int = 16):
        """Load each kind's RM from its ``<kind>_path`` ('' = kind off) onto the policy's device."""
        paths = {"factuality": factuality_path, "relevance": relevance_path, "completeness": completeness_path}
        if not any(paths.values()):
            raise ValueError("fg_rlhf: give at least one of factuality_path, relevance_path, completeness_path "
                             "(directories from `finegrain prm train --kind discriminative --label-kind KIND`)")
        device = next(ctx.policy.parameters()).device if ctx.policy is not None else "cpu"
        models, infos = {}, {}
        for kind, path in paths.items():
            if not path:
                continue
            where = f"fg_rlhf.{kind}_path"
            model, tok, info = load_step_classifier(path, str(device), where=where)
            if info.get("label_kind") != kind:
                raise ValueError(f"{where}: '{path}' was trained with label kind '{info.get('label_kind', 'steps')}', "
                                 f"not '{kind}' (finegrain prm train --kind discriminative --label-kind {kind})")
            if KIND_LEVELS[kind] == "step" and info.get("segmenter") not in (None, ctx.task.segmenter):
                raise ValueError(f"{where}: '{path}' cuts steps with '{info['segmenter']}', the task with "
                                 f"'{ctx.task.segmenter}'")
            model.requires_grad_(False)
            models[kind], infos[kind] = (model, tok), info
        mean, std = completeness_mean, completeness_std
        if "completeness" in models:
            info = infos["completeness"]
            for key, got, rec in (("completeness_mean", mean, "logit_mean"), ("completeness_std", std, "logit_std")):
                if got is None and rec not in info:
                    raise ValueError(f"fg_rlhf.{key}: not given and '{completeness_path}' records no {rec}; set it")
            mean = info["logit_mean"] if mean is None else mean
            std = info["logit_std"] if std is None else std
            if not std > 0:
                raise ValueError(f"fg_rlhf.completeness_std: expected > 0, got {std} (recorded in "
                                 f"'{completeness_path}'); set it")
        values = {"factuality": (factuality_positive, factuality_negative),
                  "relevance": (relevance_positive, relevance_negative)}
        return cls(models, segmenter=ctx.task.segmenter, task=ctx.task, values=values,
                   completeness_norm=(0.0 if mean is None else mean, 1.0 if std is None else std,
                                      completeness_scale, completeness_shift), micro_batch=micro_batch)

    def prompt_text(self, traj, b: int) -> str:
        """The question text of row b: the task's prompt of its example, else the trajectory's prompt text."""
        if self.task is not None and traj.examples and hasattr(traj.examples[b], "prompt"):
            return self.task.format_prompt(traj.examples[b])
        return traj.prompt_texts[b]

    def kind_output(self, kind: str, prompts: list[str], texts: list[str]) -> tuple[RewardOutput, torch.Tensor]:
        """One kind's rewards at its own level (step (B, S) or outcome (B,)), and its 'ok' component (B,)."""
        model, tok = self.models[kind]
        B = len(texts)
        if KIND_LEVELS[kind] == "step":
            steps = [[t[a:c] for a, c in self.segment(t)] for t in texts]
            logits = step_logits(model, tok, prompts, steps, micro_batch=self.micro_batch)
            S = max((len(row) for row in logits), default=0)
            values, mask, ok = torch.zeros(B, S), torch.zeros(B, S, dtype=torch.bool), torch.zeros(B)
            pos, neg = self.values[kind]
            for b, row in enumerate(logits):
                scored = [(k, s) for k, s in enumerate(row) if s is not None]
                for k, s in scored:
                    values[b, k], mask[b, k] = segment_value(s, pos, neg), True
                if scored:
                    ok[b] = sum(s > 0 for _, s in scored) / len(scored)
            return RewardOutput(values, mask, "step"), ok
        mean, std, scale, shift = self.norm
        rows = [b for b, t in enumerate(texts) if t.strip()]
        logits = step_logits(model, tok, [prompts[b] for b in rows], [[texts[b]] for b in rows],
                             micro_batch=self.micro_batch)
        values, mask, ok = torch.zeros(B), torch.zeros(B, dtype=torch.bool), torch.zeros(B)
        for b, (s,) in zip(rows, logits):
            if s is not None:
                values[b] = normalised_value(s, mean=mean, std=std, scale=scale, shift=shift)
                mask[b], ok[b] = True, float(s > 0)
        return RewardOutput(values, mask, "outcome"), ok

    def __call__(self, traj) -> RewardOutput:
        B, L = traj.response_ids.shape
        device = traj.response_ids.device
        prompts = [self.prompt_text(traj, b) for b in range(B)]
        texts = list(traj.response_texts)
        token = torch.zeros(B, L, device=device)
        placed = torch.zeros(B, L, dtype=torch.bool, device=device)
        components = {}
        for kind in KINDS:
            if kind not in self.models:
                continue
            out, ok = self.kind_output(kind, prompts, texts)
            out = RewardOutput(out.values.to(device), out.mask.to(device), out.level)
            r = to_token_rewards(out, traj)                                            # (B, L)
            where = to_token_rewards(RewardOutput(torch.ones_like(out.values), out.mask, out.level), traj) != 0
            token, placed = token + r, placed | where
            components[f"{kind}_reward"] = r.sum(1)
            components[f"{kind}_ok"] = ok.to(device)
        return RewardOutput(token, placed, "token", components)
