"""ArithCalcTask: arith's problems with a calculator tool; traces, labels, the tool, SFT data.

Hand example (defaults: calc for '*' and for an operand above 50):
    Q: 7 +5 *3 -4   7+5 inline (12), 12*3 by calc (36), 36-4 inline (32)
"""

import random
import re
from collections import Counter

import pytest

from finegrain import toolcalls as env_tools
from finegrain.segment import SEGMENTERS
from finegrain.tasks import TASKS
from finegrain.tasks.arith import ArithTask, format_problem
from finegrain.tasks.arith_calc import ArithCalcTask, calc, parse_problem
from finegrain.tasks.base import STEP_CORRECT as C
from finegrain.tasks.base import STEP_UNPARSEABLE as U
from finegrain.tasks.base import STEP_WRONG as W
from finegrain.tasks.base import Example, StepTask
from finegrain.tasks.lookup import observation_spans, tool_turns

TASK = ArithCalcTask()
EX = Example(id="hand", prompt="Q: 7 +5 *3 -4\n", answer="32")


def cl(expr):
    return f"<call>calc({expr})</call>"


def res(text):
    return f"\n<result>{text}</result>\n"


GOLD = "7+5=12\n" + cl("12*3") + res("36") + "36-4=32\nA: 32"


def judged(response, ex=EX):
    out = TASK.label_steps(ex, response)
    assert out.spans == SEGMENTERS.get(TASK.segmenter)(response)
    return out.labels, out.first_error, [t.kind for t in TASK.judge_turns(ex, response)]


def replay(ex, trace):
    """The trace's model turns played against the tools, as the environment would."""
    text, calls = "", []
    for a, b in tool_turns(trace):
        turn = trace[a:b]
        text += turn
        c = env_tools.parse_call(turn)
        if c is None:
            break
        assert c.error is None
        calls.append([c.name, c.args])
        text += env_tools.format_result(TASK.tools(ex)[c.name](*c.args))
    return text, calls


def test_registered_and_protocol():
    assert TASKS.get("arith_calc") is ArithCalcTask
    assert isinstance(TASK, StepTask)
    assert TASK.segmenter == "tool_turns"
    assert TASK.format_prompt(EX) == EX.prompt


def test_same_problems_as_arith():
    kwargs = dict(min_steps=1, max_steps=3, max_value=60, seed=7)
    task, arith = ArithCalcTask(**kwargs), ArithTask(**kwargs)
    for split in ("train", "test"):
        mine, theirs = task.examples(split, 200), arith.examples(split, 200)
        assert [(e.prompt, e.answer) for e in mine] == [(e.prompt, e.answer) for e in theirs]
        assert [e.id for e in mine] == [e.id.replace("arith-", "arith_calc-") for e in theirs]
    assert not {e.prompt for e in task.examples("train", 2000)} & {e.prompt for e in task.examples("test", 300)}
    again = ArithCalcTask(**kwargs)
    assert [(e.solution, e.meta) for e in again.examples("train", 100)] == \
           [(e.solution, e.meta) for e in task.examples("train", 100)]
    assert task.examples("train", 30) == task.examples("train", 100)[:30]


def test_hand_example_trace_and_meta():
    start, ops = parse_problem(EX.prompt)
    assert (start, ops) == (7, [("+", 5), ("*", 3), ("-", 4)])
    assert TASK.trace(start, ops) == GOLD
    # over the threshold: 48+5 inline (48 <= 50), then 53+9 and 62-3 by calc (53, 62 > 50)
    assert TASK.trace(48, [("+", 5), ("+", 9), ("-", 3)]) == \
        "48+5=53\n" + cl("53+9") + res("62") + cl("62-3") + res("59") + "A: 59"
    no_mul = ArithCalcTask(calc_ops="", calc_above=99)  # never a call: arith's own solution
    assert no_mul.trace(start, ops) == "7+5=12\n12*3=36\n36-4=32\nA: 32"
    ex = TASK._example("train", Example("arith-train-00003", EX.prompt, "32"))
    assert ex.id == "arith_calc-train-00003" and ex.solution == GOLD
    assert ex.meta == {
        "gold_calls": [["calc", ["12*3"]]],
        "entities": ["12", "36", "32"],
        "checklist": [
            {"id": "call1", "weight": 0.5, "depends": [],
             "check": {"type": "call", "name": "calc", "args": ["12*3"]}},
            {"id": "answer", "weight": 0.5, "depends": ["call1"], "check": {"type": "answer", "value": "32"}}],
    }
    only = no_mul._example("train", Example("arith-train-00000", EX.prompt, "32"))
    assert only.meta["gold_calls"] == [] and only.meta["checklist"] == [
        {"id": "answer", "weight": 1.0, "depends": [], "check": {"type": "answer", "value": "32"}}]


def test_generated_examples():
    n_calls = Counter()
    for ex in TASK.examples("train", 300):
        assert set(ex.meta) == {"gold_calls", "entities", "checklist"}
        assert ex.prompt == format_problem(*parse_problem(ex.prompt))
        start, ops = parse_problem(ex.prompt)
        v, hard = start, []
        for (op, b), value in zip(ops, ex.meta["entities"], strict=True):
            if op == "*" or max(v, b) > 50:
                hard.append(["calc", [f"{v}{op}{b}"]])
            v = {"+": v + b, "-": v - b, "*": v * b}[op]
            assert value == str(v)
        assert ex.meta["gold_calls"] == hard and ex.answer == str(v)
        items = ex.meta["checklist"]
        assert [i["check"] for i in items[:-1]] == \
            [{"type": "call", "name": "calc", "args": a} for _, a in hard]
        assert items[-1]["check"] == {"type": "answer", "value": ex.answer}
        assert abs(sum(i["weight"] for i in items) - 1.0) < 1e-12
        rebuilt, calls = replay(ex, ex.solution)
        assert rebuilt == ex.solution and calls == hard
        assert TASK.verify(ex, ex.solution) == 1.0
        out = TASK.label_steps(ex, ex.solution)
        assert out.labels == [C] * (len(hard) + 1) and out.first_error is None
        n_calls[len(hard)] += 1
    assert n_calls[0] > 0 and sum(v for k, v in n_calls.items() if k >= 2) > 0  # the model must decide


def test_observation_spans():
    for ex, text in TASK.sft_corpus(80, 0.5):
        spans = observation_spans(text)
        assert [text[a:b] for a, b in spans] == re.findall(r"\n<result>-?\d+</result>\n", text)
        assert TASK.observation_spans(text) == spans


# ---- the calculator -------------------------------------------------------------------------


def test_calc():
    assert calc("12*3") == "36" and calc(" 7 + 5 ") == "12" and calc("(7+5)*3") == "36"
    assert calc("2-7") == "-5" and calc("2*-3") == "-6" and calc("-(2+3)*2") == "-10"
    assert calc("1+2*3") == "7"  # precedence
    assert calc("0") == "0" and calc("9" * 50 + "*" + "9" * 49) == str(int("9" * 50) * int("9" * 49))
    for bad in ["12/3", "2**3", "2^3", "1.5+1", "2(3)", "(2)3", "(1)(2)", "1 000", "07+1", "", "  ", "1+",
                "(1+2", "x+1", "1,000", "9" * 101, "__import__('os')"]:
        with pytest.raises(ValueError):
            calc(bad)
    with pytest.raises(ValueError):
        calc(12)
    for args in [(), ("1", "2")]:  # Python's own error (the environment reports bad_arguments)
        with pytest.raises(TypeError):
            calc(*args)

# ---- verify and labels ----------------------------------------------------------------------


def test_verify():
    assert TASK.verify(EX, GOLD) == 1.0
    assert TASK.verify(EX, GOLD.replace("A: 32", "A: 33")) == 0.0
    assert TASK.verify(EX, "A: 32") == 1.0 and TASK.verify(EX, "A: 32\nA: 7") == 0.0
    assert TASK.verify(EX, GOLD[:-5]) == 0.0


@pytest.mark.parametrize("response, labels, first, kinds", [
    (GOLD, [C, C], None, ["correct", "correct"]),
    # the hard operation computed inline, even rightly: no_call
    ("7+5=12\n12*3=36\n36-4=32\nA: 32", [W], 0, ["no_call"]),
    # an easy operation sent to calc
    (cl("7+5") + res("12") + cl("12*3") + res("36") + "36-4=32\nA: 32", [W, C, C], 0,
     ["redundant_call", "correct", "correct"]),
    # the same call twice: the second counts for nothing
    ("7+5=12\n" + cl("12*3") + res("36") + cl("12*3") + res("36") + "36-4=32\nA: 32", [C, W, C], 1,
     ["correct", "redundant_call", "correct"]),
    # a wrong argument; the rest carries its result on correctly (local labels), answer wrong
    ("7+5=12\n" + cl("12*2") + res("24") + "24-4=20\nA: 20", [W, C], 0, ["wrong_argument", "correct"]),
    # an inline slip; the call then uses the wrong value correctly
    ("7+5=13\n" + cl("13*3") + res("39") + "39-4=35\nA: 35", [W, C], 0, ["wrong_value", "correct"]),
    # a miracle: two wrong steps, right answer
    ("7+5=13\n" + cl("13*3") + res("39") + "39-7=32\nA: 32", [W, W], 0, ["wrong_value", "wrong_value"]),
    # another tool, a refused expression, a malformed call, then the right call
    ("7+5=12\n" + "<call>add(12, 3)</call>" + res("error: no tool add") + cl("12/3") + res("error: calc")
     + "<call>calc(12*3</call>" + res("error: malformed") + cl("12*3") + res("36") + "36-4=32\nA: 32",
     [W, W, W, C, C], 0, ["wrong_tool", "wrong_argument", "malformed", "correct", "correct"]),
    # two arguments: calc refuses (TypeError), the call counts for nothing
    ("7+5=12\n" + cl("12, 3") + res("error: bad arguments") + cl("12*3") + res("36") + "36-4=32\nA: 32",
     [W, C, C], 0, ["wrong_argument", "correct", "correct"]),
    # the JSON form
    ('7+5=12\n<call>{"name": "calc", "arguments": {"expr": "12*3"}}</call>' + res("36") + "36-4=32\nA: 32",
     [C, C], None, ["correct", "correct"]),
    # wrong answer line; a call after the last operation
    (GOLD.replace("A: 32", "A: 33"), [C, W], 1, ["correct", "wrong_answer"]),
    ("7+5=12\n" + cl("12*3") + res("36") + "36-4=32\n" + cl("32+0") + res("32") + "A: 32", [C, W, C], 1,
     ["correct", "redundant_call", "correct"]),
    # answering early
    ("7+5=12\nA: 12", [W], 0, ["wrong_answer"]),
    # free text is not checked; nothing to check is UNPARSEABLE
    ("First 7+5.\n7+5=12\n" + cl("12*3") + res("36") + "hmm", [C, U], 1, ["correct", "unparseable"]),
    ("", [], None, []),
])
def test_label_steps_hand_written(response, labels, first, kinds):
    assert judged(response) == (labels, first, kinds)


def test_a_repeated_expression_that_is_needed_is_correct():
    ex = Example("h", "Q: 0 *3 *3\n", "0")
    trace = TASK.trace(0, [("*", 3), ("*", 3)])
    assert trace == cl("0*3") + res("0") + cl("0*3") + res("0") + "A: 0"
    assert judged(trace, ex) == ([C, C, C], None, ["correct"] * 3)


# ---- SFT data -------------------------------------------------------------------------------

FLAW_VERIFY = {"wrong_argument": 0.0, "redundant_call": 1.0, "no_call": 0.0, "wrong_value": 0.0}


def test_sft_corpus_without_flaws_is_gold():
    corpus = TASK.sft_corpus(150, 0.0, seed=2)
    assert all(text == ex.solution for ex, text in corpus)
    assert [ex.id for ex, _ in corpus] == [ex.id for ex in TASK.examples("train", 150)]


def test_sft_corpus_flaws_appear_as_designed():
    assert set(FLAW_VERIFY) == set(ArithCalcTask.FLAW_KINDS)
    corpus = TASK.sft_corpus(200, 0.5, seed=0)
    flawed = [(ex, t) for ex, t in corpus if t != ex.solution]
    assert len(flawed) == 100
    seen = Counter()
    for ex, text in flawed:
        judgements = TASK.judge_turns(ex, text)
        wrong = [j for j in judgements if j.label != C]
        assert len(wrong) == 1  # local labels: exactly the flawed turn
        seen[wrong[0].kind] += 1
        assert TASK.verify(ex, text) == FLAW_VERIFY[wrong[0].kind]
        assert replay(ex, text)[0] == text  # observations are the tool's answers
    assert set(seen) == set(FLAW_VERIFY) and min(seen.values()) >= 15
    assert TASK.sft_corpus(200, 0.5, seed=0) == corpus


@pytest.mark.parametrize("kind", ArithCalcTask.FLAW_KINDS)
def test_flawed_trace_of_each_kind(kind):
    rng, made = random.Random(1), 0
    for ex in TASK.examples("test", 60):
        got = TASK.flawed_trace(ex, rng, kind)
        has_hard, has_easy = bool(ex.meta["gold_calls"]), len(ex.meta["gold_calls"]) < len(ex.meta["entities"])
        applies = {"wrong_argument": has_hard, "no_call": has_hard, "wrong_value": has_easy,
                   "redundant_call": True}
        assert (got is not None) == applies[kind]
        if got is None:
            continue
        made += 1
        labels = TASK.label_steps(ex, got[1]).labels
        assert got[0] == kind and labels.count(W) == 1 and labels.count(U) == 0
        assert TASK.verify(ex, got[1]) == FLAW_VERIFY[kind]
    assert made >= 20
    with pytest.raises(ValueError, match="unknown flaw kind"):
        TASK.flawed_trace(EX, rng, "typo")


# ---- kwargs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"calc_ops": "/"}, "task.kwargs.calc_ops: expected distinct characters from '+-*' (or ''), got '/'"),
    ({"calc_ops": "**"}, "task.kwargs.calc_ops: expected distinct characters from '+-*' (or ''), got '**'"),
    ({"calc_above": -1}, "task.kwargs.calc_above: expected an integer >= 0, got -1"),
    ({"calc_above": 5.5}, "task.kwargs.calc_above: expected an integer >= 0, got 5.5"),
    ({"min_steps": 3, "max_steps": 2},
     "task.kwargs.max_steps: expected an integer in [min_steps (3), 32], got 2"),
    ({"ops": "+/"}, "task.kwargs.ops: expected distinct characters from '+-*', got '+/'"),
])
def test_kwargs_are_checked(kwargs, message):
    with pytest.raises(ValueError) as err:
        ArithCalcTask(**kwargs)
    assert str(err.value) == message


def test_registry_checks_kwargs():
    with pytest.raises(ValueError, match="unknown key 'threshold' for task 'arith_calc'"):
        TASKS.check_kwargs("arith_calc", {"threshold": 3}, "task.kwargs")
    TASKS.check_kwargs("arith_calc", {"calc_above": 20, "max_steps": 3}, "task.kwargs")
