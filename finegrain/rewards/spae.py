"""SPAE's step potential: probe the policy after each step, reward the change of potential (level 'step').

SPAE (Step Potential Advantage Estimation, Wu et al. 2026, arXiv:2601.03823). After each step
boundary k of a response (and once right after the prompt, k = −1) the policy is probed with the
context h_k = prompt + response through step k + answer prefix (``prefix``, default "A: ",
finegrain's answer line), and the reference answer a* = ``Example.answer`` (M tokens) is scored
teacher-forced through ``finegrain.models.probe.probe_logprobs`` (``return_entropy=True``):

    Acc_k  = (1/M) Σ_j π_θ(a*_j | h_k, a*_<j)                       mean per-token probability
    Conf_k = exp(−(1/M) Σ_j H_j),  H_j = −Σ_v π_θ(v | h_k, a*_<j) log π_θ(v | h_k, a*_<j)
    Φ_k    = 1.5·Acc_k·Conf_k + 0.5·Acc_k − Conf_k                  ∈ [−1, 1]
    r_k    = ΔΦ_k = Φ_k − Φ_{k−1},  k = 0..K_b−2                     (Φ_{−1}: the probe after the prompt)

Φ = 1 is confident and correct, −1 confident and wrong, about 0 unsure. The values are (B, S)
with S the largest step count of the batch; the mask is True for the K_b − 1 probed steps of each
row (none for a row of fewer than two steps). Pair it with an outcome signal (``verifier``) and
the ``spae`` estimator (``finegrain/credit/spae.py``), which reads the outcome at the row's last
trained token and these rewards at the step ends.

Cost per batch: Σ_{b: K_b≥2} K_b probes (the prompt and K_b − 1 step ends) under no_grad; the
probes of one response share its prefix, so on packing models they cost about one forward over
the rollout plus K_b·(|prefix| + M) tokens (``docs/algorithms/probe.md``).

Sources: arXiv:2601.03823 (Acc and Conf as written in the paper, via a review of it: methods.md §7);
cii030/SPAE-RL inference/probe_mechanism_example.py @ 1f8c839df2965cb8dbf89111843b1c8d68c9acc4
(probe after each ".\\n\\n" step of the <think> part, prompt "**Final Answer**\\n\\boxed{",
Φ = 1.5·Acc·Conf + 0.5·Acc − Conf, ΔΦ of the first step = 0, saturation diagnostics at Φ > 0.9).

Departures (numbered; docs/algorithms/spae.md repeats them):
 1. Teacher forcing instead of sampling. The reference samples N = 5 probe continuations (T = 0.6,
    10 tokens, top-20 log-probs) and reads the answer tokens' log-probs and the entropies at the
    sampled positions. Acc as the paper defines it, π(a*_m | h, a*_<m), conditions on the
    *reference* prefix, so teacher forcing gives it exactly (no sampling noise, one forward). Conf
    here is the entropy at the answer positions of the teacher-forced reference, not of sampled
    continuations: the expectation over samples the paper averages is replaced by the one
    continuation that Acc scores.
 2. Entropy over the whole vocabulary at temperature 1 (the reference: exponentiated top-20
    log-probs without renormalising, from vLLM's sampler); a missing answer token is not
    replaced by log-prob −10, there is none missing.
 3. Acc is the mean of the per-token probabilities (the paper's formula); the reference code
    computes exp(Σ_j log p_j)/M, the product over M, which agrees for one-token answers.
 4. Φ_{−1} is a probe right after the prompt and r_0 = Φ_0 − Φ_{−1} (potential-based shaping
    from the start state); the reference sets the first ΔΦ to 0. ``baseline="zero"`` takes
    Φ_{−1} := 0 instead (no prompt probe, r_0 = Φ_0), so the running sum of the rewards is the
    potential itself, which is what the ``spae`` estimator's saturation test would read.
 5. The last step of a response gets no reward: its end is the response's end, where the outcome
    reward is placed (the estimator tells the two apart by position), and in ``arith`` it is the
    answer line itself. The reference probes inside <think> only, not after the final answer.
 6. Steps are finegrain's (``Trajectory.step_ids``, the task's segmenter: lines in ``arith``);
    the context after step k holds every response token up to step k's last token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from finegrain.models.probe import answer_probes, probe_logprobs
from finegrain.rewards.base import REWARDS, RewardOutput

BASELINES = ("prompt", "zero")


def step_potential(acc: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
    """Φ = 1.5·Acc·Conf + 0.5·Acc − Conf (elementwise).

    >>> step_potential(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([1.0, 1.0, 0.0])).tolist()
    [1.0, -1.0, 0.25]
    """
    return 1.5 * acc * conf + 0.5 * acc - conf


def acc_conf(answer_logprobs: Sequence[torch.Tensor], answer_entropies: Sequence[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Acc = mean_j exp(lp_j) and Conf = exp(−mean_j H_j) of each probe; NaN for an empty answer.

    Args: N tensors (M_n,) of answer-token log-probs, N tensors (M_n,) of entropies.
    Returns: acc (N,), conf (N,) float32.

    >>> a, c = acc_conf([torch.log(torch.tensor([0.5, 1.0]))], [torch.tensor([0.0, 2.0])])
    >>> round(float(a[0]), 4), round(float(c[0]), 4)       # (0.5 + 1)/2, exp(−1)
    (0.75, 0.3679)
    """
    nan = torch.full((), float("nan"))
    acc = [lp.float().exp().mean().cpu() if lp.numel() else nan for lp in answer_logprobs]
    conf = [torch.exp(-h.float().mean()).cpu() if h.numel() else nan for h in answer_entropies]
    return (torch.stack(acc), torch.stack(conf)) if acc else (torch.zeros(0), torch.zeros(0))


def step_end_lengths(step_ids: torch.Tensor, num_steps: int) -> list[int]:
    """For one row: n_k = response tokens through the end of step k (its last token + 1), k = 0..num_steps−1.

    step_ids (L,) long, −1 outside steps; a step with no token gets n_k of the step before it.

    >>> step_end_lengths(torch.tensor([0, 0, 0, 1, 1, -1, -1]), 2)
    [3, 5]
    """
    pos = torch.arange(step_ids.shape[0])
    out, prev = [], 0
    for k in range(num_steps):
        at = pos[step_ids == k]
        prev = int(at.max()) + 1 if at.numel() else prev
        out.append(prev)
    return out


@REWARDS.register("spae_potential", level="step", bounds={"micro_batch": "[1, inf)"},
                  choices={"baseline": BASELINES})
class SPAEPotential:
    """SPAE's step reward ΔΦ_k (module docstring). Components (per row): ``probed_steps``
    (K_b − 1, 0 when not probed), ``potential_gain`` (Σ_k ΔΦ_k = Φ_{K_b−2} − Φ_{−1}),
    ``saturated`` (1 if some probe of the row has Φ > 0.9, the reference's solving threshold)."""

    name = "spae_potential"
    level = "step"

    def __init__(self, policy, tokenizer, *, prefix: str = "A: ", baseline: str = "prompt", micro_batch: int = 16):
        if baseline not in BASELINES:
            raise ValueError(f"spae_potential.baseline: expected one of {' | '.join(BASELINES)}, got {baseline!r}")
        if policy is None or tokenizer is None:
            raise ValueError("spae_potential: needs the policy and its tokenizer (the context gave none)")
        self.policy, self.tokenizer, self.prefix, self.baseline, self.micro_batch = (
            policy, tokenizer, prefix, baseline, micro_batch)

    @classmethod
    def from_context(cls, ctx, *, prefix: str = "A: ", baseline: str = "prompt", micro_batch: int = 16):
        return cls(ctx.policy, ctx.tokenizer, prefix=prefix, baseline=baseline, micro_batch=micro_batch)

    def potentials(self, traj) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Φ, Acc, Conf at every probe: (B, S + 1) each, column 0 = after the prompt (k = −1),
        column k + 1 = after step k; NaN where not probed (and column 0 with baseline 'zero')."""
        B = traj.batch_size
        K = traj.num_steps.tolist()
        S = max(max(K, default=0), 1)
        first = [(0, 0)] if self.baseline == "prompt" else []                      # the probe after the prompt
        cuts = {b: first + [(k + 1, n) for k, n in enumerate(step_end_lengths(traj.step_ids[b].cpu(), K[b] - 1))]
                for b in range(B) if K[b] >= 2}                                     # after steps 0..K−2
        contexts, answers, where = answer_probes(traj, self.tokenizer, self.prefix, cuts)
        acc = torch.full((B, S + 1), float("nan"))
        conf = torch.full((B, S + 1), float("nan"))
        if contexts:
            lps, ents = probe_logprobs(self.policy, contexts, answers, pad_token_id=self.tokenizer.pad_token_id,
                                       micro_batch=self.micro_batch, return_entropy=True)
            a, c = acc_conf(lps, ents)
            rows, cols = (list(x) for x in zip(*where))
            acc[rows, cols], conf[rows, cols] = a, c
        return step_potential(acc, conf), acc, conf

    def __call__(self, traj) -> RewardOutput:
        phi, _, _ = self.potentials(traj)                                          # (B, S + 1)
        if self.baseline == "zero":
            phi[:, 0] = 0.0
        delta = phi[:, 1:] - phi[:, :-1]                                           # (B, S): Φ_k − Φ_{k−1}
        mask = torch.isfinite(delta)
        values = torch.where(mask, delta, torch.zeros_like(delta))
        device = traj.response_ids.device
        seen = torch.isfinite(phi)
        comps = {"probed_steps": mask.sum(1).float(), "potential_gain": values.sum(1),
                 "saturated": (torch.where(seen, phi, torch.full_like(phi, -2.0)) > 0.9).any(1).float()}
        return RewardOutput(values.to(device), mask.to(device), "step",
                            components={k: v.to(device) for k, v in comps.items()})
