"""DRO's Reasoning Reflection Reward (R3): how much the model's CoT raises the reference outcome's
likelihood, weighted towards the tokens that react to the CoT (level 'outcome').

DRO (Direct Reasoning Optimization, Xu et al. 2025, arXiv:2506.13351) scores the *reference*
outcome y = ``Example.answer`` (M tokens), teacher-forced after each sampled chain of thought c_i
(the response up to its own answer, which is replaced by y), with a scorer π_rwd:

    lp_{i,j}   = log π_rwd(y_j | q, c_i, prefix, y_<j)              j = 1..M
    lp°_j      = log π_rwd(y_j | q, prefix, y_<j)                    the masked-CoT baseline (no CoT)
    σ_{g,j}    = std_{i∈g} lp_{i,j}                                  across the G CoTs of prompt g
    w_{g,j}    = exp(σ_{g,j}/Δ) / Σ_{j'} exp(σ_{g,j'}/Δ)             increasing in σ (reasoning-reflective tokens)
    R3_i       = Σ_j w_{g(i),j} · (lp_{i,j} − lp°_j)

(``baseline="none"`` drops lp°: the basic R3 = Σ_j w_j lp_{i,j}.) A token whose log-prob barely
moves across the CoTs (σ ≈ 0: it follows from the earlier reference tokens, or is certain anyway)
gets little weight; the tokens on which the CoTs disagree dominate. All probes go through
``finegrain.models.probe.probe_logprobs``; the G + 1 probes of a prompt share the prompt prefix.

The CoT is the response before the first occurrence of ``prefix`` (default "A: ", finegrain's
answer line; ``finegrain.rewards.pear.marker_boundary`` finds it on the sampled tokens); a response
without it is all CoT (but a final EOS). The probe context is prompt + CoT + prefix, the continuation y.

Scorer: ``scorer="policy"`` (the synced π_θ that sampled the batch, DRO's default self-reward) or
``"initial"`` (the frozen starting policy, DRO's static π_ref).

Source: arXiv:2506.13351 (read in a full-text copy: methods.md §15, PAPER). No code was available.

Departures and choices (numbered; docs/algorithms/r3.md repeats them):
 1. w_Δ is UNVERIFIED: the paper's weight is "increasing in σ_j"; here a softmax of σ/Δ over the
    reference tokens (``delta`` = Δ, default 0.5 nats). It sums to 1, so R3 is a weighted mean;
    Δ → ∞ gives the plain mean log-likelihood ratio, Δ → 0 the single most CoT-sensitive token.
    When every σ is equal (a group of one, identical CoTs) the weights are uniform.
 2. σ is the population std (÷ G) over the rows of the group that have the token; UNVERIFIED
    which one the paper uses.
 3. The masked CoT is the CoT *removed* (the probe after the prompt alone); the paper's masking
    details are UNVERIFIED. This baseline is the same for every sample of a prompt, so it shifts
    R3 by a per-prompt constant Σ_j w_j lp°_j: group-relative advantages do not change, absolute
    values (and any outcome mixed in) do.
 4. The propagation-corrected form (P_k^prop with γ, d) is not implemented.
 5. The length reward r_len = 1 − β·| |y| − |ŷ| |/|y| and its combination weights are not part of
    this signal (UNVERIFIED weights); add a length signal with its own weight if wanted.
 6. The lagged-π_θ scorer is not offered (``policy`` or ``initial`` only).

DRO's data filter is not here: it needs the full-vocabulary rank of every reference token and acts
on the prompt pool across rounds, with state (docs/algorithms/r3.md describes it). Its statistic
max_j σ_{g,j} is logged as component ``max_sigma``.
"""

from __future__ import annotations

import torch

from finegrain.masked import group_index, group_mean_std
from finegrain.models.probe import probe_logprobs, probe_token_ids
from finegrain.rewards.base import REWARDS, RewardOutput
from finegrain.rewards.pear import marker_boundary
from finegrain.shapes import check_mask, check_shapes

BASELINES = ("masked_cot", "none")
SCORERS = ("policy", "initial")


def reflection_weights(token_logprobs: torch.Tensor, token_mask: torch.Tensor, group_ids: torch.Tensor, *,
                       delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """σ_{g,j} (population std over the rows of each group) and w = softmax_j(σ/Δ) per row.

    Args: token_logprobs (B, M) float; token_mask (B, M) bool (False = no token j in that row,
          values ignored); group_ids (B,) long; delta Δ > 0.
    Returns: sigma (B, M) (each row gets its group's σ_j; 0 where masked), weights (B, M)
             (Σ_j w = 1 over a row's tokens; 0 where masked and for a row without tokens).

    >>> lp = torch.tensor([[-1.0, -1.0], [-1.0, -3.0]]); m = torch.ones(2, 2, dtype=torch.bool)
    >>> s, w = reflection_weights(lp, m, torch.tensor([0, 0]), delta=1.0)
    >>> s[0].tolist(), [round(x, 4) for x in w[0].tolist()]      # σ = (0, 1); w = (1, e)/(1 + e)
    ([0.0, 1.0], [0.2689, 0.7311])
    """
    check_shapes(token_logprobs=(token_logprobs, ("B", "M")), token_mask=(token_mask, ("B", "M")),
                 group_ids=(group_ids, ("B",)))
    check_mask("token_mask", token_mask)
    if not delta > 0:
        raise ValueError(f"r3: delta must be > 0, got {delta}")
    B, M = token_logprobs.shape
    g, _ = group_index(group_ids)
    keys = (g[:, None] * M + torch.arange(M, device=g.device)[None, :])             # (B, M) (group, j)
    sigma = torch.zeros(B, M, dtype=torch.float32, device=token_logprobs.device)
    if bool(token_mask.any()):
        _, sd, _ = group_mean_std(token_logprobs[token_mask].float(), keys[token_mask], unbiased=False)
        sigma[token_mask] = sd
    logits = torch.where(token_mask, sigma / delta, torch.full_like(sigma, float("-inf")))
    weights = torch.softmax(logits, dim=1)                                          # (B, M)
    weights = torch.where(token_mask, weights, torch.zeros_like(weights))           # rows without tokens: 0
    return sigma, weights


def r3_reward(token_logprobs: torch.Tensor, baseline_logprobs: torch.Tensor | None, token_mask: torch.Tensor,
              group_ids: torch.Tensor, *, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """R3_i = Σ_j w_{g(i),j} (lp_{i,j} − lp°_{i,j}) (lp° = 0 when ``baseline_logprobs`` is None).

    Args: token_logprobs, baseline_logprobs (B, M) float; token_mask (B, M) bool; group_ids (B,).
    Returns: R3 (B,) float32 (0 for a row without tokens) and max_j σ_{g(i),j} (B,).

    >>> lp = torch.tensor([[-1.0, -1.0], [-1.0, -3.0]]); m = torch.ones(2, 2, dtype=torch.bool)
    >>> r, _ = r3_reward(lp, None, m, torch.tensor([0, 0]), delta=1.0)
    >>> [round(x, 4) for x in r.tolist()]                # −1; −0.2689 − 3·0.7311
    [-1.0, -2.4621]
    """
    sigma, w = reflection_weights(token_logprobs, token_mask, group_ids, delta=delta)
    diff = token_logprobs.float() if baseline_logprobs is None else token_logprobs.float() - baseline_logprobs.float()
    diff = torch.where(token_mask, diff, torch.zeros_like(diff))
    max_sigma = torch.where(token_mask, sigma, torch.zeros_like(sigma)).amax(1) if sigma.shape[1] else \
        torch.zeros(sigma.shape[0])
    return (w * diff).sum(1), max_sigma


def _pad(seqs: list[torch.Tensor], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.zeros(len(seqs), width)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, :s.numel()] = s.float().cpu()
        mask[i, :s.numel()] = True
    return out, mask


@REWARDS.register("r3", level="outcome", bounds={"delta": "(0, inf)", "micro_batch": "[1, inf)"},
                  choices={"baseline": BASELINES, "scorer": SCORERS})
class ReasoningReflectionReward:
    """DRO's R3 on a batch (module docstring). Components: ``ref_logprob`` (mean lp_{i,j}),
    ``max_sigma`` (max_j σ_{g(i),j}, DRO's filter statistic), ``cot_tokens``, ``marker_found``."""

    name = "r3"
    level = "outcome"

    def __init__(self, scorer_model, tokenizer, *, prefix: str = "A: ", delta: float = 0.5,
                 baseline: str = "masked_cot", micro_batch: int = 16):
        if baseline not in BASELINES:
            raise ValueError(f"r3.baseline: expected one of {' | '.join(BASELINES)}, got {baseline!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"r3.prefix: expected a non-empty string, got {prefix!r}")
        if not delta > 0:
            raise ValueError(f"r3.delta: expected a number > 0, got {delta}")
        if scorer_model is None or tokenizer is None:
            raise ValueError("r3: needs a scoring model and its tokenizer (the context gave none)")
        self.model, self.tokenizer, self.prefix, self.delta = scorer_model, tokenizer, prefix, delta
        self.baseline, self.micro_batch = baseline, micro_batch

    @classmethod
    def from_context(cls, ctx, *, prefix: str = "A: ", delta: float = 0.5, baseline: str = "masked_cot",
                     scorer: str = "policy", micro_batch: int = 16):
        if scorer not in SCORERS:
            raise ValueError(f"r3.scorer: expected one of {' | '.join(SCORERS)}, got {scorer!r}")
        model = ctx.policy if scorer == "policy" else ctx.initial_policy()
        return cls(model, ctx.tokenizer, prefix=prefix, delta=delta, baseline=baseline, micro_batch=micro_batch)

    def cot_lengths(self, traj) -> tuple[list[int], list[bool]]:
        """Tokens of each response before its answer prefix (all of them but a final EOS if there
        is none)."""
        lengths, found = [], []
        eos = getattr(self.tokenizer, "eos_token_id", None)
        for ids, m in zip(traj.response_ids.cpu(), traj.response_mask.cpu()):
            real = ids[m].tolist()
            if real and real[-1] == eos:
                real = real[:-1]
            k, _, ok = marker_boundary(self.tokenizer, real, self.prefix)
            lengths.append(k)
            found.append(ok)
        return lengths, found

    def __call__(self, traj) -> RewardOutput:
        B = traj.batch_size
        cot, found = self.cot_lengths(traj)
        cache: dict[str, tuple[list[int], list[int]]] = {}
        contexts, answers = [], []
        for b in range(B):
            answer = str(traj.examples[b].answer)
            if answer not in cache:
                cache[answer] = probe_token_ids(self.tokenizer, self.prefix, answer)
            prefix_ids, answer_ids = cache[answer]
            prompt = traj.prompt_ids[b][traj.prompt_mask[b]].tolist()
            real = traj.response_ids[b][traj.response_mask[b]].tolist()
            contexts.append(prompt + real[:cot[b]] + prefix_ids)
            answers.append(answer_ids)
            if self.baseline == "masked_cot":
                contexts.append(prompt + prefix_ids)
                answers.append(answer_ids)
        lps = probe_logprobs(self.model, contexts, answers, pad_token_id=self.tokenizer.pad_token_id,
                             micro_batch=self.micro_batch)
        step = 2 if self.baseline == "masked_cot" else 1
        width = max((len(a) for a in answers), default=0)
        lp, mask = _pad(lps[0::step], width)                                        # (B, M)
        base = _pad(lps[1::step], width)[0] if step == 2 else None                  # (B, M)
        group_ids = traj.group_ids.cpu()
        values, max_sigma = r3_reward(lp, base, mask, group_ids, delta=self.delta)
        n = mask.sum(1).clamp(min=1)
        device = traj.response_ids.device
        comps = {"ref_logprob": torch.where(mask, lp, torch.zeros_like(lp)).sum(1) / n, "max_sigma": max_sigma,
                 "cot_tokens": torch.tensor(cot, dtype=torch.float32), "marker_found": torch.tensor(found).float()}
        return RewardOutput(values.to(device), mask.any(1).to(device), "outcome",
                            components={k: v.to(device) for k, v in comps.items()})
