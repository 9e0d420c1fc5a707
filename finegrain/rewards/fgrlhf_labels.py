"""Exact segment-error labels of arith responses for Fine-Grained RLHF's segment reward models.

Fine-Grained RLHF (Wu et al. 2023, methods.md §11) trains one reward model per error kind:
*irrelevance* (irrelevant, repetitive or incoherent sub-sentences), *factual error* (sentences)
and *incompleteness* (the whole answer). On the arith testbed each kind has an exact label, read
off the text of any response and the problem's operations. A response is cut into lines by the
task's ``newline`` segmenter (the spans of ``ArithTask.label_steps`` and ``Trajectory.step_ids``).

Walk the lines in order, holding the *carried value* v (the start value at first) and the number
j of the problem's operations applied so far (0 at first). A line is

    a computation line  ``a<op>b=c``  (arith's own pattern)
    an answer line      ``A: n``      (arith's own pattern)
    anything else       (unparseable)

**relevance** (step level; 1 = relevant). A computation line is relevant iff it applies the next
operation of the problem to the carried value: j < len(ops), a = v and (op, b) = ops[j]; it then
advances the walk (v ← c, the *written* result, right or wrong; j ← j + 1). An answer line is
relevant iff it is the first answer line and j = len(ops). Every other line (a repeated line, a
restart, a skipped or extra operation, an early or second answer, anything after the answer,
unparseable text) is irrelevant and changes nothing: v and j stay as they were, so the walk picks
up again at the next line that continues the solution.

**factuality** (step level; 1 = factual). A computation line is factual iff its arithmetic holds,
c = a op b, whatever a is (a repeated correct line is irrelevant but factual). An answer line is
factual iff n = v, the carried value (it states what the solution reached). An unparseable line
states nothing checkable and is labelled 0.

**completeness** (sequence level; 1 = complete). The response is complete iff its walk applies
every operation (j reaches len(ops)) and then gives a relevant answer line. It says nothing about
the arithmetic: a complete response may have a wrong answer (factuality's business), and a right
answer alone (``A: 32``) is incomplete.

On the SFT corpus traces (gold, random slips, skill gaps, miracle steps) every line is relevant,
every trace is complete, and factuality equals ``label_steps`` (CORRECT → 1): those traces always
continue from the written value, so the only errors are arithmetic ones. ``corrupt_response``
adds irrelevant lines and incomplete responses, so that each kind's reward model sees both classes.

>>> ex = Example("x", "Q: 7 +5 *3\\n", "36", meta={"start": 7, "ops": [["+", 5], ["*", 3]]})
>>> text = "7+5=12\\n7+5=12\\n12*3=37\\nA: 37"
>>> relevance_labels(ex, text), factuality_labels(ex, text), completeness_label(ex, text)
([1, 0, 1, 1], [1, 1, 0, 1], 1)
>>> completeness_label(ex, "7+5=12\\nA: 12")
0
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from finegrain.rewards.disc_prm_data import StepRow
from finegrain.segment import newline
from finegrain.tasks.arith import _ANSWER_RE, _COMPUTE_RE, ArithTask, _apply
from finegrain.tasks.base import Example

# kind -> the level its reward lands at ('step': each line's last token; 'outcome': the last token)
KIND_LEVELS: dict[str, str] = {"factuality": "step", "relevance": "step", "completeness": "outcome"}
KINDS: tuple[str, ...] = tuple(KIND_LEVELS)
CORRUPTIONS = ("drop_answer", "truncate", "repeat_line", "restart_line", "skip_op", "garbage_line")


def _ops(example: Example) -> tuple[int, list[tuple[str, int]]]:
    return example.meta["start"], [(op, int(b)) for op, b in example.meta["ops"]]


def _walk(example: Example, response: str) -> list[tuple[str, int, int, bool]]:
    """One (kind of line, relevance, factuality, answer-relevant flag) per newline span; see the module docstring."""
    v, ops = _ops(example)
    j, answered, out = 0, False, []
    for s, e in newline(response):
        line = response[s:e]
        m = _COMPUTE_RE.fullmatch(line)
        if m:
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            relevant = not answered and j < len(ops) and a == v and (op, b) == ops[j]
            out.append(("compute", int(relevant), int(c == _apply(a, op, b)), False))
            if relevant:
                v, j = c, j + 1
            continue
        m = _ANSWER_RE.fullmatch(line)
        if m:
            relevant = not answered and j == len(ops)
            out.append(("answer", int(relevant), int(int(m.group(1)) == v), relevant))
            answered = answered or relevant
            continue
        out.append(("other", 0, 0, False))
    return out


def relevance_labels(example: Example, response: str) -> list[int]:
    """1 / 0 per line (newline span) of ``response``: relevant / irrelevant (module docstring)."""
    return [rel for _, rel, _, _ in _walk(example, response)]


def factuality_labels(example: Example, response: str) -> list[int]:
    """1 / 0 per line (newline span) of ``response``: factual / not (module docstring)."""
    return [fact for _, _, fact, _ in _walk(example, response)]


def completeness_label(example: Example, response: str) -> int:
    """1 if ``response`` applies every operation and then answers (module docstring), else 0."""
    return int(any(done for _, _, _, done in _walk(example, response)))


LABELERS: dict[str, Callable[[Example, str], Any]] = {
    "factuality": factuality_labels, "relevance": relevance_labels, "completeness": completeness_label}


def check_kind(kind: str, where: str = "label kind") -> str:
    if kind not in KIND_LEVELS:
        raise ValueError(f"{where}: expected one of {', '.join(KINDS)}, got '{kind}'")
    return kind


def check_task(task, where: str = "--task") -> None:
    """The exact labels read arith's operations (``example.meta['start'/'ops']``): any other task is refused."""
    if not isinstance(task, ArithTask):
        raise ValueError(f"{where}: segment-error labels (factuality, relevance, completeness) are defined for the "
                         f"arith task only, got '{getattr(task, 'name', type(task).__name__)}'")


def kind_rows(task, pairs: Sequence[tuple[Example, str]], kind: str) -> list[StepRow]:
    """StepRows labelled with one error kind, for ``train_disc_prm``.

    Step kinds: the response's lines are the steps (newline spans), one label each (1 = no error).
    completeness: the whole response is one step with its one label, so the classifier reads the
    last token of the response (where the sequence-level reward is placed). Responses without a
    line are skipped.
    """
    check_kind(kind)
    check_task(task)
    out = []
    for i, (ex, text) in enumerate(pairs):
        spans = newline(text)
        if not spans:
            continue
        where = f"{task.name} response {i} ({kind})"
        if KIND_LEVELS[kind] == "step":
            steps = tuple(text[a:b] for a, b in spans)
            labels = tuple(float(v) for v in LABELERS[kind](ex, text))
        else:
            steps, labels = (text,), (float(completeness_label(ex, text)),)
        out.append(StepRow(task.format_prompt(ex), steps, labels, where, ex))
    return out


# ----------------------------------------------------------------------------- corrupted responses

def corrupt_response(example: Example, response: str, rng: random.Random, how: str | None = None) -> str:
    """``response`` with one corruption ``how`` (uniform over ``CORRUPTIONS`` when None), to give the
    relevance and completeness models both classes. The labels are never taken from ``how``: they
    are computed from the resulting text by the labelers above.

    drop_answer: remove the answer line; truncate: keep the first k < n computation lines (and, half
    of the time, an early answer ``A: <last value>``); repeat_line: write a computation line twice;
    restart_line: insert a line that applies the next operation to the start value; skip_op: remove
    one computation line that is not the last; garbage_line: insert a line of the prompt's text.
    A corruption that needs more lines than there are falls back to drop_answer.

    >>> ex = Example("x", "Q: 7 +5 *3\\n", "36", meta={"start": 7, "ops": [["+", 5], ["*", 3]]})
    >>> corrupt_response(ex, "7+5=12\\n12*3=36\\nA: 36", random.Random(0), "repeat_line")
    '7+5=12\\n12*3=36\\n12*3=36\\nA: 36'
    """
    how = how if how is not None else rng.choice(CORRUPTIONS)
    if how not in CORRUPTIONS:
        raise ValueError(f"corruption: expected one of {', '.join(CORRUPTIONS)}, got '{how}'")
    lines = response.split("\n")
    comp = [i for i, ln in enumerate(lines) if _COMPUTE_RE.fullmatch(ln)]
    start, ops = _ops(example)
    if how == "truncate" and len(comp) >= 2:
        k = rng.randrange(1, len(comp))
        kept = lines[:comp[k - 1] + 1]
        m = _COMPUTE_RE.fullmatch(kept[-1])
        return "\n".join(kept + ([f"A: {m.group(4)}"] if rng.random() < 0.5 else []))
    if how == "repeat_line" and comp:
        i = rng.choice(comp)
        return "\n".join(lines[:i + 1] + [lines[i]] + lines[i + 1:])
    if how == "restart_line" and len(comp) >= 2:
        k = rng.randrange(1, len(comp))
        op, b = ops[k] if k < len(ops) else ops[-1]
        return "\n".join(lines[:comp[k]] + [f"{start}{op}{b}={_apply(start, op, b)}"] + lines[comp[k]:])
    if how == "skip_op" and len(comp) >= 2:
        i = comp[rng.randrange(len(comp) - 1)]
        return "\n".join(lines[:i] + lines[i + 1:])
    if how == "garbage_line" and lines:
        i = rng.randrange(len(lines))
        return "\n".join(lines[:i] + [example.prompt.strip()] + lines[i:])
    keep = [ln for ln in lines if not _ANSWER_RE.fullmatch(ln)]
    return "\n".join(keep)


def corrupted_pairs(pairs: Sequence[tuple[Example, str]], fraction: float, seed: int) -> list[tuple[Example, str]]:
    """``pairs`` with exactly round(n · fraction) responses, at positions chosen by ``seed``,
    replaced by ``corrupt_response`` (one seeded stream, so the result is a function of the inputs)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--corrupt-fraction: expected a number in [0, 1], got {fraction}")
    rng = random.Random(f"fgrlhf-corrupt/{seed}")
    chosen = set(rng.sample(range(len(pairs)), round(len(pairs) * fraction)))
    return [(ex, corrupt_response(ex, text, rng) if i in chosen else text) for i, (ex, text) in enumerate(pairs)]
