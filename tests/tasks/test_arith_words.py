"""ArithWordsTask: arith with the answer in words; number <-> words; labels equal arith's; the
verifier is refused for training by config validation.

Hand example: Q: 7 +5 *3 -4 -> 7+5=12, 12*3=36, 36-4=32, answer "thirty-two".
"""

import random

import pytest

from finegrain.config import load_config, validate
from finegrain.segment import SEGMENTERS
from finegrain.tasks import TASKS
from finegrain.tasks.arith import ArithTask
from finegrain.tasks.arith_words import (MAX_WORDS, ArithWordsTask, digits_answer_lines, number_to_words,
                                         parse_answer, parse_number, words_solution)
from finegrain.tasks.base import STEP_CORRECT as C
from finegrain.tasks.base import STEP_UNPARSEABLE as U
from finegrain.tasks.base import STEP_WRONG as W
from finegrain.tasks.base import Example, StepTask

TASK = ArithWordsTask()
ARITH = ArithTask()
META = {"start": 7, "ops": [["+", 5], ["*", 3], ["-", 4]], "values": [12, 36, 32]}
EX = Example(id="hand", prompt="Q: 7 +5 *3 -4\n", answer="thirty-two", meta=META)
EX_DIGITS = Example(id="hand", prompt="Q: 7 +5 *3 -4\n", answer="32", meta=META)


# ================================================================================ number <-> words

def test_round_trip_for_every_value_of_the_largest_task():
    # arith's values stay in 0..max_value <= 10,000 (MAX_VALUE_LIMIT); every one reads back, in
    # words and in digits, and no two values share a spelling
    spelled = {}
    for n in range(0, 10_001):
        w = number_to_words(n)
        assert parse_number(w) == n and parse_number(str(n)) == n, n
        assert w not in spelled, (w, n, spelled.get(w))
        spelled[w] = n
    for n in (10_001, 99_999, 123_456_789, MAX_WORDS, -1, -105):
        assert parse_number(number_to_words(n)) == n


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"), (32, "thirty-two"), (99, "ninety-nine"),
    (100, "one hundred"), (105, "one hundred five"), (110, "one hundred ten"), (999, "nine hundred ninety-nine"),
    (1000, "one thousand"), (2041, "two thousand forty-one"), (10_000, "ten thousand"),
    (1_000_001, "one million one"), (-3, "minus three"),
])
def test_canonical_words(n, words):
    assert number_to_words(n) == words


@pytest.mark.parametrize("text, value", [
    ("thirty-two", 32), ("thirty two", 32), ("Thirty-Two", 32), ("THIRTY  TWO", 32), (" thirty-two. ", 32),
    ("32", 32), ("032", 32), ("-4", -4), ("one hundred and five", 105), ("one hundred five", 105),
    ("two thousand and forty-one", 2041), ("zero", 0),
    # not one spelling of a number
    ("thirty thirty", None), ("twelve hundred", None), ("thirty-two apples", None), ("twenty-zero", None),
    ("and", None), ("minus zero", None), ("3.5", None), ("", None), ("thirty - two", None), ("32 32", None),
    ("hundred", None), ("one hundred and", None),
])
def test_equivalent_forms_and_refusals(text, value):
    assert parse_number(text) == value


def test_number_to_words_refuses_out_of_range():
    for bad in (MAX_WORDS + 1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="number_to_words"):
            number_to_words(bad)


# ================================================================================ the task

def test_registered_and_protocol():
    assert TASKS.get("arith_words") is ArithWordsTask
    assert isinstance(TASK, StepTask) and TASK.segmenter == "newline" and ArithWordsTask.train_verifier is False


def test_examples_are_ariths_with_the_answer_in_words():
    words, digits = TASK.examples("train", 300), ARITH.examples("train", 300)
    for w, d in zip(words, digits):
        assert w.prompt == d.prompt and w.meta == d.meta
        assert w.id == d.id.replace("arith-", "arith_words-")
        assert w.answer == number_to_words(int(d.answer)) and parse_number(w.answer) == int(d.answer)
        assert w.solution == words_solution(d.solution)
        assert w.solution.rsplit("\n", 1)[0] == d.solution.rsplit("\n", 1)[0]      # same step lines
        assert w.solution.endswith("A: " + w.answer)
        assert TASK.verify(w, w.solution) == 1.0 and TASK.label_steps(w, w.solution).first_error is None
    assert TASK.examples("test", 20) == ArithWordsTask().examples("test", 20)
    assert TASK.examples("train", 10) == words[:10]                                  # prefix
    assert ArithWordsTask(seed=1).examples("train", 10) != words[:10]


def test_kwargs_are_checked_by_arith():
    with pytest.raises(ValueError, match=r"task.kwargs.max_steps: expected an integer in \[min_steps \(3\), 32\]"):
        ArithWordsTask(min_steps=3, max_steps=2)


@pytest.mark.parametrize("response, score", [
    ("7+5=12\n12*3=36\n36-4=32\nA: thirty-two", 1.0),
    ("A: thirty two", 1.0), ("A: Thirty-Two", 1.0), ("A: 32", 1.0), ("  A:thirty-two  \n\n", 1.0),
    ("A: thirty-one\nA: thirty-two", 1.0),     # the last answer line counts
    ("A: thirty-two\nA: thirty-one", 0.0),
    ("A: thirty-two\nA: lots", 1.0),           # an answer line that reads no number is skipped
    ("A: thirty", 0.0), ("A: thirty-twoQ: 4 +1", 0.0), ("thirty-two", 0.0), ("", 0.0),
])
def test_verify_accepts_every_equivalent_form(response, score):
    assert TASK.verify(EX, response) == score
    assert TASK.verify(Example("d", EX.prompt, "32", meta=META), response) == score   # a digits reference too


def test_extract_answer_gives_digits():
    assert TASK.extract_answer("7+5=12\nA: Twelve") == "12" and TASK.extract_answer("A: none") is None
    assert parse_answer("A: one hundred and five") == 105


# labels: the same lines as arith, the answer line in words (or digits, or unreadable)
@pytest.mark.parametrize("words, digits", [
    ("7+5=12\n12*3=36\n36-4=32\nA: thirty-two", "7+5=12\n12*3=36\n36-4=32\nA: 32"),
    ("7+5=13\n13*3=39\n39-4=32\nA: Thirty Two", "7+5=13\n13*3=39\n39-4=32\nA: 32"),     # miracle: W C W C
    ("7+5=12\n12*3=36\nA: thirty-six", "7+5=12\n12*3=36\nA: 36"),                        # too few lines
    ("7+5=12\n12*3=36\n36-4=32\nA: thirty-one", "7+5=12\n12*3=36\n36-4=32\nA: 31"),
    ("7+5=12\n12x3=36\n36-4=32\nA: thirty-two", "7+5=12\n12x3=36\n36-4=32\nA: 32"),
    ("7+5=12\n12*3=36\n36-4=32\nA: 32\n\n  zz", "7+5=12\n12*3=36\n36-4=32\nA: 32\n\n  zz"),
    ("A: thirty-two", "A: 32"), ("", ""), ("\n\n", "\n\n"),
])
def test_step_labels_equal_ariths_on_the_same_lines(words, digits):
    got, want = TASK.label_steps(EX, words), ARITH.label_steps(EX_DIGITS, digits)
    assert got.labels == want.labels and got.first_error == want.first_error
    assert got.spans == SEGMENTERS.get("newline")(words)


def test_unreadable_answer_line_is_unparseable():
    out = TASK.label_steps(EX, "7+5=12\n12*3=36\n36-4=32\nA: thirty-twoo")
    assert out.labels == [C, C, C, U] and out.first_error == 3
    assert TASK.label_steps(EX, "7+5=12\n12*3=36\n36-4=32\nA: 32xyz").labels == [C, C, C, U]   # arith: C
    assert TASK.label_steps(EX, "7+5=13\nA: thirteen").labels == [W, W]
    assert digits_answer_lines("A: lots\nA: 5") == "?\nA: 5"


def test_labels_line_up_with_the_segmenter_on_random_text():
    rng = random.Random(0)
    alphabet = "0123456789+-*= A:\nthirywo-fuvenx"
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(50)))
        out = TASK.label_steps(EX, text)
        assert out.spans == SEGMENTERS.get("newline")(text) and len(out.labels) == len(out.spans)
        assert set(out.labels) <= {C, W, U}


def test_sft_corpus_is_ariths_with_words():
    task = ArithWordsTask(miracle_fraction=0.2)
    mine, base = task.sft_corpus(120, 0.3, seed=2), ArithTask(miracle_fraction=0.2).sft_corpus(120, 0.3, seed=2)
    assert [ex for ex, _ in mine] == task.examples("train", 120)
    for (ex, text), (_, arith_text) in zip(mine, base):
        assert text == words_solution(arith_text) and text.rsplit("\n", 1)[0] == arith_text.rsplit("\n", 1)[0]
    flawed = sum(text != ex.solution for ex, text in mine)
    assert flawed == sum(text != ex.solution for ex, text in base) > 0


# ================================================================================ no verifier in training

def test_validation_refuses_the_verifier_for_this_task():
    ok = load_config(None, ["task.name=arith_words", "rewards=[{name: rlpr}]", "filters.filters=[]"])
    validate(ok)
    # the default rewards are [verifier]: refused, naming the field
    with pytest.raises(ValueError, match=r"^rewards\[0\].name: 'verifier' scores with the rule verifier of task "
                                         r"'arith_words', which is for evaluation only \(train_verifier = False\)"):
        load_config(None, ["task.name=arith_words"])
    # at weight 0 too, and so the filters cannot read it (the LASER/PEAR pattern)
    with pytest.raises(ValueError, match=r"^rewards\[1\].name: 'verifier'"):
        load_config(None, ["task.name=arith_words", "rewards=[{name: rlpr}, {name: verifier, weight: 0.0}]",
                           "filters.outcome=verifier", "filters.filters=[{name: accuracy_band}]"])
    # any other signal that scores with the verifier
    for name in ("pear", "laser", "entity_match"):
        with pytest.raises(ValueError, match=rf"^rewards\[0\].name: '{name}' scores with the rule verifier"):
            load_config(None, ["task.name=arith_words", f"rewards=[{{name: {name}}}]", "filters.filters=[]"])
    # a task with a training verifier is unaffected, and arith_words may train on step labels
    load_config(None, ["task.name=arith"])
    load_config(None, ["task.name=arith_words", "rewards=[{name: rlpr}, {name: step_labels, weight: 0.5}]",
                       "advantage.name=prime_rloo", "filters.filters=[]"])


def test_a_signal_declaring_needs_verify_is_refused(monkeypatch):
    from finegrain.rewards import REWARDS

    monkeypatch.setitem(REWARDS._meta, "sar", {**REWARDS.meta("sar"), "needs": "verify"})
    with pytest.raises(ValueError, match=r"^rewards\[0\].name: 'sar' scores with the rule verifier"):
        load_config(None, ["task.name=arith_words", "rewards=[{name: sar}]", "filters.filters=[]"])
