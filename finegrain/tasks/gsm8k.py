"""GSM8K: grade-school word problems, a math-verify verifier, and step labels for the arithmetic.

Data: GSM8K-format rows with a question and an answer, where the answer is GSM8K's reasoning
with calculator annotations and a final marker::

    She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.
    #### 18

(an answer that is just a number, ``18``, is accepted too). Rows come from local JSONL files
(``data_dir`` / ``train_file`` / ``test_file``) or from any Hugging Face dataset, by Hub name or
local path (``dataset``, see ``finegrain.tasks.hf_data``); ``question_field`` and
``answer_field`` name the columns.

Answers (``verify``): ``finegrain.tasks.answers`` finds the final answer of a response with
math-verify (``\\boxed{}``, LaTeX, "the answer is", the last ``=``, the last number) and
compares it with the reference through ``math_verify.verify`` (exact for rationals, floats
rounded to 6 decimals, ``50%`` = 50). Its own code handles only what math-verify lacks: GSM8K's
``#### n`` marker (read first), mixed numbers (``2 1/2``), space-separated thousands inside LaTeX,
number words (``forty-two``), U+2212 minus, and the time bounds that let it run off the main
thread. Its module docstring lists which case takes which path, and why.

Step labels check arithmetic only, line by line (segmenter ``newline``): every ``<<expr=c>>``
annotation, and every free-text equation ``a op b = c``. Expressions are evaluated exactly
(fractions) by a small parser for numbers, ``+ - * /`` (also ``x × ÷``), parentheses and
``%``; Python's ``eval`` is never used. A line is CORRECT if it has at least one check and all
pass, WRONG if one fails, and UNPARSEABLE if it has nothing to check (most prose lines, and the
``#### n`` line). ``first_error`` is the first WRONG line: lines without a check are skipped,
because in free-form reasoning a line with no arithmetic is not an error.

>>> normalize_number("$1,234.50 per week")
'1234.5'
>>> extract_answer("So she has 5 + 3 = 8 apples.\\nThe answer is 1,234.")
'1234'
>>> labels = label_arithmetic("He has 3 * 4 = <<3*4=12>>12 cans\\nThen 12 + 5 = 18\\nDone")
>>> labels.labels, labels.first_error
([1, 0, -1], 1)
"""

from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

from finegrain.jsonl import parse_json_object
from finegrain.segment import newline
from finegrain.tasks import TASKS
from finegrain.tasks.answers import canonical_number, extract_answer, is_equivalent
from finegrain.tasks.base import (STEP_CORRECT, STEP_UNPARSEABLE, STEP_WRONG, Example, StepLabels,
                                  check_str, kwarg_error)
from finegrain.tasks.hf_data import load_columns, load_splits

__all__ = ["GSM8KTask", "extract_answer", "normalize_number", "label_arithmetic", "line_checks",
           "evaluate", "load_jsonl", "default_data_dir"]

SPLITS = ("train", "test")
FIELDS = ("question", "answer")

# ---- numbers --------------------------------------------------------------------------------

MAX_DIGITS = 100  # longer numbers are garbage, not answers (and int() refuses > 4300 digits)
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"(?:(?<![\w.)])[-+])?(?:\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+(?![\d.]))?")


def _clean(text: str) -> str:
    """Drop '$' and thousands commas, use ASCII minus."""
    return _THOUSANDS_COMMA.sub("", text.replace("$", "").replace("\u2212", "-"))


def normalize_number(s: str) -> str | None:
    """Canonical text of the first number in ``s``, or None if there is none.

    Ignores ``$``, thousands commas, a leading ``+``, units and words after the number, and
    trailing zeros. A fraction ``p/q`` becomes a decimal when it has a finite one, else ``p/q``.

    >>> [normalize_number(s) for s in ["72.00", "+5", "1,234", "$ 18 dollars", "-0", "3/4", "1/3", "n/a"]]
    ['72', '5', '1234', '18', '0', '0.75', '1/3', None]
    """
    m = _NUMBER.search(_clean(s))
    if not m or len(m.group(0)) > MAX_DIGITS:
        return None
    text = m.group(0).replace(" ", "")
    if "/" in text:
        num, den = text.split("/")
        if Fraction(den) == 0:
            return None
        return canonical_number(Fraction(num) / Fraction(den))
    return canonical_number(Fraction(text))


def _bare_number(text: str) -> str | None:
    """``normalize_number(text)`` when ``text`` is nothing but one number ('$1,234', '-3')."""
    return normalize_number(text) if _NUMBER.fullmatch(_clean(text.strip())) else None


def _isclose(a: Fraction, b: Fraction, rel_tol: float = 1e-6) -> bool:
    """math.isclose on exact fractions (no float overflow on huge numbers)."""
    return abs(a - b) <= max(Fraction(rel_tol) * max(abs(a), abs(b)), Fraction(1, 10**12))


# ---- arithmetic checks ----------------------------------------------------------------------


class Tok(NamedTuple):
    """A token of a line. kind: 'num' (value = (Fraction, has %, decimals shown)), 'op'
    (one of + - * / // ( )), 'eq', 'word' (letters), 'var' (a number that is not a quantity:
    a coefficient glued to a letter as in 3x, a code with a leading zero as in 0730, or a run of
    more than MAX_DIGITS characters),
    'junk' (any other character). start/end: character range in the line."""

    kind: str
    value: object
    start: int
    end: int


# mixed numbers: "1 1/2", "5 and 2/3", "16 and (2/3)", "$3 and $1/3"
_MIXED = re.compile(r"(\d+) +(?:and +\$?(\()?)?([1-9]\d*)/(\d+)(?(2)\))(?![\d.])")
# numbers: 1,234.5 | 18 000 (space-grouped thousands) | 12 | .5
_NUM = re.compile(r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d{1,3}(?: \d{3})+(?!\d|,\d|\.\d|/)|\d+)"
                  r"(?:\.\d+)?|\.\d+")
_WORD = re.compile(r"[^\W\d_]+")
_OP_CHARS = {"+": "+", "-": "-", "\u2013": "-", "\u2212": "-", "*": "*", "×": "*", "·": "*",
             "/": "/", "÷": "/", "(": "(", ")": ")"}


def _tokenize(line: str) -> list[Tok]:
    """Tokens of one line; spaces and '$' are skipped. A lone x/X between two operands is '*'."""
    toks: list[Tok] = []
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c.isspace() or c == "$":
            i += 1
            continue
        if line.startswith(("==", "<=", ">=", "!="), i):
            toks.append(Tok("junk", line[i:i + 2], i, i + 2))
            i += 2
            continue
        m = _MIXED.match(line, i)
        if m and int(m.group(3)) < int(m.group(4)):
            value = int(m.group(1)) + Fraction(int(m.group(3)), int(m.group(4)))
            toks.append(Tok("num", (value, False, 0), i, m.end()))
            i = m.end()
            continue
        m = _NUM.match(line, i)
        if m:
            text, end = m.group(0), m.end()
            percent = line.startswith("%", end)
            if (len(text) > 1 and text[0] == "0" and text[1].isdigit()) or len(text) > MAX_DIGITS:
                toks.append(Tok("var", text, i, end))
            else:
                decimals = len(text.partition(".")[2])
                value = Fraction(text.replace(",", "").replace(" ", ""))
                toks.append(Tok("num", (value, percent, decimals),
                                i, end + percent))
            i = end + percent
            continue
        if line.startswith("//", i):
            toks.append(Tok("op", "//", i, i + 2))
            i += 2
            continue
        if c in _OP_CHARS:
            toks.append(Tok("op", _OP_CHARS[c], i, i + 1))
            i += 1
            continue
        if c == "=":
            toks.append(Tok("eq", "=", i, i + 1))
            i += 1
            continue
        m = _WORD.match(line, i)
        if m:
            toks.append(Tok("word", m.group(0), i, m.end()))
            i = m.end()
            continue
        toks.append(Tok("junk", c, i, i + 1))
        i += 1
    for k, t in enumerate(toks):
        prev = toks[k - 1] if k else None
        nxt = toks[k + 1] if k + 1 < len(toks) else None
        if t.kind == "word" and t.value in ("x", "X") and prev and nxt \
                and (prev.kind == "num" or prev.value == ")") \
                and (nxt.kind == "num" or nxt.value == "("):
            toks[k] = Tok("op", "*", t.start, t.end)
        elif t.kind == "word" and len(t.value) == 1 and prev and prev.kind == "num" \
                and prev.end == t.start:
            toks[k - 1] = Tok("var", prev.value, prev.start, prev.end)  # 3x, 5A: a coefficient
    return toks


MAX_TOKENS = 100  # longer runs of numbers and operators are not checked


class _Parser:
    """Recursive descent over 'num'/'op' tokens:
    expr := term (('+'|'-') term)*;  term := unary (('*'|'/'|'//') unary | implicit '*')*;
    unary := ('+'|'-') unary | number | '(' expr ')'.
    Implicit multiplication: ``2(3+4)``, ``(1/2)(4)``, ``(1/2) 278``. ``%`` divides by 100 when
    ``percent`` is True."""

    def __init__(self, tokens: list[Tok], percent: bool):
        self.tokens, self.pos, self.percent, self.binary_ops = tokens, 0, percent, 0

    def peek(self) -> tuple[str | None, object]:
        t = self.tokens[self.pos] if self.pos < len(self.tokens) else None
        return (t.kind, t.value) if t else (None, None)

    def take(self) -> tuple[str | None, object]:
        tok = self.peek()
        self.pos += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            rhs = self.term()
            self.binary_ops += 1
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while True:
            kind, val = self.peek()
            after_paren = self.tokens[self.pos - 1].value == ")"
            if (kind, val) in (("op", "*"), ("op", "/"), ("op", "//")):
                self.take()
            elif (kind, val) == ("op", "(") or (kind == "num" and after_paren):
                val = "*"  # implicit multiplication
            else:
                return value
            rhs = self.unary()
            self.binary_ops += 1
            if val != "*" and rhs == 0:
                raise ZeroDivisionError("division by zero")
            value = value * rhs if val == "*" else value / rhs if val == "/" else Fraction(value // rhs)

    def unary(self) -> Fraction:
        kind, val = self.take()
        if (kind, val) in (("op", "-"), ("op", "+")):
            inner = self.unary()
            return -inner if val == "-" else inner
        if kind == "num":
            number, is_percent, _ = val
            return number / 100 if (is_percent and self.percent) else number
        if (kind, val) == ("op", "("):
            inner = self.expr()
            if self.take() != ("op", ")"):
                raise ValueError("unbalanced parenthesis")
            return inner
        raise ValueError(f"unexpected token {val!r}")


def evaluate(expr: str | list[Tok], *, percent: bool = True) -> tuple[Fraction, int]:
    """Exact value of an arithmetic expression and its number of binary operations.
    Raises ValueError (or ZeroDivisionError) unless the whole input is one expression.

    >>> evaluate("(80000+50000)*1.5")
    (Fraction(195000, 1), 2)
    >>> evaluate("20% * 50")
    (Fraction(10, 1), 1)
    >>> evaluate("2(40+9)")
    (Fraction(98, 1), 2)
    """
    tokens = _tokenize(expr) if isinstance(expr, str) else expr
    if not tokens:
        raise ValueError("empty expression")
    if len(tokens) > MAX_TOKENS:
        raise ValueError(f"expression longer than {MAX_TOKENS} tokens")  # bounds the recursion
    p = _Parser(tokens, percent)
    value = p.expr()
    if p.pos != len(tokens):
        raise ValueError("trailing tokens")
    return value, p.binary_ops


def _group_fractions(tokens: list[Tok]) -> list[Tok]:
    """Parenthesise an unspaced integer fraction ``p/q`` that follows a division sign: prose
    writes ``25 / 1/3`` for 25 ÷ (1/3), which left-to-right evaluation reads as (25 / 1) / 3."""
    out, k = [], 0
    while k < len(tokens):
        a, slash, b = (tokens[k:k + 3] + [None, None])[:3]
        if (b is not None and out and out[-1].value in ("/", "//")
                and a.kind == "num" and slash.value == "/" and b.kind == "num"
                and a.end == slash.start and slash.end == b.start
                and a.value[0].denominator == 1 and b.value[0].denominator == 1):
            out += [Tok("op", "(", a.start, a.start), a, slash, b, Tok("op", ")", b.end, b.end)]
            k += 3
        else:
            out.append(a)
            k += 1
    return out


def _readings(tokens: list[Tok]) -> list[tuple[Fraction, int]]:
    """Every plausible (value, binary ops) of ``tokens`` in prose: '%' read as ÷100 and, when
    there is a '%', also ignored; unspaced fractions grouped or not (``_group_fractions``).
    [] if the tokens are not one expression."""
    has_percent = any(t.kind == "num" and t.value[1] for t in tokens)
    grouped = _group_fractions(tokens)
    out = []
    for toks in ((tokens, grouped) if len(grouped) != len(tokens) else (tokens,)):
        for percent in ((True, False) if has_percent else (True,)):
            try:
                out.append(evaluate(toks, percent=percent))
            except (ValueError, ZeroDivisionError):
                pass
    return out


def _close(value: Fraction, claimed: Fraction, decimals: int) -> bool:
    """``claimed`` states ``value``: equal up to 1e-6 relative, or, when the claim is written with
    d decimals, within one unit of its last digit (GSM8K rounds and truncates: 10/3 = 3.33)."""
    if _isclose(value, claimed):
        return True
    return decimals > 0 and abs(value - claimed) <= Fraction(1, 10 ** decimals)


def _decimals(tokens: list[Tok]) -> int:
    """Decimals shown when ``tokens`` is one number (a possibly rounded claim), else 0."""
    return tokens[0].value[2] if len(tokens) == 1 and tokens[0].kind == "num" else 0


def _check_annotation(body: str) -> bool:
    """``expr=c`` (c may itself be an expression): every side evaluates and all are equal."""
    sides = [_tokenize(side) for side in body.split("=")]
    try:
        values = [evaluate(side)[0] for side in sides]
    except (ValueError, ZeroDivisionError):
        return False
    return all(_close(values[0], v, _decimals(side)) for side, v in zip(sides[1:], values[1:]))


_NOT_UNITS = {"percent", "percentage", "hundred", "hundreds", "thousand", "thousands", "million",
              "millions", "billion", "dozen", "dozens", "half", "halves", "third", "thirds",
              "quarter", "quarters", "times", "cents", "cent"}


def _units(toks: list[Tok]) -> set[str]:
    """Words that can be read as units in this line: two or more letters, not a scale word, and
    used at least twice ("20 sheep + 160 sheep = 180 sheep"). Plural 's' is ignored."""
    words = [t.value.lower().rstrip("s") for t in toks
             if t.kind == "word" and len(t.value) > 1 and t.value.lower() not in _NOT_UNITS]
    return {w for w in words if words.count(w) > 1}


def _is_unit(toks: list[Tok], k: int, units: set[str]) -> bool:
    """``toks[k]`` is a unit word between a number and an operator or '=' (or a ')')."""
    t = toks[k]
    return (t.kind == "word" and t.value.lower().rstrip("s") in units
            and k > 0 and toks[k - 1].kind == "num" and k + 1 < len(toks)
            and toks[k + 1].kind in ("op", "eq") and toks[k + 1].value != "(")


def _left_operand(toks: list[Tok], eq: int, units: set[str]) -> list[Tok] | None:
    """The expression right before the '=' at ``toks[eq]``, or None when there is nothing to
    check: no operator, or the expression visibly continues to the left (it starts with an
    operator; it follows a one-letter word such as a variable or an 'x' sign, a word that
    follows an operator, or a glued ':' as in 7:50).

    Unit words (``_units``) between a number and an operator are skipped: "4 * 20 sheep = 80
    sheep" is checked as 4 * 20 = 80.
    """
    start = eq
    while start > 0 and (toks[start - 1].kind in ("num", "op") or _is_unit(toks, start - 1, units)):
        start -= 1
    left = [t for t in toks[start:eq] if t.kind != "word"]
    while left and left[0].value == ")":
        left = left[1:]
    while left and left[0].value == "(" and sum(t.value == "(" for t in left) > sum(
            t.value == ")" for t in left):
        left = left[1:]
    if not left:
        return None
    before = toks[start - 1] if start > 0 else None
    if before is not None and (
            before.kind == "var"
            or (before.kind == "word" and len(before.value) == 1)
            or (before.kind == "word" and start > 1 and toks[start - 2].kind == "op")
            or (before.value == ":" and before.end == left[0].start and start > 1
                and toks[start - 2].kind == "num" and toks[start - 2].end == before.start)):
        return None
    if left[0].kind == "op" and left[0].value != "(" and not (
            left[0].value == "-" and (before is None or before.kind in ("junk", "eq"))):
        return None
    return left


def _right_operand(toks: list[Tok], eq: int, units: set[str]) -> list[Tok] | None:
    """The numbers and operators right after the '=' at ``toks[eq]`` (unit words skipped), or
    None when nothing is claimed or the claim continues into a variable ("= 30 + M")."""
    end = eq + 1
    while end < len(toks) and (toks[end].kind in ("num", "op") or _is_unit(toks, end, units)):
        end += 1
    right = [t for t in toks[eq + 1:end] if t.kind != "word"]
    while right and right[-1].value == "(":
        right = right[:-1]
    if not right or (right[0].kind == "op" and right[0].value not in "(-") \
            or (right[-1].kind == "op" and right[-1].value != ")"):
        return None
    after = toks[end] if end < len(toks) else None
    if after is not None and after.value == ":" and after.start == right[-1].end:
        return None  # a time, 8:20
    return right


def _free_text_checks(line: str) -> list[bool]:
    """Results of the equations ``<expression with an operator> = <claim>`` in prose.

    The sides are the runs of numbers and operators around '=' (``_left_operand``,
    ``_right_operand``); the claim passes if the left value equals any prefix of the right run
    that is an expression, so "5*2 = 10 + 3 = 13", "6/8 = 3/4" and "3/2 = 1 1/2" read
    naturally. Every plausible reading of a side is tried (``_readings``), and a claim in cents
    is also read in dollars. Prose is ambiguous; when unsure this gives no check rather than a
    wrong one.
    """
    toks = _tokenize(line)
    units = _units(toks)
    results = []
    for eq, t in enumerate(toks):
        if t.kind != "eq":
            continue
        left = _left_operand(toks, eq, units)
        right = _right_operand(toks, eq, units)
        if left is None or right is None:
            continue
        lhs = [v for v, n_ops in _readings(left) if n_ops > 0]
        claims = [(v, _decimals(right[:k])) for k in range(1, min(len(right), MAX_TOKENS) + 1)
                  for v, _ in _readings(right[:k])]
        end = next((k for k in range(eq + 1, len(toks)) if toks[k].start >= right[-1].end), None)
        if end is not None and str(toks[end].value).lower() in ("cents", "cent"):
            claims += [(v / 100, d + 2) for v, d in claims]  # "$2.50 - $2.24 = 26 cents"
        if lhs and claims:
            results.append(any(_close(lv, rv, d) for lv in lhs for rv, d in claims))
    return results


_ANNOTATION = re.compile(r"<<([^<>]*)>>")


def line_checks(line: str) -> list[bool]:
    """Pass/fail of every arithmetic claim in one line: annotations, then free-text equations
    (with the annotations removed). An annotation without '=' is not a claim.

    >>> line_checks("It takes 2/2=<<2/2=1>>1 bolt")
    [True, True]
    >>> line_checks("So 9 * 2 = 19 dollars")
    [False]
    """
    checks = [_check_annotation(body) for body in _ANNOTATION.findall(line) if "=" in body]
    return checks + _free_text_checks(_ANNOTATION.sub("", line))


def label_arithmetic(response: str) -> StepLabels:
    """Step labels of any text by its arithmetic, one step per non-empty line (see module doc)."""
    spans = newline(response)
    labels = []
    for s, e in spans:
        checks = line_checks(response[s:e])
        labels.append(STEP_UNPARSEABLE if not checks else
                      STEP_CORRECT if all(checks) else STEP_WRONG)
    first = next((k for k, lab in enumerate(labels) if lab == STEP_WRONG), None)
    return StepLabels(labels=labels, spans=spans, first_error=first)


# ---- the task -------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """``$FINEGRAIN_GSM8K_DIR`` if set, else the copy shipped in the package
    (``finegrain/tasks/data/gsm8k``: the whole test split, 1,319 problems, and the first 500 of the
    7,473 train problems, MIT licence). For full training data set ``data_dir``, ``train_file`` or
    ``dataset=openai/gsm8k``."""
    env = os.environ.get("FINEGRAIN_GSM8K_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "data" / "gsm8k"


def make_example(question: Any, answer: Any, split: str, index: int, where: str,
                 fields: tuple[str, str] = FIELDS, **meta: Any) -> Example:
    """One Example from a GSM8K row; one-line errors start with ``gsm8k: <where>``.

    ``answer`` is GSM8K's reasoning ending in ``#### <number>``, or just a number (a string
    such as '1,234', or an int or float); then the example has no solution. ``fields`` names
    the two columns in errors.
    """
    q_field, a_field = fields
    if not isinstance(question, str):
        raise ValueError(f"gsm8k: {where}: missing or non-string field '{q_field}'")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)  # a numeric column (csv, parquet) or a JSON number
    if not isinstance(answer, str):
        raise ValueError(f"gsm8k: {where}: missing or non-string field '{a_field}'")
    reasoning, marker, final = answer.rpartition("####")
    value = normalize_number(final) if marker else _bare_number(answer)
    if value is None:
        raise ValueError(f"gsm8k: {where}: field '{a_field}' has no final '#### <number>' and is "
                         f"not a number")
    solution = (_ANNOTATION.sub("", reasoning.rstrip("\n")) + f"\n#### {value}") if marker else ""
    return Example(id=f"gsm8k-{split}-{index:05d}", prompt=question, answer=value,
                   solution=solution, meta={"annotated_solution": answer, **meta})


def load_jsonl(path: Path, split: str, fields: tuple[str, str] = FIELDS) -> list[Example]:
    """Examples from a GSM8K-format JSONL file; one-line errors name the file and line.
    ``fields`` = (question field, answer field)."""
    if not path.is_file():
        raise FileNotFoundError(f"gsm8k: {path} not found; expected JSONL with one object per line "
                                f"holding fields {', '.join(map(repr, fields))}")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            row = parse_json_object(raw, f"gsm8k: {where}", fields)
            out.append(make_example(row.get(fields[0]), row.get(fields[1]), split, len(out), where,
                                    fields, line=lineno))
    return out


@TASKS.register("gsm8k")
class GSM8KTask:
    """GSM8K from local JSONL files or a Hugging Face dataset; a split is read on first use.

    Args (keyword-only; each is checked before any work, ``task.kwargs.<name>: ...``):
        data_dir: folder holding ``train.jsonl`` and ``test.jsonl``; default
            ``default_data_dir()``.
        train_file / test_file: explicit JSONL paths; they override ``data_dir`` for their split.
        dataset: instead of the files, a Hugging Face dataset: a Hub name or a local path (a
            ``save_to_disk`` directory, or a directory or file of json/jsonl/parquet/csv); see
            ``finegrain.tasks.hf_data``. Cannot be combined with the three file arguments.
        dataset_config: the dataset's configuration name (e.g. ``main`` for ``openai/gsm8k``).
        train_split / test_split: the dataset's split names read as 'train' and 'test'.
        question_field / answer_field: the column (or JSON field) holding the question and the
            GSM8K-format answer.
    """

    name = "gsm8k"
    segmenter = "newline"

    def __init__(self, *, data_dir: str | os.PathLike | None = None,
                 train_file: str | os.PathLike | None = None,
                 test_file: str | os.PathLike | None = None,
                 dataset: str | None = None, dataset_config: str | None = None,
                 train_split: str = "train", test_split: str = "test",
                 question_field: str = "question", answer_field: str = "answer"):
        data_dir = check_str("data_dir", data_dir, optional=True, path=True)
        train_file = check_str("train_file", train_file, optional=True, path=True)
        test_file = check_str("test_file", test_file, optional=True, path=True)
        self.dataset = check_str("dataset", dataset, optional=True, path=True)
        self.dataset_config = check_str("dataset_config", dataset_config, optional=True)
        self.splits = {"train": check_str("train_split", train_split),
                       "test": check_str("test_split", test_split)}
        self.fields = (check_str("question_field", question_field),
                       check_str("answer_field", answer_field))
        if test_split == train_split:
            raise kwarg_error("test_split", f"a split other than train_split ({train_split!r})",
                              test_split)
        if answer_field == question_field:
            raise kwarg_error("answer_field",
                              f"a field other than question_field ({question_field!r})", answer_field)
        if self.dataset is not None:
            files = {"data_dir": data_dir, "train_file": train_file, "test_file": test_file}
            for key, value in files.items():
                if value is not None:
                    raise kwarg_error(key, "null when task.kwargs.dataset is set", value)
        else:
            for key, value, default in (("dataset_config", dataset_config, None),
                                        ("train_split", train_split, "train"),
                                        ("test_split", test_split, "test")):
                if value != default:
                    raise kwarg_error(key, f"{default!r} (it applies to task.kwargs.dataset, which "
                                           f"is not set)", value)
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        self.files = {"train": Path(train_file) if train_file else root / "train.jsonl",
                      "test": Path(test_file) if test_file else root / "test.jsonl"}
        self._cache: dict[str, list[Example]] = {}
        self._dataset_splits: dict[str, Any] | None = None

    def _load(self, split: str) -> list[Example]:
        if self.dataset is None:
            return load_jsonl(self.files[split], split, self.fields)
        if self._dataset_splits is None:
            self._dataset_splits = load_splits(self.dataset, config=self.dataset_config)
        name = self.splits[split]
        rows = load_columns(self.dataset, name,
                            {"question_field": self.fields[0], "answer_field": self.fields[1]},
                            split_kwarg=f"{split}_split", splits=self._dataset_splits)
        return [make_example(q, a, split, i, f"{self.dataset} [{name}] row {i}", self.fields, row=i)
                for i, (q, a) in enumerate(rows)]

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        """The first ``n`` examples of ``split`` in source order (all if n is None or larger)."""
        if split not in SPLITS:
            raise ValueError(f"gsm8k: split must be one of {SPLITS}, got {split!r}")
        if n is not None and (not isinstance(n, int) or n < 0):
            raise ValueError(f"gsm8k: n must be None or an integer >= 0, got {n!r}")
        if split not in self._cache:
            self._cache[split] = self._load(split)
        return list(self._cache[split][:n])

    def format_prompt(self, example: Example) -> str:
        return example.prompt

    def verify(self, example: Example, response: str) -> float:
        """1.0 iff the final answer of ``response`` equals the reference number according to
        math-verify (``finegrain.tasks.answers.is_equivalent``), else 0.0. Never raises."""
        return 1.0 if is_equivalent(example.answer, response) else 0.0

    def label_steps(self, example: Example, response: str) -> StepLabels:
        """Arithmetic labels per line (``label_arithmetic``); the example is not needed."""
        return label_arithmetic(response)
