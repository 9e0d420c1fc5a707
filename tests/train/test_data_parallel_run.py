"""``accelerate launch --config_file examples/accelerate/cpu_2proc.yaml -m finegrain train CONFIG`` on CPU (gloo): the run
finishes, only rank 0 writes the log and checkpoints, the logged batch is the global one, and a
killed-then-resumed data-parallel run continues from its checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finegrain.config import dump_config
from finegrain.train.logging import read_log
from tests.train.test_loop_e2e import make_cfg

ACCELERATE = Path(__file__).resolve().parents[2] / "examples" / "accelerate"


def _launch(config, cfg_path, *overrides, timeout=600):
    env = {**os.environ, "FINEGRAIN_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config),
           "-m", "finegrain", "train", str(cfg_path), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("config, fsdp", [("cpu_2proc.yaml", False), ("cpu_2proc_fsdp.yaml", True)],
                         ids=["replicated", "fsdp"])
def test_two_process_run_logs_the_global_batch_once_and_resumes(tmp_path, sft_cache, config, fsdp):
    cfg = make_cfg("grpo", tmp_path / "run", sft_cache, **{"train.steps": 4, "train.save_every": 2,
                                                        "rollout.prompts_per_step": 4, "train.fsdp": fsdp})
    dump_config(cfg, tmp_path / "cfg.yaml")
    first = _launch(config, tmp_path / "cfg.yaml", "train.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    said = "data parallel: 2 processes, 2 prompts each per step" + (", policy sharded (FSDP2)" if fsdp else "")
    assert first.stdout.count(said) == 1  # said once, by rank 0
    run = tmp_path / "run"
    rows = [r for r in read_log(run / "metrics.jsonl") if "loss/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]  # one row per step: rank 1 logged nothing
    assert all(r["rollout/rows"] == 4 * cfg.rollout.group_size for r in rows)  # the global batch, summed
    assert (run / "checkpoints").is_dir() and (run / "report.json").is_file()
    # continue the finished 2-step run to 4 steps: both ranks load the step-2 checkpoint
    if fsdp:  # the checkpoint holds the full model (gathered from both shards), loadable as it is
        from finegrain.models.load import load_pretrained

        ck = run / "checkpoints" / "step_000002"
        full, _ = load_pretrained(str(ck / "policy"), device="cpu")
        assert sum(p.numel() for p in full.parameters()) > 0
        state = torch.load(ck / "state.pt", weights_only=True)
        assert all(isinstance(k, str) for k in state["optimizer"]["state"])  # keyed by parameter name
        assert len(state["optimizer"]["state"]) == len(list(full.parameters()))
    second = _launch(config, tmp_path / "cfg.yaml", "train.steps=4", "train.resume=force")
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [r for r in read_log(run / "metrics.jsonl") if "loss/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((run / "report.json").read_text())["steps"] == 4
    assert "resumed from" in second.stdout + second.stderr
    # the resumed steps 3 and 4 are those of an uninterrupted 4-step run: step 3 needs the weights
    # restored on both ranks, step 4 also the optimizer state (AdamW's moments moved step 3)
    cfg.train.out_dir = str(tmp_path / "straight")
    dump_config(cfg, tmp_path / "straight.yaml")
    straight = _launch(config, tmp_path / "straight.yaml", "train.steps=4")
    assert straight.returncode == 0, straight.stderr[-3000:]
    want = [r for r in read_log(tmp_path / "straight" / "metrics.jsonl") if "loss/loss" in r]
    for i in (2, 3):
        for key in ("loss/loss", "loss/grad_norm", "reward/verifier/mean"):
            assert rows[i][key] == pytest.approx(want[i][key], rel=1e-5, abs=1e-7), (i + 1, key)
