"""Eval's process metrics (miracle steps, turns, tool-call precision/recall) on hand-made episodes."""

import random
from types import SimpleNamespace

import pytest

from finegrain.eval.runner import process_metrics
from finegrain.eval.turns import tool_call_precision_recall
from finegrain.tasks.lookup import LookupTask


def _turns(calls):
    return [{"call": {"name": n, "args": list(a)}, "error": None, "result": "x"} for n, a in calls] + \
        [{"call": None, "error": None, "result": None}]  # the answer turn


def test_process_metrics_on_lookup_episodes():
    task = LookupTask(seed=0)
    ex = task.examples("test", 1)[0]  # Q: Deb.ceo.born_in, two gold calls
    gold = [(n, tuple(a)) for n, a in ex.meta["gold_calls"]]
    _, redundant = task.flawed_trace(ex, random.Random(0), "redundant_call")  # right answer, a wrong step
    wrong = ex.solution.rsplit("A: ", 1)[0] + "A: Nobody"
    texts = [ex.solution, redundant, wrong]
    correct = [task.verify(ex, t) == 1.0 for t in texts]
    assert correct == [True, True, False]
    traj = SimpleNamespace(examples=[ex] * 3, response_texts=texts,
                           turn_info=[_turns(gold), _turns(gold[:1] + gold), _turns(gold)])
    m = process_metrics(task, traj, correct)
    assert m["miracle_step_rate"] == pytest.approx(1 / 2)  # of the 2 right answers, the redundant one
    assert m["turns"] == pytest.approx((3 + 4 + 3) / 3) and m["tool_calls"] == pytest.approx(7 / 3)
    assert m["tool_call_precision"] == pytest.approx(6 / 7)  # the repeated call matches no second gold copy
    assert m["tool_call_recall"] == pytest.approx(1.0)


def test_process_metrics_leave_out_what_has_nothing_to_count():
    task = LookupTask(seed=0)
    ex = task.examples("test", 1)[0]
    traj = SimpleNamespace(examples=[ex], response_texts=["A: Nobody"], turn_info=[_turns([])])
    m = process_metrics(task, traj, [False])
    assert "miracle_step_rate" not in m and "tool_call_precision" not in m  # no right answer, no call
    assert m["tool_call_recall"] == 0.0 and m["tool_calls"] == 0.0
    single = SimpleNamespace(examples=[ex], response_texts=[ex.solution], turn_info=[])
    assert set(process_metrics(task, single, [True])) == {"miracle_step_rate"}  # no turns: single-turn env


def test_precision_recall_is_order_free_and_checks_lengths():
    a, b = ("f", ("1",)), ("g", ("2",))
    assert tool_call_precision_recall([[b, a]], [[a, b]])["precision"] == 1.0
    r = tool_call_precision_recall([[a], []], [[a], [b]])
    assert (r["precision"], r["recall"]) == (1.0, 0.5)
    with pytest.raises(ValueError, match="2 predicted episodes but 1 gold"):
        tool_call_precision_recall([[a], []], [[a]])


def test_prm_first_wrong_step_accuracy_against_exact_labels():
    from finegrain.tasks.arith import ArithTask

    task = ArithTask(min_steps=2, max_steps=2)
    ex = task.examples("test", 1)[0]
    gold = ex.solution                                             # 3 steps, all correct: first error None
    a, b = gold.split("\n")[0].split("=")
    slip = "\n".join([f"{a}={int(b) + 1}"] + gold.split("\n")[1:])  # step 0 wrong
    texts = [gold, slip, slip]
    traj = SimpleNamespace(examples=[ex] * 3, response_texts=texts, turn_info=[])
    firsts = [task.label_steps(ex, t).first_error for t in texts]
    assert firsts == [None, 0, 0]
    # the scorer: row 0 all fine (None: right), row 1 flags step 0 (right), row 2 flags step 1 (wrong)
    scorer = lambda traj: ([[0.3, 0.1, 0.2], [-0.4, 0.2, 0.1], [0.2, -0.1, 0.3]], 0.0)  # noqa: E731
    m = process_metrics(task, traj, [True, False, False], {"implicit_prm": scorer})
    assert m["prm_first_wrong_step_accuracy"] == pytest.approx(2 / 3)
    two = process_metrics(task, traj, [True, False, False], {"a": scorer, "b": lambda t: ([[1.0]] * 3, 0.0)})
    assert two["prm_first_wrong_step_accuracy/a"] == pytest.approx(2 / 3)
    assert two["prm_first_wrong_step_accuracy/b"] == pytest.approx(1 / 3)   # predicts no error: right on row 0
