"""The arith testbed regimes (docs/testbed.md): the skill-gap and compensating-step rules on
hand-worked traces, the regimes' SFT corpora, the default corpus pinned, bad kwargs, configs."""

import hashlib
import json
import math
import random
from pathlib import Path

import pytest

from finegrain.config import RunConfig, from_dict, load_config, to_dict, validate
from finegrain.recipes.regimes import METHODS, SETTINGS, regime_config
from finegrain.tasks.arith import (ArithTask, _apply, compensated_values, format_problem,
                                   format_solution, skill_gap_values)
from finegrain.tasks.base import STEP_CORRECT as C
from finegrain.tasks.base import STEP_WRONG as W
from finegrain.tasks.base import Example
from finegrain.tasks.regimes import REGIMES

# Q: 7 +5 *3 -4  ->  12, 36, 32
OPS = [("+", 5), ("*", 3), ("-", 4)]
EX = Example(id="hand", prompt=format_problem(7, OPS), answer="32",
             solution="7+5=12\n12*3=36\n36-4=32\nA: 32",
             meta={"start": 7, "ops": [list(o) for o in OPS], "values": [12, 36, 32]})
TASK = ArithTask()
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "regimes"


def corpus_hash(corpus) -> str:
    return hashlib.sha256(json.dumps([[ex.id, ex.prompt, text] for ex, text in corpus]).encode()).hexdigest()


# ---- the default corpus is what it was before the regime kwargs existed ---------------------

# sha256 of sft_corpus(200, flawed_fraction, seed) of ArithTask(), computed before the kwargs
# skill_gap_op / skill_gap_rate / miracle_fraction were added (and checked equal to the old code
# at n = 30,000). tests/train/test_regression_pin.py depends on this corpus.
PINNED_CORPUS = {
    (0.0, 0): "709df15bae6500be6c98d1a585a8a891c73cf37e670a39a90d6acb12a33ac67b",
    (0.3, 0): "c52a8b5216ea128a91ccb3107e8fb4d9cffe91b4bbd12c1525d54118c987d36b",  # the demo's fraction
    (0.25, 3): "4e4ac7a43d71a0c7fcb6f4ee64481c3839534bf035041eb7f4aeb4997840308f",
}


@pytest.mark.parametrize("kwargs", [{}, {"skill_gap_op": None, "skill_gap_rate": 0.0, "miracle_fraction": 0.0},
                                    {"skill_gap_op": "*", "skill_gap_rate": 0.0}])
@pytest.mark.parametrize("fraction, seed", sorted(PINNED_CORPUS))
def test_default_corpus_is_unchanged(kwargs, fraction, seed):
    assert corpus_hash(ArithTask(**kwargs).sft_corpus(200, fraction, seed)) == PINNED_CORPUS[fraction, seed]


# ---- the skill-gap rule: a op b written as (a op b) + b ---------------------------------------

@pytest.mark.parametrize("gap_lines, text, labels", [
    # 12*3 written as (12+1)*3 = 39; 39-4 = 35 correctly continues from it
    ([1], "7+5=12\n12*3=39\n39-4=35\nA: 35", [C, W, C, C]),
    # 7+5 written as 7+5+5 = 17, then 17*3 = 51, 51-4 = 47
    ([0], "7+5=17\n17*3=51\n51-4=47\nA: 47", [W, C, C, C]),
    # 36-4 written as 36 (the subtraction forgotten)
    ([2], "7+5=12\n12*3=36\n36-4=36\nA: 36", [C, C, W, C]),
    # two gap lines: 7+5 = 17, then 17*3 written as 18*3 = 54, 54-4 = 50
    ([0, 1], "7+5=17\n17*3=54\n54-4=50\nA: 50", [W, W, C, C]),
])
def test_skill_gap_worked_examples(gap_lines, text, labels):
    assert format_solution(7, OPS, skill_gap_values(7, OPS, gap_lines)) == text
    assert TASK.label_steps(EX, text).labels == labels
    assert TASK.verify(EX, text) == 0.0


def test_skill_gap_lines_picks_the_op_at_the_rate():
    rng = random.Random(0)
    assert ArithTask(skill_gap_op="*", skill_gap_rate=1.0).skill_gap_lines(EX, rng) == [1]
    assert ArithTask(skill_gap_op="-", skill_gap_rate=1.0).skill_gap_lines(EX, rng) == [2]
    state = rng.getstate()
    assert ArithTask(skill_gap_op="*", skill_gap_rate=0.0).skill_gap_lines(EX, rng) == []
    assert rng.getstate() == state  # rate 0 draws nothing


def test_flawed_solution_with_gap_lines():
    # a random slip on top of the gap: the slipped line and the gap lines are wrong, the answer too
    task = ArithTask(skill_gap_op="*", skill_gap_rate=1.0)
    rng = random.Random(0)
    for ex in task.examples("train", 400):
        gap = task.skill_gap_lines(ex, rng)
        text = task.flawed_solution(ex, rng, gap)
        wrong = {k for k, lab in enumerate(task.label_steps(ex, text).labels) if lab == W}
        assert set(gap) <= wrong and len(wrong - set(gap)) <= 1 and len(wrong) >= 1
        assert task.verify(ex, text) == 0.0
        assert all(int(line.split("=")[1]) >= 0 for line in text.split("\n")[:-1])


# ---- the compensating-step rule ---------------------------------------------------------------

@pytest.mark.parametrize("wrong_at, shift, fixed_at, text, labels", [
    # the module docstring's example: 7+5 = 13 (+1), 13*3 = 39 (right from 13), 39-4 = 32 (wrong: 35)
    (0, 1, 2, "7+5=13\n13*3=39\n39-4=32\nA: 32", [W, C, W, C]),
    # 12*3 = 34 (−2), then 34-4 = 32 (wrong: 30) writes the gold value
    (1, -2, 2, "7+5=12\n12*3=34\n34-4=32\nA: 32", [C, W, W, C]),
    # 7+5 = 9 (−3), then 9*3 = 36 (wrong: 27) is back on gold, 36-4 = 32 right
    (0, -3, 1, "7+5=9\n9*3=36\n36-4=32\nA: 32", [W, W, C, C]),
])
def test_compensating_step_worked_examples(wrong_at, shift, fixed_at, text, labels):
    assert format_solution(7, OPS, compensated_values(7, OPS, wrong_at, shift, fixed_at)) == text
    assert TASK.label_steps(EX, text).labels == labels
    assert TASK.verify(EX, text) == 1.0


@pytest.mark.parametrize("wrong_at, shift, fixed_at", [(1, 1, 1), (2, 1, 3), (0, 0, 2), (-1, 1, 2)])
def test_compensated_values_refuses_bad_positions(wrong_at, shift, fixed_at):
    with pytest.raises(ValueError, match="compensated_values: needs"):
        compensated_values(7, OPS, wrong_at, shift, fixed_at)


def test_miracle_solution_has_two_wrong_steps_and_the_right_answer():
    task = ArithTask(miracle_fraction=0.5)
    rng = random.Random(0)
    pairs = set()
    for ex in task.examples("train", 500):
        text = task.miracle_solution(ex, rng)
        wrong = [k for k, lab in enumerate(task.label_steps(ex, text).labels) if lab != C]
        assert len(wrong) == 2 and wrong[1] < len(ex.meta["ops"])
        assert task.verify(ex, text) == 1.0
        assert all(int(line.split("=")[1]) >= 0 for line in text.split("\n")[:-1])
        pairs.add(tuple(wrong))
    assert pairs == {(k, j) for j in range(4) for k in range(j)}  # every (wrong, fixed) pair occurs


# ---- the regimes' SFT corpora ---------------------------------------------------------------

@pytest.fixture(scope="module")
def corpora():
    """regime -> (task, corpus at the regime's own sft settings, each trace's labels)."""
    out = {}
    for name in REGIMES:
        cfg = regime_config(name)
        task = ArithTask(**cfg["task"]["kwargs"])
        corpus = task.sft_corpus(cfg["sft"]["n_examples"], cfg["sft"]["flawed_fraction"], cfg["sft"].get("seed", 0))
        out[name] = task, corpus, [task.label_steps(ex, text).labels for ex, text in corpus]
    return out


@pytest.mark.parametrize("name", sorted(REGIMES))
def test_every_arithmetically_wrong_line_is_labelled_wrong(corpora, name):
    # the corpus never changes a line's a, op or b: WRONG <=> c != a op b on every computation line
    task, corpus, labels = corpora[name]
    for (ex, text), labs in zip(corpus, labels):
        lines = text.split("\n")
        assert len(labs) == len(lines) == len(ex.meta["ops"]) + 1
        prev = ex.meta["start"]
        for line, (op, b), lab in zip(lines, ex.meta["ops"], labs):
            left, c = line.split("=")
            assert left == f"{prev}{op}{b}"
            assert (lab == W) == (int(c) != _apply(prev, op, b)) and lab in (C, W)
            prev = int(c)
        assert labs[-1] == C  # the answer line repeats the last written value


def test_skill_gap_corpus(corpora):
    task, corpus, labels = corpora["skill_gap"]
    rate = task.skill_gap_rate
    gap_lines = gap_wrong = 0
    for (ex, text), labs in zip(corpus, labels):
        for (op, b), lab, line in zip(ex.meta["ops"], labs, text.split("\n")):
            if lab == W:  # no slips in this regime: every wrong line is a * line with the (a+1)*b rule
                a, c = int(line.split("*")[0]), int(line.split("=")[1])
                assert op == "*" and c == (a + 1) * b
            if op == "*":
                gap_lines, gap_wrong = gap_lines + 1, gap_wrong + (lab == W)
        # no miracles here: a wrong step means a wrong answer (the gap error only grows)
        assert task.verify(ex, text) == (0.0 if W in labs else 1.0)
    sd = math.sqrt(rate * (1 - rate) / gap_lines)  # binomial sd of the wrong fraction
    assert gap_lines > 10_000
    assert rate - 4 * sd <= gap_wrong / gap_lines <= rate + 4 * sd


def test_miracle_corpus(corpora):
    task, corpus, labels = corpora["miracle"]
    n, flawed_fraction = len(corpus), SETTINGS["miracle"]["sft"]["flawed_fraction"]
    right = [labs for (ex, text), labs in zip(corpus, labels) if task.verify(ex, text) == 1.0]
    miracle = [labs for labs in right if W in labs]
    assert len(miracle) / len(right) >= 0.10
    # exactly round(miracle_fraction x the slip-free traces) (every problem has >= 2 operations)
    assert len(miracle) == round(task.miracle_fraction * (n - round(n * flawed_fraction)))
    assert all(labs.count(W) == 2 for labs in miracle)
    slips = [labs for (ex, text), labs in zip(corpus, labels) if task.verify(ex, text) == 0.0]
    assert len(slips) == round(n * flawed_fraction) and all(labs.count(W) == 1 for labs in slips)


def test_long_chains_corpus(corpora):
    task, corpus, labels = corpora["long_chains"]
    steps = {len(ex.meta["ops"]) for ex, _ in corpus}
    assert steps == set(range(8, 17))
    assert task.num_problems() > 10**20  # plentiful


@pytest.mark.parametrize("name", sorted(REGIMES))
def test_max_new_tokens_fit_the_regime(corpora, name):
    task, corpus, _ = corpora[name]
    cfg = regime_config(name)
    budget = cfg["rollout"]["max_new_tokens"]
    assert cfg["eval"]["max_new_tokens"] == budget
    assert budget >= task.longest_solution() + 8
    assert budget >= max(len(text) for _, text in corpus) + 1  # + EOS


def test_longest_solution_matches_enumeration():
    task = ArithTask(min_steps=1, max_steps=4, max_start=6, max_value=40, max_operand=5, ops="+-*")
    longest = max(len(format_solution(s, ops, skill_gap_values(s, ops))) for s, ops in task._enumerate())
    assert task.longest_solution() == longest
    assert ArithTask().longest_solution() == 37 and ArithTask(min_steps=8, max_steps=16).longest_solution() == 133


# ---- the regime kwargs shape the SFT corpus only ---------------------------------------------

@pytest.mark.parametrize("kwargs", [{"skill_gap_op": "*", "skill_gap_rate": 0.8}, {"miracle_fraction": 0.25},
                                    {"skill_gap_op": "+", "skill_gap_rate": 1.0, "miracle_fraction": 1.0}])
def test_regime_kwargs_leave_examples_verify_and_labels_alone(kwargs):
    task = ArithTask(**kwargs)
    for split in ("train", "test"):
        assert task.examples(split, 300) == TASK.examples(split, 300)
    for response in ["7+5=12\n12*3=39\n39-4=35\nA: 35", "7+5=13\n13*3=39\n39-4=32\nA: 32", EX.solution]:
        assert task.verify(EX, response) == TASK.verify(EX, response)
        assert task.label_steps(EX, response) == TASK.label_steps(EX, response)
    assert task.num_problems() == TASK.num_problems()


def test_combined_kwargs_corpus():
    # skill gap + miracle + slips together: the miracle traces are gold-based (right answer), the
    # rest carry the gap; every trace is deterministic
    task = ArithTask(skill_gap_op="*", skill_gap_rate=1.0, miracle_fraction=0.5)
    corpus = task.sft_corpus(300, 0.2, seed=1)
    assert corpus == task.sft_corpus(300, 0.2, seed=1)
    assert [ex for ex, _ in corpus] == TASK.examples("train", 300)
    n_right_with_wrong = sum(task.verify(ex, t) == 1.0 and W in task.label_steps(ex, t).labels for ex, t in corpus)
    assert n_right_with_wrong == round(0.5 * (300 - 60))


# ---- bad kwargs ------------------------------------------------------------------------------

NAN = float("nan")


@pytest.mark.parametrize("kwargs, field", [
    ({"skill_gap_op": "/"}, "skill_gap_op"),
    ({"skill_gap_op": "**"}, "skill_gap_op"),
    ({"skill_gap_op": ""}, "skill_gap_op"),
    ({"skill_gap_op": 3}, "skill_gap_op"),
    ({"skill_gap_op": "*", "ops": "+-"}, "skill_gap_op"),     # not one of the task's ops
    ({"skill_gap_op": "*", "skill_gap_rate": 2}, "skill_gap_rate"),
    ({"skill_gap_op": "*", "skill_gap_rate": -0.1}, "skill_gap_rate"),
    ({"skill_gap_op": "*", "skill_gap_rate": NAN}, "skill_gap_rate"),
    ({"skill_gap_op": "*", "skill_gap_rate": True}, "skill_gap_rate"),
    ({"skill_gap_op": "*", "skill_gap_rate": "0.8"}, "skill_gap_rate"),
    ({"skill_gap_rate": 0.8}, "skill_gap_rate"),               # a rate without an op
    ({"miracle_fraction": 1.5}, "miracle_fraction"),
    ({"miracle_fraction": -1}, "miracle_fraction"),
    ({"miracle_fraction": NAN}, "miracle_fraction"),
    ({"miracle_fraction": None}, "miracle_fraction"),
    ({"miracle_fraction": 0.2, "min_steps": 1, "max_steps": 1}, "miracle_fraction"),  # needs 2 ops
])
def test_bad_regime_kwargs(kwargs, field):
    with pytest.raises(ValueError) as err:
        ArithTask(**kwargs)
    msg = str(err.value)
    assert msg.startswith(f"task.kwargs.{field}: expected ")
    assert msg.endswith(f", got {kwargs[field]!r}") and "\n" not in msg


def test_bad_regime_kwarg_messages():
    with pytest.raises(ValueError) as err:
        ArithTask(skill_gap_op="*", skill_gap_rate=2)
    assert str(err.value) == "task.kwargs.skill_gap_rate: expected a finite number in [0, 1], got 2"
    with pytest.raises(ValueError) as err:
        ArithTask(skill_gap_op="*", ops="+-")
    assert str(err.value) == "task.kwargs.skill_gap_op: expected null or one of the task's ops '+-', got '*'"


# ---- regime configs --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(REGIMES))
@pytest.mark.parametrize("method", METHODS)
def test_shipped_regime_yaml_matches_the_recipe(name, method):
    cfg = from_dict(RunConfig, regime_config(name, method))
    validate(cfg)
    assert to_dict(load_config(CONFIGS / f"{name}_{method}.yaml")) == to_dict(cfg)
    assert cfg.task.kwargs == REGIMES[name].task_kwargs
    assert isinstance(ArithTask(**cfg.task.kwargs), ArithTask)


def test_regime_config_methods_and_errors():
    for method in METHODS:
        validate(from_dict(RunConfig, regime_config("skill_gap", method)))
    oracle = regime_config("miracle", "step_oracle")
    assert [r["name"] for r in oracle["rewards"]] == ["verifier", "step_labels"]
    assert oracle["advantage"]["per_source"]["step_labels"]["kwargs"] == {"reward_at": "step_end"}
    cfg = regime_config("long_chains")
    cfg["task"]["kwargs"]["max_steps"] = 3  # a copy: the registry is untouched
    assert REGIMES["long_chains"].task_kwargs["max_steps"] == 16
    with pytest.raises(ValueError, match="regime: expected one of long_chains, skill_gap, miracle, skill_gap_long, got 'easy'"):
        regime_config("easy")
    with pytest.raises(ValueError, match="method: expected one of grpo"):
        regime_config("miracle", "agent")
    assert sorted(CONFIGS.glob("*.yaml")) == sorted(CONFIGS / f"{r}_{m}.yaml" for r in REGIMES
                                                    for m in METHODS)
