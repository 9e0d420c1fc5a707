"""ArithTask: formats, exact step labels on hand-worked responses, splits, determinism, SFT data."""

import random

import pytest

from finegrain.segment import SEGMENTERS
from finegrain.tasks import TASKS
from finegrain.tasks.arith import ArithTask, format_problem, parse_answer, split_of
from finegrain.tasks.base import STEP_CORRECT as C
from finegrain.tasks.base import STEP_UNPARSEABLE as U
from finegrain.tasks.base import STEP_WRONG as W
from finegrain.tasks.base import Example, StepTask

TASK = ArithTask()
# Q: 7 +5 *3 -4  ->  12, 36, 32
EX = Example(id="hand", prompt="Q: 7 +5 *3 -4\n", answer="32",
             solution="7+5=12\n12*3=36\n36-4=32\nA: 32",
             meta={"start": 7, "ops": [["+", 5], ["*", 3], ["-", 4]], "values": [12, 36, 32]})


def labels(response, ex=EX):
    out = TASK.label_steps(ex, response)
    assert out.spans == SEGMENTERS.get(TASK.segmenter)(response)  # lines up with step_ids
    return out.labels, out.first_error


def test_registered_and_protocol():
    assert TASKS.get("arith") is ArithTask
    assert isinstance(TASK, StepTask)
    assert TASK.segmenter == "newline"
    assert TASK.format_prompt(EX) == EX.prompt


def test_format_of_generated_examples():
    for ex in TASK.examples("train", 300):
        start, ops = ex.meta["start"], ex.meta["ops"]
        assert ex.prompt == format_problem(start, [tuple(o) for o in ops])
        v, lines = start, []
        for (op, b), c in zip(ops, ex.meta["values"]):
            lines.append(f"{v}{op}{b}={c}")
            v = c
        assert ex.solution == "\n".join(lines + [f"A: {v}"])
        assert ex.answer == str(ex.meta["values"][-1])
        assert 2 <= len(ops) <= 4 and 0 <= start <= 20


def test_generated_values_respect_limits():
    task = ArithTask(min_steps=1, max_steps=6, max_start=5, max_operand=4, max_value=30, ops="-*",
                     seed=3)
    seen_ops = set()
    for ex in task.examples("train", 500):
        v = ex.meta["start"]
        assert 1 <= len(ex.meta["ops"]) <= 6
        for (op, b), c in zip(ex.meta["ops"], ex.meta["values"]):
            seen_ops.add(op)
            assert op in "-*"
            assert b in (2, 3) if op == "*" else 1 <= b <= 4
            assert 0 <= c <= 30
            v = c
    assert seen_ops == {"-", "*"}


def test_gold_solution_is_all_correct():
    assert labels(EX.solution) == ([C, C, C, C], None)
    assert TASK.verify(EX, EX.solution) == 1.0
    for ex in TASK.examples("test", 200):
        out = TASK.label_steps(ex, ex.solution)
        assert out.labels == [C] * (len(ex.meta["ops"]) + 1) and out.first_error is None
        assert TASK.verify(ex, ex.solution) == 1.0


def test_flawed_response_carries_the_error_forward():
    # 12*3 = 37 is wrong; 37-4 = 33 correctly continues from it; the answer matches the last line
    response = "7+5=12\n12*3=37\n37-4=33\nA: 33"
    assert labels(response) == ([C, W, C, C], 1)
    assert TASK.verify(EX, response) == 0.0


def test_miracle_step_right_answer_two_compensating_errors():
    # 7+5 = 13 (wrong, +1); 13*3 = 39 (correct from 13); 39-4 = 32 (wrong, -3); answer 32 = gold
    response = "7+5=13\n13*3=39\n39-4=32\nA: 32"
    assert TASK.verify(EX, response) == 1.0
    assert labels(response) == ([W, C, W, C], 0)


@pytest.mark.parametrize("response, expected", [
    # wrong operation, wrong operand, wrong carried value (a != previous c)
    ("7*5=35\n35*3=105\n105-4=101\nA: 101", ([W, C, C, C], 0)),
    ("7+6=13\n13*3=39\n39-4=35\nA: 35", ([W, C, C, C], 0)),
    ("7+5=12\n13*3=39\n39-4=35\nA: 35", ([C, W, C, C], 1)),
    # spaces around numbers and signs are fine
    ("7 + 5 = 12\n 12*3 =36\n36 - 4=32\nA:32", ([C, C, C, C], None)),
    # an unparseable line is its own step; numbering of computation lines skips it
    ("7+5=12\nhmm\n12*3=36\n36-4=32\nA: 32", ([C, U, C, C, C], 1)),
    # ...so a garbled line shifts the rest: "36-4" is read as the 2nd operation (*3), and only 2
    # computation lines precede the answer
    ("7+5=12\n12x3=36\n36-4=32\nA: 32", ([C, U, W, W], 1)),
    # too few computation lines: the answer line is wrong even if it repeats the last value
    ("7+5=12\n12*3=36\nA: 36", ([C, C, W], 2)),
    # extra computation lines beyond the number of operations are wrong, and so is the answer
    ("7+5=12\n12*3=36\n36-4=32\n32+1=33\nA: 33", ([C, C, C, W, W], 3)),
    ("7+5=12\n12*3=36\n36-4=32\nA: 32\n32+0=32", ([C, C, C, C, W], 4)),
    # answer line that does not match the last computation
    ("7+5=12\n12*3=36\n36-4=32\nA: 31", ([C, C, C, W], 3)),
    # no computation at all
    ("A: 32", ([W], 0)),
    ("", ([], None)),
    ("\n\n", ([], None)),
    # trailing garbage lines are steps too (unparseable)
    ("7+5=12\n12*3=36\n36-4=32\nA: 32\n\n  zz", ([C, C, C, C, U], 4)),
])
def test_label_cases(response, expected):
    assert labels(response) == expected


def test_labels_line_up_with_segmenter_on_random_text():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("0123456789+-*= A:\n") for _ in range(rng.randrange(40)))
        out = TASK.label_steps(EX, text)
        assert out.spans == SEGMENTERS.get("newline")(text)
        assert len(out.labels) == len(out.spans)
        assert set(out.labels) <= {C, W, U}


@pytest.mark.parametrize("response, score", [
    ("7+5=12\n12*3=36\n36-4=32\nA: 32", 1.0),
    ("A: 32", 1.0),
    ("  A:32  \n\n", 1.0),
    ("7+5=12\nA: 32\nzzz 9+", 1.0),        # garbage after the answer line
    ("A: 32Q: 4 +1\n4+1=5", 1.0),          # generation ran on past the answer
    ("A: 31\nA: 32", 1.0),                 # the last answer line counts
    ("A: 32\nA: 31", 0.0),
    ("A: 320", 0.0),
    ("A: 32.5", 0.0),
    ("7+5=12\n12*3=36\n36-4=32", 0.0),     # no answer line
    ("the answer is 32", 0.0),
    ("", 0.0),
])
def test_verify(response, score):
    assert TASK.verify(EX, response) == score


def test_huge_numbers_are_garbage_not_errors():
    big = "9" * 5000  # beyond int()'s 4300-digit limit
    assert labels(f"{big}+5=12\nA: {big}") == ([U, U], 0)
    assert TASK.verify(EX, f"A: {big}") == 0.0


def test_parse_answer():
    assert parse_answer("x\nA: -3\n") == -3
    assert parse_answer("xA: 3") is None


def test_determinism_and_prefix():
    a, b = ArithTask(seed=5), ArithTask(seed=5)
    assert a.examples("train", 400) == b.examples("train", 400)
    assert a.examples("test", 50) == b.examples("test", 50)
    assert ArithTask(seed=5).examples("train", 100) == a.examples("train", 400)[:100]
    assert ArithTask(seed=6).examples("train", 100) != a.examples("train", 100)
    ids = [ex.id for ex in a.examples("test", 13)]
    assert ids[0] == "arith-test-00000" and ids[12] == "arith-test-00012"


def test_train_test_disjoint_and_deduplicated():
    train = {ex.prompt for ex in ArithTask(seed=0).examples("train", 5000)}
    test = {ex.prompt for ex in ArithTask(seed=0).examples("test", 3000)}
    assert len(train) == 5000 and len(test) == 3000
    assert not train & test
    # the split is a property of the problem, so other seeds do not leak either
    assert not train & {ex.prompt for ex in ArithTask(seed=1).examples("test", 1000)}
    assert all(split_of(p) == "test" for p in test)


def test_small_space_exhaustion():
    task = ArithTask(min_steps=1, max_steps=1, max_start=3, max_operand=2, ops="+-")
    # starts 0..3, ops +1 +2 -1 -2 (when >= 0): 4*2 + (0+1+2+2) = 13 problems
    assert task.num_problems() == 13 == len(list(task._enumerate()))
    n_test = sum(split_of(format_problem(s, ops)) == "test" for s, ops in task._enumerate())
    n_train = 13 - n_test
    assert len({ex.prompt for ex in task.examples("train", n_train)}) == n_train
    with pytest.raises(ValueError, match=f"only {n_train} distinct 'train' problems"):
        task.examples("train", n_train + 1)
    with pytest.raises(ValueError, match="only 13 distinct problems in all splits"):
        task.examples("test", 14)


NAN, INF = float("nan"), float("inf")


# Every numeric kwarg gets zero/negative, NaN/inf, non-integer and too-large values. The message
# starts with the config path ``task.kwargs.<name>:`` (it used to be ``arith: <name>``), says
# the allowed range and the value received, on one line.
@pytest.mark.parametrize("kwargs, field", [
    ({"min_steps": 0}, "min_steps"),
    ({"min_steps": -1}, "min_steps"),
    ({"min_steps": NAN}, "min_steps"),
    ({"min_steps": 2.0}, "min_steps"),                  # a float, even a whole one
    ({"min_steps": True}, "min_steps"),                 # bool is not an integer here
    ({"min_steps": 33, "max_steps": 40}, "min_steps"),
    ({"max_steps": 1}, "max_steps"),                    # < min_steps (2)
    ({"max_steps": INF}, "max_steps"),
    ({"max_steps": 33}, "max_steps"),
    ({"max_steps": "4"}, "max_steps"),
    ({"max_start": -1}, "max_start"),
    ({"max_start": NAN}, "max_start"),
    ({"max_start": 10_001}, "max_start"),
    ({"max_operand": 0}, "max_operand"),
    ({"max_operand": -3}, "max_operand"),
    ({"max_operand": INF}, "max_operand"),
    ({"max_operand": 101}, "max_operand"),
    ({"max_value": 10}, "max_value"),                   # < max_start (20)
    ({"max_value": 0, "max_start": 0}, "max_value"),
    ({"max_value": -INF}, "max_value"),
    ({"max_value": 10**9}, "max_value"),
    ({"seed": 1.5}, "seed"),
    ({"seed": NAN}, "seed"),
    ({"seed": None}, "seed"),
    ({"ops": "+/"}, "ops"),
    ({"ops": ""}, "ops"),
    ({"ops": "++"}, "ops"),
    ({"ops": 3}, "ops"),
])
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError) as err:
        ArithTask(**kwargs)
    msg = str(err.value)
    assert msg.startswith(f"task.kwargs.{field}: expected ")
    assert msg.endswith(f", got {kwargs[field]!r}") and "\n" not in msg


def test_bad_argument_messages_give_the_range():
    with pytest.raises(ValueError) as err:
        ArithTask(min_steps=3, max_steps=2)
    assert str(err.value) == "task.kwargs.max_steps: expected an integer in [min_steps (3), 32], got 2"
    with pytest.raises(ValueError) as err:
        ArithTask(max_operand=NAN)
    assert str(err.value) == "task.kwargs.max_operand: expected an integer in [1, 100], got nan"


def test_limits_are_accepted():
    task = ArithTask(min_steps=32, max_steps=32, max_start=0, max_value=10_000, max_operand=100,
                     seed=-5)
    assert (task.min_steps, task.max_value, task.max_operand, task.seed) == (32, 10_000, 100, -5)


def test_bad_split_and_n():
    with pytest.raises(ValueError, match="split"):
        TASK.examples("validation")
    with pytest.raises(ValueError, match="n must be"):
        TASK.examples("train", -1)


def test_flawed_solution_has_exactly_one_wrong_step():
    rng = random.Random(0)
    positions = set()
    for ex in TASK.examples("train", 500):
        text = TASK.flawed_solution(ex, rng)
        out = TASK.label_steps(ex, text)
        wrong = [k for k, lab in enumerate(out.labels) if lab != C]
        assert len(wrong) == 1 and wrong[0] < len(ex.meta["ops"])  # a computation line
        k = wrong[0]
        positions.add(k)
        got = int(text.split("\n")[k].split("=")[1])
        assert 1 <= abs(got - ex.meta["values"][k]) <= 3 and got >= 0
        assert all(int(line.split("=")[1]) >= 0 for line in text.split("\n")[:-1])
        assert TASK.verify(ex, text) == 0.0  # ops are increasing in the carried value
    assert positions == {0, 1, 2, 3}


def test_flawed_solution_worked_example():
    # first randrange picks the line, then choice picks the delta; whatever they are, the text
    # must be the gold with line k's result shifted and everything after recomputed
    text = TASK.flawed_solution(EX, random.Random(1))
    assert text != EX.solution
    assert TASK.label_steps(EX, text).labels.count(W) == 1


def test_sft_corpus():
    corpus = TASK.sft_corpus(200, flawed_fraction=0.25, seed=3)
    assert len(corpus) == 200
    assert [ex for ex, _ in corpus] == TASK.examples("train", 200)
    flawed = [i for i, (ex, text) in enumerate(corpus) if text != ex.solution]
    assert len(flawed) == 50
    assert corpus == TASK.sft_corpus(200, flawed_fraction=0.25, seed=3)
    assert [t for _, t in corpus] != [t for _, t in TASK.sft_corpus(200, 0.25, seed=4)]
    assert all(text == ex.solution for ex, text in TASK.sft_corpus(20, 0.0, seed=0))
    with pytest.raises(ValueError, match="flawed_fraction"):
        TASK.sft_corpus(10, 1.5)
