"""A fine-tuned judge: its agreement metrics worked by hand, its training rows against the task's
exact step labels, the prompt/verdict mask, the output directory's guard, and ``finegrain judge
train`` end to end on a micro model: what it saves, that the judge reward loads its rubric and
refuses another level, and the command's one-line errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from finegrain.cli.judge_cmd import main
from finegrain.models.tokenizer import char_tokenizer
from finegrain.rewards import REWARDS
from finegrain.rewards.judge import Judge, Rubric, RuleJudge, judge_prompt_ids, load_rubric, make_items
from finegrain.rewards.judge_data import compact_verdict, split_by_response, verdict_rows
from finegrain.tasks import TASKS
from finegrain.tasks.base import STEP_CORRECT
from finegrain.train.judge_sft import agreement, check_judge_out_dir, encode_verdict_row
from tests.helpers import judge_ctx, only_error_line

REPO = Path(__file__).resolve().parents[2]
COMPACT = REPO / "examples" / "rubrics" / "arith_step_compact.yaml"
TASK_KWARGS = {"min_steps": 2, "max_steps": 3}


# ------------------------------------------------------------------------- agreement, by hand

def test_agreement_worked_example():
    # predicted → ŝ = [1, 1, 0, none, 0] against s = [1, 0, 0, 1, 0]:
    # agree at 0, 2, 4 → 3/5; tp = 1 of 2 positives; tn = 2 of 3 negatives;
    # q̂ = 2/5 (ŝ = 1), q = 2/5, 1/5 without a verdict: p_e = .4·.4 + (1 − .4 − .2)·.6 = .40
    # κ = (.6 − .4) / (1 − .4) = 1/3
    m = agreement([0.9, 0.5, 0.49, None, 0.0], [1, 0, 0, 1, 0])
    assert m["agreement"] == pytest.approx(0.6) and m["tpr"] == pytest.approx(0.5)
    assert m["tnr"] == pytest.approx(2 / 3) and m["kappa"] == pytest.approx(1 / 3)
    assert m["no_verdict"] == pytest.approx(0.2) and m["n"] == 5


def test_agreement_invariances_and_edges():
    rng = random.Random(0)
    pred = [rng.choice([0.0, 1.0, None]) for _ in range(50)]
    exact = [rng.randint(0, 1) for _ in range(50)]
    perm = list(range(50))
    rng.shuffle(perm)
    a, b = agreement(pred, exact), agreement([pred[i] for i in perm], [exact[i] for i in perm])
    assert a == pytest.approx(b)                                   # order of the questions does not matter
    flipped = agreement([None if p is None else 1.0 - p for p in pred], [1 - y for y in exact])
    assert flipped["agreement"] == pytest.approx(a["agreement"])   # relabelling both sides swaps tpr and tnr
    assert flipped["tpr"] == pytest.approx(a["tnr"]) and flipped["tnr"] == pytest.approx(a["tpr"])
    assert all(math.isnan(agreement([], [])[k]) for k in ("agreement", "tpr", "tnr", "kappa"))
    one_class = agreement([1.0, 1.0], [1, 1])                      # no negatives: tnr and κ undefined, not 0
    assert one_class["agreement"] == 1.0 and math.isnan(one_class["tnr"]) and math.isnan(one_class["kappa"])
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        agreement([1, 0, 1], [1, 0])


# ------------------------------------------------------------------------- rows and encoding

def test_verdict_rows_are_the_exact_step_labels():
    task = TASKS.get("arith")(**TASK_KWARGS)
    pairs = task.sft_corpus(12, flawed_fraction=0.5, seed=3)
    judge = Judge(RuleJudge(task), task, level="step", rubric=load_rubric(str(COMPACT)))
    rows = verdict_rows(judge, task, pairs)
    for g, (ex, response) in enumerate(pairs):
        mine = [r for r in rows if r.group == g]
        labels = task.label_steps(ex, response).labels
        asked = judge.requests(ex, response)
        assert [r.step for r in mine] == list(range(len(asked))) and len(asked) == len(judge.segment(response))
        assert [r.prompt for r in mine] == [q.prompt for q in asked]           # the reward's own questions
        assert [r.scores["correct"] for r in mine] == [int(lab == STEP_CORRECT) for lab in labels[:len(mine)]]
        assert all(r.target == compact_verdict(r.scores, ["correct"]) for r in mine)
    assert {r.scores["correct"] for r in rows} == {0, 1}                     # flawed responses give wrong steps
    assert rows[0].target in ('{"correct":1}', '{"correct":0}')


def test_outcome_rows_carry_answer_and_correct():
    task = TASKS.get("arith")(**TASK_KWARGS)
    pairs = task.sft_corpus(6, flawed_fraction=0.5, seed=1)
    items = make_items([{"id": "correct", "text": "every step is right"}, {"id": "answer", "text": "the answer is"}],
                       "test")
    rows = verdict_rows(Judge(RuleJudge(task), task, level="outcome", rubric=Rubric(items=items)), task, pairs)
    assert len(rows) == len(pairs) and all(r.step is None for r in rows)
    for r, (ex, response) in zip(rows, pairs):
        lab = task.label_steps(ex, response)
        assert r.scores == {"correct": int(bool(lab.labels) and lab.first_error is None),
                            "answer": int(task.verify(ex, response) >= 1.0)}
        assert r.target == compact_verdict(r.scores, ["correct", "answer"])
    assert {r.scores["answer"] for r in rows} == {0, 1}


def test_split_by_response_keeps_each_response_on_one_side():
    task = TASKS.get("arith")(**TASK_KWARGS)
    pairs = task.sft_corpus(40, flawed_fraction=0.5, seed=0)
    rows = verdict_rows(Judge(RuleJudge(task), task, level="step"), task, pairs)
    train, held = split_by_response(rows, len(pairs), 0.25, seed=0)
    assert len(train) + len(held) == len(rows) and not {r.group for r in train} & {r.group for r in held}
    assert len({r.group for r in held}) == 10                          # round(40 · 0.25) responses
    assert split_by_response(rows, len(pairs), 0.25, seed=0) == (train, held)          # seeded
    assert split_by_response(rows, len(pairs), 0.25, seed=1)[1] != held
    assert len(split_by_response(rows, len(pairs), 0.25, seed=0, max_eval=7)[1]) == 7
    assert split_by_response(rows, len(pairs), 0.0, seed=0) == (rows, [])
    with pytest.raises(ValueError, match="eval_fraction"):
        split_by_response(rows, len(pairs), 1.0, seed=0)


def test_encode_verdict_row_trains_on_the_verdict_and_eos_only():
    tok = char_tokenizer("0123456789QA:{}\"correct ")
    ids, mask = encode_verdict_row(tok, "Q: 1", '{"correct":1}')
    p = judge_prompt_ids(tok, "Q: 1")
    v = tok('{"correct":1}', add_special_tokens=False)["input_ids"]
    assert ids == p + v + [tok.eos_token_id]
    assert mask == [False] * len(p) + [True] * (len(v) + 1)


def test_check_judge_out_dir(tmp_path):
    assert check_judge_out_dir(tmp_path / "new") == tmp_path / "new"          # absent: fine
    (tmp_path / "empty").mkdir()
    check_judge_out_dir(tmp_path / "empty")
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "finegrain_judge.json").write_text("{}")
    check_judge_out_dir(tmp_path / "judge")                                  # an earlier judge: replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory or a fine-tuned judge"):
        check_judge_out_dir(tmp_path / "other")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--out"):
        check_judge_out_dir(tmp_path / "file")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------- the command, end to end

TRAIN = ["train", "--tiny", "micro", "--max-positions", "128", "--n-examples", "48",
         "--task-kwargs", json.dumps(TASK_KWARGS), "--rubric-file", str(COMPACT), "--batch-size", "8",
         "--lr", "1e-2", "--warmup-steps", "5", "--epochs", "3", "--eval-fraction", "0.25", "--max-eval", "40",
         "--verdict-tokens", "16", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("judge") / "j"
    main([*TRAIN, "--out", str(out)])
    return out


def test_judge_train_saves_a_judge_that_learned_the_verdict_format(trained):
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "rubric.json", "finegrain_judge.json",
                 "judge_metrics.json"):
        assert (trained / name).is_file(), name
    info = json.loads((trained / "finegrain_judge.json").read_text())
    assert info["kind"] == "judge" and info["level"] == "step" and info["task"] == "arith" and info["n_rows"] > 100
    m = json.loads((trained / "judge_metrics.json").read_text())
    assert m["before"]["eval/unparsable"] == 1.0                     # a random model writes no verdict
    assert m["final"]["eval/unparsable"] < 0.25                      # ~100 SFT steps teach it the format
    assert m["final"]["eval/agreement"] > m["before"]["eval/agreement"]
    assert m["final"]["eval/n"] == 40
    rubric = json.loads((trained / "rubric.json").read_text())
    assert rubric["step_template"] == load_rubric(str(COMPACT)).step_template and rubric["template"] is None
    assert not list(trained.parent.glob(".j.tmp-*"))                 # the temporary directory was renamed away


def test_the_judge_reward_brings_the_fine_tuned_rubric_and_refuses_another_level(trained):
    from tests.rewards.test_judge import TEXTS, TOK, make_traj

    ctx = judge_ctx(TOK, TASKS.get("arith")(**TASK_KWARGS))
    judge = REWARDS.get("judge").from_context(ctx, backend="hf", model_path=str(trained), level="step",
                                              max_new_tokens=16)
    assert judge.template == load_rubric(str(COMPACT)).step_template
    out = judge(make_traj(TEXTS[:2]))
    assert out.values.shape == (2, 3) and out.mask.all()
    assert set(out.values[out.mask].tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="fine-tuned to judge at level 'step', the reward asks for 'outcome'"):
        REWARDS.get("judge").from_context(ctx, backend="hf", model_path=str(trained), level="outcome")


def test_judge_train_over_an_earlier_judge_replaces_it(trained, tmp_path):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(trained, out)
    (out / "stale.txt").write_text("from before")
    main([*TRAIN, "--out", str(out), "--epochs", "1", "--eval-fraction", "0"])
    assert not (out / "stale.txt").exists() and (out / "finegrain_judge.json").is_file()
    assert "final" not in json.loads((out / "judge_metrics.json").read_text())   # nothing held out this time


def error_line(capsys, argv):
    return only_error_line(capsys, main, argv)


def test_judge_train_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "--model / --tiny" in error_line(capsys, ["train", "--out", out])
    assert "--eval-fraction" in error_line(capsys, [*TRAIN, "--out", out, "--eval-fraction", "1.5"])
    assert "--policy: required" in error_line(capsys, [*TRAIN, "--out", out, "--responses", "sampled"])
    assert "--rubric-file" in error_line(capsys, [*TRAIN, "--out", out, "--rubric-file", str(tmp_path / "none.yaml")])
    assert "--lr" in error_line(capsys, [*TRAIN, "--out", out, "--lr", "-1"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    assert "not an empty directory or a fine-tuned judge" in error_line(capsys, [*TRAIN, "--out", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x" and not Path(out).exists()
