"""Benchmarks call the library's own stages; these tests keep them importable and running, so a
benchmark cannot silently rot (``step_timing.py`` once copied the loop body and stopped importing)."""

import importlib.util
from pathlib import Path

import pytest

from finegrain.config import apply_overrides, from_dict, to_dict
from finegrain.cli.main import demo_config
from finegrain.config import RunConfig
from tests.conftest import tiny_run_overrides

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH.glob("*.py")))
def test_every_benchmark_imports(name):
    load(name)


@pytest.mark.parametrize("method", ["grpo", "prime"])
def test_step_timing_runs_the_trainers_stages(tmp_path, sft_cache, method):
    from finegrain.train.sft import warm_started_tiny
    from finegrain.tasks import TASKS

    bench = load("step_timing")
    d = apply_overrides(to_dict(demo_config(method)), tiny_run_overrides(tmp_path / "x", sft_cache))
    cfg = from_dict(RunConfig, d)
    task = TASKS.get(cfg.task.name)(**cfg.task.kwargs)
    model, tok, _ = warm_started_tiny(task, cfg.task.kwargs, cfg.model, cfg.sft, log=lambda m: None)
    side = bench.FinegrainSide(cfg, task, model, tok)
    rec = side.step(0)
    assert rec["rows"] == 16 and rec["total"] >= rec["generate"] > 0
    assert sorted(e.prompt for e in side.prompts_for(0)) == rec["prompts"]


def test_probe_speed_runs_and_its_three_paths_agree(capsys):
    bench = load("probe_speed")
    (row,) = bench.main(["--models", "tiny", "--probes", "3", "--responses", "2", "--prompt-len", "8",
                         "--response-len", "10", "--answer-len", "2", "--reps", "1"])
    # 2 responses x 3 probes, one packed row each: P + max n_k + K·(|"A: "| + answer) tokens per response
    assert row["packs"] and row["probes"] == 6 and row["shared_forwards"] == 1
    assert row["shared_tokens"] <= 2 * (8 + 9 + 3 * 5) < row["naive_tokens"]
    assert row["naive_diff"] < 1e-5 and row["one_by_one_diff"] < 1e-5
    assert "| tiny | 0.9M | 3 | 6 |" in capsys.readouterr().out
