"""Synthetic multi-step arithmetic with exact step labels, sized for char-level models on a CPU.

A problem is a start value and a chain of operations applied left to right::

    prompt    "Q: 7 +5 *3 -4\\n"
    solution  "7+5=12\\n12*3=36\\n36-4=32\\nA: 32"

Steps are lines (segmenter ``newline``): one computation line per operation, then the answer
line. Texts are short on purpose: with a character-level tokenizer every character is a token.

Step labels are *local*: a computation line is correct when it starts from the value the
previous computation line wrote (whether or not that value was right), applies the problem's
next operation, and computes it correctly. So a response can reach the right answer through
wrong steps (a "miracle step"), and ``label_steps`` shows where.

The SFT corpus (``sft_corpus``) can be shaped by three constructor kwargs that never touch
``examples``, ``verify`` or ``label_steps`` (docs/testbed.md):

- ``skill_gap_op``/``skill_gap_rate``: a systematic skill gap; each ``skill_gap_op`` line is
  written as ``a op b = (a op b) + b`` with probability ``skill_gap_rate`` (``skill_gap_values``).
- ``miracle_fraction``: traces that reach the right answer through a wrong step and a later
  compensating wrong step (``compensated_values``).

>>> task = ArithTask(seed=0)
>>> ex = Example("x", "Q: 7 +5 *3 -4\\n", "32", meta={"start": 7, "ops": [["+", 5], ["*", 3], ["-", 4]]})
>>> task.verify(ex, "7+5=12\\n12*3=36\\n36-4=32\\nA: 32")
1.0
>>> task.label_steps(ex, "7+5=13\\n13*3=39\\n39-4=32\\nA: 32").labels  # two compensating errors
[0, 1, 0, 1]
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache

from finegrain.segment import newline
from finegrain.tasks import TASKS
from finegrain.tasks.base import (STEP_CORRECT, STEP_UNPARSEABLE, STEP_WRONG, Example, StepLabels,
                                  check_float, check_int, kwarg_error)

SPLITS = ("train", "test")
TEST_PER_MILLE = 100  # a problem is in 'test' iff sha1(prompt) mod 1000 < 100, so 10% of problems
# Sanity limits on the constructor arguments: they keep building the task and counting its
# problems to seconds (both grow with max_value x max_operand x max_steps).
MAX_STEPS_LIMIT, MAX_VALUE_LIMIT, MAX_OPERAND_LIMIT = 32, 10_000, 100

# integers are capped at 100 digits (longer is garbage, and int() refuses > 4300 digits)
_COMPUTE_RE = re.compile(r"\s*(-?\d{1,100})\s*([-+*])\s*(-?\d{1,100})\s*=\s*(-?\d{1,100})\s*")
# answer line: "A: <int>" at the start of a line; anything after the integer is ignored, except
# that "A: 3.5" (not an integer) is not an answer line
_ANSWER_RE = re.compile(r"\s*A\s*:\s*(-?\d{1,100})(?!\d|\.\d).*", re.DOTALL)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def skill_gap_values(start: int, ops: list[tuple[str, int]], gap_lines=(), *,
                     shift_at: int | None = None, shift: int = 0) -> list[int]:
    """The line results written by a solver with a skill gap: every line applies its operation
    to the previous *written* result; a line in ``gap_lines`` is off by its operand
    (``a op b`` written as ``(a op b) + b``: ``a*b`` as ``(a+1)*b``, ``a+b`` as ``a+2b``, ``a-b``
    as ``a``); line ``shift_at`` is further off by ``shift`` (a random slip).

    The gap error is > 0 and every operation is increasing in the carried value, so a gap line
    makes every later value, and the final answer, larger than the gold one.

    >>> skill_gap_values(7, [("+", 5), ("*", 3), ("-", 4)], [1])  # 12*3 written as 39
    [12, 39, 35]
    >>> skill_gap_values(7, [("+", 5), ("*", 3), ("-", 4)])  # no gap: the gold values
    [12, 36, 32]
    """
    values, a = [], start
    for k, (op, b) in enumerate(ops):
        a = _apply(a, op, b) + (b if k in gap_lines else 0) + (shift if k == shift_at else 0)
        values.append(a)
    return values


def compensated_values(start: int, ops: list[tuple[str, int]], wrong_at: int, shift: int,
                       fixed_at: int) -> list[int]:
    """Line results of a "miracle" trace: line ``wrong_at`` is off by ``shift``, the lines up to
    ``fixed_at`` continue correctly from the wrong value, line ``fixed_at`` writes the gold result
    anyway (a wrong computation that compensates), and the rest is gold. Needs
    0 <= wrong_at < fixed_at < len(ops) and shift != 0; then exactly lines ``wrong_at`` and
    ``fixed_at`` are wrong (each op is strictly increasing in the carried value) and the final
    answer is right.

    >>> compensated_values(7, [("+", 5), ("*", 3), ("-", 4)], wrong_at=0, shift=1, fixed_at=2)
    [13, 39, 32]
    """
    if not (0 <= wrong_at < fixed_at < len(ops)) or shift == 0:
        raise ValueError(f"compensated_values: needs 0 <= wrong_at < fixed_at < {len(ops)} and "
                         f"shift != 0, got wrong_at={wrong_at}, fixed_at={fixed_at}, shift={shift}")
    gold = skill_gap_values(start, ops)
    values = skill_gap_values(start, ops[:fixed_at], shift_at=wrong_at, shift=shift)
    return values + gold[fixed_at:]


def split_of(prompt: str) -> str:
    """The split a problem belongs to, from a stable hash of its canonical prompt (not the seed),
    so train and test never share a problem whatever seeds or sizes are used.

    >>> split_of("Q: 7 +5 *3 -4\\n") in SPLITS
    True
    """
    h = int.from_bytes(hashlib.sha1(prompt.encode()).digest()[:8], "big")
    return "test" if h % 1000 < TEST_PER_MILLE else "train"


def format_problem(start: int, ops: list[tuple[str, int]]) -> str:
    """Canonical prompt text.

    >>> format_problem(7, [("+", 5), ("*", 3)])
    'Q: 7 +5 *3\\n'
    """
    return "Q: " + " ".join([str(start)] + [f"{op}{b}" for op, b in ops]) + "\n"


def format_solution(start: int, ops: list[tuple[str, int]], values: list[int]) -> str:
    """Solution text for the given (possibly wrong) line results ``values``.

    >>> format_solution(7, [("+", 5), ("*", 3)], [12, 36])
    '7+5=12\\n12*3=36\\nA: 36'
    """
    lines, a = [], start
    for (op, b), c in zip(ops, values):
        lines.append(f"{a}{op}{b}={c}")
        a = c
    return "\n".join(lines + [f"A: {a}"])


def parse_answer(response: str) -> int | None:
    """The value of the last ``A: <int>`` line, or None. Other lines and anything after the
    integer on the answer line (generation that ran past the answer) are ignored.

    >>> parse_answer("7+5=12\\nA: 12\\n  \\nxx+")
    12
    >>> parse_answer("A: 12Q: 3 +4")
    12
    >>> parse_answer("A: 3.5") is None
    True
    """
    found = None
    for line in response.split("\n"):
        m = _ANSWER_RE.fullmatch(line)
        if m:
            found = int(m.group(1))
    return found


@TASKS.register("arith")
class ArithTask:
    """Chains of ``min_steps``..``max_steps`` operations (from ``ops``) on a start value in
    0..``max_start``; every intermediate value stays in 0..``max_value``.

    Operands: ``+`` and ``-`` use 1..``max_operand``, ``*`` uses 2..3. At each step one op is
    chosen uniformly among those with at least one allowed operand (``-`` only if the result
    stays ≥ 0, ``+``/``*`` only if it stays ≤ ``max_value``), then its operand uniformly among
    the allowed ones. The number of operations is uniform in [min_steps, max_steps].

    SFT-corpus kwargs (they change only ``sft_corpus``/``flawed_solution``; defaults leave it as
    it always was): ``skill_gap_op`` (None or one of ``ops``) and ``skill_gap_rate`` (in [0, 1],
    0 unless ``skill_gap_op`` is set): each ``skill_gap_op`` line of an SFT trace is written with
    the skill-gap rule (``skill_gap_values``) with that probability; ``miracle_fraction`` (in
    [0, 1], 0 when max_steps < 2): that fraction of the SFT traces without a random slip reach
    the right answer through a wrong step and a compensating one (``miracle_solution``).

    Every argument is checked before any work (``task.kwargs.<name>: expected ..., got ...``):
    integers with 1 <= min_steps <= max_steps <= 32, 0 <= max_start <= max_value,
    1 <= max_value <= 10,000, 1 <= max_operand <= 100; ``ops`` distinct characters of '+-*';
    ``seed`` any integer; the SFT-corpus kwargs as above.
    """

    name = "arith"
    segmenter = "newline"

    def __init__(self, *, min_steps: int = 2, max_steps: int = 4, max_start: int = 20,
                 max_operand: int = 9, max_value: int = 99, ops: str = "+-*", seed: int = 0,
                 skill_gap_op: str | None = None, skill_gap_rate: float = 0.0,
                 miracle_fraction: float = 0.0):
        min_steps = check_int("min_steps", min_steps, low=1, high=MAX_STEPS_LIMIT)
        max_steps = check_int("max_steps", max_steps, low=min_steps, high=MAX_STEPS_LIMIT,
                              low_name="min_steps")
        max_start = check_int("max_start", max_start, low=0, high=MAX_VALUE_LIMIT)
        max_value = check_int("max_value", max_value, low=max(1, max_start), high=MAX_VALUE_LIMIT,
                              low_name="max_start" if max_start >= 1 else None)
        max_operand = check_int("max_operand", max_operand, low=1, high=MAX_OPERAND_LIMIT)
        seed = check_int("seed", seed)
        if not isinstance(ops, str) or not ops or set(ops) - set("+-*") or len(set(ops)) != len(ops):
            raise kwarg_error("ops", "distinct characters from '+-*'", ops)
        if skill_gap_op is not None and (not isinstance(skill_gap_op, str) or len(skill_gap_op) != 1
                                         or skill_gap_op not in ops):
            raise kwarg_error("skill_gap_op", f"null or one of the task's ops {ops!r}", skill_gap_op)
        skill_gap_rate = check_float("skill_gap_rate", skill_gap_rate, low=0, high=1)
        if skill_gap_op is None and skill_gap_rate > 0:
            raise kwarg_error("skill_gap_rate", "0 when skill_gap_op is null (set skill_gap_op too)",
                              skill_gap_rate)
        miracle_fraction = check_float("miracle_fraction", miracle_fraction, low=0, high=1)
        if max_steps < 2 and miracle_fraction > 0:
            raise kwarg_error("miracle_fraction", "0 when max_steps < 2 (a compensating step needs "
                              "a second operation)", miracle_fraction)
        self.skill_gap_op, self.skill_gap_rate = skill_gap_op, skill_gap_rate
        self.miracle_fraction = miracle_fraction
        self.min_steps, self.max_steps, self.max_start = min_steps, max_steps, max_start
        self.max_operand, self.max_value, self.ops, self.seed = max_operand, max_value, ops, seed
        # moves[v] = [(op, [allowed operands])...] for every op that has at least one operand at v
        self._moves: list[list[tuple[str, list[int]]]] = []
        for v in range(max_value + 1):
            moves = []
            for op in ops:
                cands = range(2, 4) if op == "*" else range(1, max_operand + 1)
                ok = [b for b in cands if 0 <= _apply(v, op, b) <= max_value]
                if ok:
                    moves.append((op, ok))
            self._moves.append(moves)
        self._cache: dict[str, tuple[list[Example], set[str], random.Random]] = {}

    # ---- problems -------------------------------------------------------------------------

    def _draw(self, rng: random.Random) -> tuple[int, list[tuple[str, int]]] | None:
        """One problem from the generative distribution; None if it dead-ends (no allowed op)."""
        rand = rng.random
        v = int(rand() * (self.max_start + 1))
        start, ops = v, []
        for _ in range(self.min_steps + int(rand() * (self.max_steps - self.min_steps + 1))):
            moves = self._moves[v]
            if not moves:
                return None
            op, operands = moves[int(rand() * len(moves))]
            b = operands[int(rand() * len(operands))]
            ops.append((op, b))
            v = _apply(v, op, b)
        return start, ops

    def _example(self, split: str, idx: int, start: int, ops: list[tuple[str, int]],
                 prompt: str) -> Example:
        values, v = [], start
        for op, b in ops:
            v = _apply(v, op, b)
            values.append(v)
        return Example(id=f"arith-{split}-{idx:05d}", prompt=prompt, answer=str(v),
                       solution=format_solution(start, ops, values),
                       meta={"start": start, "ops": [[op, b] for op, b in ops], "values": values})

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        """The first ``n`` distinct problems of ``split`` (default 10,000 train / 1,000 test).

        Problems are drawn from ``random.Random`` seeded by (seed, split) and kept if their
        prompt hashes to ``split`` and was not seen before, so the result for a given n is a
        prefix of the result for any larger n.
        """
        if split not in SPLITS:
            raise ValueError(f"arith: split must be one of {SPLITS}, got {split!r}")
        if n is None:
            n = 10_000 if split == "train" else 1_000
            if self.num_problems() < 200_000:  # small configurations: all problems of the split
                n = min(n, sum(split_of(format_problem(*p)) == split for p in self._enumerate()))
        if n < 0:
            raise ValueError(f"arith: n must be >= 0, got {n}")
        if split not in self._cache:
            seed_bytes = hashlib.sha1(f"arith/{self.seed}/{split}".encode()).digest()[:8]
            self._cache[split] = ([], set(), random.Random(int.from_bytes(seed_bytes, "big")))
        out, seen, rng = self._cache[split]
        if n > len(out):
            total = self.num_problems()
            if n > total:
                raise ValueError(f"arith: asked for {n} '{split}' problems but this configuration "
                                 f"has only {total} distinct problems in all splits")
            budget = 200 * (n - len(out)) + 100_000
            while len(out) < n and budget > 0:
                budget -= 1
                drawn = self._draw(rng)
                if drawn is None:
                    continue
                prompt = format_problem(*drawn)
                if prompt in seen or split_of(prompt) != split:
                    continue
                seen.add(prompt)
                out.append(self._example(split, len(out), *drawn, prompt))
            if len(out) < n:
                self._fill_by_enumeration(split, n)
        return out[:n]

    def _fill_by_enumeration(self, split: str, n: int) -> None:
        """Rejection sampling stalled (the space is nearly exhausted): add the remaining
        problems of the split in a seeded order, or raise if there are not enough."""
        out, seen, rng = self._cache[split]
        if self.num_problems() > 2_000_000:
            raise ValueError(f"arith: found only {len(out)} distinct '{split}' problems, asked for "
                             f"{n}; ask for fewer or widen the configuration")
        rest = [p for p in self._enumerate() if split_of(format_problem(*p)) == split
                and format_problem(*p) not in seen]
        if len(out) + len(rest) < n:
            raise ValueError(f"arith: asked for {n} '{split}' problems but this configuration has "
                             f"only {len(out) + len(rest)} distinct '{split}' problems")
        random.Random(f"arith-fill/{self.seed}/{split}").shuffle(rest)
        for start, ops in rest[: n - len(out)]:
            prompt = format_problem(start, ops)
            seen.add(prompt)
            out.append(self._example(split, len(out), start, ops, prompt))

    def _enumerate(self):
        """Every distinct problem (start, ops) of this configuration."""
        def chains(v: int, k: int):
            if k == 0:
                yield []
                return
            for op, operands in self._moves[v]:
                for b in operands:
                    for rest in chains(_apply(v, op, b), k - 1):
                        yield [(op, b)] + rest
        for start in range(self.max_start + 1):
            for k in range(self.min_steps, self.max_steps + 1):
                for ops in chains(start, k):
                    yield start, ops

    def num_problems(self) -> int:
        """Number of distinct problems over both splits (exact, by dynamic programming)."""
        moves = tuple(tuple((op, tuple(o)) for op, o in m) for m in self._moves)
        return _count(moves, self.max_start, self.min_steps, self.max_steps)

    # ---- scoring --------------------------------------------------------------------------

    def format_prompt(self, example: Example) -> str:
        return example.prompt

    def verify(self, example: Example, response: str) -> float:
        """1.0 iff the last ``A: <int>`` line of ``response`` equals the reference answer."""
        got = parse_answer(response)
        return 1.0 if got is not None and str(got) == example.answer else 0.0

    def label_steps(self, example: Example, response: str) -> StepLabels:
        """Label each line of any response (see the module docstring for the rules).

        Computation line i (counting only computation lines) is CORRECT iff it reads
        ``a<op>b=c`` with a = the previous computation line's c (the start value for i = 0),
        (op, b) = the problem's i-th operation and c = a op b; WRONG if it parses but one of
        these fails, including lines beyond the number of operations. An answer line ``A: n``
        is CORRECT iff n = the last computation line's c and exactly len(ops) computation lines
        precede it. Anything else is UNPARSEABLE.
        """
        start = example.meta["start"]
        ops = [(op, int(b)) for op, b in example.meta["ops"]]
        spans = newline(response)
        labels, n_comp, prev = [], 0, start
        for s, e in spans:
            line = response[s:e]
            m = _COMPUTE_RE.fullmatch(line)
            if m:
                a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
                ok = (n_comp < len(ops) and a == prev and (op, b) == ops[n_comp]
                      and c == _apply(a, op, b))
                labels.append(STEP_CORRECT if ok else STEP_WRONG)
                n_comp, prev = n_comp + 1, c
                continue
            m = _ANSWER_RE.fullmatch(line)
            if m:
                ok = n_comp == len(ops) and int(m.group(1)) == prev
                labels.append(STEP_CORRECT if ok else STEP_WRONG)
            else:
                labels.append(STEP_UNPARSEABLE)
        first = next((k for k, lab in enumerate(labels) if lab != STEP_CORRECT), None)
        return StepLabels(labels=labels, spans=spans, first_error=first)

    # ---- SFT data -------------------------------------------------------------------------

    def skill_gap_lines(self, example: Example, rng: random.Random) -> list[int]:
        """The computation lines of ``example`` that an SFT trace writes with the skill-gap rule:
        each ``skill_gap_op`` line with probability ``skill_gap_rate`` (one ``rng.random()`` per
        such line). ``[]``, drawing nothing, when the rate is 0."""
        if self.skill_gap_rate == 0:
            return []
        return [k for k, (op, _) in enumerate(example.meta["ops"])
                if op == self.skill_gap_op and rng.random() < self.skill_gap_rate]

    def flawed_solution(self, example: Example, rng: random.Random, gap_lines=()) -> str:
        """The solution with one computation line's result off by ±1..±3 (kept ≥ 0); later
        lines continue correctly from the wrong value and the answer line repeats the wrong last
        value. Only deltas that keep every later value ≥ 0 are used, and since each operation is
        increasing in its left operand, the final answer is always wrong.

        ``gap_lines``: lines also written with the skill-gap rule (``skill_gap_values``); then
        only deltas that leave the slipped line wrong and the final answer wrong are used (the
        positive ones always do). With no gap lines this filter removes nothing.

        Labels of the result: exactly one WRONG step, at the perturbed line (plus the gap lines).
        """
        start = example.meta["start"]
        ops = [(op, int(b)) for op, b in example.meta["ops"]]
        k = rng.randrange(len(ops))

        def usable(delta: int) -> bool:
            values = skill_gap_values(start, ops, gap_lines, shift_at=k, shift=delta)
            carried = values[k - 1] if k else start
            return (min(values[k:]) >= 0 and values[k] != _apply(carried, *ops[k])
                    and values[-1] != int(example.answer))

        deltas = [d for d in (-3, -2, -1, 1, 2, 3) if usable(d)]
        return format_solution(start, ops, skill_gap_values(start, ops, gap_lines, shift_at=k,
                                                            shift=rng.choice(deltas)))

    def miracle_solution(self, example: Example, rng: random.Random) -> str:
        """A right answer through wrong steps (``compensated_values``): line k (uniform in
        0..n-2) off by ±1..±3, the lines after it continue from the wrong value up to line j
        (uniform in k+1..n-1), which writes the gold result anyway; the rest is gold. Only
        deltas that keep the values in between ≥ 0 are used. Needs at least two operations.

        Labels of the result: exactly two WRONG steps, k and j; ``verify`` gives 1.0.
        """
        start = example.meta["start"]
        ops = [(op, int(b)) for op, b in example.meta["ops"]]
        k = rng.randrange(len(ops) - 1)
        j = rng.randrange(k + 1, len(ops))
        deltas = [d for d in (-3, -2, -1, 1, 2, 3)
                  if min(compensated_values(start, ops, k, d, j)[k:j]) >= 0]
        return format_solution(start, ops, compensated_values(start, ops, k, rng.choice(deltas), j))

    def sft_corpus(self, n: int, flawed_fraction: float = 0.0, seed: int = 0
                   ) -> list[tuple[Example, str]]:
        """``n`` (train example, solution text) pairs; exactly round(n · flawed_fraction) of them,
        at positions chosen by ``seed``, carry a ``flawed_solution`` (a random slip), the rest the
        gold one, except:

        - ``miracle_fraction``: of the other positions whose problem has ≥ 2 operations, exactly
          round(that count · miracle_fraction) carry a ``miracle_solution`` instead;
        - ``skill_gap_rate``: every trace that is not a miracle one writes its ``skill_gap_lines``
          with the skill-gap rule (slip traces too, the slip on top).

        Each of the three draws from its own seeded stream, so with the default kwargs the corpus
        is exactly what it was before they existed."""
        if not 0.0 <= flawed_fraction <= 1.0:
            raise ValueError(f"arith: flawed_fraction must be in [0, 1], got {flawed_fraction}")
        exs = self.examples("train", n)
        rng = random.Random(f"arith-sft/{seed}")
        flawed = set(rng.sample(range(n), round(n * flawed_fraction)))
        miracle_rng = random.Random(f"arith-sft-miracle/{seed}")
        miracles: set[int] = set()
        if self.miracle_fraction > 0:
            eligible = [i for i, ex in enumerate(exs) if i not in flawed and len(ex.meta["ops"]) >= 2]
            miracles = set(miracle_rng.sample(eligible, round(len(eligible) * self.miracle_fraction)))
        gap_rng = random.Random(f"arith-sft-skill-gap/{seed}")
        out = []
        for i, ex in enumerate(exs):
            if i in miracles:
                out.append((ex, self.miracle_solution(ex, miracle_rng)))
                continue
            gap = self.skill_gap_lines(ex, gap_rng)
            if i in flawed:
                text = self.flawed_solution(ex, rng, gap)
            elif gap:
                ops = [(op, int(b)) for op, b in ex.meta["ops"]]
                text = format_solution(ex.meta["start"], ops, skill_gap_values(ex.meta["start"], ops, gap))
            else:
                text = ex.solution
            out.append((ex, text))
        return out

    def longest_solution(self) -> int:
        """Characters in the longest gold solution over every problem of this configuration
        (exact, by dynamic programming over (value, operations left)). SFT traces with slips,
        skill gaps or miracles can be a few characters longer (their values can pass max_value).

        >>> task = ArithTask(min_steps=1, max_steps=1, max_start=9, max_value=9, max_operand=1, ops="+")
        >>> task.longest_solution(), len("8+1=9\\nA: 9")  # 9+1 would pass max_value
        (10, 10)
        """
        moves = tuple(tuple((op, tuple(o)) for op, o in m) for m in self._moves)
        return _longest(moves, self.max_start, self.min_steps, self.max_steps)


@lru_cache(maxsize=32)
def _count(moves, max_start: int, min_steps: int, max_steps: int) -> int:
    """Distinct problems: Σ_start Σ_k (number of k-step operation chains from start)."""
    ways = [1] * len(moves)  # ways[v] = number of k-step chains from value v; k = 0 here
    total = 0
    for k in range(max_steps + 1):
        if k >= min_steps:
            total += sum(ways[: max_start + 1])
        ways = [sum(ways[_apply(v, op, b)] for op, operands in moves[v] for b in operands)
                for v in range(len(moves))]
    return total


@lru_cache(maxsize=32)
def _longest(moves, max_start: int, min_steps: int, max_steps: int) -> int:
    """max over problems of len(gold solution): best[v] = longest text of a k-operation chain
    from value v (−1 when every chain dead-ends), built up k = 0..max_steps."""
    best = [len(f"A: {v}") for v in range(len(moves))]  # k = 0: the answer line only
    longest = -1
    for k in range(max_steps + 1):
        if k >= min_steps:
            longest = max([longest] + best[: max_start + 1])
        best = [max([len(f"{v}{op}{b}={_apply(v, op, b)}\n") + best[_apply(v, op, b)]
                     for op, operands in moves[v] for b in operands
                     if best[_apply(v, op, b)] >= 0], default=-1)
                for v in range(len(moves))]
    return longest
