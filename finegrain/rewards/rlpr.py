"""RLPR: the policy's own probability of the reference answer after its reasoning, as the reward.

For a response o = (z, a) with reasoning z and answer a, the policy scores the reference answer y*
teacher-forced in place of a (o' = z + answer marker + y*), and subtracts the same statistic for
y* with no reasoning, computed once per (prompt, y*) with the initial policy (the debiasing
baseline):

    lp_j  = log π_θ(y*_j | q, z, "A: ", y*_<j)           j = 0..|y*|−1   (current policy)
    lp0_j = log π_0(y*_j | q, "A: ", y*_<j)                              (initial policy, cached)
    s(lp) = (1/|y*|) Σ_j exp(lp_j)      score='mean_prob' (default; the reference's mean_exp_log_softmax)
          = (1/|y*|) Σ_j lp_j           score='mean_logprob'   (mean_log_softmax)
          = exp(Σ_j lp_j)               score='seq_prob'       (exp_sum_log_softmax)
          = exp((1/|y*|) Σ_j lp_j)      score='geo_mean'       (exp_mean_log_softmax)
    R     = max(s(lp) − s(lp0), 0)      clip_low=True (the scripts' threshold_0); s(lp) − s(lp0) if False
    R     = 0                            when the response has no answer marker, or nothing after it

Source: RLPR (arXiv:2506.18254; methods.md §21); OpenBMB/RLPR @ 8490fca326c625a1697a09ac1a1476a4f6f76325
verl/workers/reward_manager/prob.py (ProbRewardManager, compute_scoreB), verl/trainer/ppo/ray_trainer.py
(get_scoreA, compute_promptgt2scoreA, replace_answer_with_gt_batch). Those files were not in the
index this was written against; the equations and options follow methods.md's reading of them.

Shapes: B rows; P prompt, L response tokens; |y*| reference-answer tokens. Reads prompt_ids,
prompt_mask (B, P), response_texts and examples[b].answer; gives values (B,), mask (B,) all True.

Departures from the reference:
1. The answer format is finegrain's: the reasoning is the response text up to and including the
   last answer marker ``answer_prefix`` (default "A: ") that starts a line, and y* follows it. The
   reference rebuilds ``<think>…</think><answer> y* </answer>`` and requires exactly one of each
   tag; here a response without the marker, or with nothing after its last marker on that line,
   is the malformed case and gets R = 0 (the reference's value under threshold_0; without
   clipping the reference would give 0 − s(lp0), here it stays 0).
2. The baseline scores y* after the prompt and the answer marker (prompt + "A: " + y*), so both
   probes score y* at the same place of the answer format; the reference writes prompt + " " + y*
   with no answer tag.
3. The baseline is computed lazily, the first time a (prompt, y*) pair is seen, with a frozen copy
   of the initial policy (``ctx.initial_policy()``, taken when the signal is built, before a
   resumed run loads its weights) and cached for the run; the reference computes it for the whole
   dataset once before training. The initial policy is frozen and a probe does not depend on its
   batch mates, so the values are the same; the cost is one frozen model copy kept for the run.
   The cache is not checkpointed: a resumed run recomputes the same values.
4. No format reward (the reference's R = 0.9·Δ + 0.1·format) and no repetition penalty: the
   marker is finegrain's whole format. No temperature: the probe scores log-probs at
   temperature 1.
5. The reasoning is re-tokenized from the decoded response text (as the reference tokenizes o'),
   so a non-canonical BPE split in the sampled tokens is not kept; with a character tokenizer the
   tokens are the sampled ones.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from finegrain.models.probe import probe_logprobs, probe_token_ids
from finegrain.rewards.base import REWARDS, RewardOutput

SCORES = ("mean_prob", "mean_logprob", "seq_prob", "geo_mean")


def answer_scores(token_logprobs: Sequence[torch.Tensor], *, score: str = "mean_prob") -> torch.Tensor:
    """The RLPR statistic of each probe's per-token log-probs (see the module docstring for the
    four ``score`` kinds); NaN for an empty probe.

    Args: token_logprobs: N tensors (|c_n|,) float (``probe_logprobs``'s output).
    Returns: (N,) float32 on the device of the first tensor (CPU when N = 0).

    >>> import math
    >>> lp = [torch.log(torch.tensor([0.5, 0.25])), torch.zeros(0)]
    >>> answer_scores(lp).tolist()[0], math.isnan(answer_scores(lp).tolist()[1])
    (0.375, True)
    >>> [round(answer_scores(lp[:1], score=s).item(), 6) for s in ("mean_logprob", "seq_prob", "geo_mean")]
    [-1.039721, 0.125, 0.353553]
    """
    if score not in SCORES:
        raise ValueError(f"rlpr.score: expected one of {' | '.join(SCORES)}, got {score!r}")
    if not token_logprobs:
        return torch.zeros(0)
    device = token_logprobs[0].device
    n = torch.tensor([t.numel() for t in token_logprobs], device=device)                     # (N,)
    lp = pad_sequence([t.float().to(device) for t in token_logprobs], batch_first=True)        # (N, A), 0 past |c_n|
    mask = torch.arange(lp.shape[1], device=device)[None, :] < n[:, None]                      # (N, A)
    total = torch.where(mask, lp, torch.zeros_like(lp)).sum(1)                                 # Σ_j lp_j
    mean = total / n.clamp(min=1)
    if score == "mean_prob":
        out = torch.where(mask, lp.exp(), torch.zeros_like(lp)).sum(1) / n.clamp(min=1)
    elif score == "mean_logprob":
        out = mean
    elif score == "seq_prob":
        out = total.exp()
    else:
        out = mean.exp()
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def rlpr_rewards(score: torch.Tensor, baseline: torch.Tensor, well_formed: torch.Tensor, *,
                 clip_low: bool = True) -> torch.Tensor:
    """R_i = max(score_i − baseline_i, 0) (``clip_low``) or score_i − baseline_i; 0 where the
    response is malformed (``well_formed`` False; its score and baseline are not read).

    Args: score, baseline (B,) float; well_formed (B,) bool. Returns: (B,) float.

    >>> rlpr_rewards(torch.tensor([0.75, 0.25, 0.9]), torch.tensor([0.5, 0.5, float("nan")]),
    ...              torch.tensor([True, True, False])).tolist()
    [0.25, 0.0, 0.0]
    """
    delta = score - baseline
    if clip_low:
        delta = delta.clamp(min=0.0)
    return torch.where(well_formed, delta, torch.zeros_like(delta))


def answer_cut(text: str, prefix: str) -> int | None:
    """End of the last ``prefix`` that starts a line of ``text``, if the model wrote an answer
    after it (something other than spaces before the end of that line); else None.

    >>> answer_cut("7+5=12\\nA: 12", "A: "), answer_cut("DATA: 3", "A: "), answer_cut("x\\nA: \\n", "A: ")
    (10, None, None)
    """
    last = None
    for m in re.finditer(r"(?m)^" + re.escape(prefix), text):
        last = m
    if last is None or not text[last.end():].split("\n", 1)[0].strip():
        return None
    return last.end()


@REWARDS.register("rlpr", level="outcome", bounds={"micro_batch": "[1, inf)"}, choices={"score": SCORES})
class ReferenceProbability:
    """RLPR's probability reward (level 'outcome'); see the module docstring.

    Cost per batch: one probe per well-formed response under the current policy (context
    P + |reasoning| + |prefix|, continuation |y*|), plus one probe under the initial policy per
    (prompt, y*) pair not seen before, both through ``finegrain.models.probe.probe_logprobs``.
    """

    name = "rlpr"
    level = "outcome"

    def __init__(self, policy, initial, tokenizer, *, answer_prefix: str = "A: ", score: str = "mean_prob",
                 clip_low: bool = True, micro_batch: int = 16):
        if score not in SCORES:
            raise ValueError(f"rlpr.score: expected one of {' | '.join(SCORES)}, got {score!r}")
        if not answer_prefix:
            raise ValueError("rlpr.answer_prefix: expected a non-empty marker (the text before the answer), got ''")
        if initial is None:
            raise ValueError("rlpr: the debiasing baseline needs the initial policy, and the context gave none")
        self.policy, self.initial, self.tokenizer = policy, initial, tokenizer
        self.answer_prefix, self.score, self.clip_low, self.micro_batch = answer_prefix, score, clip_low, micro_batch
        self._baseline: dict[tuple[tuple[int, ...], str], float] = {}   # (prompt ids, y*) -> s(lp0)

    @classmethod
    def from_context(cls, ctx, *, answer_prefix: str = "A: ", score: str = "mean_prob", clip_low: bool = True,
                     micro_batch: int = 16):
        # the initial copy is taken now: a resumed run loads its saved weights into the policy later
        return cls(ctx.policy, ctx.initial_policy(), ctx.tokenizer, answer_prefix=answer_prefix, score=score,
                   clip_low=clip_low, micro_batch=micro_batch)

    def _probe(self, model, contexts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
        lps = probe_logprobs(model, contexts, answers, pad_token_id=self.tokenizer.pad_token_id,
                             micro_batch=self.micro_batch)
        return answer_scores(lps, score=self.score).float().cpu()

    def baselines(self, prompts: list[list[int]], answers: list[str]) -> torch.Tensor:
        """(B,) s(lp0) of each (prompt ids, y*) under the initial policy, from the cache or probed
        now (one probe call for every pair not seen before); NaN for an empty y*."""
        keys = [(tuple(p), a) for p, a in zip(prompts, answers)]
        new = [k for k in dict.fromkeys(keys) if k not in self._baseline]
        if new:
            split = [probe_token_ids(self.tokenizer, self.answer_prefix, a) for _, a in new]
            values = self._probe(self.initial, [list(p) + pre for (p, _), (pre, _) in zip(new, split)],
                                 [ans for _, ans in split])
            self._baseline.update(zip(new, values.tolist()))
        return torch.tensor([self._baseline[k] for k in keys], dtype=torch.float32)

    def __call__(self, traj) -> RewardOutput:
        B = traj.batch_size
        prompts = [traj.prompt_ids[b][traj.prompt_mask[b]].tolist() for b in range(B)]
        answers = [str(ex.answer) for ex in traj.examples]
        contexts, continuations, rows = [], [], []
        for b in range(B):
            cut = answer_cut(traj.response_texts[b], self.answer_prefix)
            if cut is None:
                continue
            prefix_ids, answer_ids = probe_token_ids(self.tokenizer, traj.response_texts[b][:cut], answers[b])
            if answer_ids:  # an empty reference answer has nothing to score: malformed
                contexts.append(prompts[b] + prefix_ids)
                continuations.append(answer_ids)
                rows.append(b)
        well_formed = torch.zeros(B, dtype=torch.bool)
        well_formed[rows] = True
        score = torch.zeros(B)
        if rows:
            score[rows] = self._probe(self.policy, contexts, continuations)
        baseline = torch.zeros(B)
        if rows:  # only the rows that are scored need their baseline
            baseline[rows] = self.baselines([prompts[b] for b in rows], [answers[b] for b in rows])
        values = rlpr_rewards(score, baseline, well_formed, clip_low=self.clip_low)
        dev = traj.response_ids.device
        return RewardOutput(values.to(dev), torch.ones(B, dtype=torch.bool, device=dev), "outcome",
                            components={"score": score.to(dev), "baseline": baseline.to(dev),
                                        "well_formed": well_formed.float().to(dev)})
