import json

from finegrain.cli.main import main
from tests.conftest import tiny_run_overrides


def test_demo_command_end_to_end(tmp_path, sft_cache, capsys):
    out = tmp_path / "demo"
    overrides = [o for o in tiny_run_overrides(out, sft_cache, steps=2) if not o.startswith("train.out_dir")]
    main(["demo", "--method", "grpo", "--out", str(out), *overrides])
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "before" in printed and str(out) in printed
    report = json.loads((out / "report.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "n_problems"):
        assert key in report["eval"]
    assert report["wall_seconds"] > 0
    for name in ("metrics.jsonl", "curves.png", "config.yaml", "samples_after.jsonl"):
        assert (out / name).exists(), name


def test_cli_sets_the_passive_openmp_wait_before_torch_loads():
    """libgomp reads its wait policy once, when torch loads it: the CLI sets it first
    (finegrain/threads.py; spinning threads made runs ~10x slower beside other jobs)."""
    import os
    import subprocess
    import sys

    code = ("import os, sys; from finegrain.cli.main import main; main(['config']); "
            "print('POLICY', os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "FINEGRAIN_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "POLICY PASSIVE" in out.stdout
    env["FINEGRAIN_THREADS"] = "torch"  # the old behaviour on request
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "POLICY None" in out.stdout
