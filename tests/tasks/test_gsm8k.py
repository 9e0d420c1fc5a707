"""GSM8KTask: answer extraction, verify, arithmetic step labels, real data, file and kwarg errors.

The answer forms math-verify handles, its fallbacks and thread safety are in test_answers.py;
reading Hugging Face datasets is in test_hf_data.py."""

import json
from fractions import Fraction

import pytest

from finegrain.segment import SEGMENTERS
from finegrain.tasks import TASKS
from finegrain.tasks.base import STEP_CORRECT as C
from finegrain.tasks.base import STEP_UNPARSEABLE as U
from finegrain.tasks.base import STEP_WRONG as W
from finegrain.tasks.base import Example, StepTask
from finegrain.tasks.gsm8k import (GSM8KTask, default_data_dir, evaluate, extract_answer,
                                   line_checks, normalize_number)

DATA = default_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "test.jsonl").is_file(),
                                reason=f"GSM8K data not found in {DATA}")


def ex(answer: str) -> Example:
    return Example(id="t", prompt="q", answer=answer)


# ---- numbers and answers --------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("72", "72"), ("72.00", "72"), ("72.50", "72.5"), ("+5", "5"), ("-3", "-3"), ("-0", "0"),
    ("1,234", "1234"), ("1,450,000", "1450000"), ("$1,234.50", "1234.5"), ("$ 18", "18"),
    ("18 dollars", "18"), ("5kg", "5"), ("50%", "50"), ("0.5", "0.5"), (".5", "0.5"),
    ("100", "100"), ("3/4", "0.75"), ("1/3", "1/3"), ("1,234.", "1234"), ("\u22125", "-5"),
    ("abc", None), ("", None), ("1/0", None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("#### 72.00\nsome trailing chatter 5", "72"),        # the marker wins over later numbers
    ("The answer is 1,234.", "1234"),
    ("So the answer is $72.00 per day", "72"),
    ("Answer: 45 apples", "45"),
    ("The answer is 3. Wait, no: the answer is 4.", "4"),  # the last one
    ("7+5=12\nA: 12", "12"),
    ("The final result is \\boxed{42}.", "42"),
    ("She has 5 + 3 = 8 apples, then 8 * 2 = 16 apples", "16"),  # no marker: last number
    ("He earns $1,500 in total", "1500"),
    ("#### nothing here\nbut 7 later", "7"),              # a marker without a number falls through
    ("I do not know", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("response, reference, score", [
    ("#### 72", "72", 1.0),
    ("The answer is 72.00 dollars", "72", 1.0),
    ("The answer is $1,234.", "1234", 1.0),
    ("Answer: 0.50", "0.5", 1.0),
    # math-verify compares rationals exactly: the old 1e-6 relative tolerance accepted
    # 1000000.5 for 1000000, and so also off-by-one answers such as 1450001 for 1450000
    ("#### 1000000.5", "1000000", 0.0),
    ("#### 1450001", "1450000", 0.0),
    ("#### 1000002", "1000000", 0.0),
    ("#### 0.333333", "1/3", 1.0),          # floats are rounded to 6 decimals
    ("#### 0.33", "1/3", 0.0),
    ("#### 71", "72", 0.0),
    ("#### 72", "-72", 0.0),
    ("no number at all", "72", 0.0),
    ("", "72", 0.0),
])
def test_verify(response, reference, score):
    got = GSM8KTask(data_dir="/nonexistent").verify(ex(reference), response)
    assert type(got) is float and got == score


# ---- arithmetic checks ----------------------------------------------------------------------

@pytest.mark.parametrize("expr, value", [
    ("16-3-4", 9), ("48/2", 24), ("80000*1.5", 120000), ("(3+4)*2", 14), ("2*(3+4)/7", 2),
    ("-5+3", -2), ("10/4", Fraction(5, 2)), ("2(40+9)", 98), ("560//10", 56), ("20%*50", 10),
    (".8+.84+.82", Fraction(246, 100)),
])
def test_evaluate(expr, value):
    assert evaluate(expr)[0] == value


@pytest.mark.parametrize("expr", ["__import__('os')", "2**3", "3+", "(1+2", "1 2", "", "1/0"])
def test_evaluate_rejects_non_arithmetic(expr):
    with pytest.raises((ValueError, ZeroDivisionError)):
        evaluate(expr)


@pytest.mark.parametrize("line, checks", [
    # annotations (both the annotation and the free text before it are checked)
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.", [True, True]),
    ("She makes 9 * 2 = $<<9*2=18>>18 every day", [True, True]),
    ("She makes 9 * 2 = $<<9*2=19>>19 every day", [False, False]),
    ("It takes <<2/2=1>>1 bolt", [True]),
    ("<<3/4=3/4>>", [True]),                      # the result side may be an expression
    ("<<10/3=3.33>>", [True]),                    # rounded to the decimals shown
    ("<<2/3=0.66>>", [True]),                     # or truncated
    ("<<10/3=3>>", [False]),                      # but an integer claim must be exact
    ("<<1/0=5>>", [False]),
    ("<<just text>>", []),                        # no '=': not a claim
    # free text
    ("The cost is 80,000+50,000=$130,000", [True]),
    ("So 12 + 5 = 18 apples", [False]),
    ("5*2 = 10 + 3 = 13", [True, True]),          # running calculation
    ("5*2 = 11 + 3 = 14", [False, True]),
    ("The museum tour will take 3 / 2 = 1 1/2 hours.", [True]),      # mixed numbers
    ("17/3 = 5 and 2/3 loads", [True]),
    ("Female:9(2/3)=6 unicorns", [True]),         # implicit multiplication
    ("he used 25 / 1/3 = 75 decorations", [True]),  # "a / p/q" means a ÷ (p/q)
    ("50 * 10% = 5", [True]),
    ("So 10/3 = 3.33 hours", [True]),
    ("$2.50 - $2.24 = 26 cents", [True]),
    ("So in a month, 600 x 30 = 18 000 watts.", [True]),
    # unit words that recur in the line are skipped
    ("12 slices * 1/3 = 4 slices", [True]),
    ("20 sheep + 160 sheep + 80 sheep = 260 sheep", [True]),
    ("2 babies / (2 babies + 2 babies) = 2 babies / 4 babies = .5", [True, True]),
    ("13 marbles + 4 marbles + 16 marbles = 45 marbles", [False]),
    ("4 pounds - 6 ounces = 58 ounces", []),
    ("he left at 7:50 + 30 minutes = 8:20 a.m.", []),
    ("5 thousand * 3 = 15,000", []),
    # nothing to check: no operator, algebra, or an expression that continues to the left
    ("He has 5 apples = 5 fruits", []),
    ("Combining like terms, 3x + 4 = 28", []),
    ("X*6 + 9 = 87 years old", []),
    ("24 cars * 1/3 = 8", []),                    # "cars" is not a unit here (used once)
    ("100/5 = 5A/5 or 20 = A", []),               # "5A" is an algebraic term, not a number
    ("3*30 = 30 + M trees", []),
    ("Leave at 0900-0130 = 0730 hours", []),
    ("x <= 3+4", []),
    ("no numbers here", []),
])
def test_line_checks(line, checks):
    assert line_checks(line) == checks


def test_label_steps_worked_example():
    task = GSM8KTask(data_dir="/nonexistent")
    response = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"  # C
                "Let us think.\n"                                   # U: nothing to check
                "Altogether she sold 48+24 = 73 clips.\n"            # W
                "Then 73 - 1 = 72.\n"                               # C (locally right)
                "#### 72")                                           # U
    out = task.label_steps(ex("72"), response)
    assert out.labels == [C, U, W, C, U]
    assert out.first_error == 2  # lines without a check are not errors
    assert out.spans == SEGMENTERS.get(task.segmenter)(response)
    assert task.verify(ex("72"), response) == 1.0  # a miracle: right answer, wrong step
    assert task.label_steps(ex("1"), "").labels == []
    assert task.label_steps(ex("1"), "no math\nat all").first_error is None


# ---- real data ------------------------------------------------------------------------------

# Gold solutions whose written arithmetic is wrong in the GSM8K test split itself (the final
# answers are right). Both lines are labelled WRONG, which is the intended behaviour.
#   test-00501: "3/4 of a skein of yarn * 364 yards = 364 / 4 = 273 yards."  (364/4 = 91)
#   test-01024: "So, Suzzane has $32 - $20 = $300 left."                     (typo for 320-20)
KNOWN_WRONG_TEST_LINES = {("gsm8k-test-00501", 2), ("gsm8k-test-01024", 4)}


@needs_data
def test_first_200_test_gold_solutions_verify_with_no_wrong_step():
    task = GSM8KTask()
    examples = task.examples("test", 200)
    assert len(examples) == 200
    n_checked = n_checked_annotated = 0
    for e in examples:
        for text in (e.solution, e.meta["annotated_solution"]):
            assert task.verify(e, text) == 1.0, e.id
            out = task.label_steps(e, text)
            assert W not in out.labels, (e.id, text)
            assert out.first_error is None
        n_checked += C in task.label_steps(e, e.solution).labels
        n_checked_annotated += C in task.label_steps(e, e.meta["annotated_solution"]).labels
    # the checks really fire: with annotations on 197/200 solutions, on the stripped text
    # (free-text equations only) on 185/200
    assert n_checked_annotated >= 195 and n_checked >= 180


@needs_data
def test_whole_test_split_wrong_lines_are_the_known_dataset_errors():
    task = GSM8KTask()
    wrong = set()
    for e in task.examples("test"):
        assert task.verify(e, e.solution) == 1.0
        labels = task.label_steps(e, e.solution).labels
        wrong |= {(e.id, k) for k, lab in enumerate(labels) if lab == W}
    assert wrong == KNOWN_WRONG_TEST_LINES


@needs_data
def test_real_example_fields():
    task = TASKS.get("gsm8k")()
    assert isinstance(task, StepTask) and task.segmenter == "newline"
    first = task.examples("test", 1)[0]
    assert first.id == "gsm8k-test-00000"
    assert first.prompt.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first.answer == "18"
    assert first.solution == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
                              "She makes 9 * 2 = $18 every day at the farmer\u2019s market.\n"
                              "#### 18")
    assert "<<16-3-4=9>>" in first.meta["annotated_solution"]
    assert task.format_prompt(first) == first.prompt
    assert len(task.examples("test")) == 1319
    assert len(task.examples("test", 10_000)) == 1319  # n caps the count


# ---- files ----------------------------------------------------------------------------------

def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_files_from_data_dir_and_explicit_paths(tmp_path):
    rows = [{"question": "q1", "answer": "a 2+2=<<2+2=4>>4\n#### 1,450,000"},
            {"question": "q2", "answer": "#### 72.00"}]
    write(tmp_path / "train.jsonl", rows)
    write(tmp_path / "test.jsonl", rows[:1])
    task = GSM8KTask(data_dir=tmp_path)
    assert [e.answer for e in task.examples("train")] == ["1450000", "72"]
    assert task.examples("train")[0].solution == "a 2+2=4\n#### 1450000"
    assert task.examples("train", 1)[0].id == "gsm8k-train-00000"
    other = write(tmp_path / "other.jsonl", rows[1:])
    assert [e.answer for e in GSM8KTask(data_dir=tmp_path, test_file=other).examples("test")] == ["72"]
    with pytest.raises(ValueError, match="split"):
        task.examples("dev")


def test_default_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("FINEGRAIN_GSM8K_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("FINEGRAIN_GSM8K_DIR")
    assert default_data_dir().parts[-3:] == ("tasks", "data", "gsm8k")  # shipped inside the package
    assert (default_data_dir() / "test.jsonl").is_file()


def test_missing_file(tmp_path):
    task = GSM8KTask(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        task.examples("test")
    msg = str(err.value)
    assert str(tmp_path / "test.jsonl") in msg and "'question'" in msg and "'answer'" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("bad_row, message", [
    ({"question": "q"}, "missing or non-string field 'answer'"),
    ({"answer": "#### 1"}, "missing or non-string field 'question'"),
    ({"question": "q", "answer": ["5"]}, "field 'answer'"),   # (a JSON number is a bare answer)
    ({"question": "q", "answer": float("nan")}, "is not a number"),
    ({"question": "q", "answer": "no marker"}, "no final '#### <number>'"),
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, bad_row, message):
    path = write(tmp_path / "train.jsonl", [{"question": "q", "answer": "#### 1"}, bad_row])
    with pytest.raises(ValueError) as err:
        GSM8KTask(train_file=path).examples("train")
    assert f"{path}:2" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("text", [
    "-" * 5000 + "= 5",
    "(" * 5000 + "1 = 1",
    "1+" * 5000 + "1 = 2",
    "9" * 400 + " * 2 = 5",
    "<<" + "9" * 400 + "*2=5>>",
    "#### " + "9" * 500,
    "#### " + "9" * 5000,                      # beyond int()'s 4300-digit limit
    "9" * 5000 + " * 2 = 5",
])
def test_adversarial_text_gives_labels_not_errors(text):
    task = GSM8KTask(data_dir="/nonexistent")
    out = task.label_steps(ex("72"), text)
    assert len(out.labels) == 1
    assert task.verify(ex("72"), text) == 0.0


# ---- constructor arguments ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"data_dir": ""}, "data_dir"),
    ({"data_dir": 5}, "data_dir"),
    ({"train_file": "  "}, "train_file"),
    ({"test_file": 1.5}, "test_file"),
    ({"dataset": ""}, "dataset"),
    ({"dataset": 3}, "dataset"),
    ({"dataset": "a\nb"}, "dataset"),
    ({"dataset": "d", "dataset_config": ""}, "dataset_config"),
    ({"dataset": "d", "train_split": ""}, "train_split"),
    ({"dataset": "d", "test_split": None}, "test_split"),
    ({"dataset": "d", "test_split": "train"}, "test_split"),        # same as train_split
    ({"question_field": ""}, "question_field"),
    ({"answer_field": 7}, "answer_field"),
    ({"answer_field": "question"}, "answer_field"),                  # same as question_field
    ({"dataset": "d", "data_dir": "x"}, "data_dir"),                 # files and a dataset
    ({"dataset": "d", "test_file": "x.jsonl"}, "test_file"),
    ({"train_split": "validation"}, "train_split"),                  # only with a dataset
    ({"dataset_config": "main"}, "dataset_config"),
])
def test_bad_kwargs_name_the_field_on_one_line(kwargs, field):
    with pytest.raises(ValueError) as err:
        GSM8KTask(**kwargs)
    msg = str(err.value)
    assert msg.startswith(f"task.kwargs.{field}: expected ") and ", got " in msg
    assert "\n" not in msg


def test_kwarg_error_says_what_is_allowed_and_what_came():
    with pytest.raises(ValueError) as err:
        GSM8KTask(dataset="d", test_split="train")
    assert str(err.value) == ("task.kwargs.test_split: expected a split other than train_split "
                              "('train'), got 'train'")


def test_bad_n():
    with pytest.raises(ValueError, match="n must be"):
        GSM8KTask(data_dir="/nonexistent").examples("test", -1)


def test_field_mapping_for_jsonl_files(tmp_path):
    write(tmp_path / "train.jsonl", [{"problem": "q1", "solution": "1+1=<<1+1=2>>2\n#### 2"},
                                     {"problem": "q2", "solution": "$1,234"}])  # a bare number
    task = GSM8KTask(data_dir=tmp_path, question_field="problem", answer_field="solution")
    first, second = task.examples("train")
    assert (first.prompt, first.answer, first.solution) == ("q1", "2", "1+1=2\n#### 2")
    assert (second.prompt, second.answer, second.solution) == ("q2", "1234", "")
    write(tmp_path / "test.jsonl", [{"problem": "q3", "solution": -12}])  # a JSON number
    assert task.examples("test")[0].answer == "-12"
    with pytest.raises(ValueError) as err:
        GSM8KTask(data_dir=tmp_path, question_field="problem2", answer_field="solution").examples("train")
    assert str(err.value) == f"gsm8k: {tmp_path / 'train.jsonl'}:1: missing or non-string field 'problem2'"
