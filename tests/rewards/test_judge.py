"""The ``judge`` reward: verdict parsing (valid, partially valid, garbage), weights and
dependencies worked by hand, the cache, the rubric file's confinement, the rule backend against
``step_labels``, end-to-end calls against loopback servers (a scripted judge and the real tiny
model server of ``tests/sampling/openai_servers.py``), and a tiny RL run with the rule judge."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from finegrain.config import load_config, validate
from finegrain.models.tokenizer import char_tokenizer
from finegrain.rewards import REWARDS
from finegrain.rewards.judge import Item, Judge, Rubric, checklist_score, load_rubric, make_items, parse_verdict
from finegrain.segment import token_step_ids
from finegrain.tasks import TASKS
from finegrain.tasks.base import Example
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from finegrain.trajectory import Trajectory
from tests.conftest import tiny_run_overrides
from tests.helpers import close, judge_ctx
from tests.sampling.openai_servers import (chat_answer, save_tiny_model, scripted_server, serving_available,
                                           stdlib_model_server, transformers_serve)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALPHABET = "0123456789+-*=:QAx \n"
EX = Example("x", "Q: 7 +5 *3\n", "36", meta={"start": 7, "ops": [["+", 5], ["*", 3]], "values": [12, 36]})
TEXTS = [
    "7+5=12\n12*3=36\nA: 36",   # all correct
    "7+5=13\n13*3=39\nA: 39",   # step 0 wrong, then correctly carried on
    "7+5=12\nxx\nA: 12",        # unparseable middle line, wrong answer line
]
TOK = char_tokenizer(ALPHABET)


def make_traj(texts, examples=None):
    rows = [TOK(t, add_special_tokens=False)["input_ids"] + [TOK.eos_token_id] for t in texts]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), TOK.pad_token_id)
    rm = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        rm[i, :len(r)] = True
    B = len(rows)
    examples = examples or [EX] * B
    return Trajectory(prompt_ids=torch.ones(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                      response_ids=ids, response_mask=rm, loss_mask=rm.clone(), group_ids=torch.zeros(B, dtype=torch.long),
                      step_ids=token_step_ids(TOK, ids, rm, "newline"), behavior_logprobs=torch.zeros(B, L),
                      truncated=torch.zeros(B, dtype=torch.bool), prompt_texts=[e.prompt for e in examples],
                      response_texts=list(texts), examples=examples)


def ctx(task=None):
    return judge_ctx(TOK, task)


class Scripted:
    """A backend that answers ``answer(request)`` and counts what it was asked."""

    key = "scripted"

    def __init__(self, answer):
        self.answer, self.calls, self.prompts = answer, 0, []

    def generate(self, requests):
        self.calls += 1
        self.prompts += [q.prompt for q in requests]
        return [self.answer(q) for q in requests]


# --------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, scores, missing", [
    ('{"scores": {"a": 1, "b": 0}}', {"a": 1.0, "b": 0.0}, ()),
    ('Reasoning first. ```json\n{"scores": {"a": true, "b": "no"}}\n```', {"a": 1.0, "b": 0.0}, ()),
    ('{"a": 0.25, "b": {"answer": true}}', {"a": 0.25, "b": 1.0}, ()),                   # flat; CM2's {"answer": bool}
    ('{"scores": {"a": 0}} then I changed my mind: {"scores": {"a": 1, "b": 1}}', {"a": 1.0, "b": 1.0}, ()),  # the LAST
    ('{"scores": {"a": "PASS", "b": "satisfied"}} trailing words', {"a": 1.0, "b": 1.0}, ()),
])
def test_valid_verdicts(text, scores, missing):
    v = parse_verdict(text, ["a", "b"])
    assert v.parsed and v.scores == scores and v.missing == missing


@pytest.mark.parametrize("text, scores, missing", [
    ('{"scores": {"a": 1}}', {"a": 1.0}, ("b",)),                       # b absent
    ('{"scores": {"a": 1, "b": 2}}', {"a": 1.0}, ("b",)),               # out of [0, 1]
    ('{"scores": {"a": "maybe", "b": 0}}', {"b": 0.0}, ("a",)),         # not yes/no-like
    ('{"scores": {"a": NaN, "b": 1}}', {"b": 1.0}, ("a",)),             # NaN is not a score
    ('{"scores": {"a": [1], "b": null, "c": 1}}', {}, ("a", "b")),      # nothing valid: unparsable
])
def test_partially_valid_verdicts(text, scores, missing):
    v = parse_verdict(text, ["a", "b"])
    assert v.scores == scores and v.missing == missing and v.parsed == bool(scores)


@pytest.mark.parametrize("text", ["", "looks right to me", '{"scores": {"a": 1', "[1, 0]", "{not json}", "}{"])
def test_garbage_verdicts(text):
    v = parse_verdict(text, ["a", "b"])
    assert not v.parsed and v.scores == {} and v.missing == ("a", "b")


# --------------------------------------------------------------------------------- weights and dependencies

ITEMS = make_items([{"id": "a", "text": "A", "weight": 1}, {"id": "b", "text": "B", "weight": 2, "depends": ["a"]},
                    {"id": "c", "text": "C", "weight": 1, "depends": ["b"]}], "test")


@pytest.mark.parametrize("scores, want", [
    ({"a": 1, "b": 1, "c": 1}, 1.0),          # (1 + 2 + 1) / 4
    ({"a": 0, "b": 1, "c": 1}, 0.0),          # a fails: b gated, so c gated too (transitive)
    ({"a": 1, "b": 0, "c": 1}, 0.25),         # c gated by b: 1 / 4
    ({"a": 1, "b": 0.4, "c": 1}, 0.45),       # e_b = 0.4 < τ = 0.5 gates c: (1 + 0.8) / 4
    ({"a": 1, "b": 0.5, "c": 1}, 0.75),       # e_b = 0.5 ≥ τ: (1 + 1 + 1) / 4
    ({"a": 1, "c": 1}, 0.25),                 # b missing scores 0 (missing_item_score), gating c
])
def test_checklist_score_by_hand(scores, want):
    assert checklist_score(ITEMS, {k: float(v) for k, v in scores.items()}) == pytest.approx(want, rel=1e-12)


def test_missing_item_score_and_threshold_are_used():
    # b missing scored 1: (1 + 2 + 1) / 4; with τ = 1 an item at 0.9 gates its dependants
    assert checklist_score(ITEMS, {"a": 1.0, "c": 1.0}, missing_item_score=1.0) == 1.0
    assert checklist_score(ITEMS, {"a": 0.9, "b": 1.0, "c": 1.0}, pass_threshold=1.0) == pytest.approx(0.9 / 4)


@pytest.mark.parametrize("raw, match", [
    ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "item ids must be unique"),
    ([{"id": "a", "text": "x", "depends": ["z"]}], r"depends on unknown ids \['z'\]"),
    ([{"id": "a", "text": "x", "depends": ["b"]}, {"id": "b", "text": "y", "depends": ["a"]}], "dependency cycle a -> b -> a"),
    ([{"id": "a", "text": "x", "weight": 0}], "weights sum to 0"),
    ([{"id": "a", "text": "x", "weight": -1}], "weight must be a finite number >= 0"),
    ([{"id": "a"}], "needs a 'text'"),
    ([], "non-empty list of items"),
])
def test_bad_items_are_refused(raw, match):
    with pytest.raises(ValueError, match=match):
        make_items(raw, "test")


def test_cm2_style_items_are_accepted():
    [it] = make_items([{"id": "k1", "question": "Did it call lookup?", "weight": 0.5, "depends_on": []}], "test")
    assert it == Item("k1", "Did it call lookup?", 0.5, ())


# --------------------------------------------------------------------------------- unparsable policy, items, prompts

def test_unparsable_and_partial_verdicts_are_counted_never_raised():
    answers = {TEXTS[0]: '{"scores": {"correct": 1}}', TEXTS[1]: "no idea", TEXTS[2]: '{"scores": {"other": 1}}'}
    judge = Judge(Scripted(lambda q: answers[q.response]), TASKS.get("arith")(), fallback=0.3)
    out = judge(make_traj(TEXTS))
    # row 1: garbage -> fallback 0.3; row 2: JSON without the item -> unparsable too (no valid item)
    close(out.values, [1.0, 0.3, 0.3])
    assert out.mask.all() and out.components["unparsable"].tolist() == [0, 1, 1]
    masked = Judge(Scripted(lambda q: answers[q.response]), TASKS.get("arith")(), fallback=None)(make_traj(TEXTS))
    assert masked.mask.tolist() == [True, False, False] and masked.values.tolist() == [1.0, 0.0, 0.0]


def test_partially_valid_verdict_counts_missing_items_and_uses_weights():
    rubric = Rubric(items=make_items([{"id": "steps", "text": "s", "weight": 3},
                                      {"id": "answer", "text": "a", "weight": 1, "depends": ["steps"]}], "t"))
    judge = Judge(Scripted(lambda q: '{"scores": {"steps": 1}}'), TASKS.get("arith")(), rubric=rubric,
                  correct=2.0, wrong=-1.0)
    out = judge(make_traj(TEXTS[:1]))
    # G = 3 / 4 (answer missing -> 0); r = −1 + (2 − (−1)) · 0.75 = 1.25
    close(out.values, [1.25])
    assert out.components["missing_items"].tolist() == [1] and out.components["unparsable"].tolist() == [0]


def test_example_meta_items_override_the_rubric_and_reach_the_prompt():
    ex = Example("m", EX.prompt, EX.answer, meta={**EX.meta, "rubric": [{"id": "tidy", "text": "Lines are tidy."}]})
    backend = Scripted(lambda q: json.dumps({"scores": {it.id: 1 for it in q.items}}))
    out = Judge(backend, TASKS.get("arith")())(make_traj(TEXTS[:2], [ex, EX]))
    close(out.values, [1.0, 1.0])
    assert "- tidy: Lines are tidy." in backend.prompts[0] and '{"scores": {"tidy": 1}}' in backend.prompts[0]
    assert "- correct: " in backend.prompts[1] and "Reference answer: 36" in backend.prompts[1]


def test_step_prompts_show_the_previous_steps():
    backend = Scripted(lambda q: '{"scores": {"correct": 1}}')
    Judge(backend, TASKS.get("arith")(), level="step")(make_traj(TEXTS[:1]))
    assert len(backend.prompts) == 3
    assert "Steps so far:\n(none)\n\nStep to grade:\n7+5=12\n" in backend.prompts[0]
    assert "Steps so far:\n7+5=12\n12*3=36\n\nStep to grade:\nA: 36\n" in backend.prompts[2]


# --------------------------------------------------------------------------------- cache

def test_identical_requests_are_judged_once():
    backend = Scripted(lambda q: '{"scores": {"correct": 1}}')
    judge = Judge(backend, TASKS.get("arith")())
    first = judge(make_traj([TEXTS[0], TEXTS[0], TEXTS[1]]))
    assert len(backend.prompts) == 2 and first.components["cache_hits"].tolist() == [0, 1, 0]
    again = judge(make_traj([TEXTS[1], TEXTS[0]]))
    assert len(backend.prompts) == 2 and again.components["cache_hits"].tolist() == [1, 1]
    assert torch.equal(again.values, torch.tensor([1.0, 1.0]))


def test_the_cache_is_keyed_by_model_and_bounded():
    a, b = Scripted(lambda q: '{"correct": 1}'), Scripted(lambda q: '{"correct": 0}')
    b.key = "another-model"
    ja, jb = Judge(a, TASKS.get("arith")(), cache_size=1), Judge(b, TASKS.get("arith")())
    jb._cache = ja._cache  # one shared store: the model key still tells the verdicts apart
    assert ja(make_traj(TEXTS[:1])).values.tolist() == [1.0] and jb(make_traj(TEXTS[:1])).values.tolist() == [0.0]
    ja(make_traj(TEXTS[1:2]))
    assert len(ja._cache) == 1  # bounded: the oldest entry went


def test_batches_go_to_the_backend_batch_size_at_a_time():
    backend = Scripted(lambda q: '{"correct": 1}')
    # 3 + 3 + 3 steps, of which 8 distinct prompts (rows 0 and 2 open with the same step): 3 + 3 + 2
    out = Judge(backend, TASKS.get("arith")(), level="step", batch_size=3)(make_traj(TEXTS))
    assert backend.calls == 3 and len(backend.prompts) == 8
    assert out.components["cache_hits"].tolist() == [0, 0, 1]


# --------------------------------------------------------------------------------- rubric files

def test_rubric_file_with_confined_files(tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "outcome.txt").write_text("Q={prompt} R={response} {items} -> {example}")
    (tmp_path / "items.json").write_text(json.dumps([{"id": "correct", "text": "right", "weight": 2}]))
    (tmp_path / "rubric.yaml").write_text("items_file: items.json\ntemplate_file: prompts/outcome.txt\n")
    r = load_rubric(tmp_path / "rubric.yaml")
    assert r.items == (Item("correct", "right", 2.0, ()),) and r.template.startswith("Q={prompt}")
    (tmp_path / "r.json").write_text(json.dumps({"items": [{"id": "a", "text": "x"}], "step_template": "S {step}"}))
    assert load_rubric(tmp_path / "r.json").step_template == "S {step}"


@pytest.mark.parametrize("body, match", [
    ("template_file: ../secret.txt\n", "is outside the rubric file's directory"),
    ("template_file: /etc/hostname\n", "is outside the rubric file's directory"),
    ("template_file: link.txt\n", "is outside the rubric file's directory"),      # a symlink out of it
    ("templates: x\n", r"unknown keys \['templates'\]"),
    ("template: a\ntemplate_file: b.txt\n", "give 'template' or 'template_file', not both"),
    ("items: [\n", "cannot parse rubric.yaml"),
])
def test_rubric_file_errors(tmp_path, body, match):
    (tmp_path / "secret.txt").write_text("outside")
    inner = tmp_path / "rubric"
    inner.mkdir()
    os.symlink(tmp_path / "secret.txt", inner / "link.txt")
    (inner / "rubric.yaml").write_text(body)
    with pytest.raises(ValueError, match=match):
        load_rubric(inner / "rubric.yaml")


# --------------------------------------------------------------------------------- the rule backend

@pytest.mark.parametrize("correct, wrong", [(0.0, -1.0), (1.0, 0.0)])
def test_rule_backend_equals_step_labels(correct, wrong):
    traj = make_traj(TEXTS)
    task = TASKS.get("arith")()
    want = REWARDS.get("step_labels")(task, correct=correct, wrong=wrong)(traj)
    got = REWARDS.get("judge").from_context(ctx(task), backend="rule", level="step", correct=correct, wrong=wrong)(traj)
    assert got.level == "step" and torch.equal(got.values, want.values) and torch.equal(got.mask, want.mask)
    assert got.components["unparsable"].tolist() == [0, 0, 0] and got.components["missing_items"].tolist() == [0, 0, 0]


def test_rule_backend_outcome_items():
    # correct = every step right; answer = the verifier; answer 2, correct 1 depending on answer
    rubric = Rubric(items=make_items([{"id": "answer", "text": "a", "weight": 2},
                                      {"id": "correct", "text": "c", "weight": 1, "depends": ["answer"]}], "t"))
    texts = TEXTS + ["7+5=13\n13*3=36\nA: 36"]  # right answer through two wrong steps (a miracle)
    out = Judge(REWARDS.get("judge").from_context(ctx(), backend="rule").backend, TASKS.get("arith")(),
                rubric=rubric)(make_traj(texts))
    close(out.values, [1.0, 0.0, 0.0, 2 / 3])
    assert out.components["unparsable"].sum() == 0


def test_rule_backend_needs_step_labels():
    class Plain:
        name, segmenter = "plain", "newline"

    with pytest.raises(ValueError, match="task 'plain' cannot label steps"):
        REWARDS.get("judge").from_context(ctx(Plain()), backend="rule")


# --------------------------------------------------------------------------------- end to end on loopback servers

def test_openai_judge_end_to_end_with_a_scripted_judge(tmp_path):
    seen = []

    def answer(body):
        seen.append(body)
        prompt = body["messages"][0]["content"]
        return chat_answer('Looks fine. {"scores": {"correct": 1}}' if "A: 36" in prompt else "I cannot tell.")

    with scripted_server(answer) as (url, counter):
        judge = REWARDS.get("judge").from_context(ctx(), backend="openai", base_url=url, model="judge-model",
                                                  max_concurrency=2, fallback=0.0)
        out = judge(make_traj(TEXTS))
        assert counter.posts == 3
        out2 = judge(make_traj(TEXTS))  # all cached: no new request
        assert counter.posts == 3 and out2.components["cache_hits"].tolist() == [1, 1, 1]
    close(out.values, [1.0, 0.0, 0.0])
    assert out.components["unparsable"].tolist() == [0, 1, 1]
    assert {b["model"] for b in seen} == {"judge-model"} and all(b["temperature"] == 0.0 for b in seen)


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    model_dir, model, tok = save_tiny_model(tmp_path_factory.mktemp("judge_model"), ALPHABET + '{}"')
    if serving_available():
        with transformers_serve(model_dir) as (url, name):
            yield url, name
    else:
        with stdlib_model_server(model, tok) as (url, _):
            yield url, None


def test_openai_judge_end_to_end_with_the_tiny_model_server(tmp_path, model_server):
    """A random tiny model cannot write a verdict: every row is unparsable, scored as the
    fallback and counted, and nothing raises."""
    url, name = model_server
    (tmp_path / "short.txt").write_text("{prompt}{response}")  # the tiny model's context is short
    (tmp_path / "rubric.yaml").write_text("template_file: short.txt\n")
    judge = REWARDS.get("judge").from_context(ctx(), backend="openai", base_url=url, model=name or "",
                                              rubric_file=str(tmp_path / "rubric.yaml"), max_new_tokens=8,
                                              fallback=0.5, timeout=60.0)
    out = judge(make_traj(TEXTS[:2]))
    close(out.values, [0.5, 0.5])
    assert out.mask.all() and out.components["unparsable"].tolist() == [1, 1]
    assert judge.backend.sampler.client.stats["failures"] == 0


def test_hf_judge_on_a_tiny_local_model(tmp_path):
    from finegrain.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(TOK, size="micro", seed=0)
    c = ctx()
    c.initial_policy = lambda: model
    (tmp_path / "short.txt").write_text("{prompt}{step}")
    (tmp_path / "rubric.yaml").write_text("step_template_file: short.txt\n")
    judge = REWARDS.get("judge").from_context(c, backend="hf", level="step", max_new_tokens=6,
                                              rubric_file=str(tmp_path / "rubric.yaml"))
    out = judge(make_traj(TEXTS[:1]))
    assert out.values.shape == (1, 3) and out.mask.all() and out.components["unparsable"].tolist() == [3]
    assert judge.backend.key == "hf:initial_policy"


# --------------------------------------------------------------------------------- a tiny RL run

def test_tiny_run_with_the_rule_judge_matches_the_step_oracle(tmp_path, sft_cache):
    """configs/arith_judge_rule.yaml is arith_step_oracle.yaml with step_labels asked through the
    judge path; with a perfect (rule) judge the two runs log the same losses."""
    logs = {}
    for name, file in (("judge", "arith_judge_rule.yaml"), ("step_labels", "arith_step_oracle.yaml")):
        overrides = tiny_run_overrides(tmp_path / name, sft_cache, steps=2, **{"train.save_every": 0})
        cfg = load_config(CONFIGS / file, overrides)
        validate(cfg)
        train(cfg, log=lambda s: None)
        logs[name] = [r for r in read_log(tmp_path / name / "metrics.jsonl") if "loss/loss" in r]
    rows = logs["judge"]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/loss"]) and r["reward/judge/unparsable"] == 0 for r in rows)
    assert [r["loss/loss"] for r in rows] == [r["loss/loss"] for r in logs["step_labels"]]
    assert [r["reward/judge/mean"] for r in rows] == [r["reward/step_labels/mean"] for r in logs["step_labels"]]
