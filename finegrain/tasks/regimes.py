"""Named arith regimes where credit assignment matters (docs/testbed.md).

Each regime is a set of ``arith`` constructor kwargs (``task.kwargs`` of a run config). The
run settings that must change with them (response length, SFT corpus size and slips) are in
``finegrain.recipes.regimes``, which builds full configs from these.

On the demo's arith task (2–4 operations) the SFT warm start already knows the arithmetic and
its errors are random sampling slips, so an outcome reward and an exact process reward
(``step_labels``) tell the policy much the same thing. Each regime removes that in one way.

>>> sorted(REGIMES)
['long_chains', 'miracle', 'skill_gap', 'skill_gap_long']
>>> from finegrain.tasks.arith import ArithTask
>>> all(isinstance(ArithTask(**r.task_kwargs), ArithTask) for r in REGIMES.values())
True
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Regime:
    """``task_kwargs``: the arith kwargs (copy before changing them); ``doc``: what the regime
    is for and what a run on it should show."""

    task_kwargs: dict
    doc: str


LONG_CHAINS = Regime(
    task_kwargs={"min_steps": 8, "max_steps": 16, "max_start": 20, "max_value": 99, "max_operand": 9},
    doc="""8–16 operations with the demo's numbers (values 0..99, operands 1..9, so each line is
    as hard as in the demo and only the chain is longer; about 5·10^21 distinct problems). The
    warm start's per-line slip rate compounds over 8–16 lines, so sampled success is sparse
    (the target is 5–30% at the start) and an outcome reward says only "somewhere in these
    ~12 lines". Step labels say which line. Should show: step_labels reaching GRPO's final
    accuracy in fewer rollouts, or a higher final accuracy at the same budget.""")

SKILL_GAP = Regime(
    task_kwargs={"min_steps": 2, "max_steps": 4, "skill_gap_op": "*", "skill_gap_rate": 0.8},
    doc="""The demo's problems, but the SFT corpus writes 80% of its ``*`` lines with the
    skill-gap rule ``a*b = (a+1)*b`` (``arith.skill_gap_values``), continuing from the wrong
    value, so the warm start has learned one operation wrong rather than making random slips.
    Greedy decoding inherits the wrong rule, so greedy accuracy is low on problems with a
    ``*`` and can rise if RL teaches the skill. Step labels mark exactly the ``*`` lines, the
    outcome only the whole trace. Should show: greedy accuracy rising under both, faster (in
    rollouts) with step_labels, and the per-line error concentrated on ``*`` falling.""")

MIRACLE = Regime(
    task_kwargs={"min_steps": 2, "max_steps": 4, "miracle_fraction": 0.25},
    doc="""The demo's problems, but a quarter of the SFT traces that have no random slip reach
    the right answer through a wrong step and a later compensating wrong step
    (``arith.compensated_values``), so the warm start has learned "miracle steps": a right
    answer through wrong work. The outcome reward pays such traces in full; step labels
    penalise their two wrong lines. Should show: the miracle-step rate
    (``eval/miracle_step_rate``) falling under step_labels and staying (or rising) under
    outcome-only GRPO, at a similar final accuracy.""")

SKILL_GAP_LONG = Regime(
    task_kwargs={"min_steps": 4, "max_steps": 8, "skill_gap_op": "*", "skill_gap_rate": 0.8},
    doc="""``skill_gap`` on chains of 4–8 operations: about two ``*`` lines per problem instead
    of one, each right with probability ~0.2 at the start, so a whole trace is right only when
    every ``*`` line is (0.2^k for k of them) and the outcome reward cannot say which of the
    ``*`` lines was wrong. Added after ``skill_gap`` (2–4 operations) separated step_labels from
    GRPO by only ~1.3x in rollouts: there most problems have at most one ``*``, so the outcome
    already names the wrong line. Should show: step_labels reaching GRPO's final accuracy in
    clearly fewer rollouts (the calibration of docs/testbed.md).""")

REGIMES: dict[str, Regime] = {"long_chains": LONG_CHAINS, "skill_gap": SKILL_GAP, "miracle": MIRACLE,
                              "skill_gap_long": SKILL_GAP_LONG}
