"""LookupTask: the KB, questions and splits, tools, the trace format, turn labels, SFT data.

Hand-written traces use a hand-made example (labels read only the example's meta), so their
expected labels do not depend on the generated KB:
    Q: Zorb.founder.born_in.located_in   Zorb -founder-> Kel -born_in-> Varo -located_in-> Pem
"""

import random
import re
from collections import Counter

import pytest

from finegrain import toolcalls as env_tools
from finegrain.segment import SEGMENTERS
from finegrain.tasks import TASKS
from finegrain.tasks.arith import split_of
from finegrain.tasks.base import STEP_CORRECT as C
from finegrain.tasks.base import STEP_UNPARSEABLE as U
from finegrain.tasks.base import STEP_WRONG as W
from finegrain.tasks.base import Example, StepTask
from finegrain.tasks.lookup import (RELATIONS, LookupTask, checklist, format_question, observation_spans,
                                    parse_call, tool_turns)

TASK = LookupTask()
GOLD_CALLS = [["lookup", ["Zorb", "founder"]], ["lookup", ["Kel", "born_in"]],
              ["lookup", ["Varo", "located_in"]]]
EX = Example(id="hand", prompt="Q: Zorb.founder.born_in.located_in\n", answer="Pem",
             meta={"gold_calls": GOLD_CALLS, "entities": ["Kel", "Varo", "Pem"],
                   "checklist": checklist(GOLD_CALLS, "Pem")})


def call(name, *args):
    return f"<call>{name}({', '.join(args)})</call>"


def res(text):
    return f"\n<result>{text}</result>\n"


GOLD = (call("lookup", "Zorb", "founder") + res("Kel") + call("lookup", "Kel", "born_in") + res("Varo")
        + call("lookup", "Varo", "located_in") + res("Pem") + "A: Pem")


def judged(response, ex=EX):
    out = TASK.label_steps(ex, response)
    assert out.spans == SEGMENTERS.get(TASK.segmenter)(response)  # lines up with step_ids
    kinds = [t.kind for t in TASK.judge_turns(ex, response)]
    return out.labels, out.first_error, kinds


def model_turns(text):
    return [text[a:b] for a, b in tool_turns(text)]


def replay(task, ex, trace):
    """Play the trace's model turns against the task's tools as the environment would: each turn
    is parsed with finegrain.toolcalls.parse_call, the tool is run and format_result appended.
    Returns the rebuilt text and the calls made."""
    tools, text, calls = task.tools(ex), "", []
    for turn in model_turns(trace):
        text += turn
        c = env_tools.parse_call(turn)
        if c is None:
            break
        assert c.error is None, (turn, c.error)
        calls.append([c.name, c.args])
        text += env_tools.format_result(tools[c.name](*c.args))
    return text, calls


# ---- registration, KB, questions ------------------------------------------------------------


def test_registered_and_protocol():
    assert TASKS.get("lookup") is LookupTask
    assert isinstance(TASK, StepTask)
    assert TASK.segmenter == "tool_turns" and SEGMENTERS.get("tool_turns") is tool_turns
    assert TASK.format_prompt(EX) == EX.prompt


def test_kb_is_consistent():
    kb = TASK.kb
    assert Counter(kb.types.values()) == {"person": 40, "city": 16, "country": 6, "company": 16}
    for name, kind in kb.types.items():
        assert re.fullmatch(r"[A-Z][a-z]{2,4}", name), name
        # every relation of the entity's type is defined and lands on the declared type
        for rel in kb.relations_of(name):
            assert kb.types[kb.facts[name, rel]] == RELATIONS[rel][1]
    assert len(kb.facts) == 40 * 3 + 16 * 3 + 16 * 2 + 6 * 2
    for country in kb.of_type("country"):
        assert kb.facts[kb.facts[country, "capital"], "located_in"] == country
    for company in kb.of_type("company"):
        assert kb.facts[company, "founder"] != kb.facts[company, "ceo"]


def test_examples_deterministic_and_seed_dependent():
    a, b = LookupTask(seed=3), LookupTask(seed=3)
    assert a.kb == b.kb
    assert [(e.id, e.prompt, e.answer, e.solution, e.meta) for e in a.examples("train", 200)] == \
           [(e.id, e.prompt, e.answer, e.solution, e.meta) for e in b.examples("train", 200)]
    assert a.kb != LookupTask(seed=4).kb
    assert a.examples("test", 50) == a.examples("test")[:50]  # n gives a prefix
    assert a.examples("train", 0) == []


def test_splits_disjoint_and_sizes():
    train, test = TASK.examples("train"), TASK.examples("test")
    assert (len(train), len(test)) == (3868, 445)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert len({e.prompt for e in train}) == len(train)
    assert all(split_of(e.prompt) == "train" for e in train) and all(split_of(e.prompt) == "test" for e in test)
    assert train[0].id == "lookup-train-00000" and test[-1].id == f"lookup-test-{len(test) - 1:05d}"
    # any prefix mixes hop counts evenly (until the 2-hop questions run out)
    assert Counter(len(e.meta["gold_calls"]) for e in train[:300]) == {2: 100, 3: 100, 4: 100}
    assert {len(e.meta["gold_calls"]) for e in train} == {2, 3, 4}
    with pytest.raises(ValueError, match="asked for 446 'test' questions"):
        TASK.examples("test", 446)
    with pytest.raises(ValueError, match="split must be one of"):
        TASK.examples("dev")


def test_meta_format_and_gold_path():
    kb = TASK.kb
    for ex in TASK.examples("train", 150) + TASK.examples("test", 50):
        assert set(ex.meta) == {"gold_calls", "entities", "checklist"}
        calls, ents = ex.meta["gold_calls"], ex.meta["entities"]
        start, *rels = ex.prompt[3:-1].split(".")
        assert ex.prompt == format_question(start, rels)
        # the chain, followed through the KB, visits `entities` and ends at the answer
        at = start
        for (name, args), rel, ent in zip(calls, rels, ents, strict=True):
            assert name == "lookup" and args == [at, rel]
            at = kb.facts[at, rel]
            assert at == ent
        assert ents[-1] == ex.answer and len(set([start] + ents)) == len(ents) + 1  # no loops
        items = ex.meta["checklist"]
        assert [i["id"] for i in items] == [f"call{k}" for k in range(1, len(calls) + 1)] + ["answer"]
        assert [i["depends"] for i in items] == [[]] + [[f"call{k}"] for k in range(1, len(calls) + 1)]
        assert [i["check"] for i in items] == [{"type": "call", "name": n, "args": a} for n, a in calls] + \
            [{"type": "answer", "value": ex.answer}]
        assert abs(sum(i["weight"] for i in items) - 1.0) < 1e-12
        assert all(set(i) == {"id", "weight", "depends", "check"} for i in items)


# ---- trace format ---------------------------------------------------------------------------


def test_gold_traces_are_what_the_environment_builds():
    for ex in TASK.examples("train", 100) + TASK.examples("test", 30):
        rebuilt, calls = replay(TASK, ex, ex.solution)
        assert rebuilt == ex.solution
        assert calls == ex.meta["gold_calls"]
        turns = model_turns(ex.solution)
        assert len(turns) == len(calls) + 1 and turns[-1] == f"A: {ex.answer}"
        assert env_tools.parse_call(turns[-1]) is None  # the final answer has no call
        assert TASK.verify(ex, ex.solution) == 1.0
        out = TASK.label_steps(ex, ex.solution)
        assert out.labels == [C] * len(turns) and out.first_error is None


def test_observation_spans_cover_exactly_the_results():
    texts = [ex.solution for ex in TASK.examples("train", 50)] + [t for _, t in TASK.sft_corpus(60, 1.0)]
    for text in texts:
        spans = observation_spans(text)
        # an independent reading: every "\n<result>...</result>\n" right after "</call>"
        expected = [(m.start(1), m.end(1)) for m in re.finditer(r"</call>(\n<result>[^<]*</result>\n)", text)]
        assert spans == expected and len(spans) == text.count("<result>")
        assert "".join(model_turns(text)) == re.sub(r"\n<result>[^<]*</result>\n", "", text)


def test_observation_spans_edge_cases():
    c = call("lookup", "Zorb", "founder")
    assert observation_spans(c + "\n<result>Ke") == [(len(c), len(c) + 11)]  # cut by the budget
    assert observation_spans(c + "\n") == [(len(c), len(c) + 1)]
    assert observation_spans(c + "\n<result>Kel</result>") == [(len(c), len(c) + 21)]  # no final newline
    assert observation_spans("A: Pem\n<result>Kel</result>\n") == []  # written by the model
    assert observation_spans(c + "more text") == [] and observation_spans("") == []

# ---- tools and verify -----------------------------------------------------------------------


def test_tools():
    kb = TASK.kb
    tools = TASK.tools(EX)
    lookup, list_relations = tools["lookup"], tools["list_relations"]
    person = kb.of_type("person")[0]
    city = kb.facts[person, "born_in"]
    assert lookup(person, "born_in") == city and lookup(f" {person} ", "born_in ") == city
    assert lookup("Nobody", "born_in") == "unknown"          # unknown entity
    assert lookup(person, "capital") == "unknown"            # relation of another type
    assert lookup(person.lower(), "born_in") == "unknown"    # names are case-sensitive
    assert list_relations(person) == "born_in, lives_in, works_for"
    assert list_relations(city) == "located_in, mayor"
    assert list_relations("Nobody") == "unknown"
    for bad in [("", "born_in"), (person, " "), (person, "birthplace"), (person, "Born_in"), (3, 4)]:
        with pytest.raises(ValueError):
            lookup(*bad)
    with pytest.raises(ValueError):
        list_relations("")
    # a wrong number of arguments is Python's TypeError (the environment binds the signature first
    # and reports it as bad_arguments)
    for bad in [(person,), (person, "born_in", "x")]:
        with pytest.raises(TypeError):
            lookup(*bad)
    with pytest.raises(TypeError):
        list_relations(person, city)


def test_verify_reads_the_last_answer_line():
    assert TASK.verify(EX, GOLD) == 1.0
    assert TASK.verify(EX, GOLD.replace("A: Pem", "A: Varo")) == 0.0
    assert TASK.verify(EX, "A: Pem") == 1.0                     # no lookups: still the right answer
    assert TASK.verify(EX, "A: Pem\nA: Kel") == 0.0             # the last answer line counts
    assert TASK.verify(EX, "A: Kel\nA: Pem.") == 1.0            # text after the name is ignored
    assert TASK.verify(EX, "A: pem") == 0.0 and TASK.verify(EX, "Pem") == 0.0
    assert TASK.verify(EX, GOLD[:GOLD.rindex("A:")]) == 0.0     # no answer


# ---- turn labels on hand-written traces -----------------------------------------------------

C1, C2 = call("lookup", "Zorb", "founder"), call("lookup", "Kel", "born_in")
C3 = call("lookup", "Varo", "located_in")
R1, R2, R3 = res("Kel"), res("Varo"), res("Pem")


@pytest.mark.parametrize("response, labels, first, kinds", [
    (GOLD, [C, C, C, C], None, ["correct"] * 4),
    # wrong tool, then the right call: only the wrong-tool turn is wrong
    (C1 + R1 + call("list_relations", "Kel") + res("born_in, lives_in, works_for") + C2 + R2 + C3 + R3
     + "A: Pem",
     [C, W, C, C, C], 1, ["correct", "wrong_tool", "correct", "correct", "correct"]),
    # wrong relation, then the right one
    (C1 + R1 + call("lookup", "Kel", "lives_in") + res("Tam") + C2 + R2 + C3 + R3 + "A: Pem",
     [C, W, C, C, C], 1, ["correct", "wrong_argument", "correct", "correct", "correct"]),
    # a wrong track: off the gold chain every call is wrong, and the answer is not looked up
    (C1 + R1 + call("lookup", "Kel", "lives_in") + res("Tam") + call("lookup", "Tam", "located_in") + res("Dor")
     + "A: Dor", [C, W, W, W], 1, ["correct", "wrong_argument", "wrong_argument", "no_lookup"]),
    # the same call twice
    (C1 + R1 + C1 + R1 + C2 + R2 + C3 + R3 + "A: Pem", [C, W, C, C, C], 1,
     ["correct", "redundant_call", "correct", "correct", "correct"]),
    # a new call after the chain is complete is redundant too
    (C1 + R1 + C2 + R2 + C3 + R3 + call("lookup", "Pem", "capital") + res("Lun") + "A: Pem",
     [C, C, C, W, C], 3, ["correct", "correct", "correct", "redundant_call", "correct"]),
    # answering without looking up: wrong even though the answer is right (a miracle)
    ("A: Pem", [W], 0, ["no_lookup"]),
    (C1 + R1 + "A: Pem", [C, W], 1, ["correct", "no_lookup"]),
    (C1 + R1 + C2 + R2 + C3 + R3 + "A: Varo", [C, C, C, W], 3, ["correct"] * 3 + ["wrong_answer"]),
    # malformed calls, a wrong number of arguments, another tool name
    ("<call>lookup[Zorb]</call>" + res("error: malformed call") + C1 + R1, [W, C], 0, ["malformed", "correct"]),
    (call("lookup", "Zorb") + res("error: lookup takes 2 arguments") + C1 + R1, [W, C], 0,
     ["wrong_argument", "correct"]),
    (call("search", "Zorb") + res("error: no tool search"), [W], 0, ["wrong_tool"]),
    # free text before a call is not checked; a turn with only free text is UNPARSEABLE
    ("I need the founder.\n" + C1 + R1 + "I do not know.", [C, U], 1, ["correct", "unparseable"]),
    # the JSON form of a call
    ('<call>{"name": "lookup", "arguments": {"entity": "Zorb", "relation": "founder"}}</call>' + R1,
     [C], None, ["correct"]),
    # a call made out of order is wrong; made again when it is the next gold call, it is correct
    (C2 + R2 + C1 + R1 + C2 + R2 + C3 + R3 + "A: Pem", [W, C, C, C, C], 0,
     ["wrong_argument"] + ["correct"] * 4),
    # cut after an observation: every turn so far is right, but nothing answers (verify 0)
    (C1 + R1 + C2 + R2, [C, C], None, ["correct", "correct"]),
    ("", [], None, []),
])
def test_label_steps_hand_written(response, labels, first, kinds):
    assert judged(response) == (labels, first, kinds)


def test_label_spans_are_the_model_turns():
    response = C1 + R1 + "A: Pem\n"
    out = TASK.label_steps(EX, response)
    assert [response[a:b] for a, b in out.spans] == [C1, "A: Pem\n"]


# ---- SFT data -------------------------------------------------------------------------------

# the verify result each flaw is designed to give
FLAW_VERIFY = {"wrong_tool": 1.0, "wrong_argument": 0.0, "redundant_call": 1.0, "no_lookup": 0.0,
               "wrong_answer": 0.0}


def test_sft_corpus_without_flaws_is_gold():
    corpus = TASK.sft_corpus(120, 0.0, seed=1)
    assert [ex.id for ex, _ in corpus] == [ex.id for ex in TASK.examples("train", 120)]
    assert all(text == ex.solution for ex, text in corpus)
    assert all(TASK.label_steps(ex, text).first_error is None for ex, text in corpus)


def test_sft_corpus_flaws_appear_as_designed():
    assert set(FLAW_VERIFY) == set(LookupTask.FLAW_KINDS)
    corpus = TASK.sft_corpus(200, 0.4, seed=0)
    flawed = [(ex, text) for ex, text in corpus if text != ex.solution]
    assert len(flawed) == 80
    seen = Counter()
    for ex, text in flawed:
        out = TASK.label_steps(ex, text)
        assert out.first_error is not None
        kind = TASK.judge_turns(ex, text)[out.first_error].kind
        seen[kind] += 1
        assert TASK.verify(ex, text) == FLAW_VERIFY[kind], (kind, text)
        rebuilt, _ = replay(TASK, ex, text)  # the observations are the tools' true answers
        assert rebuilt == text
    assert seen == {k: 16 for k in FLAW_VERIFY}  # kinds taken in turn
    assert TASK.sft_corpus(200, 0.4, seed=0) == corpus
    assert [t for _, t in TASK.sft_corpus(200, 0.4, seed=1)] != [t for _, t in corpus]
    with pytest.raises(ValueError, match="flawed_fraction"):
        TASK.sft_corpus(10, 1.5)


@pytest.mark.parametrize("kind", LookupTask.FLAW_KINDS)
def test_flawed_trace_of_each_kind(kind):
    rng = random.Random(0)
    for ex in TASK.examples("test", 40):
        got_kind, text = TASK.flawed_trace(ex, rng, kind)
        judgements = TASK.judge_turns(ex, text)
        first = next(j for j in judgements if j.label != C)
        assert got_kind == kind and first.kind == kind
        assert TASK.verify(ex, text) == FLAW_VERIFY[kind]
        if kind in ("wrong_tool", "redundant_call"):  # one wasted call, the rest is gold
            assert [j.label for j in judgements].count(W) == 1
            assert len(judgements) == len(ex.meta["gold_calls"]) + 2
    with pytest.raises(ValueError, match="unknown flaw kind"):
        TASK.flawed_trace(EX, rng, "typo")


# ---- kwargs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"n_people": 1}, "task.kwargs.n_people: expected an integer in [2, 500], got 1"),
    ({"n_cities": 3, "n_countries": 4},
     "task.kwargs.n_cities: expected an integer in [n_countries (4), 500], got 3"),
    ({"n_companies": 2.0}, "task.kwargs.n_companies: expected an integer in [2, 500], got 2.0"),
    ({"min_hops": 0}, "task.kwargs.min_hops: expected an integer in [1, 5], got 0"),
    ({"min_hops": 3, "max_hops": 2}, "task.kwargs.max_hops: expected an integer in [min_hops (3), 5], got 2"),
    ({"max_hops": 6}, "task.kwargs.max_hops: expected an integer in [min_hops (2), 5], got 6"),
    ({"seed": True}, "task.kwargs.seed: expected an integer, got True"),
])
def test_kwargs_are_checked(kwargs, message):
    with pytest.raises(ValueError) as err:
        LookupTask(**kwargs)
    assert str(err.value) == message


def test_registry_checks_unknown_kwargs():
    with pytest.raises(ValueError, match="unknown key 'hops' for task 'lookup'"):
        TASKS.check_kwargs("lookup", {"hops": 3}, "task.kwargs")
    TASKS.check_kwargs("lookup", {"max_hops": 3, "seed": 1}, "task.kwargs")


def test_small_configuration():
    task = LookupTask(n_people=2, n_cities=2, n_countries=2, n_companies=2, min_hops=1, max_hops=1, seed=5)
    train, test = task.examples("train"), task.examples("test")
    assert len(train) + len(test) == 2 * 3 + 2 * 3 + 2 * 2 + 2 * 2  # one question per fact
    assert all(len(e.meta["gold_calls"]) == 1 for e in train + test)
    corpus = task.sft_corpus(len(train), 1.0)
    assert all(task.label_steps(ex, t).first_error is not None for ex, t in corpus)
