"""GSM8K: grade-school word problems, a numeric verifier, and step labels for the arithmetic.

Data: JSONL with ``question`` and ``answer`` per line, where ``answer`` is GSM8K's reasoning
with calculator annotations and a final marker::

    She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.
    #### 18

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

import json
import math
import os
import re
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

from finegrain.segment import newline
from finegrain.tasks import TASKS
from finegrain.tasks.base import STEP_CORRECT, STEP_UNPARSEABLE, STEP_WRONG, Example, StepLabels

SPLITS = ("train", "test")
FIELDS = ("question", "answer")

# ---- numbers --------------------------------------------------------------------------------

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
    if not m:
        return None
    text = m.group(0).replace(" ", "")
    if "/" in text:
        num, den = text.split("/")
        if Fraction(den) == 0:
            return None
        value = Fraction(num) / Fraction(den)
        d = value.denominator
        while d % 2 == 0:
            d //= 2
        while d % 5 == 0:
            d //= 5
        if d != 1:
            return f"{value.numerator}/{value.denominator}"
        dec = Decimal(value.numerator) / Decimal(value.denominator)
    else:
        dec = Decimal(text)
    out = f"{dec.normalize():f}"
    return "0" if out in ("-0", "0") else out


_MARKER = re.compile(r"####(.*)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_LINE = re.compile(r"answer\s*(?:is|:|=)\s*:?(.*)|^\s*A\s*:(.*)", re.IGNORECASE | re.MULTILINE)


def extract_answer(text: str) -> str | None:
    """The final answer of a free-form solution, normalised, or None.

    Looks, in order, for: the last ``#### n`` marker; the last ``\\boxed{n}``; the last
    "answer is n" / "Answer: n" / line-initial "A: n"; the last number anywhere in the text.
    A candidate without a number falls through to the next rule.

    >>> extract_answer("blah\\n#### 1,450,000")
    '1450000'
    >>> extract_answer("Answer: $72.00 in total")
    '72'
    >>> extract_answer("3 + 4 = 7, then 7 * 2 = 14 cookies")
    '14'
    >>> extract_answer("no numbers") is None
    True
    """
    for pattern in (_MARKER, _BOXED, _ANSWER_LINE):
        for m in reversed(list(pattern.finditer(text))):
            tail = next(g for g in m.groups() if g is not None)
            got = normalize_number(tail.split("\n")[0])
            if got is not None:
                return got
    numbers = _NUMBER.findall(_clean(text))
    return normalize_number(numbers[-1]) if numbers else None


def _to_fraction(canonical: str) -> Fraction:
    return Fraction(canonical)


def numbers_match(got: str, ref: str, *, rel_tol: float = 1e-6) -> bool:
    """Numeric equality of two canonical number strings, relative tolerance ``rel_tol``."""
    a, b = float(_to_fraction(got)), float(_to_fraction(ref))
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-12)


# ---- arithmetic checks ----------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(%?)|([-+*/()x×÷X])|(\$)|(.))")
_OPS = {"x": "*", "X": "*", "×": "*", "÷": "/"}


def _tokenize(text: str) -> list[tuple[str, object]]:
    """('num', (Fraction, is_percent, decimals shown)) | ('op', one of '+-*/()') | ('junk', char);
    '$' and spaces are dropped."""
    out = []
    for m in _TOKEN.finditer(text):
        num, pct, op, _dollar, junk = m.groups()
        if num is not None:
            decimals = len(num.partition(".")[2])
            out.append(("num", (Fraction(num.replace(",", "")), pct == "%", decimals)))
        elif op is not None:
            out.append(("op", _OPS.get(op, op)))
        elif junk is not None and not junk.isspace():
            out.append(("junk", junk))
    return out


class _Parser:
    """Recursive descent: expr := term (+|- term)*; term := unary (*|/ unary)*;
    unary := (+|-) unary | number | ( expr ). Percent signs divide by 100 when ``percent``."""

    def __init__(self, tokens, percent: bool):
        self.tokens, self.pos, self.percent, self.binary_ops = tokens, 0, percent, 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)

    def take(self):
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
        while self.peek() in (("op", "*"), ("op", "/")):
            op = self.take()[1]
            rhs = self.unary()
            self.binary_ops += 1
            if op == "/" and rhs == 0:
                raise ZeroDivisionError
            value = value * rhs if op == "*" else value / rhs
        return value

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


def evaluate(tokens_or_text, *, percent: bool = True) -> tuple[Fraction, int]:
    """Exact value of an arithmetic expression and its number of binary operations.
    Raises ValueError (or ZeroDivisionError) if it is not one complete expression.

    >>> evaluate("(80000+50000)*1.5")
    (Fraction(195000, 1), 2)
    >>> evaluate("20% * 50")
    (Fraction(10, 1), 1)
    """
    tokens = _tokenize(tokens_or_text) if isinstance(tokens_or_text, str) else tokens_or_text
    if not tokens:
        raise ValueError("empty expression")
    p = _Parser(tokens, percent)
    value = p.expr()
    if p.pos != len(tokens):
        raise ValueError("trailing tokens")
    return value, p.binary_ops


def _close(value: Fraction, claimed: Fraction, decimals: int) -> bool:
    """``claimed`` states ``value``: equal up to 1e-6 relative, or, when the claim is written with
    d decimals, within one unit of its last digit (GSM8K rounds and truncates: 10/3 = 3.33)."""
    if math.isclose(float(value), float(claimed), rel_tol=1e-6, abs_tol=1e-12):
        return True
    return decimals > 0 and abs(value - claimed) <= Fraction(1, 10 ** decimals)


def _decimals(tokens) -> int:
    """Decimals shown when ``tokens`` is one number (a rounded claim), else 0 (exact claim)."""
    return tokens[0][1][2] if len(tokens) == 1 and tokens[0][0] == "num" else 0


def _check_annotation(body: str) -> bool:
    """``expr=c`` (c may itself be an expression): every side evaluates and all are equal."""
    sides = body.split("=")
    try:
        values = [evaluate(side) for side in sides]
    except (ValueError, ZeroDivisionError):
        return False
    first = values[0][0]
    return all(_close(first, v, _decimals(_tokenize(side)))
               for side, (v, _) in zip(sides[1:], values[1:]))


_RUN_CHARS = set("0123456789.,$% +-*/()x×÷X\t")


def _free_text_checks(text: str) -> list[bool]:
    """Results of the equations ``<expression with an operator> = <number>`` in prose.

    The left side is the longest run of expression characters right before '=' that parses
    with at least one operator; the claim is passed if the left value equals any parseable
    prefix of the right side (so both "5*2 = 10 + 3 = 13" and "6/8 = 3/4" read naturally). With
    a '%' in either side, both readings of '%' (÷100 and none) are tried.
    """
    results = []
    for m in re.finditer(r"(?<![<>=!])=(?!=)", text):
        i = m.start()
        j = i
        while j > 0 and text[j - 1] in _RUN_CHARS:
            j -= 1
        left = _tokenize(text[j:i])
        while left and left[-1][0] == "junk":
            left.pop()
        cut = max((k + 1 for k, (kind, _) in enumerate(left) if kind == "junk"), default=0)
        left = left[cut:]
        k = i + 1
        while k < len(text) and text[k] in _RUN_CHARS:
            k += 1
        right = _tokenize(text[i + 1:k])
        cut = next((n for n, (kind, _) in enumerate(right) if kind == "junk"), len(right))
        right = right[:cut]
        lhs_values = _longest_suffix_values(left)
        if not lhs_values:
            continue
        rhs = _prefix_claims(right)
        if not rhs:
            continue
        results.append(any(_close(lv, rv, dec) for lv in lhs_values for rv, dec in rhs))
    return results


def _longest_suffix_values(tokens) -> list[Fraction]:
    """Values (for both readings of %) of the longest suffix that is an expression with ≥1 op."""
    for start in range(len(tokens)):
        values = []
        for percent in (True, False):
            try:
                value, n_ops = evaluate(tokens[start:], percent=percent)
            except (ValueError, ZeroDivisionError):
                break
            if n_ops == 0:
                break
            values.append(value)
        if values:
            return values
    return []


def _prefix_claims(tokens) -> list[tuple[Fraction, int]]:
    """(value, decimals shown) for every prefix of the right side that is an expression."""
    claims = []
    for end in range(1, len(tokens) + 1):
        for percent in (True, False):
            try:
                value, _ = evaluate(tokens[:end], percent=percent)
            except (ValueError, ZeroDivisionError):
                continue
            claims.append((value, _decimals(tokens[:end])))
    return claims


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
    """``$FINEGRAIN_GSM8K_DIR`` if set, else ``<repo>/../shared/data/gsm8k``."""
    env = os.environ.get("FINEGRAIN_GSM8K_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"


def load_jsonl(path: Path, split: str) -> list[Example]:
    """Examples from a GSM8K-format JSONL file; one-line errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"gsm8k: {path} not found; expected JSONL with one object per line "
                                f"holding fields {', '.join(map(repr, FIELDS))}")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as err:
                raise ValueError(f"gsm8k: {where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"gsm8k: {where}: expected a JSON object with fields "
                                 f"{', '.join(map(repr, FIELDS))}")
            for key in FIELDS:
                if not isinstance(row.get(key), str):
                    raise ValueError(f"gsm8k: {where}: missing or non-string field '{key}'")
            reasoning, marker, final = row["answer"].rpartition("####")
            answer = normalize_number(final) if marker else None
            if answer is None:
                raise ValueError(f"gsm8k: {where}: field 'answer' has no final '#### <number>'")
            reasoning = reasoning.rstrip("\n")
            solution = _ANNOTATION.sub("", reasoning) + f"\n#### {answer}"
            out.append(Example(id=f"gsm8k-{split}-{len(out):05d}", prompt=row["question"],
                               answer=answer, solution=solution,
                               meta={"annotated_solution": row["answer"], "line": lineno}))
    return out


@TASKS.register("gsm8k")
class GSM8KTask:
    """GSM8K from local JSONL files. Files are read on first use of a split.

    Args (keyword-only):
        data_dir: folder holding ``train.jsonl`` and ``test.jsonl``; default
            ``default_data_dir()``.
        train_file / test_file: explicit paths; they override ``data_dir`` for their split.
    """

    name = "gsm8k"
    segmenter = "newline"

    def __init__(self, *, data_dir: str | os.PathLike | None = None,
                 train_file: str | os.PathLike | None = None,
                 test_file: str | os.PathLike | None = None):
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        self.files = {"train": Path(train_file) if train_file else root / "train.jsonl",
                      "test": Path(test_file) if test_file else root / "test.jsonl"}
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        """The first ``n`` examples of ``split`` in file order (all if n is None or larger)."""
        if split not in SPLITS:
            raise ValueError(f"gsm8k: split must be one of {SPLITS}, got {split!r}")
        if split not in self._cache:
            self._cache[split] = load_jsonl(self.files[split], split)
        return list(self._cache[split][:n])

    def format_prompt(self, example: Example) -> str:
        return example.prompt

    def verify(self, example: Example, response: str) -> float:
        """1.0 iff ``extract_answer(response)`` equals the reference number (1e-6 relative)."""
        got = extract_answer(response)
        return 1.0 if got is not None and numbers_match(got, example.answer) else 0.0

    def label_steps(self, example: Example, response: str) -> StepLabels:
        """Arithmetic labels per line (``label_arithmetic``); the example is not needed."""
        return label_arithmetic(response)
