"""PRM-guided step search at test time: beam search over steps, and its early-rejection variant.

Both generate one *step* at a time with a Hugging Face causal LM: a step is sampled until the
step separator (a token whose text contains ``separator``, newline for arith and GSM8K) or EOS,
and every candidate is scored with a reward signal through :mod:`finegrain.eval.scoring`. All candidates
of all problems are sampled in one batched ``generate`` call (chunks of ``max_batch`` rows).

Budget letters: ``N`` = ``n_beams`` candidates per problem per iteration, ``M`` = ``beam_width``
candidates per kept beam, so ``N/M`` beams are kept; ``τ`` = ``tau`` tokens of a partial step.

* ``beam`` (step-level beam search; Snell et al. 2024, arXiv:2408.03314 §5.2): each iteration,
  every live beam is extended by M full steps; the N/M best candidates of each problem
  (among the new ones and the beams that already finished) are kept.
* ``early_reject`` (ER-PRM partial beam search; methods.md §16): each iteration, every live beam
  gets M continuations of only τ tokens of its next step; the partial candidates are scored
  (score of the last, partial step), the N/M best are kept and only those are completed to the
  end of the step. Rejected candidates cost τ tokens instead of a whole step.

Where this departs from the sources:

1. A candidate's score is ``selection.aggregate_steps(step_scores, aggregation)``; the default
   'last' is ER-PRM's "score of the last (partial) step", right for PRMs whose step score
   estimates the value of the prefix. For an implicit PRM the value of a prefix is its Q-value,
   the sum of the step rewards so far: use 'sum' (``finegrain eval`` picks it from the reward's
   ``search_value`` registry metadata). The final answer of a problem is its highest-scoring kept beam under the
   same aggregation.
2. Finished beams (EOS, or ``max_new_tokens`` reached) stay in the pool and compete with new
   candidates on their score; they are not extended. A problem stops when all its kept beams
   are finished; the search stops after ``max_steps`` iterations, keeping unfinished beams as
   they are.
3. A step longer than ``max_step_tokens`` is cut there; the next iteration continues the same
   line (it is still one step for the segmenter).
4. ``generated_tokens`` counts sampled tokens only (kept and rejected, EOS included); the prompt
   and prefix forwards that ``generate`` recomputes each iteration (no KV cache is shared across
   iterations) and the scorer's forwards are not counted.
5. With a byte-level BPE tokenizer a separator token may carry other text ("\\n\\n" or ".\\n");
   the step then ends after that token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from finegrain.eval.scoring import Scores
from finegrain.eval.selection import aggregate_steps
from finegrain.registry import Registry
from finegrain.envs.runner import render_prompt
from finegrain.sampling import SamplingParams, sample_seed
from finegrain.sampling.base import Sampler
from finegrain.segment import token_step_ids
from finegrain.tasks.base import Example
from finegrain.trajectory import Trajectory

SEARCHES = Registry("step search")

ScoreFn = Callable[[Trajectory], Scores]


@dataclass
class Beam:
    """One partial response of problem ``problem``: its response token ids and search state.

    done: EOS produced or the token budget used up (never extended again).
    step_open: the last step has not ended with a separator or EOS (a partial step).
    step_tokens: tokens generated for the current step so far.
    """

    problem: int
    ids: list[int] = field(default_factory=list)
    done: bool = False
    step_open: bool = False
    step_tokens: int = 0
    score: float = float("-inf")


@dataclass(frozen=True)
class SearchResult:
    """Outcome of a search over P problems.

    responses: (P,) chosen response texts; response_ids: P token-id lists;
    scores: (P,) the chosen beam's aggregated score; correct: (P,) verifier result ≥ 1;
    generated_tokens: (P,) tokens sampled for the problem (kept and rejected);
    n_beams, beam_width, tau: the budget used (tau None for plain beam search).
    """

    responses: list[str]
    response_ids: list[list[int]]
    scores: list[float]
    correct: list[bool]
    generated_tokens: list[int]
    n_beams: int
    beam_width: int
    tau: int | None

    @property
    def accuracy(self) -> float:
        """Fraction of problems whose chosen response the verifier accepts."""
        return sum(self.correct) / max(len(self.correct), 1)

    @property
    def tokens_per_problem(self) -> float:
        """Mean generated tokens per problem."""
        return sum(self.generated_tokens) / max(len(self.generated_tokens), 1)


def stop_token_ids(tokenizer, separator: str = "\n") -> list[int]:
    """Ids that end a step: EOS first, then every token whose decoded text contains ``separator``.
    Decodes each vocabulary entry once (called once per search).

    >>> from finegrain.models.tokenizer import char_tokenizer
    >>> tok = char_tokenizer("ab\\n")
    >>> stop_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("\\n")]
    True
    """
    special = set(tokenizer.all_special_ids)
    sep = [i for i in range(len(tokenizer))
           if i not in special and separator in tokenizer.decode([i], skip_special_tokens=True)]
    return [tokenizer.eos_token_id] + sep


def keep_top(problems: Sequence[int], scores: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` highest-scoring candidates of each problem, in index order.
    Ties go to the lower index (Python's sort is stable).

    >>> keep_top([0, 0, 0, 1, 1], [0.2, 0.9, 0.2, -1.0, 3.0], 2)   # 0.9 and the first 0.2; both of problem 1
    [0, 1, 3, 4]
    """
    by_problem: dict[int, list[int]] = {}
    for i, p in enumerate(problems):
        by_problem.setdefault(p, []).append(i)
    kept = []
    for idx in by_problem.values():
        kept += sorted(idx, key=lambda i: -scores[i])[:k]
    return sorted(kept)


def _extend(sampler: Sampler, prompts: list[list[int]], beams: list[Beam], limits: list[int],
            stop_ids: list[int], sampling: SamplingParams, seed: int) -> list[list[int]]:
    """Sample up to ``limits[i]`` tokens continuing beam i, stopping at the first stop token
    (kept). Rows are batched by equal limit (so no row samples past its own limit); batch k of a
    call draws with seed ``sample_seed(seed, k)``. Returns the new token ids of each beam."""
    out: list[list[int]] = [[] for _ in beams]
    for k, limit in enumerate(sorted(set(limits))):
        rows = [i for i, lim in enumerate(limits) if lim == limit]
        params = dataclasses.replace(sampling, max_new_tokens=limit, stop_token_ids=tuple(stop_ids), logprobs=False)
        got = sampler.sample([prompts[beams[i].problem] + beams[i].ids for i in rows], 1, params, sample_seed(seed, k))
        for i, ids in zip(rows, got.token_ids):
            out[i] = ids
    return out


def candidates_trajectory(tokenizer, prompts: list[list[int]], beams: list[Beam], examples: list[Example],
                          segmenter: str) -> Trajectory:
    """A Trajectory holding the beams' partial responses (for scoring): prompts left-padded,
    responses right-padded, ``step_ids`` from ``segmenter``, group id = problem index."""
    pad = tokenizer.pad_token_id
    P = max(len(prompts[b.problem]) for b in beams)
    L = max(max(len(b.ids) for b in beams), 1)
    prompt_ids = torch.tensor([[pad] * (P - len(prompts[b.problem])) + prompts[b.problem] for b in beams])  # (B, P)
    prompt_mask = torch.tensor([[False] * (P - len(prompts[b.problem])) + [True] * len(prompts[b.problem])
                                for b in beams])  # (B, P)
    response_ids = torch.tensor([b.ids + [pad] * (L - len(b.ids)) for b in beams])  # (B, L)
    response_mask = torch.tensor([[True] * len(b.ids) + [False] * (L - len(b.ids)) for b in beams])  # (B, L)
    step_ids = token_step_ids(tokenizer, response_ids, response_mask, segmenter)  # (B, L)
    B = len(beams)
    return Trajectory(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask,
        loss_mask=response_mask.clone(), group_ids=torch.tensor([b.problem for b in beams]), step_ids=step_ids,
        behavior_logprobs=torch.zeros(B, L), truncated=torch.zeros(B, dtype=torch.bool),
        prompt_texts=[tokenizer.decode(prompts[b.problem], skip_special_tokens=True) for b in beams],
        response_texts=[tokenizer.decode(b.ids, skip_special_tokens=True) for b in beams],
        examples=[examples[b.problem] for b in beams])


def _score(beams: list[Beam], tokenizer, prompts, examples, segmenter, score_fn: ScoreFn, aggregation: str,
           max_batch: int, device) -> None:
    """Set ``beam.score`` = aggregate_steps(step scores of the beam's response, aggregation)."""
    for s in range(0, len(beams), max_batch):
        chunk = beams[s:s + max_batch]
        traj = candidates_trajectory(tokenizer, prompts, chunk, examples, segmenter).to(device)
        out = score_fn(traj)
        for b, steps in zip(chunk, out.step):
            b.score = aggregate_steps(steps, aggregation)


@torch.no_grad()
def step_search(model, tokenizer, task, examples: list[Example], score_fn: ScoreFn, *, n_beams: int = 8,
                beam_width: int = 4, tau: int | None = None, aggregation: str = "last",
                sampling: SamplingParams = SamplingParams(), max_steps: int = 16, max_step_tokens: int | None = None,
                seed: int = 0, separator: str = "\n", max_batch: int = 256,
                use_chat_template: bool = True, sampler: Sampler | None = None) -> SearchResult:
    """Beam search over steps (``tau=None``) or ER-PRM partial beam search (``tau`` ≥ 1).

    Per iteration, for each problem (module docstring for the budget letters):
      1. each of the ≤ N/M live beams gets M continuations: a full step (``tau=None``) or its
         first τ tokens;
      2. every new candidate is scored: s = aggregate_steps(step scores, aggregation);
      3. the N/M best of (new candidates ∪ finished beams) are kept (:func:`keep_top`);
      4. with τ: the kept partial candidates are completed to the end of their step and rescored.
    The first iteration starts from N/M empty beams, i.e. N samples of the first step.

    Args:
        model, tokenizer: HF causal LM and its tokenizer (needs a pad token).
        task: gives ``segmenter`` and ``verify``. examples: the P problems.
        score_fn: Trajectory → Scores (a reward signal and its task bound, ``scoring.score``).
        n_beams: N ≥ 1, a multiple of ``beam_width``; beam_width: M ≥ 1.
        tau: τ tokens before scoring a partial step, or None (plain step beam search).
        aggregation: name in ``selection.STEP_AGGREGATIONS``.
        sampling: temperature / top-p / top-k and ``max_new_tokens``, the response budget.
        max_steps: iterations; max_step_tokens: cap per step (None = the response budget).
        seed: the search's sampling seed; call c of the sampler uses ``sample_seed(seed, c)``.
        sampler: the ``Sampler`` to continue beams with (default: the HF sampler on ``model``).
    Returns:
        :class:`SearchResult`.
    """
    if beam_width < 1 or n_beams < beam_width or n_beams % beam_width:
        raise ValueError(f"search: n_beams ({n_beams}) must be a positive multiple of beam_width ({beam_width})")
    if tau is not None and tau < 1:
        raise ValueError(f"search: tau must be >= 1, got {tau}")
    if max_steps < 1:
        raise ValueError(f"search: max_steps must be >= 1, got {max_steps}")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer: needs a pad token (set tokenizer.pad_token, e.g. to the EOS token)")
    budget = sampling.max_new_tokens
    cap = min(max_step_tokens or budget, budget)
    keep = n_beams // beam_width
    prompts = [tokenizer(render_prompt(tokenizer, ex.prompt, use_chat_template), add_special_tokens=True)["input_ids"]
               for ex in examples]
    stop_ids = stop_token_ids(tokenizer, separator)
    stop_set, eos = set(stop_ids), tokenizer.eos_token_id
    tokens = [0] * len(examples)
    if sampler is None:
        from finegrain.sampling.hf import HFSampler

        sampler = HFSampler(model, tokenizer, max_batch=max_batch)
    calls = [0]

    def grow(beams: list[Beam], limits: list[int]) -> None:
        """Extend each beam by one sampled chunk (≤ its limit); update counts and flags."""
        calls[0] += 1
        new_ids = _extend(sampler, prompts, beams, limits, stop_ids, sampling, sample_seed(seed, calls[0], stream=5))
        for b, new in zip(beams, new_ids):
            b.ids += new
            b.step_tokens += len(new)
            tokens[b.problem] += len(new)
            b.step_open = new[-1] not in stop_set
            b.done = new[-1] == eos or len(b.ids) >= budget

    def rescore(beams: list[Beam]) -> None:
        """Score the beams' current responses."""
        _score(beams, tokenizer, prompts, examples, task.segmenter, score_fn, aggregation, max_batch, model.device)

    beams = [Beam(p) for p in range(len(examples)) for _ in range(keep)]
    for _ in range(max_steps):
        live = [b for b in beams if not b.done]
        if not live:
            break
        cands = [Beam(b.problem, list(b.ids)) for b in live for _ in range(beam_width)]
        first = min(tau, cap) if tau is not None else cap
        grow(cands, [min(first, budget - len(c.ids)) for c in cands])
        rescore(cands)
        pool = [b for b in beams if b.done] + cands
        beams = [pool[i] for i in keep_top([b.problem for b in pool], [b.score for b in pool], keep)]
        if tau is not None:
            unfinished = [b for b in beams if b.step_open and not b.done and b.step_tokens < cap]
            if unfinished:
                grow(unfinished, [min(cap - b.step_tokens, budget - len(b.ids)) for b in unfinished])
                rescore(unfinished)

    best: dict[int, Beam] = {}
    for b in beams:  # index order, so ties go to the first kept beam
        if b.problem not in best or b.score > best[b.problem].score:
            best[b.problem] = b
    chosen = [best[p] for p in range(len(examples))]
    texts = [tokenizer.decode(b.ids, skip_special_tokens=True) for b in chosen]
    return SearchResult(
        responses=texts, response_ids=[b.ids for b in chosen], scores=[b.score for b in chosen],
        correct=[task.verify(ex, t) >= 1.0 for ex, t in zip(examples, texts)], generated_tokens=tokens,
        n_beams=n_beams, beam_width=beam_width, tau=tau)


@SEARCHES.register("beam", partial=False)
def beam_search(model, tokenizer, task, examples, score_fn, *, n_beams: int, beam_width: int, tau: int | None,
                **options) -> SearchResult:
    """Step-level beam search: :func:`step_search` with whole steps (``tau`` is not used)."""
    return step_search(model, tokenizer, task, examples, score_fn, n_beams=n_beams, beam_width=beam_width,
                       tau=None, **options)


@SEARCHES.register("early_reject", partial=True)
def early_reject_search(model, tokenizer, task, examples, score_fn, *, n_beams: int, beam_width: int,
                        tau: int | None, **options) -> SearchResult:
    """ER-PRM partial beam search (methods.md §16): :func:`step_search` scoring the first ``tau``
    tokens of each candidate step and completing only the kept ones."""
    if tau is None:
        raise ValueError("search early_reject: needs tau (tokens of a partial step before scoring)")
    return step_search(model, tokenizer, task, examples, score_fn, n_beams=n_beams, beam_width=beam_width,
                       tau=tau, **options)
