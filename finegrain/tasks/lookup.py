"""Multi-hop questions over a generated knowledge base, answered with a ``lookup`` tool.

The knowledge base (KB) is made of people, cities, countries and companies with made-up names
of 3–5 letters, and ten single-valued relations between them; it is built from ``seed``. A
question names a start entity and a chain of 2–4 relations; the model follows the chain one
``lookup`` call at a time, each call taking the entity the previous one returned::

    prompt   "Q: Sofav.founder.born_in.located_in\\n"
    trace    "<call>lookup(Sofav, founder)</call>"      model turn 0
             "\\n<result>Mov</result>\\n"                 observation (the environment's text)
             "<call>lookup(Mov, born_in)</call>"        model turn 1
             "\\n<result>Fopan</result>\\n"
             "<call>lookup(Fopan, located_in)</call>"   model turn 2
             "\\n<result>Sasu</result>\\n"
             "A: Sasu"                                  model turn 3: the final answer

The call and observation texts are those of ``finegrain.toolcalls`` (``<call>NAME(ARG, ARG)
</call>``, then ``\\n<result>TEXT</result>\\n``): a core-layer module, so the tasks that
write traces and the environments that parse them share one definition. This module also holds
what both tool tasks (``lookup`` and ``arith_calc``) share: ``observation_spans``, the ``tool_turns``
segmenter (one step per model turn), the checklist of ``Example.meta`` and ``TurnJudgement``.

Steps are model turns. A turn is judged against the gold chain (not locally, as arith's lines
are: the question fixes one path through the KB, and a call off it cannot lead to the answer).
A call turn is CORRECT iff it is the next gold call; a final turn iff every gold call was made
and it answers the gold entity. Wrong turns carry a kind: ``wrong_tool``, ``wrong_argument``,
``redundant_call``, ``no_lookup`` (answered before looking everything up), ``wrong_answer``,
``malformed``.

>>> task = LookupTask(seed=0)
>>> ex = task.examples("test", 1)[0]
>>> ex.prompt
'Q: Deb.ceo.born_in\\n'
>>> task.verify(ex, ex.solution), task.label_steps(ex, ex.solution).labels
(1.0, [1, 1, 1])
>>> task.tools(ex)["lookup"]("Deb", "ceo"), task.tools(ex)["lookup"]("Deb", "born_in")
('Mim', 'unknown')
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Callable

from finegrain.segment import SEGMENTERS, Spans
from finegrain.toolcalls import (CALL_CLOSE, CALL_OPEN, RESULT_CLOSE, RESULT_OPEN, ToolCall, format_call, format_result,
                                 parse_call)
from finegrain.tasks import TASKS
from finegrain.tasks.arith import split_of
from finegrain.tasks.base import (STEP_CORRECT, STEP_UNPARSEABLE, STEP_WRONG, Example, StepLabels,
                                  check_int)

SPLITS = ("train", "test")

# ---- the tool-call text format lives in finegrain.toolcalls (core layer), shared with the environments

Call = ToolCall


# ---- tool traces: observations, turns, checklists (shared with arith_calc) ----------------


def observation_spans(text: str) -> Spans:
    """Character spans of the environment's observations in a tool-use trace: each
    ``\\n<result>TEXT</result>\\n`` that directly follows a ``</call>``, newlines included (at RL
    time all of it is observation tokens). One cut short at the end of the text (a token budget)
    runs to the end. A ``<result>`` the model wrote itself (not after ``</call>``) is model text.

    >>> t = "<call>f(1)</call>\\n<result>2</result>\\nA: 2"
    >>> [t[a:b] for a, b in observation_spans(t)]
    ['\\n<result>2</result>\\n']
    """
    spans, pos, opening = [], 0, "\n" + RESULT_OPEN
    while True:
        at = text.find(CALL_CLOSE, pos)
        if at < 0:
            return spans
        start = pos = at + len(CALL_CLOSE)
        if text.startswith(opening, start):
            close = text.find(RESULT_CLOSE, start + len(opening))
            end = len(text) if close < 0 else close + len(RESULT_CLOSE)
            end += text.startswith("\n", end)
            spans.append((start, end))
            pos = end
        elif start < len(text) and opening.startswith(text[start:]):
            spans.append((start, len(text)))
            return spans


@SEGMENTERS.register("tool_turns")
def tool_turns(text: str) -> Spans:
    """One step per model turn of a tool-use response: the pieces between the observations of
    ``observation_spans`` (which belong to no step); pieces that are only whitespace are dropped.

    >>> t = "<call>f(1)</call>\\n<result>2</result>\\nA: 2"
    >>> [t[a:b] for a, b in tool_turns(t)]
    ['<call>f(1)</call>', 'A: 2']
    """
    spans, at = [], 0
    for a, b in observation_spans(text) + [(len(text), len(text))]:
        if text[at:a].strip():
            spans.append((at, a))
        at = b
    return spans


def checklist(gold_calls: list, answer: str) -> list[dict]:
    """``Example.meta["checklist"]``: one item per gold call, each depending on the one before,
    then the final answer, depending on the last call. Equal weights summing to 1.

    >>> [(c["id"], c["depends"], c["weight"]) for c in checklist([["calc", ["12*3"]]], "32")]
    [('call1', [], 0.5), ('answer', ['call1'], 0.5)]
    """
    weight = 1.0 / (len(gold_calls) + 1)
    items, prev = [], []
    for k, (name, args) in enumerate(gold_calls, 1):
        items.append({"id": f"call{k}", "weight": weight, "depends": prev,
                      "check": {"type": "call", "name": name, "args": list(args)}})
        prev = [f"call{k}"]
    items.append({"id": "answer", "weight": weight, "depends": prev,
                  "check": {"type": "answer", "value": answer}})
    return items


@dataclass(frozen=True)
class TurnJudgement:
    """One model turn of a response: its character span, its label (STEP_CORRECT / STEP_WRONG /
    STEP_UNPARSEABLE) and why (``correct``, ``unparseable`` or the error kind)."""

    span: tuple[int, int]
    label: int
    kind: str


def judged_turn(span: tuple[int, int], kinds: list[str]) -> TurnJudgement:
    """A turn from the outcomes of its checks: WRONG with the first failing kind if one fails,
    CORRECT if at least one check passed and none failed, else UNPARSEABLE (nothing to check)."""
    bad = [k for k in kinds if k != "correct"]
    if bad:
        return TurnJudgement(span, STEP_WRONG, bad[0])
    return TurnJudgement(span, STEP_CORRECT, "correct") if kinds else \
        TurnJudgement(span, STEP_UNPARSEABLE, "unparseable")


def step_labels(turns: list[TurnJudgement]) -> StepLabels:
    labels = [t.label for t in turns]
    first = next((k for k, lab in enumerate(labels) if lab != STEP_CORRECT), None)
    return StepLabels(labels=labels, spans=[t.span for t in turns], first_error=first)


def split_turn(turn: str) -> tuple[str, Call | None]:
    """(the text before the turn's call, the call); the whole turn and None for a final turn."""
    call = parse_call(turn)
    return (turn, None) if call is None else (turn[:turn.rfind(CALL_OPEN)], call)


# ---- the knowledge base ---------------------------------------------------------------------

TYPES = ("person", "city", "country", "company")
# relation -> (type of the entity it is asked of, type of the answer); every relation is a function
RELATIONS = {
    "born_in": ("person", "city"), "lives_in": ("person", "city"), "works_for": ("person", "company"),
    "founder": ("company", "person"), "ceo": ("company", "person"), "hq_in": ("company", "city"),
    "located_in": ("city", "country"), "mayor": ("city", "person"),
    "capital": ("country", "city"), "leader": ("country", "person"),
}
UNKNOWN = "unknown"
MAX_ENTITIES_PER_TYPE, MAX_HOPS_LIMIT = 500, 5  # keep enumerating the questions to seconds
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_ANSWER_RE = re.compile(r"\s*A\s*:\s*([A-Za-z][A-Za-z0-9_]*).*", re.S)


def parse_entity_answer(response: str) -> str | None:
    """The name on the last ``A: <name>`` line, or None; text after the name is ignored.

    >>> parse_entity_answer("<call>lookup(Kel, born_in)</call>\\n<result>Varo</result>\\nA: Varo.")
    'Varo'
    """
    found = None
    for line in response.split("\n"):
        m = _ANSWER_RE.fullmatch(line)
        if m:
            found = m.group(1)
    return found


@dataclass(frozen=True)
class KnowledgeBase:
    """``types[name]`` is the entity's type; ``facts[(name, relation)]`` the related entity."""

    types: dict[str, str]
    facts: dict[tuple[str, str], str]

    def of_type(self, kind: str) -> list[str]:
        return [e for e, t in self.types.items() if t == kind]

    def relations_of(self, entity: str) -> list[str]:
        kind = self.types.get(entity)
        return [r for r, (src, _) in RELATIONS.items() if src == kind]

    # The tools' docstrings are their descriptions in chat templates (transformers' get_json_schema
    # reads Args/Returns), so they speak to the model.
    def lookup(self, entity: str, relation: str) -> str:
        """Look up the entity that is ``relation`` of ``entity`` in the knowledge base.

        Args:
            entity: the name of a person, city, country or company, e.g. Kel
            relation: one of born_in, lives_in, works_for, founder, ceo, hq_in, located_in, mayor,
                capital, leader

        Returns:
            The related entity's name, or "unknown" for an entity not in the knowledge base or a
            relation it does not have. Raises ValueError for an empty argument or a relation name
            that does not exist (and Python's TypeError for a wrong number of arguments).
        """
        entity, relation = _tool_args(entity, relation)
        if relation not in RELATIONS:
            # the argument is not echoed: a JSON-form call may carry text such as "</result>"
            raise ValueError(f"unknown relation; relations: {', '.join(RELATIONS)}")
        return self.facts.get((entity, relation), UNKNOWN)

    def list_relations(self, entity: str) -> str:
        """List the relations the knowledge base has for an entity.

        Args:
            entity: the name of a person, city, country or company

        Returns:
            The entity's relations, comma-separated, or "unknown" for an entity not in the
            knowledge base. Raises ValueError for an empty argument.
        """
        (entity,) = _tool_args(entity)
        return ", ".join(self.relations_of(entity)) or UNKNOWN


def _tool_args(*args) -> list[str]:
    """The arguments stripped; ValueError unless each is a non-empty string."""
    if not all(isinstance(a, str) and a.strip() for a in args):
        raise ValueError("arguments must be non-empty strings")
    return [a.strip() for a in args]


def build_kb(counts: dict[str, int], seed: int) -> KnowledgeBase:
    """A random KB with ``counts[type]`` entities of each type, from ``seed``. Names are distinct,
    3–5 letters (consonant-vowel patterns, capitalised). Every country has at least one city
    and its capital is one of them; a company's founder and CEO are different people."""
    rng = random.Random(f"lookup-kb/{seed}")
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < sum(counts.values()):
        pattern = rng.choice(("CVC", "CVCV", "CVCVC"))
        name = "".join(rng.choice(_CONSONANTS if c == "C" else _VOWELS) for c in pattern).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    by_type, at = {}, 0
    for kind in TYPES:
        by_type[kind] = names[at:at + counts[kind]]
        at += counts[kind]
    people, cities, countries, companies = (by_type[k] for k in TYPES)
    facts: dict[tuple[str, str], str] = {}
    for i, city in enumerate(cities):  # the first cities give every country one
        facts[city, "located_in"] = countries[i] if i < len(countries) else rng.choice(countries)
        facts[city, "mayor"] = rng.choice(people)
    for country in countries:
        facts[country, "capital"] = rng.choice([c for c in cities if facts[c, "located_in"] == country])
        facts[country, "leader"] = rng.choice(people)
    for company in companies:
        facts[company, "founder"], facts[company, "ceo"] = rng.sample(people, 2)
        facts[company, "hq_in"] = rng.choice(cities)
    for person in people:
        facts[person, "born_in"] = rng.choice(cities)
        facts[person, "lives_in"] = rng.choice(cities)
        facts[person, "works_for"] = rng.choice(companies)
    types = {e: kind for kind in TYPES for e in by_type[kind]}
    return KnowledgeBase(types, facts)


def format_question(start: str, relations: list[str]) -> str:
    """Canonical prompt: the start entity, then the relations in the order they are looked up.

    >>> format_question("Sofav", ["founder", "born_in"])
    'Q: Sofav.founder.born_in\\n'
    """
    return "Q: " + ".".join([start] + list(relations)) + "\n"


def gold_trace(calls: list[tuple[str, list[str], str]], answer: str) -> str:
    """The trace text for (name, args, result) calls in order, then ``A: answer``."""
    return "".join(format_call(name, args) + format_result(res) for name, args, res in calls) + f"A: {answer}"


@TASKS.register("lookup")
class LookupTask:
    """Questions of ``min_hops``..``max_hops`` chained lookups over a KB of ``n_people`` people,
    ``n_cities`` cities, ``n_countries`` countries and ``n_companies`` companies, built from
    ``seed``. One KB serves both splits; the splits share no question (see ``examples``).

    Tools: ``lookup(entity, relation)`` and ``list_relations(entity)`` (never needed, since the
    question names its relations: calling it is the ``wrong_tool`` flaw).

    Every argument is checked before any work (``task.kwargs.<name>: expected ..., got ...``):
    integers with 2 <= n_countries <= n_cities, every count <= 500, the other counts >= 2,
    1 <= min_hops <= max_hops <= 5; ``seed`` any integer.
    """

    name = "lookup"
    segmenter = "tool_turns"
    FLAW_KINDS = ("wrong_tool", "wrong_argument", "redundant_call", "no_lookup", "wrong_answer")

    def __init__(self, *, n_people: int = 40, n_cities: int = 16, n_countries: int = 6,
                 n_companies: int = 16, min_hops: int = 2, max_hops: int = 4, seed: int = 0):
        top = MAX_ENTITIES_PER_TYPE
        n_people = check_int("n_people", n_people, low=2, high=top)
        n_countries = check_int("n_countries", n_countries, low=2, high=top)
        n_cities = check_int("n_cities", n_cities, low=n_countries, high=top, low_name="n_countries")
        n_companies = check_int("n_companies", n_companies, low=2, high=top)
        min_hops = check_int("min_hops", min_hops, low=1, high=MAX_HOPS_LIMIT)
        max_hops = check_int("max_hops", max_hops, low=min_hops, high=MAX_HOPS_LIMIT, low_name="min_hops")
        self.seed = check_int("seed", seed)
        self.min_hops, self.max_hops = min_hops, max_hops
        self.kb = build_kb({"person": n_people, "city": n_cities, "country": n_countries,
                            "company": n_companies}, self.seed)
        self._questions: dict[str, list[tuple]] | None = None  # per split, in order (built on first use)
        self._built: dict[str, list[Example]] = {s: [] for s in SPLITS}

    # ---- questions ------------------------------------------------------------------------

    def _chains(self):
        """Every (start, relations, path) with min_hops..max_hops relations whose entities are
        all distinct (so no question loops back, as capital.located_in would)."""
        facts = self.kb.facts

        def walk(path: list[str], rels: list[str]):
            if len(rels) >= self.min_hops:
                yield path[0], rels, path[1:]
            if len(rels) == self.max_hops:
                return
            for r in self.kb.relations_of(path[-1]):
                nxt = facts[path[-1], r]
                if nxt not in path:
                    yield from walk(path + [nxt], rels + [r])

        for start in sorted(self.kb.types):
            yield from walk([start], [])

    def _example(self, split: str, idx: int, start: str, rels: list[str], path: list[str]) -> Example:
        ents = [start] + path
        calls = [("lookup", [ents[k], r], ents[k + 1]) for k, r in enumerate(rels)]
        gold_calls = [[name, args] for name, args, _ in calls]
        return Example(id=f"lookup-{split}-{idx:05d}", prompt=format_question(start, rels), answer=path[-1],
                       solution=gold_trace(calls, path[-1]),
                       meta={"gold_calls": gold_calls, "entities": list(path),
                             "checklist": checklist(gold_calls, path[-1])})

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        """The first ``n`` questions of ``split`` (default: all of them).

        A question is in 'test' iff the sha1 of its prompt falls in 10% of the range (arith's
        ``split_of``), so the splits never share a question. Within a split, the questions of
        each hop count are shuffled by (seed, split) and then taken in turn (2, 3, 4, 2, 3, 4,
        ...), so any prefix mixes hop counts evenly until the shorter ones run out; the result
        for n is a prefix of the result for any larger n.
        """
        if split not in SPLITS:
            raise ValueError(f"lookup: split must be one of {SPLITS}, got {split!r}")
        if self._questions is None:
            by_split: dict[str, dict[int, list]] = {s: {} for s in SPLITS}
            for start, rels, path in self._chains():
                by_hops = by_split[split_of(format_question(start, rels))]
                by_hops.setdefault(len(rels), []).append((start, rels, path))
            self._questions = {}
            for s, by_hops in by_split.items():
                rng = random.Random(int.from_bytes(hashlib.sha1(f"lookup/{self.seed}/{s}".encode())
                                                   .digest()[:8], "big"))
                for hops in sorted(by_hops):
                    rng.shuffle(by_hops[hops])
                self._questions[s] = [q for group in _round_robin([by_hops[h] for h in sorted(by_hops)])
                                      for q in group]
        questions, built = self._questions[split], self._built[split]
        if n is None:
            n = len(questions)
        if not 0 <= n <= len(questions):
            raise ValueError(f"lookup: asked for {n} '{split}' questions; this KB has {len(questions)} "
                             f"(n must be in [0, {len(questions)}])")
        built.extend(self._example(split, i, *questions[i]) for i in range(len(built), n))
        return built[:n]

    # ---- tools and scoring ----------------------------------------------------------------

    def format_prompt(self, example: Example) -> str:
        return example.prompt

    def tools(self, example: Example) -> dict[str, Callable[..., str]]:
        """The tools of an episode (the same KB for every question)."""
        return {"lookup": self.kb.lookup, "list_relations": self.kb.list_relations}

    @staticmethod
    def observation_spans(trace_text: str) -> Spans:
        """See the module-level ``observation_spans``."""
        return observation_spans(trace_text)

    def verify(self, example: Example, response: str) -> float:
        """1.0 iff the last ``A: <name>`` line of the whole response names the answer (exactly,
        case included), else 0.0."""
        return 1.0 if parse_entity_answer(response) == example.answer else 0.0

    def judge_turns(self, example: Example, response: str) -> list[TurnJudgement]:
        """Each model turn of any response, judged against the gold chain.

        A call is ``malformed`` (does not parse), ``wrong_tool`` (not ``lookup``), CORRECT iff it
        is the next gold call (whatever came before), ``redundant_call`` if it repeats an earlier
        call of the response or comes after the whole chain was looked up, else
        ``wrong_argument`` (including a wrong number of arguments). Only a correct call moves
        along the chain. An ``A: <name>`` line is CORRECT iff every gold call was made and it
        names the answer; ``no_lookup`` if the chain was not finished, else ``wrong_answer``.
        Other text is not checked; a turn with nothing to check is UNPARSEABLE.
        """
        gold = [(name, list(args)) for name, args in example.meta["gold_calls"]]
        done, seen, out = 0, set(), []
        for s, e in tool_turns(response):
            body, call = split_turn(response[s:e])
            kinds = []
            for line in body.split("\n"):
                m = _ANSWER_RE.fullmatch(line)
                if m:
                    kinds.append("no_lookup" if done < len(gold) else
                                 "correct" if m.group(1) == example.answer else "wrong_answer")
            if call is not None:
                key = (call.name, tuple(call.args))
                if call.error:
                    kinds.append("malformed")
                elif call.name != "lookup":
                    kinds.append("wrong_tool")
                elif done < len(gold) and (call.name, call.args) == gold[done]:
                    kinds.append("correct")
                    done += 1
                else:
                    kinds.append("redundant_call" if key in seen or done == len(gold) else "wrong_argument")
                seen.add(key)
            out.append(judged_turn((s, e), kinds))
        return out

    def label_steps(self, example: Example, response: str) -> StepLabels:
        """One label per model turn (``tool_turns`` spans); see ``judge_turns`` for the rules.
        ``first_error`` is the first turn that is not CORRECT."""
        return step_labels(self.judge_turns(example, response))

    # ---- SFT data -------------------------------------------------------------------------

    def _gold_path(self, example: Example) -> tuple[list[str], list[str]]:
        """(entities e_0..e_k, relations r_1..r_k) of the example's gold chain."""
        calls = example.meta["gold_calls"]
        return [calls[0][1][0]] + list(example.meta["entities"]), [args[1] for _, args in calls]

    def _guess(self, answer: str, rng: random.Random) -> str:
        """An entity of the answer's type other than the answer (there are always >= 2)."""
        return rng.choice([e for e in self.kb.of_type(self.kb.types[answer]) if e != answer])

    def flawed_trace(self, example: Example, rng: random.Random, kind: str | None = None
                     ) -> tuple[str, str] | None:
        """``(kind, text)``: the gold trace with one flaw of ``kind`` (random if None) at a random
        hop j. Observations are the tools' true answers, as the environment would give them.

        - ``wrong_tool``: ``list_relations(e_j)`` before the lookup of hop j, then the gold trace;
          the answer is right.
        - ``wrong_argument``: hop j asks a wrong relation of e_j (one with the same answer type)
          or the right relation of a wrong entity of e_j's type; the remaining relations are then
          looked up from the wrong result, and the answer is what that chain gives, never the
          gold one.
        - ``redundant_call``: the call of hop j made a second time; the answer is right.
        - ``no_lookup``: only the first j calls, then a guessed answer of the right type (wrong).
        - ``wrong_answer``: every call, then another entity of the answer's type.

        The first error of the result is its flaw kind; only ``wrong_argument`` can fail (None)
        when no wrong call changes the answer.
        """
        kind = kind or rng.choice(self.FLAW_KINDS)
        if kind not in self.FLAW_KINDS:
            raise ValueError(f"lookup: unknown flaw kind {kind!r}; kinds: {', '.join(self.FLAW_KINDS)}")
        ents, rels = self._gold_path(example)
        j = rng.randrange(len(rels))
        calls = [("lookup", [ents[i], r], ents[i + 1]) for i, r in enumerate(rels)]
        answer = example.answer
        if kind == "wrong_tool":
            calls.insert(j, ("list_relations", [ents[j]], self.kb.list_relations(ents[j])))
        elif kind == "redundant_call":
            calls.insert(j + 1, calls[j])
        elif kind == "no_lookup":
            calls, answer = calls[:j], self._guess(answer, rng)
        elif kind == "wrong_answer":
            answer = self._guess(answer, rng)
        else:
            out = self._wrong_track(ents, rels, j, rng)
            if out is None:
                return None
            calls = calls[:j] + out
            answer = out[-1][2]
        return kind, gold_trace(calls, answer)

    def _wrong_track(self, ents: list[str], rels: list[str], j: int, rng: random.Random):
        """Calls from hop j on, starting with a wrong one and following the remaining relations,
        whose last result is not the gold answer; None if there is none."""
        kb, here, rel = self.kb, ents[j], rels[j]
        target = RELATIONS[rel][1]
        wrong_rels = [r for r in kb.relations_of(here) if r != rel and RELATIONS[r][1] == target]
        wrong_ents = [x for x in kb.of_type(kb.types[here]) if x != here]
        rng.shuffle(wrong_rels)
        rng.shuffle(wrong_ents)
        for first in [(here, r) for r in wrong_rels] + [(x, rel) for x in wrong_ents]:
            calls = [("lookup", list(first), kb.facts[first])]
            for r in rels[j + 1:]:
                at = calls[-1][2]
                calls.append(("lookup", [at, r], kb.facts[at, r]))
            if calls[-1][2] != ents[-1]:
                return calls
        return None

    def sft_corpus(self, n: int, flawed_fraction: float = 0.0, seed: int = 0
                   ) -> list[tuple[Example, str]]:
        """``n`` (train example, trace) pairs; exactly round(n · flawed_fraction) of them, at
        positions chosen by ``seed``, carry a ``flawed_trace``, the kinds taken in turn
        (``FLAW_KINDS`` order), the rest the gold trace. Needs n <= the number of train questions."""
        return tool_sft_corpus(self, n, flawed_fraction, seed)


def _round_robin(groups: list[list]) -> list[list]:
    """[[a0, b0, c0], [a1, b1, c1], ...]: one item from each group in turn, skipping empty ones."""
    rounds = []
    for i in range(max((len(g) for g in groups), default=0)):
        rounds.append([g[i] for g in groups if i < len(g)])
    return rounds


def tool_sft_corpus(task, n: int, flawed_fraction: float, seed: int) -> list[tuple[Example, str]]:
    """The SFT corpus of a tool task with ``FLAW_KINDS`` and ``flawed_trace`` (shared by
    ``lookup`` and ``arith_calc``): flawed positions by ``seed``, kinds in turn; a kind that does
    not apply to an example (``flawed_trace`` -> None) is replaced by the next one that does."""
    if not 0.0 <= flawed_fraction <= 1.0:
        raise ValueError(f"{task.name}: flawed_fraction must be in [0, 1], got {flawed_fraction}")
    exs = task.examples("train", n)
    rng = random.Random(f"{task.name}-sft/{seed}")
    flawed = sorted(rng.sample(range(n), round(n * flawed_fraction)))
    kinds = task.FLAW_KINDS
    out = [(ex, ex.solution) for ex in exs]
    for t, i in enumerate(flawed):
        for d in range(len(kinds)):
            got = task.flawed_trace(exs[i], rng, kinds[(t + d) % len(kinds)])
            if got is not None:
                out[i] = (exs[i], got[1])
                break
    return out
