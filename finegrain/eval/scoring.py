"""Scoring responses for evaluation and search with the reward signals of ``finegrain.rewards.REWARDS``.

Evaluation has no registry of its own. A *scorer* is a REWARDS entry, built exactly as in
training (``REWARDS.get(name).from_context(ctx, **kwargs)``, ctx a ``RewardContext``), called on
a Trajectory; :func:`scores_from_output` is the one adapter from its ``RewardOutput`` to what
selection, step search and the report use (:class:`Scores`). Higher always means "more likely
correct".

Eval metadata on a REWARDS registration (``REWARDS.meta(name)``; defaults in ``EVAL_DEFAULTS``):

    vote          'identity' | 'sigmoid': how a response score becomes a vote weight ≥ 0
                  (:func:`vote_weights`; 'sigmoid' for unbounded scores, as Implicit PRM's
                  weighted vote, methods.md §2). No default: declaring it is what makes an
                  entry usable in evaluation (``eval_names``).
    center        the score that means "no opinion" (colour midpoint in the report). Default 0.0.
    search_value  the step aggregation (``selection.STEP_AGGREGATIONS``) that values a *partial*
                  response in a step search: 'sum' for the implicit PRM (its Q-value, the
                  "accumulative" mode of methods.md §2), 'min' for exact labels (every step so far
                  correct), 'last' otherwise (ER-PRM's score of the last step, methods.md §16).
                  Default 'last'.
    eval_kwargs   keyword arguments of ``from_context`` for evaluation, under the ones the user
                  gives (e.g. ``step_labels`` on a 1 = correct, 0 = wrong scale). Default {}.
    eval_needs    'prm' when ``finegrain eval`` must load ``--prm`` as ``ctx.policy`` and
                  ``--prm-ref`` as ``ctx.initial_policy()``. Default None.

Selection: an outcome-level signal ranks responses by its outcome score; a turn-, step- or
token-level one by its step scores reduced with ``selection.aggregate_steps``.

>>> from types import SimpleNamespace
>>> from finegrain.rewards.base import RewardOutput
>>> task = SimpleNamespace(segmenter="newline")
>>> traj = SimpleNamespace(response_texts=["1\\n2\\n", ""],
...                        response_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]).bool(),
...                        step_ids=torch.tensor([[0, 0, 1, 1], [-1, -1, -1, -1]]))
>>> scores_from_output(RewardOutput(torch.tensor([1.0, 0.0]), torch.tensor([True, True]), "outcome"), traj, task)
Scores(step=[[1.0, 1.0], []], outcome=[1.0, 0.0], token=None, turn=None)
>>> tok = RewardOutput(torch.tensor([[0.5, 0.25, 1.0, 2.0], [0.0] * 4]), traj.response_mask, "token")
>>> scores_from_output(tok, traj, task)
Scores(step=[[0.75, 3.0], []], outcome=[3.75, 0.0], token=[[0.5, 0.25, 1.0, 2.0], []], turn=None)
>>> vote_weights([0.0, 2.0], "sigmoid").round(4).tolist()
[0.5, 0.8808]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from finegrain.rewards import REWARDS
from finegrain.rewards.base import RewardOutput
from finegrain.segment import SEGMENTERS
from finegrain.trajectory import Trajectory, token_to_step_sum

EVAL_DEFAULTS: dict[str, Any] = {"center": 0.0, "search_value": "last", "eval_kwargs": {}, "eval_needs": None}
VOTES = ("identity", "sigmoid")

# names evaluation used before it scored with REWARDS entries (one name per signal, no aliases)
RENAMED = {"oracle": "verifier", "step_oracle": "step_labels"}


@dataclass(frozen=True)
class Scores:
    """Scores of B responses.

    step:    B lists; list b has one float per step span of response b (S_b may be 0).
    outcome: B floats, one per response.
    token:   None, or B lists; list b has one float per real response token (``response_mask``
             row b, EOS included), in order.
    turn:    None, or B lists; list b has one float per turn of response b.
    """

    step: list[list[float]]
    outcome: list[float]
    token: list[list[float]] | None = None
    turn: list[list[float]] | None = None

    def __post_init__(self) -> None:
        """Check that every list covers the same B responses."""
        for name in ("step", "token", "turn"):
            rows = getattr(self, name)
            if rows is not None and len(rows) != len(self.outcome):
                raise ValueError(f"Scores: {len(rows)} {name} lists but {len(self.outcome)} outcome scores")

    @staticmethod
    def concat(parts: list["Scores"]) -> "Scores":
        """Row-wise concatenation (token and turn lists kept only if every part has them)."""
        def rows(name):
            return [r for p in parts for r in getattr(p, name)] if all(getattr(p, name) is not None for p in parts) \
                else None
        return Scores(step=rows("step"), outcome=[o for p in parts for o in p.outcome], token=rows("token"),
                      turn=rows("turn"))


# ---------------------------------------------------------------------------- names and metadata


def eval_names() -> list[str]:
    """REWARDS entries usable in evaluation: those whose registration declares ``vote``."""
    return [n for n in REWARDS.names() if "vote" in REWARDS.meta(n)]


def check_scorer(name: str, where: str = "scorers") -> None:
    """Raise one line naming ``where`` unless ``name`` is a REWARDS entry usable in evaluation.

    >>> check_scorer("oracle", "--scorers")
    Traceback (most recent call last):
    ...
    ValueError: --scorers: 'oracle' is now the reward 'verifier'; use --scorers verifier
    """
    if name in RENAMED:
        flag = f" {where} {RENAMED[name]}" if where.startswith("--") else f" '{RENAMED[name]}'"
        raise ValueError(f"{where}: '{name}' is now the reward '{RENAMED[name]}'; use{flag}")
    if name not in REWARDS:
        raise ValueError(f"{where}: unknown reward '{name}'; usable in evaluation: {', '.join(eval_names())}")
    if name not in eval_names():
        raise ValueError(f"{where}: reward '{name}' declares no eval metadata (vote=...); usable in evaluation: "
                         f"{', '.join(eval_names())}")


def eval_meta(name: str) -> dict[str, Any]:
    """The eval metadata of REWARDS entry ``name``, defaults filled in (module docstring)."""
    check_scorer(name)
    meta = REWARDS.meta(name)
    return {"vote": meta["vote"], **{k: meta.get(k, v) for k, v in EVAL_DEFAULTS.items()}}


def scorer_kwargs(name: str, kwargs: Mapping[str, Any] | None = None, where: str = "reward_kwargs") -> dict:
    """The keyword arguments ``name`` is built with in evaluation: its ``eval_kwargs``, then
    ``kwargs`` on top; checked against the entry's signature (one line naming ``where.name``)."""
    out = {**eval_meta(name)["eval_kwargs"], **(kwargs or {})}
    REWARDS.check_kwargs(name, out, f"{where}.{name}")
    return out


def build_scorers(names: Sequence[str], ctx, reward_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """Build each REWARDS entry of ``names`` for evaluation: ``from_context(ctx, **scorer_kwargs(...))``.

    Args:
        names: REWARDS entries usable in evaluation (:func:`eval_names`).
        ctx: a ``finegrain.train.stages.RewardContext`` (cfg, task, tokenizer, policy,
            initial_policy). For the implicit PRM, ``policy`` is the PRM π_φ and
            ``initial_policy()`` returns its reference π_ref.
        reward_kwargs: name → keyword arguments over the entry's ``eval_kwargs``.
    Returns:
        {name: signal}, in the order of ``names``.
    """
    reward_kwargs = dict(reward_kwargs or {})
    for name in reward_kwargs:
        check_scorer(name, "reward_kwargs")
        if name not in names:
            raise ValueError(f"reward_kwargs: '{name}' is not one of the scorers ({', '.join(names)})")
    kwargs = {name: scorer_kwargs(name, reward_kwargs.get(name)) for name in names}  # all checked before building
    return {name: REWARDS.get(name).from_context(ctx, **kwargs[name]) for name in names}


def selects_by(level: str) -> str:
    """'outcome' for an outcome-level signal (rank by the outcome score), else 'step' (rank by the
    aggregated step scores)."""
    return "outcome" if level == "outcome" else "step"


# ----------------------------------------------------------------------------------- the adapter


def step_spans(task, text: str) -> list[tuple[int, int]]:
    """Character spans of the steps of ``text`` under ``task.segmenter``."""
    return SEGMENTERS.get(task.segmenter)(text)


def num_steps(task, texts: list[str]) -> list[int]:
    """S_b for each response text."""
    return [len(step_spans(task, t)) for t in texts]


def scores_from_output(out: RewardOutput, traj: Trajectory, task) -> Scores:
    """The one adapter from a signal's ``RewardOutput`` on ``traj`` to :class:`Scores`.

    S_b = the number of step spans of ``task.segmenter`` on response b (the spans the exact step
    labels and the report use; ``traj.step_ids`` must come from the same segmenter). Per level:

        outcome  outcome_b = v_b; every step gets v_b.
        turn     turn_b = (v_{b,0}, ..., v_{b,T_b−1}); step k gets the value of the turn holding its
                 first token; outcome_b = Σ of the turn values.
        step     step_b = (v_{b,0}, ..., v_{b,S_b−1}); outcome_b = Σ_k v_{b,k}.
        token    token_b = (v_{b,t}) over real response tokens; step k gets Σ_{t ∈ step k} v_{b,t}
                 (0 for a step without a scored token); outcome_b = Σ_t v_{b,t}, tokens outside every
                 step (the EOS) included, so it can differ from Σ_k of the step scores.

    A value the signal marks not applicable (mask False) is −inf for an outcome, a turn, a step
    and a step that inherits it (ranked below every scored response, no vote), NaN for a token
    (shown uncoloured), and left out of the sums. A step-level output that scores a step index
    ≥ S_b disagrees with the segmenter and raises.

    Args:
        out: the signal's output on ``traj`` (values (B,), (B, T), (B, S) or (B, L) by level).
        traj: the scored batch (``response_texts``, ``response_mask``, ``step_ids``; ``turns``
            for turn level). task: gives ``segmenter``.
    Returns:
        :class:`Scores` (``token`` only for token level, ``turn`` only for turn level).
    """
    counts = num_steps(task, traj.response_texts)
    values, mask = out.values.detach().cpu(), out.mask.cpu()
    if not values.is_floating_point():
        values = values.float()
    B = len(counts)
    if values.shape[0] != B:
        raise ValueError(f"scores_from_output: {values.shape[0]} rows of values for {B} responses")
    inf = float("-inf")
    if out.level == "outcome":
        outcome = [v if m else inf for v, m in zip(values.tolist(), mask.tolist())]
        return Scores(step=[[o] * n for o, n in zip(outcome, counts)], outcome=outcome)
    applicable = torch.where(mask, values, torch.zeros_like(values))
    outcome = applicable.sum(dim=1).tolist()  # (B,) Σ of the applicable values
    if out.level == "step":
        S = values.shape[1]
        steps = []
        for b, n in enumerate(counts):
            extra = mask[b, n:].nonzero().flatten()
            if len(extra):
                raise ValueError(f"scores_from_output: response {b} has {n} steps but the signal scores step "
                                 f"{n + int(extra[0])} (its steps do not come from the task's segmenter)")
            steps.append([float(values[b, k]) if k < S and mask[b, k] else inf for k in range(n)])
        return Scores(step=steps, outcome=outcome)
    step_ids = traj.step_ids.cpu()
    response_mask = traj.response_mask.cpu()
    if out.level == "token":
        S = max(counts, default=0)
        step_values, _ = token_to_step_sum(applicable, mask & response_mask, step_ids, S)  # (B, S)
        lengths = response_mask.sum(dim=1).tolist()
        token_rows = torch.where(mask, values, torch.full_like(values, math.nan))  # (B, L)
        return Scores(step=[step_values[b, :n].tolist() for b, n in enumerate(counts)], outcome=outcome,
                      token=[token_rows[b, :n].tolist() for b, n in enumerate(lengths)])
    # turn level
    turns = traj.turns.cpu()  # (B, L), −1 on padding
    T = values.shape[1]
    turn_rows, steps = [], []
    for b, n in enumerate(counts):
        n_turns = int(turns[b].max().clamp(min=-1)) + 1
        row = [float(values[b, t]) if t < T and mask[b, t] else inf for t in range(n_turns)]
        turn_rows.append(row)
        step_row = []
        for k in range(n):
            at = ((step_ids[b] == k) & response_mask[b]).nonzero().flatten()
            t = int(turns[b, at[0]]) if len(at) else -1
            step_row.append(row[t] if 0 <= t < len(row) else inf)
        steps.append(step_row)
    return Scores(step=steps, outcome=outcome, turn=turn_rows)


def score(signal, traj: Trajectory, task) -> Scores:
    """Call ``signal`` on ``traj`` and adapt its output (:func:`scores_from_output`)."""
    return scores_from_output(signal(traj), traj, task)


def vote_weights(scores, how: str) -> np.ndarray:
    """Map response scores to vote weights ≥ 0.

    'identity': w = s (scores must already be ≥ 0; −inf, e.g. a response with no step, → 0).
    'sigmoid':  w = 1 / (1 + e^(−s)) (ImplicitPRM's weighted vote, methods.md §2).
    """
    s = np.asarray(scores, dtype=float)
    if how == "identity":
        w = np.where(np.isneginf(s), 0.0, s)
        if (w < 0).any():
            raise ValueError(f"vote weight 'identity': scores must be >= 0, got {w.min()} (a reward whose scores "
                             "can be negative needs vote='sigmoid'; or keep the scale of its eval kwargs)")
        return w
    if how == "sigmoid":
        return 1.0 / (1.0 + np.exp(-np.clip(s, -500, 500)))
    raise ValueError(f"vote weight '{how}': expected 'identity' or 'sigmoid'")
