"""Training data for a fine-tuned judge: the exact verdict on every question the judge reward asks.

``verdict_rows`` asks a ``Judge`` (its rubric, template and level) the same questions it asks at
RL time (``Judge.requests``), answers each with the rule backend (``RuleJudge``: the task's exact
step labels and verifier) and turns the answer into a compact verdict target::

    prompt  = Judge.prompt_for(example, response, items[, steps, k])     (the reward's own prompt)
    target  = {"id_1":s_1,...}    s_j ∈ {0, 1}, JSON without spaces, items in rubric order

so a model fine-tuned on (prompt, target) pairs (``finegrain judge train``) is read by the same
``parse_verdict`` as any other judge (the flat object is one of the verdict shapes it accepts).
A question whose exact verdict lacks an item (e.g. an item id the rule backend does not know) is
left out: there is no label to train on.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Sequence

from finegrain.rewards.judge import Judge, RuleJudge, parse_verdict


@dataclass(frozen=True)
class VerdictRow:
    """One judge question with its exact verdict: ``prompt`` (what the judge reads), ``target``
    (the compact verdict it should write), ``scores`` (item id → 0/1), ``group`` (index of the
    response it is about: rows of one response stay on one side of a train / held-out split) and
    ``step`` (None at outcome level)."""

    prompt: str
    target: str
    scores: dict[str, int]
    group: int
    step: int | None


def compact_verdict(scores: dict[str, float], item_ids: Sequence[str]) -> str:
    """The verdict as the fine-tuned judge writes it.

    >>> compact_verdict({"correct": 1.0, "answer": 0.0}, ["correct", "answer"])
    '{"correct":1,"answer":0}'
    """
    return json.dumps({j: int(round(scores[j])) for j in item_ids}, separators=(",", ":"))


def verdict_rows(judge: Judge, task, pairs: Sequence[tuple[Any, str]]) -> list[VerdictRow]:
    """Every question ``judge`` asks about each (example, response) of ``pairs``, with the exact
    verdict of ``RuleJudge(task)`` as the target (module docstring). Raises ValueError (one line)
    if the task has no step labels or no question has a complete exact verdict."""
    rule = RuleJudge(task)
    rows = []
    for g, (ex, response) in enumerate(pairs):
        asked = judge.requests(ex, response)
        for q, text in zip(asked, rule.generate(asked)):
            ids = [it.id for it in q.items]
            verdict = parse_verdict(text, ids)
            if verdict.missing:
                continue
            scores = {j: int(round(verdict.scores[j])) for j in ids}
            rows.append(VerdictRow(q.prompt, compact_verdict(scores, ids), scores, g, q.step))
    if not rows:
        raise ValueError(f"judge data: no question about task '{task.name}' has an exact verdict for every item "
                         "(the rule backend knows the items 'correct' and, at outcome level, 'answer')")
    return rows


def split_by_response(rows: Sequence[VerdictRow], n_responses: int, eval_fraction: float, seed: int,
                      max_eval: int | None = None) -> tuple[list[VerdictRow], list[VerdictRow]]:
    """(train, held-out) rows: round(n_responses · eval_fraction) responses, drawn by ``seed``, are
    held out with every question about them, so no response is on both sides; at most
    ``max_eval`` held-out questions are kept (a seeded sample).

    >>> rows = [VerdictRow("p", "t", {"correct": 1}, g, s) for g in range(4) for s in range(3)]
    >>> train, held = split_by_response(rows, 4, 0.5, seed=0)
    >>> len(train), len(held), {r.group for r in train} & {r.group for r in held}
    (6, 6, set())
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction: expected a number in [0, 1), got {eval_fraction}")
    order = list(range(n_responses))
    random.Random(f"judge-split/{seed}").shuffle(order)
    held = set(order[:round(n_responses * eval_fraction)])
    train = [r for r in rows if r.group not in held]
    evals = [r for r in rows if r.group in held]
    if max_eval is not None and len(evals) > max_eval:
        evals = random.Random(f"judge-eval/{seed}").sample(evals, max_eval)
    return train, evals
