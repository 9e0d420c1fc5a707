"""`finegrain compare`: the table of a micro comparison, resuming a killed one, the refusals, and the
aggregation formulas on hand-made numbers."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finegrain.cli.main import demo_config, main
from finegrain.compare import run_comparison
from finegrain.compare import runs as R
from finegrain.compare.summary import (Curve, RunResult, eval_curve, mean_curve, ratio, rollouts_to_target,
                                       summarize, t_interval, t_quantile_975, table_rows)
from finegrain.config import apply_overrides, to_dict
from tests.helpers import ATOL, RTOL, only_error_line

REPO = Path(__file__).resolve().parents[2]

# seconds-long runs: micro model, 2 steps of 2 prompts × 2 samples, 4 eval problems (the SFT settings
# are tests/conftest.py's tiny_run_overrides', so the warm start is shared with the other tests)
MICRO = ["model.size=micro", "model.device=cpu", "sft.n_examples=256", "sft.batch_size=32", "sft.lr=0.003",
         "sft.warmup_steps=2", "task.kwargs={min_steps: 2, max_steps: 2}", "rollout.prompts_per_step=2",
         "rollout.group_size=2", "rollout.max_new_tokens=12", "eval.n_problems=4", "eval.samples=1",
         "eval.max_new_tokens=12", "eval.greedy_too=false", "train.steps=2", "train.eval_every=1",
         "train.save_every=1", "filters.filters=[]"]
METHODS = "grpo,prime_lr=prime"
METHOD_SETS = ["prime_lr:rewards.1.kwargs.lr=1e-3"]
RUNS = ["grpo-s0", "prime_lr-s0", "grpo-s1", "prime_lr-s1"]


def argv(out, *extra_sets):
    return ["compare", "--methods", METHODS, "--seeds", "0,1", "--out", str(out), "--jobs", "2",
            "--set", *MICRO, *extra_sets, "--method-set", *METHOD_SETS]


def error_line(capsys, args):
    return only_error_line(capsys, main, args)


def snapshot(run_dir: Path) -> tuple:
    marker, metrics = run_dir / R.DONE_FILE, run_dir / "metrics.jsonl"
    return marker.stat().st_mtime_ns, marker.read_bytes(), metrics.read_bytes()


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory, sft_cache):
    """`finegrain compare` (2 methods × 2 seeds, 2 jobs) killed with its children once the first run
    is done, then the same comparison again."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    env = {**os.environ, "FINEGRAIN_CACHE": str(sft_cache), "PYTHONPATH": str(REPO)}
    log = out.parent / "first_call.log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "finegrain", *argv(out)], cwd=REPO, env=env, stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not list(out.glob(f"runs/*/{R.DONE_FILE}")):
            assert p.poll() is None, f"compare ended before any run was done:\n{log.read_text()}"
            assert time.time() < deadline, f"no run done after 240 s:\n{log.read_text()}"
            time.sleep(0.1)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the comparison and the training processes it started
        p.wait()
    before = {d.name: snapshot(d) for d in out.glob("runs/*") if (d / R.DONE_FILE).exists()}
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINEGRAIN_CACHE", str(sft_cache))
        res = run_comparison(METHODS, [0, 1], out, sets=MICRO, method_sets=METHOD_SETS, jobs=2,
                             command="finegrain compare (rerun)", log=lines.append)
    return out, before, lines, res


def test_compare_writes_the_table_for_two_methods_and_two_seeds(killed_then_rerun):
    out, _, _, res = killed_then_rerun
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == ["grpo", "prime_lr"]
    assert all(m["seeds"] == [0, 1] and m["n"] == 2 for m in saved["methods"].values())
    assert sorted(r["name"] for r in saved["runs"] if r["status"] == "done") == sorted(RUNS)
    assert saved["failed"] == [] and saved["missing"] == []
    for r in saved["runs"]:  # normal run directories with the seed and overrides compare set
        cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert cfg["train"]["seed"] == r["seed"] and cfg["train"]["tensorboard"] is False
        assert (Path(r["run_dir"]) / "report.json").exists() and r["peak_rss_mib"] > 0
    prm = yaml.safe_load((out / "runs" / "prime_lr-s0" / "config.yaml").read_text())["rewards"][1]
    assert prm["name"] == "implicit_prm" and prm["kwargs"]["lr"] == pytest.approx(1e-3)  # --method-set, list index

    md = (out / "summary.md").read_text()
    for m in ("grpo", "prime_lr"):
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {m} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "2" and re.fullmatch(r"\d\.\d{3} ± \d\.\d{3}", cells[2]), row
    assert "95% t-interval" in md

    page = (out / "summary.html").read_text()
    assert "data:image/png;base64," in page and (out / "curves.png").stat().st_size > 1000
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    text = re.sub(r"base64,[A-Za-z0-9+/=]+", "", page)
    assert "http" not in text and "cpu_count" in text and "finegrain compare (rerun)" in text


def test_a_killed_comparison_reruns_only_the_unfinished_runs(killed_then_rerun):
    out, before, lines, res = killed_then_rerun
    assert 1 <= len(before) < 4  # killed midway
    for name, snap in before.items():
        assert snapshot(out / "runs" / name) == snap  # marker and metrics untouched: not run again
        assert any(ln.startswith(f"skip  {name}:") for ln in lines)
        assert not any(f"start {name}" in ln for ln in lines)
    started = {n for n in RUNS if any(ln.endswith(f"start {n}") or f"start {n} (" in ln for ln in lines)}
    assert started == set(RUNS) - set(before)
    assert all((out / "runs" / n / R.DONE_FILE).exists() for n in RUNS) and res["failed"] == []


def test_rerun_with_another_config_is_refused_naming_the_key(killed_then_rerun, capsys):
    out, _, _, _ = killed_then_rerun
    before = {n: snapshot(out / "runs" / n) for n in RUNS}
    line = error_line(capsys, argv(out, "train.steps=3"))
    assert "'train.steps'" in line and "--force" in line and "another config" in line
    assert {n: snapshot(out / "runs" / n) for n in RUNS} == before


def test_configs_that_differ_outside_the_method_keys_are_refused(tmp_path, capsys):
    d = to_dict(demo_config("grpo"))
    d["rollout"]["group_size"] = 4
    (tmp_path / "g4.yaml").write_text(yaml.safe_dump(d))
    line = error_line(capsys, ["compare", "--methods", f"grpo,{tmp_path / 'g4.yaml'}", "--seeds", "0",
                               "--out", str(tmp_path / "out")])
    assert "configs differ in 'rollout.group_size' (grpo: 8, g4: 4)" in line and "method keys" in line
    assert not (tmp_path / "out").exists()  # refused before anything was written or launched

    for name, max_steps in (("a", 4), ("b", 3)):  # two config files that differ in the task
        d["rollout"]["group_size"] = 8
        d["task"]["kwargs"]["max_steps"] = max_steps
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(d))
    line = error_line(capsys, ["compare", "--methods", f"{tmp_path / 'a.yaml'},{tmp_path / 'b.yaml'}",
                               "--seeds", "0", "--out", str(tmp_path / "out")])
    assert "'task.kwargs.max_steps' (a: 4, b: 3)" in line


def test_method_set_keys_and_method_keys_may_differ(tmp_path):
    ms = R.parse_methods("grpo,g4=grpo,rloo", ["g4:rollout.group_size=4"])
    plan = R.plan_runs(ms, [0, 1], tmp_path, [])
    R.check_comparable(plan, ms)  # advantage differs (a method key), group_size only where --method-set said so
    assert [r.name for r in plan] == ["grpo-s0", "g4-s0", "rloo-s0", "grpo-s1", "g4-s1", "rloo-s1"]
    assert plan[1].config["rollout"]["group_size"] == 4 and plan[3].config["train"]["seed"] == 1
    ms = R.parse_methods("grpo,rloo", ["rloo:rollout.group_size=4", "grpo:rollout.group_size=2"])
    R.check_comparable(R.plan_runs(ms, [0], tmp_path, []), ms)  # both set it
    # every pair is checked: grpo's own --method-set lets it differ from b and c, but b and c differ in
    # a key neither of them set
    d = to_dict(demo_config("grpo"))
    for name, g in (("b", 4), ("c", 2)):
        d["rollout"]["group_size"] = g
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(d))
    ms = R.parse_methods(f"grpo,{tmp_path / 'b.yaml'},{tmp_path / 'c.yaml'}", ["grpo:rollout.group_size=8"])
    with pytest.raises(ValueError, match=r"configs differ in 'rollout\.group_size' \(b: 4, c: 2\)"):
        R.check_comparable(R.plan_runs(ms, [0], tmp_path, []), ms)


def test_force_returns_the_runs_whose_saved_config_changed(tmp_path):
    ms = R.parse_methods("grpo")
    (run,) = R.plan_runs(ms, [0], tmp_path, [])
    run.run_dir.mkdir(parents=True)
    saved = json.loads(json.dumps(run.config))
    saved["train"]["resume"], saved["train"]["out_dir"] = False, "/elsewhere"  # keys a rerun may change
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert R.check_existing([run], force=False) == []
    # a run saved before a config field existed: the field takes its default, so it is no change
    old = json.loads(json.dumps(saved))
    del old["loss"]["entropy_coef"]
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    assert R.check_existing([run], force=False) == []
    old["loss"]["entropy_coef"] = 0.5
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ValueError, match=r"'loss\.entropy_coef': 0\.5 there, 0\.0 now"):
        R.check_existing([run], force=False)
    saved["optim"]["lr"] = 1.0
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ValueError, match=r"'optim\.lr': 1\.0 there, 0\.0001 now"):
        R.check_existing([run], force=False)
    assert R.check_existing([run], force=True) == [run]
    R.reset(run)
    assert not run.run_dir.exists()


def test_method_specs_and_overrides():
    ms = R.parse_methods("grpo, p2=prime ,cfg/x.yaml", ["p2:optim.lr=1e-5", "p2:train.steps=3"])
    assert [(m.label, m.source) for m in ms] == [("grpo", "grpo"), ("p2", "prime"), ("x", "cfg/x.yaml")]
    assert ms[1].overrides == ["optim.lr=1e-5", "train.steps=3"] and ms[1].set_keys == ["optim.lr", "train.steps"]
    for spec, sets, msg in [("grpo,grpo", [], "appears twice"), ("grpo,nope", [], "neither a recipe"),
                            ("grpo", ["prime:optim.lr=1"], "no method labelled 'prime'"),
                            ("grpo", ["grpo:train.seed=3"], "compare sets it"), ("grpo", ["optim.lr=1"], "LABEL:key")]:
        with pytest.raises(ValueError, match=msg):
            R.parse_methods(spec, sets)
    d = apply_overrides({"rewards": [{"name": "a"}, {"name": "b", "kwargs": {}}]}, ["rewards.1.kwargs.lr=1e-5",
                                                                                 "rewards.0.weight=2", "x.y=true"])
    assert d == {"rewards": [{"name": "a", "weight": 2}, {"name": "b", "kwargs": {"lr": 1e-5}}], "x": {"y": True}}
    with pytest.raises(ValueError, match="'rewards' is a list of 2; expected an index 0..1, got '2'"):
        apply_overrides(d, ["rewards.2.weight=1"])


# ---------------------------------------------------------------------------------------------
# aggregation, with hand-computed values


def test_t_interval_worked_examples():
    # [0.5, 0.6, 0.7]: mean 0.6, s = √((0.01 + 0 + 0.01) / 2) = 0.1, half = t_{0.975,2} · 0.1 / √3
    m, half, n = t_interval([0.5, 0.6, 0.7])
    assert n == 3 and m == pytest.approx(0.6, rel=RTOL, abs=ATOL)
    assert half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=RTOL, abs=ATOL)  # 0.248414
    # [0.2, 0.4]: s = √0.02, half = 12.706205 · √0.02 / √2 = 12.706205 · 0.1
    m, half, n = t_interval([0.2, 0.4])
    assert (m, n) == (pytest.approx(0.3), 2) and half == pytest.approx(1.2706205, rel=RTOL, abs=ATOL)
    m, half, n = t_interval([0.7])
    assert m == 0.7 and math.isnan(half) and n == 1
    assert math.isnan(t_interval([])[0])


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 31), 31, 45, 200]:
        assert t_quantile_975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), rel=RTOL, abs=ATOL)


def test_eval_curve_counts_generated_rollouts():
    rows = [{"step": 0, "eval/accuracy": 0.25},
            {"step": 1, "filter/generated_prompts": 3, "eval/accuracy": 0.5},  # a periodic eval
            {"step": 2, "filter/generated_prompts": 1},                        # every group filtered out
            {"step": 3, "filter/generated_prompts": 2, "time/step": 1.0},
            {"step": 3, "eval/accuracy": 0.75}]                               # the final eval, its own row
    c = eval_curve(rows, group_size=4)
    # R(1) = 3·4 = 12; R(3) = (3 + 1 + 2)·4 = 24
    assert (c.steps, c.rollouts, c.accuracy) == ([0, 1, 3], [0.0, 12.0, 24.0], [0.25, 0.5, 0.75])


def test_rollouts_to_target_ratio_and_not_reached():
    x, y = [0.0, 12.0, 24.0, 36.0], [0.25, 0.5, 0.75, 0.7]
    assert rollouts_to_target(x, y, 0.5) == 12.0   # at or above: the first crossing, not interpolated
    assert rollouts_to_target(x, y, 0.6) == 24.0
    assert rollouts_to_target(x, y, 0.25) == 0.0   # the start already reaches it
    assert rollouts_to_target(x, y, 0.8) is None   # not reached
    assert ratio(24.0, 12.0) == 2.0 and ratio(None, 12.0) is None and ratio(12.0, None) is None
    assert ratio(12.0, 0.0) is None
    m = mean_curve([Curve([0, 1, 2], [0, 4, 8], [0.2, 0.4, 0.6]), Curve([0, 2], [0, 10], [0.4, 0.8])])
    assert (m.steps, m.rollouts) == ([0, 2], [0.0, 9.0]) and m.accuracy == pytest.approx([0.3, 0.7])


def _rows(accs, times=()):
    """Eval after every step; 2 generated prompts per step (× group size 2 = 4 rollouts)."""
    out = [{"step": 0, "eval/accuracy": accs[0]}]
    for s, a in enumerate(accs[1:], start=1):
        out.append({"step": s, "filter/generated_prompts": 2, "eval/accuracy": a,
                    **({"time/step": times[s - 1]} if times else {})})
    return out


def test_summarize_hand_made_comparison():
    results = [RunResult("A", 0, _rows([0.2, 0.4, 0.6], [1.0, 3.0]), 2, {"peak_rss_mib": 100.0}),
               RunResult("A", 1, _rows([0.2, 0.6, 0.8], [2.0, 10.0]), 2, {"peak_rss_mib": 150.0}),
               RunResult("B", 0, _rows([0.2, 0.3, 0.4]), 2, {}),
               RunResult("B", 1, _rows([0.2, 0.3, 0.6]), 2, {})]
    s = summarize(results, ["A", "B"])
    A, B = s["methods"]["A"], s["methods"]["B"]
    # seed-mean curves at rollouts [0, 4, 8]: A [0.2, 0.5, 0.7], B [0.2, 0.3, 0.5]
    assert A["mean_curve"]["rollouts"] == [0.0, 4.0, 8.0]
    assert A["final_accuracy"]["mean"] == pytest.approx(0.7) and B["final_accuracy"]["mean"] == pytest.approx(0.5)
    assert A["final_accuracy"]["half_width"] == pytest.approx(1.2706205, rel=RTOL)  # finals 0.6, 0.8
    # default target: the worst final mean (B, 0.5); A's mean first reaches it at 4 rollouts, B's at 8
    assert s["target"] == pytest.approx(0.5) and "B" in s["target_source"] and s["baseline"] == "A"
    assert A["rollouts_to_target"] == 4.0 and B["rollouts_to_target"] == 8.0
    assert A["ratio_to_baseline"] == 1.0 and B["ratio_to_baseline"] == 2.0
    assert B["rollouts_to_target_per_seed"] == [None, 8.0]  # seed 0 ends at 0.4
    assert A["seconds_per_step_median"] == 2.5 and A["peak_rss_mib_max"] == 150.0  # median of 1, 3, 2, 10
    assert A["miracle_step_rate"] is None and B["peak_rss_mib_max"] is None

    s = summarize(results, ["A", "B"], target=0.75, baseline="B")
    header, rows = table_rows(s)
    assert header[3].startswith("rollouts to 0.750") and header[4] == "rollouts × B"
    # A's mean curve peaks at 0.7: not reached, although seed 1 (0.8 at 8 rollouts) is
    assert rows[0] == ["A", "2", "0.700 ± 1.271", "not reached (1/2 seeds)", "n/a", "n/a", "n/a", "2.50", "150"]
    assert rows[1][3] == "not reached (0/2 seeds)" and rows[1][7:] == ["n/a", "n/a"]
