"""arith's operation chains, solved with a calculator tool that the model decides when to use.

The problems, prompts and splits are arith's (``finegrain.tasks.arith``). The gold trace
computes an easy operation inline, as an arith line, and sends a hard one to ``calc``: an
operation ``a op b`` is hard iff ``op`` is in ``calc_ops`` (default ``*``) or ``a`` or ``b`` is
above ``calc_above`` (default 50). The tool's result stands for that operation's value::

    prompt   "Q: 7 +5 *3 -4\\n"
    trace    "7+5=12\\n<call>calc(12*3)</call>"   model turn 0
             "\\n<result>36</result>\\n"            observation
             "36-4=32\\nA: 32"                     model turn 1

Steps are model turns (segmenter ``tool_turns``, see ``finegrain.tasks.lookup``). Labels are
local, as arith's are: every computation, inline or by ``calc``, must start from the value the
previous one gave (the result of a call included), so a wrong step is WRONG and the steps that
carry its value on correctly are CORRECT.

>>> task = ArithCalcTask()
>>> ex = Example("x", "Q: 7 +5 *3 -4\\n", "32")
>>> task.label_steps(ex, "7+5=12\\n<call>calc(12*3)</call>\\n<result>36</result>\\n36-4=32\\nA: 32").labels
[1, 1]
>>> [t.kind for t in task.judge_turns(ex, "7+5=12\\n12*3=36\\n36-4=32\\nA: 32")]  # no calculator
['no_call']
>>> calc("(7+5)*3"), calc("-2*(3+4)")
('36', '-14')
>>> calc("12/3")
Traceback (most recent call last):
...
ValueError: calc takes integers, + - * and parentheses
"""

from __future__ import annotations

import random
import re
from typing import Callable

from finegrain.segment import Spans
from finegrain.tasks import TASKS
from finegrain.tasks.arith import _COMPUTE_RE, ArithTask, _apply, parse_answer
from finegrain.tasks.arith import _ANSWER_RE as _INT_ANSWER_RE
from finegrain.tasks.base import Example, StepLabels, check_int, kwarg_error
from finegrain.tasks.gsm8k import evaluate
from finegrain.tasks.lookup import (TurnJudgement, checklist, format_call, format_result, judged_turn,
                                    observation_spans, split_turn, step_labels, tool_sft_corpus, tool_turns)

MAX_EXPR_CHARS = 100  # bounds the parser's work and the size of a result
_CALC_CHARS = re.compile(r"[0-9+\-*()\s]+")
_IMPLICIT = re.compile(r"\d\s+\d|[\d)]\s*\(|\)\s*\d")  # "1 000", "2(3)", "(2)3": not calc syntax
_BINARY = re.compile(r"\s*(-?\d{1,100})\s*([-+*])\s*(\d{1,100})\s*")
_PROBLEM = re.compile(r"Q: (\d+)((?: [-+*]\d+)+)\n?")


# The docstrings of tools are their descriptions in chat templates (transformers' get_json_schema
# reads the Args/Returns sections), so they speak to the model; examples are in the module docstring.
# The expression is evaluated by gsm8k's exact parser, never eval.
def calc(expression: str) -> str:
    """Compute an integer arithmetic expression exactly.

    The expression may use integers (no leading zeros), + - *, unary minus and parentheses.

    Args:
        expression: the expression, e.g. 12*3 or (7+5)*3, at most 100 characters

    Returns:
        The value as an integer. Raises ValueError for anything else: another character,
        implicit multiplication such as 2(3), a space inside a number, an incomplete expression.
    """
    if not isinstance(expression, str):
        raise ValueError("calc takes an expression string")
    if len(expression) > MAX_EXPR_CHARS:
        raise ValueError(f"calc: expression longer than {MAX_EXPR_CHARS} characters")
    if not _CALC_CHARS.fullmatch(expression) or _IMPLICIT.search(expression):
        raise ValueError("calc takes integers, + - * and parentheses")
    value, _ = evaluate(expression, percent=False)  # ValueError if it is not one expression
    return str(int(value))


def parse_problem(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """(start, ops) of an arith prompt (``arith.format_problem``'s text).

    >>> parse_problem("Q: 7 +5 *3 -4\\n")
    (7, [('+', 5), ('*', 3), ('-', 4)])
    """
    m = _PROBLEM.fullmatch(prompt)
    if m is None:
        raise ValueError(f"arith_calc: not an arith prompt: {prompt[:40]!r}")
    return int(m.group(1)), [(t[0], int(t[1:])) for t in m.group(2).split()]


@TASKS.register("arith_calc")
class ArithCalcTask:
    """arith's problems (every arith kwarg means what it means there) with the ``calc`` tool.

    ``calc_ops``: operations always sent to ``calc`` (distinct characters of '+-*', may be
    empty); ``calc_above``: an operation with an operand above it is sent to ``calc`` too
    (integer >= 0). The arith kwargs are checked by ``ArithTask``; these two first.
    """

    name = "arith_calc"
    segmenter = "tool_turns"
    FLAW_KINDS = ("wrong_argument", "redundant_call", "no_call", "wrong_value")

    def __init__(self, *, min_steps: int = 2, max_steps: int = 4, max_start: int = 20,
                 max_operand: int = 9, max_value: int = 99, ops: str = "+-*", calc_ops: str = "*",
                 calc_above: int = 50, seed: int = 0):
        if not isinstance(calc_ops, str) or set(calc_ops) - set("+-*") or len(set(calc_ops)) != len(calc_ops):
            raise kwarg_error("calc_ops", "distinct characters from '+-*' (or '')", calc_ops)
        self.calc_above = check_int("calc_above", calc_above, low=0)
        self.calc_ops = calc_ops
        self.arith = ArithTask(min_steps=min_steps, max_steps=max_steps, max_start=max_start,
                               max_operand=max_operand, max_value=max_value, ops=ops, seed=seed)
        self._cache: dict[str, list[Example]] = {"train": [], "test": []}

    def is_hard(self, a: int, op: str, b: int) -> bool:
        """Whether the gold trace sends ``a op b`` to ``calc``. Decided from the operands only,
        so the model can decide before it computes."""
        return op in self.calc_ops or max(a, b) > self.calc_above

    # ---- problems -------------------------------------------------------------------------

    def trace(self, start: int, ops: list[tuple[str, int]], flaw: tuple[str, int, int] | None = None
              ) -> str:
        """The trace of a problem: each operation inline (``a op b=c`` and a newline) if easy,
        else a ``calc`` call and its result; then ``A: <last value>``. ``flaw = (kind, k, d)``
        changes operation k (see ``flawed_trace``); the operations after it follow the same rule
        from the values actually reached."""
        text, v = [], start
        for i, (op, b) in enumerate(ops):
            c = _apply(v, op, b)
            kind = flaw[0] if flaw and flaw[1] == i else None
            if kind in ("no_call", "wrong_value"):
                c += flaw[2]
                text.append(f"{v}{op}{b}={c}\n")
            elif kind == "wrong_argument":
                c = _apply(v + flaw[2], op, b)
                text.append(format_call("calc", [f"{v + flaw[2]}{op}{b}"]) + format_result(str(c)))
            elif kind == "redundant_call" or self.is_hard(v, op, b):
                call = format_call("calc", [f"{v}{op}{b}"]) + format_result(str(c))
                text.append(call * (2 if kind == "redundant_call" and self.is_hard(v, op, b) else 1))
            else:
                text.append(f"{v}{op}{b}={c}\n")
            v = c
        return "".join(text) + f"A: {v}"

    def _example(self, split: str, ex: Example) -> Example:
        start, ops = parse_problem(ex.prompt)
        values, gold_calls, v = [], [], start
        for op, b in ops:
            if self.is_hard(v, op, b):
                gold_calls.append(["calc", [f"{v}{op}{b}"]])
            v = _apply(v, op, b)
            values.append(str(v))
        return Example(id=ex.id.replace("arith-", "arith_calc-", 1), prompt=ex.prompt, answer=ex.answer,
                       solution=self.trace(start, ops),
                       meta={"gold_calls": gold_calls, "entities": values,
                             "checklist": checklist(gold_calls, ex.answer)})

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        """arith's examples of ``split`` (same problems, order and split rule), with calc traces."""
        base = self.arith.examples(split, n)
        done = self._cache[split]
        done.extend(self._example(split, ex) for ex in base[len(done):])
        return done[:len(base)]

    # ---- tools and scoring ----------------------------------------------------------------

    def format_prompt(self, example: Example) -> str:
        return example.prompt

    def tools(self, example: Example) -> dict[str, Callable[..., str]]:
        return {"calc": calc}

    @staticmethod
    def observation_spans(trace_text: str) -> Spans:
        """See ``finegrain.tasks.lookup.observation_spans``."""
        return observation_spans(trace_text)

    def verify(self, example: Example, response: str) -> float:
        """1.0 iff the last ``A: <int>`` line of the whole response equals the answer (arith's rule)."""
        got = parse_answer(response)
        return 1.0 if got is not None and str(got) == example.answer else 0.0

    def judge_turns(self, example: Example, response: str) -> list[TurnJudgement]:
        """Each model turn of any response, from the checks of its lines and its call.

        Computations are counted in order (i = 0, 1, ...), inline lines and ``calc`` calls
        alike; the current value is the start value, then the value of the last computation.
        - an inline line ``a op b=c`` is ``no_call`` if the i-th operation, from the current
          value, is hard (right or not: it should have been a call); else CORRECT iff a is the
          current value, (op, b) the i-th operation and c = a op b, and ``wrong_value`` if not
          (also past the last operation). The current value becomes c.
        - a ``calc`` call of exactly ``<current value><op><b>`` for the i-th operation is CORRECT
          if that operation is hard and ``redundant_call`` if it is easy; the same expression as
          an earlier call, or any call after the last operation, is ``redundant_call`` and counts
          for nothing; any other expression is ``wrong_argument`` and counts as the i-th
          computation, with its own value (the result the model sees). A call the tool refuses
          is ``wrong_argument`` and counts for nothing; another tool is ``wrong_tool``; a call
          that does not parse is ``malformed``.
        - ``A: n`` is CORRECT iff every operation was computed and n is the current value, else
          ``wrong_answer``.
        Other text is not checked; a turn with nothing to check is UNPARSEABLE.
        """
        start, ops = parse_problem(example.prompt)
        i, v, seen, out = 0, start, set(), []
        for s, e in tool_turns(response):
            body, call = split_turn(response[s:e])
            kinds = []
            for line in body.split("\n"):
                m = _COMPUTE_RE.fullmatch(line)
                if m:
                    a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
                    if i < len(ops) and self.is_hard(v, *ops[i]):
                        kinds.append("no_call")
                    else:
                        ok = i < len(ops) and a == v and (op, b) == ops[i] and c == _apply(a, op, b)
                        kinds.append("correct" if ok else "wrong_value")
                    i, v = i + 1, c
                    continue
                m = _INT_ANSWER_RE.fullmatch(line)
                if m:
                    kinds.append("correct" if i == len(ops) and int(m.group(1)) == v else "wrong_answer")
            if call is not None:
                kind, value = self._call_kind(call, ops, i, v, seen)
                kinds.append(kind)
                if value is not None:
                    i, v = i + 1, value
            out.append(judged_turn((s, e), kinds))
        return out

    def _call_kind(self, call, ops, i: int, v: int, seen: set) -> tuple[str, int | None]:
        """(kind, value of the computation it counts as, or None if it counts for nothing)."""
        if call.error:
            return "malformed", None
        if call.name != "calc":
            return "wrong_tool", None
        try:
            value = int(calc(*call.args))
        except (TypeError, ValueError):  # not one argument, or one calc refuses
            return "wrong_argument", None
        key = re.sub(r"\s", "", call.args[0])
        seen_before = key in seen
        seen.add(key)
        m = _BINARY.fullmatch(call.args[0])
        if i < len(ops) and m and int(m.group(1)) == v and (m.group(2), int(m.group(3))) == ops[i]:
            return ("correct" if self.is_hard(v, *ops[i]) else "redundant_call"), value
        if seen_before or i >= len(ops):
            return "redundant_call", None
        return "wrong_argument", value

    def label_steps(self, example: Example, response: str) -> StepLabels:
        """One label per model turn (``tool_turns`` spans); see ``judge_turns`` for the rules.
        ``first_error`` is the first turn that is not CORRECT."""
        return step_labels(self.judge_turns(example, response))

    # ---- SFT data -------------------------------------------------------------------------

    def flawed_trace(self, example: Example, rng: random.Random, kind: str | None = None
                     ) -> tuple[str, str] | None:
        """``(kind, text)``: the gold trace with one flaw at operation k; None if ``kind`` does
        not apply to the example (random among those that do if ``kind`` is None).

        - ``wrong_argument`` (a hard operation): the call's left value is off by ±1..±3, and the
          trace goes on from the result it gets;
        - ``redundant_call`` (any operation): an easy one sent to ``calc``, or a hard call made
          twice; the answer stays right;
        - ``no_call`` (a hard operation): computed inline, off by ±1..±3;
        - ``wrong_value`` (an easy operation): computed inline, off by ±1..±3.
        Shifts keep every later value >= 0 (and a wrong call's text new). Every operation is
        increasing in its left value, so the answer of all but ``redundant_call`` is wrong.
        """
        start, ops = parse_problem(example.prompt)
        v, values, hard = start, [], []
        for op, b in ops:
            hard.append(self.is_hard(v, op, b))
            values.append(v)
            v = _apply(v, op, b)
        where = {"wrong_argument": [k for k, h in enumerate(hard) if h],
                 "no_call": [k for k, h in enumerate(hard) if h],
                 "wrong_value": [k for k, h in enumerate(hard) if not h],
                 "redundant_call": list(range(len(ops)))}
        if kind is None:
            kind = rng.choice([k for k in self.FLAW_KINDS if where[k]])
        if kind not in where:
            raise ValueError(f"arith_calc: unknown flaw kind {kind!r}; kinds: {', '.join(self.FLAW_KINDS)}")
        if not where[kind]:
            return None
        k = rng.choice(where[kind])
        if kind == "redundant_call":
            return kind, self.trace(start, ops, (kind, k, 0))
        gold_exprs = {args[0] for _, args in example.meta["gold_calls"]} if example.meta else set()

        def ok(d: int) -> bool:
            a, (op, b) = values[k], ops[k]
            w = _apply(a + d, op, b) if kind == "wrong_argument" else _apply(a, op, b) + d
            if w < 0 or (kind == "wrong_argument" and (a + d < 0 or f"{a + d}{op}{b}" in gold_exprs)):
                return False
            for op2, b2 in ops[k + 1:]:
                w = _apply(w, op2, b2)
                if w < 0:
                    return False
            return True

        deltas = [d for d in (-3, -2, -1, 1, 2, 3) if ok(d)]
        if not deltas:
            return None
        return kind, self.trace(start, ops, (kind, k, rng.choice(deltas)))

    def sft_corpus(self, n: int, flawed_fraction: float = 0.0, seed: int = 0
                   ) -> list[tuple[Example, str]]:
        """``n`` (train example, trace) pairs; exactly round(n · flawed_fraction) of them, at
        positions chosen by ``seed``, carry a ``flawed_trace``, the kinds taken in turn
        (``FLAW_KINDS`` order, skipping one that does not apply to the example: ``redundant_call``
        always does), the rest the gold trace."""
        return tool_sft_corpus(self, n, flawed_fraction, seed)
