"""Step-score providers for evaluation and test-time selection: ``SCORERS``.

Every entry has one signature::

    scorer(traj: Trajectory, task, ctx: ScorerContext) -> Scores

and gives, for each of the B responses of ``traj``: one score per step (the steps are the spans
of the task's segmenter on ``traj.response_texts[b]``, the same spans ``task.label_steps``
labels), one outcome score, and optionally one score per response token (for colouring the
report). Higher always means "more likely correct".

Registry metadata (``SCORERS.meta(name)``):
    level   'outcome' → best-of-N ranks responses by ``Scores.outcome``;
            'step'    → by the step scores reduced with ``selection.aggregate_steps``.
    weight  how a response score becomes a vote weight ≥ 0 (see :func:`vote_weights`):
            'identity' for scores already in [0, 1], 'sigmoid' for unbounded ones
            (Implicit PRM's weighted vote sums sigmoid(reward); methods.md §2).
    center  the score that means "no opinion" (colour midpoint in the report).
    needs   'prm' when the entry needs ``ctx.prm_model`` and ``ctx.ref_model``.
    value   the step aggregation that values a *partial* response in a step search: 'sum'
            for the implicit PRM (Q at the last token = Σ of the token rewards so far; the
            "accumulative" mode of methods.md §2), 'min' for exact labels (every step so far
            correct), 'last' otherwise (ER-PRM's score of the last step, methods.md §16).

Entries:
    oracle       the task's verifier (an outcome oracle; best-of-N with it is pass@N).
    step_oracle  the exact step labels (1 = correct step, 0 = wrong or unparseable), a process
                 oracle; tasks without ``label_steps`` cannot use it.
    implicit_prm β·log π_φ/π_ref summed per step (``finegrain.rewards.implicit_prm``).
    random       uniform [0, 1) scores from ``ctx.rng``: the random selector.

>>> sorted(SCORERS.names())
['implicit_prm', 'oracle', 'random', 'step_oracle']
>>> vote_weights([0.0, 2.0], "sigmoid").round(4).tolist()
[0.5, 0.8808]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from finegrain.registry import Registry
from finegrain.segment import SEGMENTERS
from finegrain.trajectory import Trajectory, token_to_step_sum

SCORERS = Registry("scorer")


@dataclass(frozen=True)
class Scores:
    """Scores of B responses.

    step:    B lists; list b has one float per step span of response b (S_b may be 0).
    outcome: B floats, one per response.
    token:   None, or B lists; list b has one float per real response token (``response_mask``
             row b, EOS included), in order.
    """

    step: list[list[float]]
    outcome: list[float]
    token: list[list[float]] | None = None

    def __post_init__(self) -> None:
        """Check that step, outcome and token lists cover the same B responses."""
        if len(self.step) != len(self.outcome):
            raise ValueError(f"Scores: {len(self.step)} step lists but {len(self.outcome)} outcome scores")
        if self.token is not None and len(self.token) != len(self.outcome):
            raise ValueError(f"Scores: {len(self.token)} token lists but {len(self.outcome)} outcome scores")

    @staticmethod
    def concat(parts: list["Scores"]) -> "Scores":
        """Row-wise concatenation (token lists kept only if every part has them)."""
        has_token = all(p.token is not None for p in parts)
        return Scores(step=[s for p in parts for s in p.step], outcome=[o for p in parts for o in p.outcome],
                      token=[t for p in parts for t in p.token] if has_token else None)


@dataclass
class ScorerContext:
    """What scorers may need, built once per evaluation.

    prm_model, ref_model: causal LMs sharing the policy's tokenizer (``implicit_prm`` only).
    beta: β of the implicit PRM (0.05 in PRIME and ImplicitPRM).
    micro_batch: rows per PRM/reference forward (None = all at once).
    rng: numpy Generator for ``random``; seeded by the caller, so a run is reproducible.
    """

    prm_model: Any = None
    ref_model: Any = None
    beta: float = 0.05
    micro_batch: int | None = 64
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))


def step_spans(task, text: str) -> list[tuple[int, int]]:
    """Character spans of the steps of ``text`` under ``task.segmenter``."""
    return SEGMENTERS.get(task.segmenter)(text)


def num_steps(task, texts: list[str]) -> list[int]:
    """S_b for each response text."""
    return [len(step_spans(task, t)) for t in texts]


def score(name: str, traj: Trajectory, task, ctx: ScorerContext) -> Scores:
    """Run the scorer ``name`` and check that its step lists match the segmenter's step counts."""
    fn = SCORERS.get(name)
    if SCORERS.meta(name).get("needs") == "prm" and (ctx.prm_model is None or ctx.ref_model is None):
        raise ValueError(f"scorer '{name}': needs a PRM model and a reference model (--prm / --prm-ref)")
    out = fn(traj, task, ctx)
    want = num_steps(task, traj.response_texts)
    for b, (s, n) in enumerate(zip(out.step, want)):
        if len(s) != n:
            raise ValueError(f"scorer '{name}': response {b} has {n} steps but {len(s)} step scores")
    return out


def vote_weights(scores, how: str) -> np.ndarray:
    """Map response scores to vote weights ≥ 0.

    'identity': w = s (scores must already be ≥ 0; −inf, e.g. a response with no step, → 0).
    'sigmoid':  w = 1 / (1 + e^(−s)) (ImplicitPRM's weighted vote, methods.md §2).
    """
    s = np.asarray(scores, dtype=float)
    if how == "identity":
        return np.where(np.isneginf(s), 0.0, s)
    if how == "sigmoid":
        return 1.0 / (1.0 + np.exp(-np.clip(s, -500, 500)))
    raise ValueError(f"vote weight '{how}': expected 'identity' or 'sigmoid'")


# ------------------------------------------------------------------------------------- entries


@SCORERS.register("oracle", level="outcome", weight="identity", center=0.5, value="last")
def oracle(traj: Trajectory, task, ctx: ScorerContext) -> Scores:
    """Outcome oracle: o_b = task.verify(example_b, response_b) ∈ [0, 1]; every step gets o_b.

    Best-of-N with it picks a correct sample whenever there is one, so its curve is pass@N.
    """
    outcome = [float(task.verify(ex, text)) for ex, text in zip(traj.examples, traj.response_texts)]
    steps = [[o] * n for o, n in zip(outcome, num_steps(task, traj.response_texts))]
    return Scores(step=steps, outcome=outcome)


@SCORERS.register("step_oracle", level="step", weight="identity", center=0.5, value="min")
def step_oracle(traj: Trajectory, task, ctx: ScorerContext) -> Scores:
    """Process oracle: r_{b,k} = 1 if ``task.label_steps`` marks step k correct, else 0 (wrong or
    unparseable); o_b = task.verify(...). With 'min' aggregation best-of-N prefers responses with
    no bad step, which is not the same as a right final answer (miracle steps)."""
    if not hasattr(task, "label_steps"):
        raise ValueError(f"scorer 'step_oracle': task '{task.name}' has no exact step labels")
    steps, outcome = [], []
    for ex, text in zip(traj.examples, traj.response_texts):
        labels = task.label_steps(ex, text).labels
        steps.append([1.0 if lab == 1 else 0.0 for lab in labels])
        outcome.append(float(task.verify(ex, text)))
    return Scores(step=steps, outcome=outcome)


@SCORERS.register("implicit_prm", level="step", weight="sigmoid", center=0.0, needs="prm", value="sum")
@torch.no_grad()
def implicit_prm(traj: Trajectory, task, ctx: ScorerContext) -> Scores:
    """Implicit PRM scores (Yuan et al. 2024, arXiv:2412.01981; methods.md §2):

        r_t = β · (log π_φ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t))    token score
        r_k = Σ_{t ∈ step k} r_t                                           step score ("single" mode)
        o   = Σ_t r_t = β · log π_φ(y|x) / π_ref(y|x)                      outcome score

    The token sum of ``o`` includes tokens outside every step (the EOS), so ``o`` can differ
    from Σ_k r_k. Uses ``finegrain.rewards.implicit_prm.ImplicitPRM`` with ``ctx.prm_model``,
    ``ctx.ref_model``, ``ctx.beta``; ``traj.step_ids`` must come from ``task.segmenter``.
    """
    from finegrain.rewards.implicit_prm import ImplicitPRM

    prm = ImplicitPRM(ctx.prm_model, ctx.ref_model, beta=ctx.beta, level="token", micro_batch=ctx.micro_batch)
    mask = traj.response_mask
    token_r = ctx.beta * prm.log_ratio(traj)  # (B, L), 0 where response_mask is False
    counts = num_steps(task, traj.response_texts)
    S = max(counts, default=0)
    step_values, _ = token_to_step_sum(token_r, mask, traj.step_ids, S)  # (B, S); 0 for a step with no token
    outcome = token_r.sum(dim=1)  # (B,)
    lengths = mask.sum(dim=1).tolist()
    return Scores(step=[step_values[b, :n].tolist() for b, n in enumerate(counts)],
                  outcome=outcome.tolist(),
                  token=[token_r[b, :n].tolist() for b, n in enumerate(lengths)])


@SCORERS.register("random", level="outcome", weight="identity", center=0.5, value="last")
def random_scores(traj: Trajectory, task, ctx: ScorerContext) -> Scores:
    """Random selector: o_b ~ U[0, 1) and r_{b,k} ~ U[0, 1), all independent, from ``ctx.rng``.
    Best-of-N with it picks a uniform sample, so its expected curve is flat at the mean accuracy
    (``selection.random_curve``); a finite draw scatters around it."""
    counts = num_steps(task, traj.response_texts)
    outcome = ctx.rng.random(len(counts)).tolist()
    steps = [ctx.rng.random(n).tolist() for n in counts]
    return Scores(step=steps, outcome=outcome)
