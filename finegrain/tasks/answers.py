"""Final answers of free-form math solutions: extraction and equivalence through math-verify.

``math_verify.parse`` finds and parses the final answer (LaTeX through latex2sympy, plain
numbers and expressions through its own regexes and sympy) and ``math_verify.verify`` decides
equivalence (exact for rationals, floats rounded to 6 decimals, percentages, ...). This module
adds only what math-verify does not do, as a rewrite of the text *before* it is parsed
(``prepare``), a marker rule, and guards that keep every call bounded in time.

Which path each case takes (each was checked on math-verify 0.9):

=============================================  =========================================
case                                           path
=============================================  =========================================
``\\boxed{\\frac{3}{4}}``, ``$\\frac{1}{2}$``      math-verify (LaTeX)
``A: 3 + 4 = 7``, "the answer is 3. ... is 4"  math-verify (anchors, last ``=``, last match)
``1 000 000``, ``$1,234.50``, ``50%``          math-verify (plain numbers)
``2\\frac{1}{2}`` (LaTeX mixed number)          math-verify (LaTeX)
``#### 18``                                    own rule: math-verify does not know GSM8K's
                                               marker and would read the last number after
                                               it; the rest of the line after the last
                                               ``####`` that holds an answer is read first
                                               (through math-verify, or directly when it is
                                               a plain number: 10x faster)
``2 1/2``, ``5 and 2/3`` (mixed numbers)       own rewrite to ``5/2``, ``17/3``:
                                               math-verify reads ``2 1/2`` as 2·1/2 = 1
``\\boxed{1 000}``, ``\\boxed{1\\,000}``          own rewrite to ``1000``: latex2sympy reads
                                               the spaces as products (1·0·0·0)
``twelve``, ``forty-two``,                     own rewrite to digits: math-verify has no
``one hundred and five``                       number words. Only where an answer is
                                               expected (after "answer is", "answer:",
                                               ``####``, ``\\boxed{``, a line-initial
                                               ``A:``), or anywhere when the text has no
                                               digit at all, so that prose such as "one for
                                               each day" does not become the last number
``−5`` (U+2212), ``-.5``                       own rewrite to ``-5``, ``-0.5``
=============================================  =========================================

Time bounds. The verifier runs on every rollout, possibly off the main thread, where
math-verify's timeout (``signal.alarm``) cannot work. So every call is bounded by its input
instead: whitespace runs are collapsed and only the last ``MAX_CHARS`` characters are read
(math-verify's regexes are quadratic on long runs of spaces or digits), LaTeX is not parsed when
brackets nest deeper than ``MAX_NESTING`` (latex2sympy slows down steeply with depth: about 0.5 s
at depth 6), and a parsed answer is compared only if it is a small arithmetic expression
(``is_cheap``: no power towers such as ``9^{9^{9^9}}``, factorials or sums, on which sympy
may not finish). In the main thread math-verify's own 5 s timeout is kept as a backstop; note
that it uses SIGALRM and cancels any alarm the caller had set.

Python's ``eval`` is not used here. (math-verify hands plain expressions to
``sympy.parse_expr``, which does evaluate code, but only text its regex limited to digits,
spaces and ``+ - * / ^ ( ) × ÷``.)

>>> extract_answer("So she pays 3 * 4 = 12 dollars.\\nThe answer is $\\\\frac{1}{2}$ of that.")
'0.5'
>>> extract_answer("#### 1,450,000"), extract_answer("The answer is forty-two")
('1450000', '42')
>>> is_equivalent("2.5", "It took 2 1/2 hours."), is_equivalent("2", "It took 2 1/2 hours.")
(True, False)
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from functools import lru_cache

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

MAX_CHARS = 3000  # only the tail of a response is read: the final answer is at its end
MAX_NESTING = 6  # deeper brackets: plain expressions only, no LaTeX parsing
MAX_NODES = 200  # size of a parsed answer that is still compared
MAX_EXPONENT = 100  # |exponent| allowed in a power, multiplied along nested powers
MAX_BITS = 340  # integers and rationals up to about 100 digits
MARKER_LINE_CHARS = 200  # how much of the line after '####' is read
TIMEOUT_S = 5  # math-verify's own timeout, main thread only

# Same configs as math-verify's defaults, so its compiled-regex caches (size 1) are shared with
# any other caller that uses the defaults. Boxed answers come before "answer:" anchors.
_CONFIGS = (LatexExtractionConfig(), ExprExtractionConfig())
_PLAIN_ONLY = (ExprExtractionConfig(),)


# ---- canonical numbers ----------------------------------------------------------------------


def canonical_number(value: Fraction) -> str:
    """Canonical text of a rational: a decimal when it terminates, else ``p/q``; no trailing
    zeros, no '-0'.

    >>> [canonical_number(Fraction(x)) for x in ("72.00", "3/4", "1/3", "-0", "-5/2")]
    ['72', '0.75', '1/3', '0', '-2.5']
    """
    d, twos, fives = value.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    k = max(twos, fives)  # value = scaled / 10**k exactly
    scaled = abs(value.numerator) * (10**k // value.denominator)
    digits = str(scaled).rjust(k + 1, "0")
    whole, decimals = digits[:len(digits) - k], digits[len(digits) - k:].rstrip("0")
    sign = "-" if value < 0 else ""
    return sign + whole + ("." + decimals if decimals else "")


# ---- number words ---------------------------------------------------------------------------

_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_NUMBER_WORD = "|".join(sorted([*_UNITS, *_TENS, "hundred", *_SCALES], key=len, reverse=True))
_PHRASE = rf"\b(?:{_NUMBER_WORD})(?:(?:[ -]|\s+and\s+)(?:{_NUMBER_WORD}))*\b"
_PHRASE_RE = re.compile(_PHRASE, re.IGNORECASE)
_ANCHORED_PHRASE_RE = re.compile(
    rf"(answer\s*(?:is|was|=|:)?\s*:?\s*(?:\*\*)?\s*\$?\s*|####\s*\$?\s*|\\boxed\{{\s*|^[ \t]*A[ \t]*:\s*)"
    rf"({_PHRASE})", re.IGNORECASE | re.MULTILINE)


def words_to_number(phrase: str) -> int | None:
    """The integer a phrase of English number words spells, or None if it is not one number.

    Accepts units, teens, tens (``forty-two``), ``hundred`` (``fifteen hundred``), ``thousand``,
    ``million``, ``billion`` in decreasing order, and ``and`` after a scale word.

    >>> [words_to_number(p) for p in ["twelve", "Forty-two", "one hundred and five",
    ...                               "two thousand and twenty-one", "three four", "and"]]
    [12, 42, 105, 2021, None, None]
    """
    words = [w for w in re.split(r"[\s-]+", phrase.lower().strip()) if w]
    total, current, last, last_scale = 0, 0, None, None
    for k, w in enumerate(words):
        if w == "and":
            if last not in ("hundred", "scale") or k == len(words) - 1:
                return None
            continue
        if w == "zero":
            if len(words) != 1:
                return None
        elif w in _UNITS:  # 1..19
            if last not in (None, "hundred", "scale") and not (last == "ten" and _UNITS[w] < 10):
                return None
            current += _UNITS[w]
            last = "unit"
        elif w in _TENS:
            if last not in (None, "hundred", "scale"):
                return None
            current += _TENS[w]
            last = "ten"
        elif w == "hundred":
            if last not in ("unit", "ten") or current >= 100:
                return None
            current *= 100
            last = "hundred"
        elif w in _SCALES:
            scale = _SCALES[w]
            if current == 0 or (last_scale is not None and scale >= last_scale):
                return None
            total += current * scale
            current, last, last_scale = 0, "scale", scale
        else:
            return None
    return total + current


def _spell_numbers(text: str) -> str:
    """Number words written as digits, where an answer is expected, or everywhere when the text
    has no digit at all (see the module docstring)."""
    def digits(phrase: str) -> str:
        value = words_to_number(phrase)
        return phrase if value is None else str(value)

    if not any(c.isdigit() for c in text):
        return _PHRASE_RE.sub(lambda m: digits(m.group(0)), text)
    return _ANCHORED_PHRASE_RE.sub(lambda m: m.group(1) + digits(m.group(2)), text)


# ---- rewriting the text ---------------------------------------------------------------------

_SPACES = re.compile(r"\s+")
_MIXED = re.compile(r"(?<![\d.,/])(\d{1,9})(?: +| +and +)(\d{1,9})/(\d{1,9})(?!\d|/|\.\d)")
_SPACED_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:(?: |\\,|\\ |~)\d{3})+(?!\d|[.,]\d|/)")
_BARE_DECIMAL = re.compile(r"(?<![\d.])-\.(?=\d)")


def _mixed(m: re.Match) -> str:
    whole, num, den = int(m.group(1)), int(m.group(2)), int(m.group(3))
    return f"{whole * den + num}/{den}" if 0 < num < den else m.group(0)


def prepare(text: str) -> str:
    """The text math-verify reads: whitespace runs collapsed, the last ``MAX_CHARS``
    characters, U+2212 as '-', ``-.5`` as ``-0.5``, mixed numbers as fractions, space- or
    ``\\,``-separated thousands joined, number words as digits where an answer is expected.

    >>> prepare("It took   2 1/2\\n\\n hours, or 1 000 000 \\u22125 seconds. The answer is twelve.")
    'It took 5/2\\nhours, or 1000000 -5 seconds. The answer is 12.'
    """
    text = _SPACES.sub(lambda m: "\n" if "\n" in m.group(0) else " ", text)[-MAX_CHARS:]
    text = _BARE_DECIMAL.sub("-0.", text.replace("\u2212", "-"))
    text = _MIXED.sub(_mixed, text)
    text = _SPACED_THOUSANDS.sub(lambda m: re.sub(r"\D", "", m.group(0)), text)
    return _spell_numbers(text)


# ---- parsing with bounds --------------------------------------------------------------------


def _nesting(text: str) -> int:
    """Deepest nesting of ( [ { in ``text`` (unmatched closers are ignored)."""
    depth = deepest = 0
    for c in text:
        if c in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]}" and depth:
            depth -= 1
    return deepest


_ALLOWED = (sympy.Number, sympy.NumberSymbol, sympy.Symbol, sympy.Add, sympy.Mul, sympy.Pow,
            sympy.UnevaluatedExpr, sympy.Eq, sympy.FiniteSet, sympy.Tuple)
_ALLOWED_ATOMS = (sympy.Number, sympy.NumberSymbol, sympy.Symbol, type(sympy.I))


def is_cheap(expr) -> bool:
    """True if ``expr`` is a small arithmetic expression that sympy compares quickly: at most
    ``MAX_NODES`` nodes of numbers, symbols, + × ^, equalities, sets and tuples; integers of at
    most ``MAX_BITS`` bits; powers whose exponents, multiplied along nested powers, stay within
    ``MAX_EXPONENT`` in absolute value.

    >>> x = sympy.Symbol("x")
    >>> is_cheap(sympy.Rational(3, 4)), is_cheap(sympy.Pow(2, 10, evaluate=False) + x)
    (True, True)
    >>> p = sympy.Pow(9, sympy.Pow(9, 9, evaluate=False), evaluate=False)
    >>> is_cheap(p), is_cheap(sympy.factorial(sympy.Integer(10**5), evaluate=False))
    (False, False)
    """
    if not isinstance(expr, sympy.Basic):
        return False
    stack, nodes = [(expr, 1)], 0
    while stack:
        node, power = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            return False
        if isinstance(node, sympy.Rational):
            if max(abs(node.p).bit_length(), node.q.bit_length()) > MAX_BITS:
                return False
        if not node.args:
            if not isinstance(node, _ALLOWED_ATOMS):
                return False
            continue
        if not isinstance(node, _ALLOWED):
            return False
        if isinstance(node, sympy.Pow):
            base, exponent = node.args
            if not isinstance(exponent, sympy.Number) or not exponent.is_finite:
                return False
            try:
                power *= abs(float(exponent))
            except OverflowError:
                return False
            if power > MAX_EXPONENT:
                return False
            stack += [(base, power), (exponent, 1)]
        else:
            stack += [(a, power) for a in node.args]
    return True


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _parse(text: str):
    """math-verify's answer in ``text`` if it is cheap to compare, else None."""
    configs = _CONFIGS if _nesting(text) <= MAX_NESTING else _PLAIN_ONLY
    timeout = TIMEOUT_S if _in_main_thread() else None
    try:
        found = parse(text, extraction_config=configs, fallback_mode="no_fallback",
                      parsing_timeout=timeout)
    except Exception:  # math-verify returns [] on its own errors; this is a second net
        return None
    value = next((v for v in found if isinstance(v, sympy.Basic)), None)
    return value if value is not None and is_cheap(value) else None


_MARKER = re.compile(r"####")
# a marker line that is just a number ("#### 1,234.50", "#### $18."): read directly, since
# math-verify spends most of its time turning number text into sympy (sympy.parse_expr)
_PLAIN_NUMBER = re.compile(r"\s*\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d{1,100})(?:\.\d{1,100})?)\s*\.?\s*")


def _marker_answer(line: str):
    """The answer on the rest of a ``####`` line: a plain number directly, else math-verify."""
    m = _PLAIN_NUMBER.fullmatch(line)
    if m:  # the types math-verify gives: Integer, or Float for a decimal (compared rounded)
        text = m.group(1).replace(",", "")
        return sympy.Float(text) if "." in text else sympy.Integer(text)
    return _parse(line)


def final_answer(text: str):
    """The final answer of a free-form solution as a sympy expression, or None.

    The text is rewritten (``prepare``); then the line after the last ``####`` marker that holds
    an answer is read, and without one, the whole text through math-verify (boxed answers,
    "final answer is", "answer:", the last ``=``, the last number, in its order of priority).

    >>> final_answer("#### 72.00\\nsome trailing chatter 5"), final_answer("#### 3/4 a day")
    (72.0000000000000, 3/4)
    >>> final_answer("I do not know") is None
    True
    """
    text = prepare(text)
    for m in reversed(list(_MARKER.finditer(text))):
        value = _marker_answer(text[m.end():].split("\n", 1)[0][:MARKER_LINE_CHARS])
        if value is not None:
            return value
    return _parse(text)


def _percent_base(expr):
    """``x`` for math-verify's percentage ``x·(1/100)`` (kept unevaluated), else ``expr``."""
    if (isinstance(expr, sympy.Mul) and len(expr.args) == 2
            and expr.args[1] == sympy.UnevaluatedExpr(sympy.Rational(1, 100))):
        return expr.args[0]
    return expr


def answer_text(expr) -> str:
    """Canonical text of a parsed answer: ``canonical_number`` for a rational or float (a
    percentage gives its number, ``50%`` → ``50``), else sympy's text.

    >>> answer_text(sympy.Float("72.00")), answer_text(sympy.Rational(1, 3))
    ('72', '1/3')
    """
    expr = _percent_base(expr)
    try:
        value = expr.doit() if isinstance(expr, sympy.Basic) else expr
        if isinstance(value, sympy.Rational):
            return canonical_number(Fraction(int(value.p), int(value.q)))
        if isinstance(value, sympy.Float):
            return canonical_number(Fraction(str(value)))
    except (ValueError, TypeError, ArithmeticError):
        pass
    return str(expr)


def extract_answer(text: str) -> str | None:
    """Canonical text of the final answer of ``text`` (``final_answer``), or None.

    >>> extract_answer("A: 3 + 4 = 7"), extract_answer("no numbers") is None
    ('7', True)
    """
    value = final_answer(text)
    return None if value is None else answer_text(value)


@lru_cache(maxsize=4096)
def reference_value(answer: str) -> sympy.Rational:
    """A numeric reference answer (``canonical_number`` text such as '18', '0.75', '1/3') as an
    exact sympy rational."""
    f = Fraction(answer)
    return sympy.Rational(f.numerator, f.denominator)


def is_equivalent(answer: str, response: str) -> bool:
    """True iff the final answer of ``response`` equals the numeric reference ``answer``
    according to ``math_verify.verify``. Never raises on any response text."""
    try:
        got = final_answer(response)
        if got is None:
            return False
        timeout = TIMEOUT_S if _in_main_thread() else None
        return bool(verify(reference_value(answer), got, timeout_seconds=timeout))
    except Exception:  # a response must never crash the trainer; it just scores 0
        return False
