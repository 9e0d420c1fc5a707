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
