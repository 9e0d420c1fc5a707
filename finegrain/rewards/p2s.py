"""P2S: the Path Faithfulness Reward (PFR) of each step, integrated with the outcome (level 'step').

P2S (Probabilistic Process Supervision, Zhong et al. 2026, arXiv:2601.20649) supervises the steps
of a rollout with the policy's own probability of a *gold chain of thought* o* for the prompt:
a step is good when, after it, the rest of the gold chain (and with it the reference answer y*)
becomes likely. Notation: q the prompt, y* = ``Example.answer``, z a rollout with K steps
(finegrain's ``Trajectory.step_ids``; lines in ``arith``), p_k = z through step k (sampled token
ids), o* split into m' steps by the task's segmenter, s_{t:} = o* from its step t to its end
(which always ends with the answer line "A: y*"), and

    lp(c | x) = Σ_j log π_θ(c_j | x, c_<j)                 teacher-forced (``models.probe.probe_logprobs``)

**Gold chain** (``gold_chain``, ``GoldChainSynthesizer``), re-made at every call:

    gold="synthesize":  z_1..z_C ~ π_θ(· | q, hint(y*))                      C = ``candidates`` samples
                        keep the well-formed ones (an answer line "A: ..." follows their reasoning)
                        k* = argmax_k lp(y* | q, z_k, "A: ")                  (the hint is not in this context)
                        o* = reasoning(z_k*) + "A: " + y*
    gold="solution":    o* = ``Example.solution``                             the testbed shortcut (below)

**PFR step rewards** (``max_suffix_gain``, ``PathFaithfulness.path_faithfulness``):

    r_k     = max_{t=0..m'−1} [ lp(s_{t:} | q, p_k) − lp(s_{t:} | q) ]        k = 0..K−2   (baseline='prompt')
    r_{K−1} = lp(y* | q, p_{K−2}, "A: ")                                      the last step (p_{−1} = empty)
    w_k     = σ(κ·((k+1)/K − ½)) / σ(κ/2)                                     increasing in k, w_{K−1} = 1

The baseline lp(s_{t:} | q) is the gold suffix's probability with the response prefix removed
(the "masked prefix"): without it the max would always pick the shortest suffix (the answer line
alone), whose raw log-probability is largest whatever the prefix. With it, r_k says how much the
rollout's first k + 1 steps raise the probability of *some* remainder of the gold chain; the step
t* attaining the max is how far along the gold path the rollout has got.

**Hierarchical integration** (``hierarchical_rewards``), per row i of prompt group g, on the
rows present in the batch:

    malformed i (no line starts with "A: " and has text after it)    R_i: −1 on the last step
    else, some well-formed row of g correct (outcome ≥ threshold)     R_i: outcome_i on the last step
    else (no row of g correct, or outcome='none')                      R_i: w_k·r_k on every step k

so a group with a correct rollout trains on the outcome alone, and a group where every rollout
failed, which gives GRPO no signal, gets the dense PFR instead. Values (B, S), S = the batch's
largest step count; mask False where nothing applies (intermediate steps of outcome rows, steps
of a PFR row whose prompt has no gold chain, every step of a row without steps).

Why the integration lives in the reward and not in an estimator: it needs, per row, the outcome,
the malformed flag and the PFR *separately*, plus the group. An estimator receives one summed
(B, L) token-reward tensor, in which the outcome (last trained token) and the last step's PFR
(the last trained token of the last step) share a position on any row without an EOS, and where
"malformed" is not visible at all. The reward sees the Trajectory (texts, group ids) and can call
the outcome signal itself, so the branches are decided in one place. The outcome source is a
kwarg (``outcome``: any outcome-level signal in ``REWARDS``, default ``verifier``, or 'none'),
built from the same context; the advantage is then ``finegrain.credit.p2s.p2s`` (GRPO with
process supervision), which with one reward per row is exactly GRPO.

Tasks without a training verifier (``arith_words``, ``train_verifier = False``): ``outcome``
must be a verifier-free signal, e.g. ``rlpr`` (a row counts as correct when its RLPR reward
reaches ``correct_threshold``), or 'none' (every well-formed row gets the dense PFR; the last
step's reward lp(y* | q, z, "A: ") is then the outcome side, the RLPR-like term). Building the
signal with ``outcome="verifier"`` (or any reward registered ``needs="verify"``) on such a task
raises.

The testbed shortcut. ``arith`` and ``arith_words`` ship the gold chain (``Example.solution``,
the correct step lines and the answer line), so ``gold="solution"`` uses it directly and skips
the sampling. This is not P2S's setting (its general-domain QA data has no reasoning chains; the
gold chain is synthesised by the policy every iteration); it is exact, free, and the same for
every iteration. ``configs/arith_p2s.yaml`` uses it: a micro model sampling with a hint it never
saw in SFT would synthesise mostly noise.

Cost per call: with gold='synthesize', C samples of ``gold_max_new_tokens`` per distinct prompt
(one sampler call each) plus C probes; then per PFR row (K − 1)·m' + 1 probes, plus m' baseline
probes per distinct (prompt, gold chain); the outcome signal's own cost. Probes of one response
share its prefix and are packed on Llama / Mistral / Qwen models (``docs/algorithms/probe.md``).

Sources: arXiv:2601.20649; its abstract (read) confirms the gold-CoT synthesis and filtering, the
PFR as the conditional probability of the gold-CoT's suffix given the model's reasoning prefix,
and its integration with an outcome reward. Everything else (the max over suffixes, the masked
prefix, the last-step reward, the sigmoid weights, the three HRI rules, C, the selection rule)
is from methods.md §4, which read it in an auto-generated summary of the paper [SECONDARY]. No
author code was found.

Departures and choices (numbered; docs/algorithms/p2s.md repeats them):
 1. Steps are finegrain's (the task's segmenter on the response: lines in ``arith``), not
    equal-length token chunks capped at MAX_STEP_NUM; the gold chain is split by the same
    segmenter. MAX_STEP_NUM is not applied (arith has at most ``max_steps`` + 1 lines).
 2. The masked prefix p_masked is the prefix *removed* (the suffix scored after the prompt
    alone); the paper's masking scheme is UNVERIFIED. ``baseline='none'`` drops it.
 3. The step weights' form is UNVERIFIED (only "a monotonically increasing sigmoid in the step
    index"): w_k = σ(κ·((k+1)/K − ½)) / σ(κ/2), κ = ``weight_slope`` = 4; κ = 0 weighs all steps 1.
 4. HRI: a group with a correct rollout gives *every* well-formed row its outcome (the wrong
    ones theirs, e.g. 0); the summary says only that the correct rollouts use the outcome, so
    giving the wrong rows of such a group the PFR is the other reading (not implemented: PFR
    values are log-probability ratios, unbounded, and would not be comparable with a 0/1
    outcome). "Correct" is outcome ≥ ``correct_threshold`` (the signal's ``accuracy``
    component when it has one, else its value). Malformed is finegrain's answer format: no line
    starting with ``answer_prefix`` with an answer after it (``rlpr.answer_cut``).
 5. The cold start (a format reward only for the first iterations) is not here; a schedule over
    signals is not part of finegrain's reward contract.
 6. The gold-chain candidates are conditioned on y* by appending ``hint`` (with "{answer}"
    replaced by y*) to the rendered prompt, so it opens the response; the paper's prompt is
    UNVERIFIED. A candidate's reasoning is its text before its first answer line; a candidate
    without one is malformed and dropped. No candidate left: the prompt has no gold chain, and its
    rows keep only the last-step reward. C = ``candidates`` = 4 is UNVERIFIED.
 7. The candidates of a prompt are sampled with the seed ``gold_seed(seed, prompt ids, y*)``, a
    fixed function of the prompt, so a batch's gold chains do not depend on the row order; they
    still change across iterations because the policy does.
 8. Gold suffixes are tokenized on their own (the text from the start of gold step t); the
    response prefix is the sampled tokens. With a character tokenizer these are the tokens the
    model would see; with BPE the boundary token can differ from a joint tokenization.
 9. The last step's reward is read as the answer step: its context is the response through the
    step before it, then "A: ". A well-formed response whose last step is not its answer line
    ("A: 12\\n12*3") is scored the same way.
10. A row without steps (an empty response) gets nothing, malformed or not: the step level has
    no position for it.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from finegrain.masked import group_sum
from finegrain.models.probe import probe_logprobs, probe_token_ids
from finegrain.rewards.base import REWARDS, RewardOutput, level_of
from finegrain.rewards.rlpr import answer_cut
from finegrain.rewards.spae import step_end_lengths
from finegrain.sampling import SAMPLERS, SamplingParams
from finegrain.segment import SEGMENTERS
from finegrain.shapes import check_mask, check_shapes

GOLD_SOURCES = ("synthesize", "solution")
BASELINES = ("prompt", "none")
DEFAULT_HINT = "The reference answer is {answer}. The reasoning that leads to it:\n"


# ---------------------------------------------------------------------------------- gold chain

def candidate_reasoning(text: str, answer_prefix: str) -> str | None:
    """The reasoning of a gold-chain candidate: its text before its first line that starts with
    ``answer_prefix``; None (malformed) when no line does.

    >>> candidate_reasoning("7+5=12\\nA: 12\\nxx", "A: "), candidate_reasoning("A: 3", "A: ")
    ('7+5=12\\n', '')
    >>> candidate_reasoning("7+5=12\\n12", "A: ") is None
    True
    """
    m = re.search(r"(?m)^" + re.escape(answer_prefix), text)
    return None if m is None else text[:m.start()]


def gold_chain_text(reasoning: str, answer_prefix: str, answer: str) -> str:
    """o* = reasoning + answer_prefix + y* (a newline is added when the reasoning lacks one).

    >>> gold_chain_text("7+5=12\\n", "A: ", "12"), gold_chain_text("", "A: ", "3")
    ('7+5=12\\nA: 12', 'A: 3')
    """
    if reasoning and not reasoning.endswith("\n"):
        reasoning += "\n"
    return reasoning + answer_prefix + answer


def select_gold(scores: torch.Tensor, well_formed: torch.Tensor) -> int | None:
    """k* = argmax_k scores_k over the well-formed candidates (the first on a tie); None if none is.

    Args: scores (C,) float (ignored where well_formed is False); well_formed (C,) bool.

    >>> select_gold(torch.tensor([-1.0, -0.5, 0.0]), torch.tensor([True, True, False]))
    1
    >>> select_gold(torch.tensor([-1.0]), torch.tensor([False])) is None
    True
    """
    check_shapes(scores=(scores, ("C",)), well_formed=(well_formed, ("C",)))
    check_mask("well_formed", well_formed)
    if not bool(well_formed.any()):
        return None
    masked = torch.where(well_formed, scores.float(), torch.full_like(scores.float(), float("-inf")))
    best = masked.max()
    return int(torch.nonzero(masked == best)[0])


def gold_suffixes(text: str, segmenter: str | Callable = "newline") -> list[str]:
    """s_{t:} for t = 0..m'−1: the gold chain from the start of its step t to its end.

    >>> gold_suffixes("7+5=12\\n12*3=36\\nA: 36")
    ['7+5=12\\n12*3=36\\nA: 36', '12*3=36\\nA: 36', 'A: 36']
    """
    seg = SEGMENTERS.get(segmenter) if isinstance(segmenter, str) else segmenter
    return [text[start:] for start, _ in seg(text)]


def gold_seed(seed: int, prompt_ids: Sequence[int], answer: str) -> int:
    """The sampling seed of one prompt's candidates: a fixed function of (seed, prompt ids, y*).

    >>> gold_seed(0, [1, 2], "3") == gold_seed(0, [1, 2], "3") != gold_seed(1, [1, 2], "3")
    True
    """
    return zlib.crc32(repr((int(seed), [int(t) for t in prompt_ids], str(answer))).encode()) % (2**31 - 1)


@dataclass(frozen=True)
class GoldChain:
    """One prompt's gold chain: ``text`` (o*, ending with the answer line), ``source``
    ('solution' | 'synthesized'), and for a synthesized one the candidates' reasoning texts
    (None = malformed) and scores lp(y* | q, z_k, "A: ") (NaN for malformed ones)."""

    text: str
    source: str
    candidates: tuple[str | None, ...] = ()
    scores: tuple[float, ...] = ()


class GoldChainSynthesizer:
    """Sample ``candidates`` reasoning chains conditioned on (q, y*), keep the one under which y*
    is most probable (the module docstring's gold="synthesize").

    Args:
        sampler: a ``finegrain.sampling.Sampler`` over the policy (the rollout engine's kind).
        scorer: the causal LM that scores lp(y* | q, z_k, answer_prefix) (the policy).
        tokenizer: their tokenizer.
        candidates: C samples per prompt.
        hint: text appended to the rendered prompt while sampling, "{answer}" replaced by y*.
        answer_prefix: finegrain's answer marker ("A: ").
        temperature, max_new_tokens: of the candidate samples.
        seed: base of ``gold_seed``.
        micro_batch: of the scoring probes.
    """

    def __init__(self, sampler, scorer, tokenizer, *, candidates: int = 4, hint: str = DEFAULT_HINT,
                 answer_prefix: str = "A: ", temperature: float = 1.0, max_new_tokens: int = 48, seed: int = 0,
                 micro_batch: int = 16):
        if candidates < 1:
            raise ValueError(f"p2s.candidates: expected an integer >= 1, got {candidates}")
        self.sampler, self.scorer, self.tokenizer = sampler, scorer, tokenizer
        self.candidates, self.hint, self.answer_prefix = candidates, hint, answer_prefix
        self.params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, logprobs=False)
        self.seed, self.micro_batch = seed, micro_batch

    def sample(self, prompt_ids: list[int], answer: str) -> list[str]:
        """C decoded candidate continuations of prompt + hint(y*)."""
        hint = self.hint.replace("{answer}", answer)
        hint_ids = list(self.tokenizer(hint, add_special_tokens=False)["input_ids"]) if hint else []
        out = self.sampler.sample([list(prompt_ids) + hint_ids], self.candidates, self.params,
                                  gold_seed(self.seed, prompt_ids, answer))
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in out.token_ids]

    def score(self, prompt_ids: list[int], reasonings: Sequence[str], answer: str) -> torch.Tensor:
        """(C,) lp(y* | q, z_k, answer_prefix) of each reasoning (no hint in the context)."""
        contexts, answers = [], []
        for z in reasonings:
            ctx, ans = probe_token_ids(self.tokenizer, z + self.answer_prefix, answer)
            contexts.append(list(prompt_ids) + ctx)
            answers.append(ans)
        lps = probe_logprobs(self.scorer, contexts, answers, pad_token_id=self.tokenizer.pad_token_id,
                             micro_batch=self.micro_batch)
        return torch.tensor([float(lp.float().sum()) if lp.numel() else float("nan") for lp in lps])

    def __call__(self, prompt_ids: list[int], answer: str) -> GoldChain | None:
        texts = self.sample(prompt_ids, answer)
        reasonings = [candidate_reasoning(t, self.answer_prefix) for t in texts]
        ok = [r for r in reasonings if r is not None]
        scores = torch.full((len(texts),), float("nan"))
        if ok:
            scores[[i for i, r in enumerate(reasonings) if r is not None]] = self.score(prompt_ids, ok, answer)
        well_formed = torch.tensor([r is not None for r in reasonings]) & torch.isfinite(scores)
        k = select_gold(scores, well_formed)
        if k is None:
            return None
        return GoldChain(gold_chain_text(reasonings[k], self.answer_prefix, answer), "synthesized",
                         tuple(reasonings), tuple(scores.tolist()))


# ---------------------------------------------------------------------------------- PFR

def max_suffix_gain(suffix_logprobs: torch.Tensor, baseline_logprobs: torch.Tensor | None,
                    suffix_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r_n = max_t [lp_{n,t} − lp°_{n,t}] over the gold suffixes t a probe has, and the t attaining it.

    Args: suffix_logprobs (N, T) float, lp_{n,t} = lp(s_{t:} | q, p); baseline_logprobs (N, T)
          float, lp°_{n,t} = lp(s_{t:} | q) (None: no baseline); suffix_mask (N, T) bool (False =
          no suffix t for probe n; values there are ignored, NaN ok).
    Returns: gain (N,) float32 (NaN for a probe without suffixes), best (N,) long (−1 then).

    >>> lp = torch.tensor([[-9.0, -4.0, -1.0], [-2.0, -3.0, 0.0]]); base = torch.tensor([[-6.0, -5.0, -1.0]] * 2)
    >>> g, t = max_suffix_gain(lp, base, torch.tensor([[True, True, True], [True, True, False]]))
    >>> g.tolist(), t.tolist()          # row 0: (−3, 1, 0) → 1 at t = 1; row 1: (4, 2) → 4 at t = 0
    ([1.0, 4.0], [1, 0])
    """
    check_shapes(suffix_logprobs=(suffix_logprobs, ("N", "T")), suffix_mask=(suffix_mask, ("N", "T")),
                 **({"baseline_logprobs": (baseline_logprobs, ("N", "T"))} if baseline_logprobs is not None else {}))
    check_mask("suffix_mask", suffix_mask)
    diff = suffix_logprobs.float() if baseline_logprobs is None else suffix_logprobs.float() - baseline_logprobs.float()
    diff = torch.where(suffix_mask, diff, torch.full_like(diff, float("-inf")))          # (N, T)
    if diff.shape[1] == 0:
        return torch.full((diff.shape[0],), float("nan")), torch.full((diff.shape[0],), -1, dtype=torch.long)
    gain, best = diff.max(dim=1)                                                           # (N,) each
    has = suffix_mask.any(dim=1)
    return (torch.where(has, gain, torch.full_like(gain, float("nan"))),
            torch.where(has, best, torch.full_like(best, -1)))


def step_weights(num_steps: torch.Tensor, S: int, *, slope: float) -> torch.Tensor:
    """w_{b,k} = σ(κ·((k+1)/K_b − ½)) / σ(κ/2) for k < K_b, else 0 (increasing, last step 1).

    Args: num_steps (B,) long K_b; S columns; slope κ ≥ 0 (0: every step weighs 1).
    Returns: (B, S) float32.

    >>> [round(w, 4) for w in step_weights(torch.tensor([2]), 3, slope=4.0)[0].tolist()]   # σ(0)/σ(2), 1, 0
    [0.5677, 1.0, 0.0]
    """
    check_shapes(num_steps=(num_steps, ("B",)))
    k = torch.arange(S, dtype=torch.float32)[None, :]                                     # (1, S)
    K = num_steps.float().clamp(min=1)[:, None]                                           # (B, 1)
    w = torch.sigmoid(slope * ((k + 1) / K - 0.5)) / (1.0 / (1.0 + math.exp(-slope / 2)))
    return torch.where(k < num_steps[:, None].float(), w, torch.zeros_like(w))


def hierarchical_rewards(pfr: torch.Tensor, pfr_mask: torch.Tensor, weights: torch.Tensor, num_steps: torch.Tensor,
                         well_formed: torch.Tensor, group_ids: torch.Tensor, outcome: torch.Tensor | None = None,
                         correct: torch.Tensor | None = None, *, malformed_reward: float = -1.0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """P2S's hierarchical integration of the PFR with the outcome (module docstring).

    Args:
        pfr: (B, S) float, r_k unweighted (values under a False pfr_mask are ignored, NaN ok).
        pfr_mask: (B, S) bool, True where r_k was computed.
        weights: (B, S) float, w_k.
        num_steps: (B,) long, K_b (the last step is K_b − 1).
        well_formed: (B,) bool, False = malformed.
        group_ids: (B,) long.
        outcome: (B,) float outcome reward, or None (no outcome source: every well-formed row
            gets the PFR).
        correct: (B,) bool, the outcome counts as correct; needed with ``outcome``.
        malformed_reward: the last-step reward of a malformed row.
    Returns:
        values (B, S) float32, mask (B, S) bool, uses_pfr (B,) bool (the row gets the PFR),
        group_correct (B,) bool (some well-formed row of its group is correct).

    >>> pfr = torch.tensor([[0.5, -2.0], [1.0, -1.0], [0.0, 0.0]]); m = torch.ones(3, 2, dtype=torch.bool)
    >>> w = torch.tensor([[0.5, 1.0]] * 3); K = torch.tensor([2, 2, 2]); g = torch.tensor([0, 0, 1])
    >>> v, mask, pf, gc = hierarchical_rewards(pfr, m, w, K, torch.tensor([True, True, False]), g,
    ...                                        torch.tensor([0.0, 0.0, 0.0]), torch.tensor([False, False, False]))
    >>> v.tolist(), mask.tolist()       # group 0: nobody correct → weighted PFR; row 2 malformed → −1
    ([[0.25, -2.0], [0.5, -1.0], [0.0, -1.0]], [[True, True], [True, True], [False, True]])
    """
    check_shapes(pfr=(pfr, ("B", "S")), pfr_mask=(pfr_mask, ("B", "S")), weights=(weights, ("B", "S")),
                 num_steps=(num_steps, ("B",)), well_formed=(well_formed, ("B",)), group_ids=(group_ids, ("B",)),
                 **({"outcome": (outcome, ("B",)), "correct": (correct, ("B",))} if outcome is not None else {}))
    check_mask("pfr_mask", pfr_mask)
    check_mask("well_formed", well_formed)
    if (outcome is None) != (correct is None):
        raise ValueError("hierarchical_rewards: give both outcome and correct, or neither")
    B, S = pfr.shape
    k = torch.arange(S, device=pfr.device)
    last = (k[None, :] == (num_steps - 1)[:, None]) & (num_steps > 0)[:, None]          # (B, S)
    if correct is None:
        group_correct = torch.zeros(B, dtype=torch.bool, device=pfr.device)
    else:
        check_mask("correct", correct)
        hits, _ = group_sum((correct & well_formed).float(), group_ids)                  # (B,)
        group_correct = hits > 0
    uses_pfr = well_formed & ~group_correct                                              # (B,)
    uses_outcome = well_formed & group_correct
    zero = torch.zeros((), dtype=torch.float32, device=pfr.device)
    pfr_on = uses_pfr[:, None] & pfr_mask                                                # (B, S)
    out_on = uses_outcome[:, None] & last
    bad_on = ~well_formed[:, None] & last
    values = torch.where(pfr_on, weights.float() * pfr.float(), zero)
    if outcome is not None:
        values = torch.where(out_on, outcome.float()[:, None].expand(B, S), values)
    values = torch.where(bad_on, torch.full_like(values, malformed_reward), values)
    return values, pfr_on | out_on | bad_on, uses_pfr, group_correct


@REWARDS.register("p2s", level="step",
                  bounds={"candidates": "[1, inf)", "gold_temperature": "(0, 100]", "gold_max_new_tokens": "[0, inf)",
                          "weight_slope": "[0, inf)", "micro_batch": "[1, inf)"},
                  choices={"gold": GOLD_SOURCES, "baseline": BASELINES})
class PathFaithfulness:
    """P2S's step rewards on a batch (module docstring). Components (per row): ``uses_pfr`` (the
    row's reward is the weighted PFR), ``group_correct`` (its group has a correct row),
    ``malformed``, ``gold_found`` (a PFR row whose prompt got a gold chain), ``gold_steps`` (m', 0 if none),
    ``pfr_mean`` (mean r_k over its probed intermediate steps, 0 if none), ``answer_logprob``
    (r_{K−1} = lp(y* | q, z, "A: "), 0 when not probed). Only rows that take the PFR are probed.
    """

    name = "p2s"
    level = "step"

    def __init__(self, policy, tokenizer, *, outcome_signal=None, synthesizer: Callable | None = None,
                 segmenter: str = "newline", answer_prefix: str = "A: ", baseline: str = "prompt",
                 weight_slope: float = 4.0, correct_threshold: float = 0.5, malformed_reward: float = -1.0,
                 micro_batch: int = 16):
        if baseline not in BASELINES:
            raise ValueError(f"p2s.baseline: expected one of {' | '.join(BASELINES)}, got {baseline!r}")
        if not isinstance(answer_prefix, str) or not answer_prefix:
            raise ValueError(f"p2s.answer_prefix: expected a non-empty marker, got {answer_prefix!r}")
        if policy is None or tokenizer is None:
            raise ValueError("p2s: needs the policy and its tokenizer (the context gave none)")
        self.policy, self.tokenizer, self.outcome_signal, self.synthesizer = policy, tokenizer, outcome_signal, synthesizer
        self.segmenter, self.answer_prefix, self.baseline = segmenter, answer_prefix, baseline
        self.weight_slope, self.correct_threshold, self.malformed_reward = weight_slope, correct_threshold, malformed_reward
        self.micro_batch = micro_batch

    @classmethod
    def from_context(cls, ctx, *, outcome: str = "verifier", outcome_kwargs: dict | None = None,
                     gold: str = "synthesize", candidates: int = 4, hint: str = DEFAULT_HINT,
                     gold_temperature: float = 1.0, gold_max_new_tokens: int = 0, seed: int = 0,
                     answer_prefix: str = "A: ", baseline: str = "prompt", weight_slope: float = 4.0,
                     correct_threshold: float = 0.5, malformed_reward: float = -1.0, micro_batch: int = 16):
        if gold not in GOLD_SOURCES:
            raise ValueError(f"p2s.gold: expected one of {' | '.join(GOLD_SOURCES)}, got {gold!r}")
        signal = None if outcome == "none" else outcome_signal_from(ctx, outcome, outcome_kwargs or {})
        synthesizer = None
        if gold == "synthesize":
            sampler = SAMPLERS.get(ctx.cfg.rollout.engine)(ctx.policy, ctx.tokenizer, max_batch=ctx.cfg.rollout.max_batch)
            synthesizer = GoldChainSynthesizer(
                sampler, ctx.policy, ctx.tokenizer, candidates=candidates, hint=hint, answer_prefix=answer_prefix,
                temperature=gold_temperature, max_new_tokens=gold_max_new_tokens or ctx.cfg.rollout.max_new_tokens,
                seed=seed, micro_batch=micro_batch)
        return cls(ctx.policy, ctx.tokenizer, outcome_signal=signal, synthesizer=synthesizer,
                   segmenter=getattr(ctx.task, "segmenter", "newline"), answer_prefix=answer_prefix, baseline=baseline,
                   weight_slope=weight_slope, correct_threshold=correct_threshold,
                   malformed_reward=malformed_reward, micro_batch=micro_batch)

    def gold_chains(self, traj, rows: Sequence[int] | None = None) -> list[GoldChain | None]:
        """Each row's gold chain (None for rows not in ``rows``, and when there is none): from
        ``Example.solution`` without a synthesizer, else synthesized once per distinct (prompt, y*)."""
        rows = range(traj.batch_size) if rows is None else rows
        out: list[GoldChain | None] = [None] * traj.batch_size
        made: dict[tuple, GoldChain | None] = {}
        for b in rows:
            ex = traj.examples[b]
            if self.synthesizer is None:
                out[b] = GoldChain(ex.solution, "solution") if ex.solution else None
                continue
            prompt = traj.prompt_ids[b][traj.prompt_mask[b]].tolist()
            key = (tuple(prompt), str(ex.answer))
            if key not in made:
                made[key] = self.synthesizer(prompt, str(ex.answer))
            out[b] = made[key]
        return out

    def suffix_logprobs(self, traj, rows: Sequence[int], golds: Sequence[GoldChain | None]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Every probe of the rows ``rows``, in one ``probe_logprobs`` call.

        Returns (S = max(max K_b, 1), T = the longest gold chain's m'):
            step_lp (B, S, T)  lp(s_{t:} | q, p_k) for k = 0..K_b−2, t < m'_b (NaN elsewhere)
            step_mask (B, S, T) bool, True where step_lp was probed (and its baseline is finite)
            baseline (B, S, T) lp(s_{t:} | q), the same for every k (None with baseline='none')
            last_lp (B,)       lp(y* | q, p_{K_b−2}, answer_prefix) (NaN for rows not probed)
        """
        B = traj.batch_size
        K = traj.num_steps.tolist()
        S = max(max(K, default=0), 1)
        answer_cache: dict[str, tuple[list[int], list[int]]] = {}
        suffix_cache: dict[str, list[list[int]]] = {}
        contexts, continuations, where = [], [], []       # where: ("step", b, k, t) | ("base", key, t) | ("last", b)
        base_keys: set = set()
        for b in rows:
            if K[b] < 1:
                continue
            answer = str(traj.examples[b].answer)
            if answer not in answer_cache:
                answer_cache[answer] = probe_token_ids(self.tokenizer, self.answer_prefix, answer)
            prefix_ids, answer_ids = answer_cache[answer]
            prompt = traj.prompt_ids[b][traj.prompt_mask[b]].tolist()
            response = traj.response_ids[b].tolist()
            ends = step_end_lengths(traj.step_ids[b].cpu(), K[b])                 # n_k, k = 0..K−1
            gold = golds[b]
            if gold is not None:
                if gold.text not in suffix_cache:
                    suffix_cache[gold.text] = [list(self.tokenizer(x, add_special_tokens=False)["input_ids"])
                                               for x in gold_suffixes(gold.text, self.segmenter)]
                suffixes = suffix_cache[gold.text]
                for k in range(K[b] - 1):
                    for t, suffix in enumerate(suffixes):
                        contexts.append(prompt + response[:ends[k]])
                        continuations.append(suffix)
                        where.append(("step", b, k, t))
                key = (tuple(prompt), gold.text)
                if self.baseline == "prompt" and K[b] >= 2 and key not in base_keys:   # masked prefix: the prompt alone
                    base_keys.add(key)
                    for t, suffix in enumerate(suffixes):
                        contexts.append(prompt)
                        continuations.append(suffix)
                        where.append(("base", key, t))
            reasoning = ends[K[b] - 2] if K[b] >= 2 else 0                          # through step K − 2
            contexts.append(prompt + response[:reasoning] + prefix_ids)
            continuations.append(answer_ids)
            where.append(("last", b))
        totals = []
        if contexts:
            lps = probe_logprobs(self.policy, contexts, continuations, pad_token_id=self.tokenizer.pad_token_id,
                                 micro_batch=self.micro_batch)
            totals = [float(lp.float().sum()) if lp.numel() else float("nan") for lp in lps]
        T = max((len(v) for v in suffix_cache.values()), default=0)
        step_lp = torch.full((B, S, T), float("nan"))
        step_mask = torch.zeros(B, S, T, dtype=torch.bool)
        last_lp = torch.full((B,), float("nan"))
        base: dict[tuple, torch.Tensor] = {}
        for w, v in zip(where, totals):
            if w[0] == "step":
                _, b, k, t = w
                step_lp[b, k, t], step_mask[b, k, t] = v, bool(math.isfinite(v))
            elif w[0] == "base":
                _, key, t = w
                base.setdefault(key, torch.full((T,), float("nan")))[t] = v
            else:
                last_lp[w[1]] = v
        baseline = None
        if self.baseline == "prompt":
            baseline = torch.full((B, S, T), float("nan"))
            for b in rows:
                if golds[b] is not None and K[b] >= 2:
                    key = (tuple(traj.prompt_ids[b][traj.prompt_mask[b]].tolist()), golds[b].text)
                    baseline[b] = base[key][None, :].expand(S, T)
            step_mask &= torch.isfinite(baseline)
        return step_lp, step_mask, baseline, last_lp

    def path_faithfulness(self, traj, rows: Sequence[int], golds: Sequence[GoldChain | None]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """r_k for the rows ``rows``: pfr (B, S) float32 (NaN where not computed), mask (B, S) bool,
        best (B, S) long (t* of each intermediate step, −1 elsewhere)."""
        step_lp, step_mask, baseline, last_lp = self.suffix_logprobs(traj, rows, golds)
        B, S, T = step_lp.shape
        gain, best = max_suffix_gain(step_lp.view(B * S, T), None if baseline is None else baseline.view(B * S, T),
                                     step_mask.view(B * S, T))
        gain, best = gain.view(B, S), best.view(B, S)                                 # (B, S) each
        K = traj.num_steps.cpu()
        last = (torch.arange(S)[None, :] == (K - 1)[:, None])                         # (B, S)
        pfr = torch.where(step_mask.any(dim=2), gain, torch.full_like(gain, float("nan")))
        pfr = torch.where(last, last_lp[:, None].expand(B, S), pfr)
        return pfr, torch.isfinite(pfr), best

    def __call__(self, traj) -> RewardOutput:
        B = traj.batch_size
        K = traj.num_steps.cpu()
        S = max(int(K.max()) if B else 0, 1)
        well_formed = torch.tensor([answer_cut(t, self.answer_prefix) is not None for t in traj.response_texts],
                                   dtype=torch.bool).reshape(B)
        outcome = correct = None
        if self.outcome_signal is not None:
            out = self.outcome_signal(traj)
            outcome = torch.where(out.mask.cpu(), out.values.float().cpu(), torch.zeros(()))
            judged = out.components.get("accuracy", out.values).float().cpu()
            correct = (judged >= self.correct_threshold) & out.mask.cpu()
        group_ids = traj.group_ids.cpu()
        # which rows take the PFR (decided before probing, so only those rows are probed)
        _, _, uses_pfr, _ = hierarchical_rewards(torch.zeros(B, S), torch.zeros(B, S, dtype=torch.bool),
                                                 torch.zeros(B, S), K, well_formed, group_ids, outcome, correct)
        rows = [b for b in range(B) if bool(uses_pfr[b]) and int(K[b]) >= 1]
        golds = self.gold_chains(traj, rows)
        pfr, pfr_mask, _ = self.path_faithfulness(traj, rows, golds)
        weights = step_weights(K, S, slope=self.weight_slope)
        values, mask, uses_pfr, group_correct = hierarchical_rewards(
            pfr, pfr_mask, weights, K, well_formed, group_ids, outcome, correct, malformed_reward=self.malformed_reward)
        k = torch.arange(S)
        inter = pfr_mask & (k[None, :] < (K - 1)[:, None])                             # probed intermediate steps
        last = pfr_mask & (k[None, :] == (K - 1)[:, None])
        zero = torch.zeros(())
        comps = {"uses_pfr": uses_pfr.float(), "group_correct": group_correct.float(), "malformed": (~well_formed).float(),
                 "gold_found": torch.tensor([g is not None for g in golds]).float().reshape(B),
                 "gold_steps": torch.tensor([len(gold_suffixes(g.text, self.segmenter)) if g else 0 for g in golds],
                                            dtype=torch.float32).reshape(B),
                 "pfr_mean": torch.where(inter, pfr, zero).sum(1) / inter.sum(1).clamp(min=1),
                 "answer_logprob": torch.where(last, pfr, zero).sum(1)}
        dev = traj.response_ids.device
        return RewardOutput(values.to(dev), mask.to(dev), "step", components={n: v.to(dev) for n, v in comps.items()})


def outcome_signal_from(ctx, name: str, kwargs: dict):
    """Build the outcome source of the integration: an outcome-level ``REWARDS`` entry other
    than p2s, which must not score with the rule verifier when the task has none for training."""
    if name not in REWARDS or name == "p2s":
        raise ValueError(f"p2s.outcome: expected 'none' or an outcome-level reward signal, got {name!r}; signals: "
                         + ", ".join(n for n in REWARDS.names() if n != "p2s" and REWARDS.meta(n).get("level") == "outcome"))
    if level_of(name, kwargs) != "outcome":
        raise ValueError(f"p2s.outcome: '{name}' gives {level_of(name, kwargs)} rewards, not outcome rewards")
    task = getattr(ctx, "task", None)
    if REWARDS.meta(name).get("needs") == "verify" and task is not None and not getattr(type(task), "train_verifier", True):
        raise ValueError(f"p2s.outcome: '{name}' scores with the rule verifier of task '{getattr(task, 'name', task)}', "
                         "which is for evaluation only (train_verifier = False); use outcome: rlpr, or outcome: none")
    REWARDS.check_kwargs(name, kwargs, "p2s.outcome_kwargs")
    return REWARDS.get(name).from_context(ctx, **kwargs)
