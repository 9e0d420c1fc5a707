"""`finegrain prm train --kind discriminative` end to end: files, a PRM that learns arith steps, RL and eval with it."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from finegrain.cli.prm_cmd import main as prm_main
from finegrain.config import RunConfig, apply_overrides, from_dict, load_config, to_dict, validate
from finegrain.eval.process import step_auroc
from finegrain.models.step_classifier import load_step_classifier, step_logits
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.tasks.arith import ArithTask
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from tests.conftest import tiny_run_overrides

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "arith_disc_prm.yaml"
TASK_KWARGS = {"min_steps": 2, "max_steps": 2}
N_TRAIN = 1024


def prm_train(*args):
    prm_main(["train", "--kind", "discriminative", "--no-progress", *map(str, args)])


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    """A micro PRM trained on the exact labels of 1024 arith SFT traces (half with a slip): ~3 s on one thread."""
    out = tmp_path_factory.mktemp("disc") / "prm"
    prm_train("--tiny", "micro", "--out", out, "--task", "arith", "--task-kwargs", json.dumps(TASK_KWARGS),
              "--n-examples", N_TRAIN, "--flawed-fraction", 0.5, "--epochs", 4, "--batch-size", 32, "--lr", 3e-3,
              "--max-positions", 64, "--eval-fraction", 0.1, "--seed", 0)
    return out


def test_output_directory_holds_model_head_tokenizer_and_metrics(prm_dir):
    names = {p.name for p in prm_dir.iterdir()}
    assert {"config.json", "model.safetensors", "head.safetensors", "tokenizer.json", "finegrain_prm.json",
            "prm_metrics.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]          # safetensors only, no pickle
    assert not list(prm_dir.parent.glob(".prm.tmp-*"))                              # the temporary dir was renamed
    info = json.loads((prm_dir / "finegrain_prm.json").read_text())
    assert info["kind"] == "discriminative" and info["segmenter"] == "newline" and info["labels"].startswith("task")
    log = json.loads((prm_dir / "prm_metrics.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [0, 1, 2, 3, 4] and log["final"] == log["epochs"][-1]
    assert log["epochs"][0]["fit/bce"] == pytest.approx(0.693147, abs=1e-5)          # zero head: p = ½
    assert log["final"]["fit/bce"] < 0.45 and log["settings"]["n_rows"] == N_TRAIN - round(N_TRAIN * 0.1)


def test_step_auroc_on_held_out_arith_responses_is_above_chance(prm_dir):
    task = ArithTask(**TASK_KWARGS)
    held = task.examples("train", N_TRAIN + 200)[N_TRAIN:]                          # problems never trained on
    rng = random.Random(7)
    pairs = [(ex, task.flawed_solution(ex, rng) if i % 2 else ex.solution) for i, ex in enumerate(held)]
    model, tok, _ = load_step_classifier(prm_dir)
    steps = [[t[a:b] for a, b in task.label_steps(ex, t).spans] for ex, t in pairs]
    scores = step_logits(model, tok, [ex.prompt for ex, _ in pairs], steps)
    labels = [task.label_steps(ex, t).labels for ex, t in pairs]
    # 100 slipped lines among 600 steps; a PRM that did not learn scores ≈ 0.5
    assert step_auroc(scores, labels) > 0.65


def test_prm_score_writes_step_probabilities(prm_dir, tmp_path):
    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 7 +5 *2\n", "response": "7+5=12\n12*2=24\nA: 24", "id": 3}) + "\n")
    prm_main(["score", "--data", str(data), "--prm", str(prm_dir), "--out", str(tmp_path / "s.jsonl"), "--no-progress"])
    row = json.loads((tmp_path / "s.jsonl").read_text())
    model, tok, _ = load_step_classifier(prm_dir)
    logits = step_logits(model, tok, ["Q: 7 +5 *2\n"], [["7+5=12\n", "12*2=24\n", "A: 24"]])[0]
    assert row["id"] == 3 and row["step_spans"] == [[0, 7], [7, 15], [15, 20]]
    assert row["step_logits"] == pytest.approx(logits, rel=1e-5, abs=1e-6)
    assert row["sequence_score"] == pytest.approx(min(1 / (1 + math.exp(-s)) for s in logits), rel=1e-5)


def test_same_seed_gives_the_same_prm_and_an_existing_prm_is_replaced(prm_dir, tmp_path):
    out = tmp_path / "again"
    args = ["--tiny", "micro", "--out", out, "--task-kwargs", json.dumps(TASK_KWARGS), "--n-examples", 64,
            "--epochs", 1, "--batch-size", 16, "--max-positions", 64]
    prm_train(*args)
    first = (out / "head.safetensors").read_bytes()
    prm_train(*args)                                                                # over the earlier PRM
    assert (out / "head.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_refusals_are_one_line(tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q", "steps": ["a"], "labels": [1]}\n{"prompt": "Q", "steps": ["a"], "label": 5}\n')
    cases = [
        (["--tiny", "micro", "--out", tmp_path / "busy"], "is not an empty directory or a discriminative PRM"),
        (["--tiny", "micro", "--out", tmp_path / "o", "--data", bad], f"{bad}:2: field 'label'"),
        (["--out", tmp_path / "o"], "--model / --tiny: give exactly one"),
        (["--tiny", "micro", "--out", tmp_path / "o", "--beta", "0.1"], "--beta: only with --kind implicit"),
        (["--tiny", "micro", "--out", tmp_path / "o", "--labels", "mc"], "--policy: required"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            prm_train(*args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_processbench_jsonl_and_hrm_rows_train(tmp_path):
    data = tmp_path / "pb.jsonl"
    lines = []
    for a in range(1, 9):
        lines.append({"problem": f"Q: {a} +1\n", "steps": [f"{a}+1={a + 1}", f"A: {a + 1}"], "label": -1})
        lines.append({"problem": f"Q: {a} +1\n", "steps": [f"{a}+1={a + 2}", f"A: {a + 2}"], "label": 0})
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    prm_train("--tiny", "micro", "--tokenizer", "bpe", "--bpe-vocab", 280, "--out", tmp_path / "p", "--data", data,
              "--hrm-merge", "--epochs", 2, "--max-positions", 64)
    log = json.loads((tmp_path / "p" / "prm_metrics.json").read_text())
    # 16 rows + one HRM merged row for each of the 8 all-correct ones (the others' step 2 is unlabelled)
    assert log["settings"]["n_rows"] == 24 and log["settings"]["n_labelled_steps"] == 16 * 2 - 8 + 8
    info = json.loads((tmp_path / "p" / "finegrain_prm.json").read_text())
    assert info["hrm_merge"] is True and info["labels"] == f"jsonl {data}"


def test_mc_labels_from_a_policy_through_the_sampler(tmp_path):
    tok = char_tokenizer("0123456789+-*=:AQ \n")
    policy = tmp_path / "policy"
    tiny_causal_lm(tok, size="micro", seed=0).save_pretrained(policy)
    tok.save_pretrained(policy)
    prm_train("--tiny", "micro", "--out", tmp_path / "p", "--labels", "mc", "--policy", policy, "--task-kwargs",
              json.dumps(TASK_KWARGS), "--n-examples", 4, "--mc-rollouts", 2, "--mc-mode", "soft",
              "--max-new-tokens", 8, "--max-positions", 64)
    info = json.loads((tmp_path / "p" / "finegrain_prm.json").read_text())
    assert info["labels"] == "mc soft x2 (sft responses)"
    # the task's exact labels on responses sampled from the policy
    prm_train("--tiny", "micro", "--out", tmp_path / "q", "--responses", "sampled", "--policy", policy,
              "--task-kwargs", json.dumps(TASK_KWARGS), "--n-examples", 4, "--samples", 2, "--max-new-tokens", 8,
              "--max-positions", 64)
    info = json.loads((tmp_path / "q" / "finegrain_prm.json").read_text())
    assert info["labels"] == "task arith label_steps (sampled responses)"


def test_disc_prm_reward_in_a_tiny_rl_run_and_in_finegrain_eval(prm_dir, tmp_path, sft_cache):
    d = apply_overrides(to_dict(load_config(CONFIG)), tiny_run_overrides(tmp_path / "run", sft_cache, steps=2,
                                                                           **{"train.save_every": 2}))
    assert [r["name"] for r in d["rewards"]] == ["verifier", "disc_prm"]
    d["rewards"][1]["kwargs"]["path"] = str(prm_dir)
    cfg = from_dict(RunConfig, d)
    validate(cfg)
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert len(rows) == 2 and all(0 <= r["reward/disc_prm/prob_mean"] <= 1 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss/loss"])) for r in rows)

    from finegrain.cli.main import main as cli_main

    out = tmp_path / "eval"
    cli_main(["eval", "--model", str(tmp_path / "run"), "--scorers", "disc_prm,verifier", "--reward-kwargs",
              json.dumps({"disc_prm": {"path": str(prm_dir)}}), "--n-problems", "3", "--samples", "2",
              "--max-new-tokens", "24", "--search", "beam", "--search-beams", "2", "--beam-width", "2",
              "--search-problems", "2", "--max-steps", "3", "--out", str(out), "--quiet"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["meta"]["scorers"] == ["disc_prm", "verifier"]
    assert "disc_prm" in metrics["curves"]["bon"] and "disc_prm" in metrics["process"]["scorers"]
    assert metrics["search"]["scorer"] == "disc_prm" and metrics["search"]["aggregation"] == "min"
