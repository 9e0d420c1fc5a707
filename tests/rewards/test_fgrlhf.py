"""Fine-Grained RLHF on the arith testbed: the exact segment-error labels by hand, the ``fg_rlhf``
signal's placement (each kind on its segment's last trained token, nothing elsewhere) and
invariances, its refusals, the config, and a tiny end-to-end run (three segment RMs trained with
``finegrain prm train --label-kind``, then PPO + GAE + critic with them)."""

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import finegrain.rewards.fgrlhf  # noqa: F401  (registers fg_rlhf until rewards/__init__ imports it)
from finegrain.cli.prm_cmd import main as prm_main
from finegrain.config import RunConfig, apply_overrides, from_dict, load_config, to_dict, validate
from finegrain.models.step_classifier import StepClassifier, load_step_classifier, step_logits
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.rewards import REWARDS
from finegrain.rewards.combine import to_token_rewards
from finegrain.rewards.fgrlhf import FineGrainedRLHF, normalised_value, segment_value
from finegrain.rewards.fgrlhf_labels import (CORRUPTIONS, KINDS, completeness_label, corrupt_response,
                                             corrupted_pairs, factuality_labels, kind_rows, relevance_labels)
from finegrain.rewards.prm_data import PRMRow, to_trajectory
from finegrain.segment import newline
from finegrain.tasks.arith import ArithTask
from finegrain.tasks.base import STEP_CORRECT, Example
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from tests.conftest import tiny_run_overrides
from tests.helpers import close

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "arith_fgrlhf.yaml"
ALPHABET = "0123456789+-*=:AQ \n"
# Q: 7 +5 *3 -4  ->  gold 7+5=12 / 12*3=36 / 36-4=32 / A: 32
EX = Example("x", "Q: 7 +5 *3 -4\n", "32", meta={"start": 7, "ops": [["+", 5], ["*", 3], ["-", 4]]})


def labels(text):
    return relevance_labels(EX, text), factuality_labels(EX, text), completeness_label(EX, text)


# ----------------------------------------------------------------------------- the exact labels by hand

@pytest.mark.parametrize("text, relevance, factuality, complete", [
    # gold: every line relevant and factual, complete
    ("7+5=12\n12*3=36\n36-4=32\nA: 32", [1, 1, 1, 1], [1, 1, 1, 1], 1),
    # a slip at line 1; the rest continues from 37: only line 1 is a factual error, still complete
    ("7+5=12\n12*3=37\n37-4=33\nA: 33", [1, 1, 1, 1], [1, 0, 1, 1], 1),
    # compensating (miracle) trace: lines 0 and 2 are wrong arithmetic; relevant and complete
    ("7+5=13\n13*3=39\n39-4=32\nA: 32", [1, 1, 1, 1], [0, 1, 0, 1], 1),
    # a repeated line: 7+5 again does not start from the carried 12 -> irrelevant, but factual; the walk resumes
    ("7+5=12\n7+5=12\n12*3=36\n36-4=32\nA: 32", [1, 0, 1, 1, 1], [1, 1, 1, 1, 1], 1),
    # a restart from the start value with the next op: irrelevant, factual (7*3 = 21)
    ("7+5=12\n7*3=21\n12*3=36\n36-4=32\nA: 32", [1, 0, 1, 1, 1], [1, 1, 1, 1, 1], 1),
    # a skipped op: 12-4 is not the next op (*3) -> irrelevant, and nothing after it continues 12 -> incomplete
    ("7+5=12\n12-4=8\nA: 8", [1, 0, 0], [1, 1, 0], 0),
    # garbage line: irrelevant and not factual; the walk resumes after it
    ("7+5=12\nQ: 7 +5\n12*3=36\n36-4=32\nA: 32", [1, 0, 1, 1, 1], [1, 0, 1, 1, 1], 1),
    # early answer (after 2 of 3 ops): irrelevant, factual (states the carried 36); incomplete
    ("7+5=12\n12*3=36\nA: 36", [1, 1, 0], [1, 1, 1], 0),
    # answer line that does not state the carried value: relevant, a factual error; complete
    ("7+5=12\n12*3=36\n36-4=32\nA: 31", [1, 1, 1, 1], [1, 1, 1, 0], 1),
    # a second answer and a line after the answer: both irrelevant
    ("7+5=12\n12*3=36\n36-4=32\nA: 32\nA: 32\n32+1=33", [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], 1),
    # no answer line: incomplete though every line is right
    ("7+5=12\n12*3=36\n36-4=32", [1, 1, 1], [1, 1, 1], 0),
    # the right answer alone: irrelevant (no op applied), factual? 32 != carried 7 -> 0; incomplete
    ("A: 32", [0], [0], 0),
    # an extra op after the last: irrelevant; the later answer is still the relevant one
    ("7+5=12\n12*3=36\n36-4=32\n32+1=33\nA: 32", [1, 1, 1, 0, 1], [1, 1, 1, 1, 1], 1),
    ("", [], [], 0),
])
def test_labels_by_hand(text, relevance, factuality, complete):
    assert labels(text) == (relevance, factuality, complete)
    assert len(relevance) == len(newline(text))


def test_on_sft_traces_lines_are_relevant_complete_and_factuality_is_label_steps():
    task = ArithTask(min_steps=2, max_steps=4, skill_gap_op="*", skill_gap_rate=0.5, miracle_fraction=0.25)
    for ex, text in task.sft_corpus(300, flawed_fraction=0.3, seed=1):
        exact = [int(lab == STEP_CORRECT) for lab in task.label_steps(ex, text).labels]
        assert factuality_labels(ex, text) == exact, text
        assert all(relevance_labels(ex, text)) and completeness_label(ex, text) == 1, text


def test_a_line_is_label_steps_correct_iff_relevant_and_factual_on_lines_before_any_irrelevant_one():
    # label_steps counts computation lines, the relevance walk skips irrelevant ones: they agree up
    # to (and including) the first irrelevant line
    task = ArithTask(min_steps=2, max_steps=4)
    pairs = corrupted_pairs(task.sft_corpus(300, flawed_fraction=0.3, seed=2), 1.0, seed=0)
    for ex, text in pairs:
        exact = [int(lab == STEP_CORRECT) for lab in task.label_steps(ex, text).labels]
        rel, fact = relevance_labels(ex, text), factuality_labels(ex, text)
        upto = rel.index(0) + 1 if 0 in rel else len(rel)
        assert exact[:upto] == [r & f for r, f in zip(rel, fact)][:upto], text


def test_each_corruption_by_hand():
    gold = "7+5=12\n12*3=36\n36-4=32\nA: 32"
    rng = random.Random(0)
    out = {how: corrupt_response(EX, gold, random.Random(3), how) for how in CORRUPTIONS}
    assert out["drop_answer"] == "7+5=12\n12*3=36\n36-4=32" and labels(out["drop_answer"])[2] == 0
    assert out["truncate"].startswith("7+5=12") and labels(out["truncate"])[2] == 0
    rel, fact, comp = labels(out["repeat_line"])
    assert rel.count(0) == 1 and all(fact) and comp == 1
    rel, _, comp = labels(out["restart_line"])
    assert rel.count(0) == 1 and comp == 1 and "\n7" in out["restart_line"]
    assert labels(out["skip_op"])[2] == 0
    rel, fact, comp = labels(out["garbage_line"])
    assert "Q: 7 +5 *3 -4" in out["garbage_line"] and rel.count(0) == 1 and fact.count(0) == 1 and comp == 1
    with pytest.raises(ValueError, match="corruption: expected one of drop_answer"):
        corrupt_response(EX, gold, rng, "shuffle")
    # exactly round(n·fraction) responses change, at seeded positions
    task = ArithTask(min_steps=2, max_steps=2)
    pairs = task.sft_corpus(40, seed=0)
    bad = corrupted_pairs(pairs, 0.25, seed=5)
    assert sum(a[1] != b[1] for a, b in zip(pairs, bad)) == 10 and bad == corrupted_pairs(pairs, 0.25, seed=5)
    with pytest.raises(ValueError, match="--corrupt-fraction: expected a number in \\[0, 1\\]"):
        corrupted_pairs(pairs, 1.5, seed=0)


def test_kind_rows_steps_are_lines_and_completeness_is_the_whole_response():
    task = ArithTask(min_steps=2, max_steps=2)
    pairs = [(EX, "7+5=12\n7+5=12\n12*3=36\n36-4=32\nA: 32"), (EX, ""), (EX, "7+5=12\n12*3=36\nA: 36")]
    rel = kind_rows(task, pairs, "relevance")
    assert [r.steps for r in rel] == [("7+5=12\n", "7+5=12\n", "12*3=36\n", "36-4=32\n", "A: 32"),
                                      ("7+5=12\n", "12*3=36\n", "A: 36")]
    assert [r.labels for r in rel] == [(1.0, 0.0, 1.0, 1.0, 1.0), (1.0, 1.0, 0.0)]
    comp = kind_rows(task, pairs, "completeness")
    assert [(r.steps, r.labels) for r in comp] == [((pairs[0][1],), (1.0,)), ((pairs[2][1],), (0.0,))]
    assert kind_rows(task, pairs, "factuality")[0].prompt == EX.prompt
    with pytest.raises(ValueError, match="label kind: expected one of factuality, relevance, completeness"):
        kind_rows(task, pairs, "verbosity")

    class Other:
        name = "other"

    with pytest.raises(ValueError, match="defined for the arith task only, got 'other'"):
        kind_rows(Other(), pairs, "relevance")


# ----------------------------------------------------------------------------- the signal


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(ALPHABET)


def classifier(tokenizer, seed):
    model = StepClassifier(tiny_causal_lm(tokenizer, size="micro", seed=seed, max_positions=128)).eval()
    with torch.no_grad():
        model.head.weight.normal_(generator=torch.Generator().manual_seed(seed))
        model.head.bias.fill_(0.05)
    return model


@pytest.fixture(scope="module")
def signal(tok):
    models = {k: (classifier(tok, seed), tok) for seed, k in enumerate(KINDS)}
    return FineGrainedRLHF(models, segmenter="newline", completeness_norm=(0.1, 2.0, 0.3, 0.05))


def batch(tok, texts):
    rows = [PRMRow(EX.prompt, t, None, EX.prompt) for t in texts]
    return to_trajectory(tok, rows).replace(examples=[EX] * len(texts))


TEXTS = ["7+5=12\n12*3=36\n36-4=32\nA: 32", "7+5=12\n7+5=12\n12*3=37\nA: 37", "A: 4", "7+5=12\n12-4=8\n"]


def expected_token_rewards(signal, tok, texts, loss_mask):
    """The paper's rule by hand: line k's ±values on the last trained character of line k, the
    normalised completeness on the row's last trained token (EOS); char tokenizer = 1 token per char."""
    L = loss_mask.shape[1]
    want = torch.zeros(len(texts), L)
    for b, t in enumerate(texts):
        lines = [t[a:c] for a, c in newline(t)]
        ends = [c - 1 for _, c in newline(t)]
        for kind, (pos, neg) in (("factuality", (0.5, -0.5)), ("relevance", (0.3, -0.3))):
            s = step_logits(signal.models[kind][0], tok, [EX.prompt], [lines])[0]
            for (a, c), end, s_k in zip(newline(t), ends, s):
                trained = [i for i in range(a, c) if loss_mask[b, i]]
                if trained:
                    want[b, trained[-1]] += pos if s_k > 0 else neg
        (s_c,) = step_logits(signal.models["completeness"][0], tok, [EX.prompt], [[t]])[0]
        last = max(i for i in range(L) if loss_mask[b, i])
        want[b, last] += (s_c - 0.1) / 2.0 * 0.3 + 0.05
    return want


def test_each_kind_lands_on_its_segments_last_token_and_nothing_elsewhere(signal, tok):
    traj = batch(tok, TEXTS)
    out = signal(traj)
    assert out.level == "token" and out.values.shape == traj.response_ids.shape
    want = expected_token_rewards(signal, tok, TEXTS, traj.loss_mask)
    close(out.values, want)
    # the mask is exactly the line ends and the EOS; zero everywhere else
    for b, t in enumerate(TEXTS):
        marks = {c - 1 for _, c in newline(t)} | {len(t)}                          # EOS sits at len(t)
        assert set(out.mask[b].nonzero().flatten().tolist()) == marks
    assert torch.all(out.values[~out.mask] == 0)
    # the combiner passes a token-level output through unchanged
    close(to_token_rewards(out, traj), out.values)
    # components: the kind's reward summed over the row, and the fraction judged free of the error
    fact = step_logits(signal.models["factuality"][0], tok, [EX.prompt], [["7+5=12\n", "7+5=12\n", "12*3=37\n", "A: 37"]])[0]
    close(out.components["factuality_reward"][1], sum(0.5 if s > 0 else -0.5 for s in fact))
    close(out.components["factuality_ok"][1], sum(s > 0 for s in fact) / 4)
    close(out.values.sum(1), sum(out.components[f"{k}_reward"] for k in KINDS))
    assert set(out.components) == {f"{k}_{x}" for k in KINDS for x in ("reward", "ok")}


def test_an_untrained_segment_end_moves_the_value_to_the_last_trained_token(signal, tok):
    traj = batch(tok, TEXTS)
    loss_mask = traj.loss_mask.clone()
    loss_mask[0, 6] = False                      # the "\n" ending line 0 of row 0 ("7+5=12\n")
    loss_mask[0, 7:15] = False                   # all of line 1 ("12*3=36\n"): it places nothing
    loss_mask[2, 4] = False                      # row 2's EOS: completeness moves to "4"
    out = signal(traj.replace(loss_mask=loss_mask))
    close(out.values, expected_token_rewards(signal, tok, TEXTS, loss_mask))
    assert out.mask[0, 5] and not out.mask[0, 6] and not out.mask[0, 7:15].any() and out.mask[2, 3]
    assert torch.all(out.values[~(loss_mask & traj.response_mask)] == 0)


def test_garbage_under_a_false_mask_changes_nothing(signal, tok):
    traj = batch(tok, TEXTS)
    out = signal(traj)
    pad = ~traj.response_mask
    g = torch.Generator().manual_seed(0)
    noisy = traj.replace(response_ids=torch.where(pad, torch.randint(0, len(tok), pad.shape, generator=g),
                                                  traj.response_ids),
                         behavior_logprobs=torch.where(pad, torch.randn(pad.shape, generator=g) * 1e3,
                                                       traj.behavior_logprobs))
    again = signal(noisy)
    assert torch.equal(again.values, out.values) and torch.equal(again.mask, out.mask)


def test_permuting_the_batch_permutes_the_output(signal, tok):
    traj = batch(tok, TEXTS)
    out = signal(traj)
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = signal(traj.select(perm))
    close(shuffled.values, out.values[perm])
    assert torch.equal(shuffled.mask, out.mask[perm])
    for k in out.components:
        close(shuffled.components[k], out.components[k][perm])


def test_a_kind_can_be_left_out_and_values_are_the_kwargs(tok):
    one = FineGrainedRLHF({"relevance": (classifier(tok, 1), tok)}, segmenter="newline",
                          values={"relevance": (1.0, -2.0)})
    traj = batch(tok, TEXTS)
    out = one(traj)
    assert set(out.components) == {"relevance_reward", "relevance_ok"}
    assert set(out.values[out.mask].tolist()) <= {1.0, -2.0}
    assert segment_value(0.0, 1.0, -1.0) == -1.0                                   # s = 0 is "error"
    close(torch.tensor(normalised_value(-0.4468, mean=-0.4468, std=8.3012, scale=0.3, shift=0.0)), 0.0)


# ----------------------------------------------------------------------------- refusals and the config

def ctx_for(task):
    return SimpleNamespace(task=task, policy=None, tokenizer=None, initial_policy=lambda: None)


def saved(tmp_path, tok, name, info):
    d = tmp_path / name
    classifier(tok, 0).save(d, tok, info)
    return str(d)


def test_from_context_refusals_are_one_line(tmp_path, tok):
    build = REWARDS.get("fg_rlhf").from_context
    task = ArithTask()
    with pytest.raises(ValueError, match="fg_rlhf: give at least one of factuality_path"):
        build(ctx_for(task))
    plain = saved(tmp_path, tok, "plain", {"segmenter": "newline"})
    with pytest.raises(ValueError, match="fg_rlhf.relevance_path: .* label kind 'steps', not 'relevance'"):
        build(ctx_for(task), relevance_path=plain)
    with pytest.raises(ValueError, match="fg_rlhf.factuality_path: .* no such directory"):
        build(ctx_for(task), factuality_path=str(tmp_path / "nope"))
    bare = saved(tmp_path, tok, "bare", {"segmenter": "newline", "label_kind": "completeness"})
    with pytest.raises(ValueError, match="fg_rlhf.completeness_mean: not given and .* records no logit_mean"):
        build(ctx_for(task), completeness_path=bare)
    s = build(ctx_for(task), completeness_path=bare, completeness_mean=1.0, completeness_std=2.0)
    assert s.norm == (1.0, 2.0, 0.3, 0.0)
    flat = saved(tmp_path, tok, "flat", {"segmenter": "newline", "label_kind": "completeness", "logit_mean": 0.0,
                                         "logit_std": 0.0})
    with pytest.raises(ValueError, match="fg_rlhf.completeness_std: expected > 0, got 0.0"):
        build(ctx_for(task), completeness_path=flat)
    other = saved(tmp_path, tok, "blank", {"segmenter": "blank_line", "label_kind": "factuality"})
    with pytest.raises(ValueError, match="cuts steps with 'blank_line', the task with 'newline'"):
        build(ctx_for(task), factuality_path=other)


def test_config_loads_validates_and_is_ppo_with_gae_critic_and_kl_in_the_reward():
    cfg = load_config(CONFIG)
    validate(cfg)
    assert [(r.name, r.weight) for r in cfg.rewards] == [("fg_rlhf", 1.0)]
    assert {k: cfg.rewards[0].kwargs[k] for k in ("factuality_positive", "relevance_negative", "completeness_scale")} \
        == {"factuality_positive": 0.5, "relevance_negative": -0.3, "completeness_scale": 0.3}
    assert cfg.advantage.name == "gae" and cfg.advantage.kwargs == {"gamma": 1.0, "lam": 0.95} and cfg.advantage.whiten
    assert cfg.critic.enabled and (cfg.loss.kl_mode, cfg.loss.kl_estimator, cfg.loss.kl_coef) == ("reward", "k1", 0.3)
    d = to_dict(cfg)
    d["rewards"][0]["kwargs"]["completeness_std"] = 0.0
    with pytest.raises(ValueError, match=r"rewards\[0\].kwargs.completeness_std: expected a number in \(0, inf\)"):
        validate(from_dict(RunConfig, d))
    d["rewards"][0]["kwargs"] = {"verbosity_path": "x"}
    with pytest.raises(ValueError, match=r"rewards\[0\].kwargs: unknown key 'verbosity_path' for reward signal"):
        validate(from_dict(RunConfig, d))


# ----------------------------------------------------------------------------- end to end

TASK_KWARGS = {"min_steps": 2, "max_steps": 2}


def prm_train(*args):
    prm_main(["train", "--kind", "discriminative", "--no-progress", *map(str, args)])


def test_prm_train_label_kind_refusals_are_one_line(tmp_path, capsys):
    cases = [
        (["--label-kind", "relevance", "--data", tmp_path / "x.jsonl"], "--label-kind: 'relevance' needs --labels task"),
        (["--corrupt-fraction", "0.5"], "--corrupt-fraction: only with --label-kind"),
        (["--label-kind", "completeness", "--corrupt-fraction", "2"], "--corrupt-fraction: expected a number in [0, 1]"),
        (["--label-kind", "relevance", "--task", "arith_words"], "defined for the arith task only"),
        (["--label-kind", "relevance", "--hrm-merge"], "--hrm-merge: only with --label-kind steps"),
    ]
    (tmp_path / "x.jsonl").write_text('{"prompt": "Q", "steps": ["a"], "labels": [1]}\n')
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            prm_train("--tiny", "micro", "--out", tmp_path / "o", *args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit):
        prm_main(["train", "--data", str(tmp_path / "x.jsonl"), "--model", str(tmp_path), "--out", str(tmp_path / "i"),
                  "--label-kind", "relevance"])
    assert "--label-kind: only with --kind discriminative" in capsys.readouterr().err


def test_segment_rms_train_from_exact_labels_then_ppo_with_them(tmp_path, sft_cache):
    paths = {}
    for kind in KINDS:
        out = tmp_path / f"fg_{kind}"
        prm_train("--tiny", "micro", "--out", out, "--task", "arith", "--task-kwargs", json.dumps(TASK_KWARGS),
                  "--n-examples", 96, "--flawed-fraction", 0.3, "--label-kind", kind, "--corrupt-fraction", 0.5,
                  "--epochs", 2, "--batch-size", 16, "--lr", 3e-3, "--max-positions", 128, "--seed", 0)
        info = json.loads((out / "finegrain_prm.json").read_text())
        assert info["label_kind"] == kind and info["labels"] == f"task arith {kind} (sft responses, 0.5 corrupted)"
        assert math.isfinite(info["logit_mean"]) and info["logit_std"] > 0
        log = json.loads((out / "prm_metrics.json").read_text())
        assert log["final"]["fit/bce"] < log["epochs"][0]["fit/bce"]                 # it learned something
        paths[f"{kind}_path"] = str(out)
    # the recorded statistics are those of the saved model over the training rows' labelled steps
    model, tok, info = load_step_classifier(paths["completeness_path"])
    assert info["logit_n"] == json.loads((Path(paths["completeness_path"]) / "prm_metrics.json").read_text()
                                         )["settings"]["n_labelled_steps"]

    d = apply_overrides(to_dict(load_config(CONFIG)), tiny_run_overrides(tmp_path / "run", sft_cache, steps=2))
    d["rewards"][0]["kwargs"].update(paths)
    cfg = from_dict(RunConfig, d)
    validate(cfg)
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert len(rows) == 2
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss/loss", "reward/fg_rlhf/factuality_reward",
                                                   "reward/fg_rlhf/completeness_reward"))
        assert 0 <= r["reward/fg_rlhf/relevance_ok"] <= 1
        assert any(k.startswith("critic/") for k in r)
