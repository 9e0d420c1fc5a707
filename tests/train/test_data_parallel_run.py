"""``accelerate launch --config_file examples/accelerate/cpu_2proc.yaml -m finegrain train CONFIG`` on CPU (gloo): the run
finishes, only rank 0 writes the log and checkpoints, the logged batch is the global one, and a
killed-then-resumed data-parallel run continues from its checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finegrain.config import dump_config
from finegrain.train.logging import read_log
from tests.train.test_loop_e2e import make_cfg

ACCELERATE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "accelerate" / "cpu_2proc.yaml"


def _launch(cfg_path, *overrides, timeout=600):
    env = {**os.environ, "FINEGRAIN_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
           "-m", "finegrain", "train", str(cfg_path), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_process_run_logs_the_global_batch_once_and_resumes(tmp_path, sft_cache):
    cfg = make_cfg("grpo", tmp_path / "run", sft_cache, **{"train.steps": 3, "train.save_every": 2,
                                                        "rollout.prompts_per_step": 4})
    dump_config(cfg, tmp_path / "cfg.yaml")
    first = _launch(tmp_path / "cfg.yaml", "train.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("data parallel: 2 processes, 2 prompts each per step") == 1  # said once, by rank 0
    run = tmp_path / "run"
    rows = [r for r in read_log(run / "metrics.jsonl") if "loss/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]  # one row per step: rank 1 logged nothing
    assert all(r["rollout/rows"] == 4 * cfg.rollout.group_size for r in rows)  # the global batch, summed
    assert (run / "checkpoints").is_dir() and (run / "report.json").is_file()
    # continue the finished 2-step run to 3 steps: both ranks load the step-2 checkpoint
    second = _launch(tmp_path / "cfg.yaml", "train.steps=3", "train.resume=force")
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [r for r in read_log(run / "metrics.jsonl") if "loss/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.loads((run / "report.json").read_text())["steps"] == 3
    assert "resumed from" in second.stdout + second.stderr
