"""arith's operation chains with the final answer in English words, and no rule verifier for training.

The problems, prompts, splits, step lines and step labels are arith's (``finegrain.tasks.arith``,
delegated to an ``ArithTask`` built with the same kwargs); only the answer line differs::

    prompt    "Q: 7 +5 *3 -4\\n"
    solution  "7+5=12\\n12*3=36\\n36-4=32\\nA: thirty-two"

``Example.answer`` is the reference answer in canonical words (``number_to_words``): tens and
units joined by a hyphen, no "and", e.g. "one hundred five", "two thousand forty-one".
Equivalent forms exist ("thirty two", "Thirty-Two", "32", "one hundred and five"), so an exact
string match is not a verifier.

**The rule verifier is for evaluation only.** ``verify`` is an exact check that accepts every
equivalent form (``parse_number``), and ``finegrain eval`` and the trainer's periodic evaluation
measure accuracy with it. The class attribute ``train_verifier = False`` declares that no
training signal may call it: ``finegrain.config.validate`` refuses a training config for this
task whose rewards include a signal that scores with the verifier (``verifier``, ``pear``, ...,
or any reward registered with ``needs="verify"``), which also covers the filters, since they
judge groups by one of the rewards. Train with a verifier-free signal such as ``rlpr``, which
scores the reference answer ``Example.answer`` under the policy. This is the setting of RLPR:
general-domain answers that a rule cannot check.

>>> number_to_words(32), number_to_words(105), number_to_words(2041)
('thirty-two', 'one hundred five', 'two thousand forty-one')
>>> parse_number("Thirty Two"), parse_number("one hundred and five"), parse_number("32"), parse_number("thirty")
(32, 105, 32, 30)
>>> parse_number("thirty thirty") is None, parse_number("twelve hundred") is None
(True, True)
>>> task = ArithWordsTask()
>>> ex = Example("x", "Q: 7 +5 *3 -4\\n", "thirty-two", meta={"start": 7, "ops": [["+", 5], ["*", 3], ["-", 4]]})
>>> task.verify(ex, "7+5=12\\n12*3=36\\n36-4=32\\nA: Thirty Two"), task.verify(ex, "7+5=12\\nA: 32")
(1.0, 1.0)
>>> task.label_steps(ex, "7+5=12\\n12*3=36\\n36-4=32\\nA: thirty-two").labels
[1, 1, 1, 1]
"""

from __future__ import annotations

import re

from finegrain.segment import newline
from finegrain.tasks import TASKS
from finegrain.tasks.arith import ArithTask
from finegrain.tasks.base import Example, StepLabels

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ((10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand"))
MAX_WORDS = 10 ** 12 - 1  # number_to_words covers |n| <= this (arith's values stay <= 10,000)

_WORD_VALUE = {w: i for i, w in enumerate(_ONES)} | {w: 10 * i for i, w in enumerate(_TENS) if w}
_SCALE_VALUE = {name: scale for scale, name in _SCALES}
_DIGITS_RE = re.compile(r"-?\d{1,100}")
# an answer line: "A:" at the start of a line (optional spaces), then the answer up to the end of the line
_ANSWER_LINE_RE = re.compile(r"\s*A\s*:(.*)")


def _below_thousand(n: int) -> str:
    """Words for 0 <= n < 1000."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, units = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[units]}" if units else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" {_below_thousand(rest)}" if rest else "")


def number_to_words(n: int) -> str:
    """Canonical English words for an integer with |n| <= 10^12 − 1: tens and units joined by a
    hyphen, groups of three digits named by their scale, no "and", "minus" for a negative value.

    >>> [number_to_words(n) for n in (0, 19, 40, 99, 100)]
    ['zero', 'nineteen', 'forty', 'ninety-nine', 'one hundred']
    >>> [number_to_words(n) for n in (999, 10_000, -3)]
    ['nine hundred ninety-nine', 'ten thousand', 'minus three']
    """
    if not isinstance(n, int) or isinstance(n, bool) or abs(n) > MAX_WORDS:
        raise ValueError(f"number_to_words: expected an integer with |n| <= {MAX_WORDS}, got {n!r}")
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 1000:
        return _below_thousand(n)
    parts = []
    for scale, name in _SCALES:
        if n >= scale:
            parts.append(f"{_below_thousand(n // scale)} {name}")
            n %= scale
    if n:
        parts.append(_below_thousand(n))
    return " ".join(parts)


def _normal(text: str) -> str:
    """Case, hyphens between words, repeated spaces and an "and" between a scale word and the next word do not count."""
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text.strip().lower())
    text = " ".join(text.split())
    return re.sub(r"\b(hundred|thousand|million|billion) and (?=[a-z])", r"\1 ", text)


def parse_number(text: str) -> int | None:
    """The integer written in ``text``, or None: digits (``-?\\d+``, at most 100) or the words of
    ``number_to_words`` up to case, a hyphen or a space between tens and units, and an "and" after
    "hundred"/"thousand"/... ; surrounding spaces and one final "." are ignored. Any other form
    (e.g. "thirty thirty", "twelve hundred", "thirty-two apples") is None.

    Words are read by accumulating their values and accepted only if writing the result back
    (``number_to_words``) gives the same normalised text, so exactly one spelling per value (up
    to the variations above) is accepted.
    """
    text = text.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    if _DIGITS_RE.fullmatch(text):
        return int(text)
    norm = _normal(text)
    words = norm.split()
    sign = 1
    if words and words[0] == "minus":
        sign, words = -1, words[1:]
    if not words:
        return None
    total = current = 0
    for w in words:
        if w in _WORD_VALUE:
            current += _WORD_VALUE[w]
        elif w == "hundred":
            current *= 100
        elif w in _SCALE_VALUE:
            total, current = total + current * _SCALE_VALUE[w], 0
        else:
            return None
    value = sign * (total + current)
    if abs(value) > MAX_WORDS or _normal(number_to_words(value)) != norm:
        return None
    return value


def parse_answer(response: str) -> int | None:
    """The value of the last answer line ``A: <number>`` whose answer (the rest of the line)
    ``parse_number`` reads, or None. Unlike arith, nothing may follow the answer on its line."""
    found = None
    for line in response.split("\n"):
        m = _ANSWER_LINE_RE.fullmatch(line)
        if m:
            value = parse_number(m.group(1))
            found = value if value is not None else found
    return found


def digits_answer_lines(response: str) -> str:
    """``response`` with each answer line rewritten as arith's ``A: <int>`` when its answer
    parses, and as "?" (UNPARSEABLE for arith) when it does not; other lines are unchanged. Lines
    stay lines and stay non-empty, so the newline segmenter gives the same number of steps.

    >>> digits_answer_lines("7+5=12\\nA: twelve\\nA: lots")
    '7+5=12\\nA: 12\\n?'
    """
    out = []
    for line in response.split("\n"):
        m = _ANSWER_LINE_RE.fullmatch(line)
        if m:
            value = parse_number(m.group(1))
            line = f"A: {value}" if value is not None else "?"
        out.append(line)
    return "\n".join(out)


def words_solution(text: str) -> str:
    """An arith solution or SFT trace (its last line ``A: <int>``) with the answer in words.

    >>> words_solution("7+5=12\\nA: 12")
    '7+5=12\\nA: twelve'
    """
    head, sep, last = text.rpartition("\n")
    m = re.fullmatch(r"A: (-?\d+)", last)
    if m is None:
        raise ValueError(f"arith_words: expected a trace ending in 'A: <int>', got {last[:40]!r}")
    return head + sep + "A: " + number_to_words(int(m.group(1)))


@TASKS.register("arith_words")
class ArithWordsTask:
    """arith's problems (every kwarg means what it means for ``ArithTask``, which checks them)
    with the answer line in words. ``verify`` is for evaluation only (``train_verifier``)."""

    name = "arith_words"
    segmenter = "newline"
    train_verifier = False  # verify is an exact check for evaluation; config validation refuses it in training

    def __init__(self, *, min_steps: int = 2, max_steps: int = 4, max_start: int = 20, max_operand: int = 9,
                 max_value: int = 99, ops: str = "+-*", seed: int = 0, skill_gap_op: str | None = None,
                 skill_gap_rate: float = 0.0, miracle_fraction: float = 0.0):
        self.arith = ArithTask(min_steps=min_steps, max_steps=max_steps, max_start=max_start,
                               max_operand=max_operand, max_value=max_value, ops=ops, seed=seed,
                               skill_gap_op=skill_gap_op, skill_gap_rate=skill_gap_rate,
                               miracle_fraction=miracle_fraction)
        self._cache: dict[str, list[Example]] = {"train": [], "test": []}

    # ---- problems -------------------------------------------------------------------------

    def _example(self, ex: Example) -> Example:
        return Example(id=ex.id.replace("arith-", "arith_words-", 1), prompt=ex.prompt,
                       answer=number_to_words(int(ex.answer)), solution=words_solution(ex.solution),
                       meta=dict(ex.meta))

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        """arith's examples of ``split`` (same problems, order, split rule and meta), with the
        answer and the solution's answer line in words."""
        base = self.arith.examples(split, n)
        done = self._cache[split]
        done.extend(self._example(ex) for ex in base[len(done):])
        return done[:len(base)]

    def num_problems(self) -> int:
        return self.arith.num_problems()

    # ---- scoring (evaluation only) --------------------------------------------------------

    def format_prompt(self, example: Example) -> str:
        return example.prompt

    def verify(self, example: Example, response: str) -> float:
        """1.0 iff the last answer line's number (words in any accepted form, or digits) equals
        the reference answer's. For evaluation only: ``train_verifier`` is False."""
        got, want = parse_answer(response), parse_number(example.answer)
        return 1.0 if got is not None and got == want else 0.0

    def extract_answer(self, response: str) -> str | None:
        """The final answer as digits (what majority votes in ``finegrain eval`` compare)."""
        got = parse_answer(response)
        return None if got is None else str(got)

    def label_steps(self, example: Example, response: str) -> StepLabels:
        """arith's labels (``ArithTask.label_steps``) of the response with its answer lines in
        digits (``digits_answer_lines``): computation lines are labelled exactly as in arith, and
        an answer line by arith's rule for the number it writes (UNPARSEABLE if no number
        parses). Spans are the newline segmenter's on ``response`` itself."""
        labelled = self.arith.label_steps(example, digits_answer_lines(response))  # same lines, one label each
        return StepLabels(labels=labelled.labels, spans=newline(response), first_error=labelled.first_error)

    # ---- SFT data -------------------------------------------------------------------------

    def sft_corpus(self, n: int, flawed_fraction: float = 0.0, seed: int = 0) -> list[tuple[Example, str]]:
        """arith's SFT corpus (same traces, slips, skill gaps and miracles for the same
        arguments), each trace's answer line in words."""
        corpus = self.arith.sft_corpus(n, flawed_fraction, seed)
        return [(ex, words_solution(text)) for ex, (_, text) in zip(self.examples("train", n), corpus)]
