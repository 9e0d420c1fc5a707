"""``finegrain compare``: train methods × seeds under one budget and compare them.

    finegrain compare --methods grpo,prime,step_oracle --seeds 0,1,2 --out /tmp/cmp \\
        [--set train.steps=50 eval.n_problems=200 ...] [--method-set prime:rewards.1.kwargs.lr=1e-5 ...] \\
        [--jobs 2] [--target 0.7] [--baseline grpo] [--force]

``run_comparison`` resolves and checks every run's config before anything starts (``runs.py``:
what may differ between methods, what a rerun may change), trains the runs that are not done in
parallel subprocesses (``finegrain train``, one torch thread each), then aggregates every
finished run (``summary.py``) into ``<out>/results.json``, ``summary.md``, ``curves.png`` and
``summary.html``. A rerun of the same command trains only the runs without a done marker, so a
killed comparison loses at most its unfinished runs' progress since their last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

from finegrain.compare import runs as R
from finegrain.compare import summary as S


def machine_info() -> dict:
    """CPU count, load average, library versions (read without importing torch)."""
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"cpu_count": os.cpu_count(), "load_avg": list(os.getloadavg()), "torch": version("torch"),
            "transformers": version("transformers"), "python": platform.python_version(),
            "platform": platform.platform(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def json_safe(x):
    """NaN and ±inf -> None, recursively (results.json stays strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def load_results(plan: list[R.Run]) -> tuple[list[S.RunResult], list[str]]:
    """The finished runs of a plan (those with a done marker), and the names of the others."""
    done, missing = [], []
    for r in plan:
        if not R.is_done(r):
            missing.append(r.name)
            continue
        rows = [json.loads(ln) for ln in (r.run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        info = json.loads((r.run_dir / R.DONE_FILE).read_text())
        done.append(S.RunResult(r.method, r.seed, rows, int(r.config["rollout"]["group_size"]), info))
    return done, missing


def run_comparison(methods: str, seeds: list[int], out: str | Path, *, sets: list[str] = (),
                   method_sets: list[str] = (), jobs: int = 2, target: float | None = None,
                   baseline: str | None = None, force: bool = False, command: str = "",
                   log: Callable[[str], None] = print) -> dict:
    """Train what is not done yet, then write the comparison; returns results.json's content.

    Every refusal (a bad method or override, configs that differ outside the method keys, a run
    directory trained with another config) is a one-line ValueError raised before any launch.
    ``results["failed"]`` names the runs whose training failed in this call.
    """
    t0 = time.time()
    out = Path(out).resolve()
    machine = machine_info()
    ms = R.parse_methods(methods, list(method_sets))
    labels = [m.label for m in ms]
    if baseline is not None and baseline not in labels:
        raise ValueError(f"--baseline: '{baseline}' is not one of the methods ({', '.join(labels)})")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct seeds, got {seeds}")
    plan = R.plan_runs(ms, list(seeds), out, list(sets))
    R.check_comparable(plan, ms)
    for r in R.check_existing(plan, force):
        log(f"--force: {r.run_dir} was run with another config; deleting it to run again")
        R.reset(r)

    jobs_todo = []
    for r in plan:
        R.write_config(r)
        if R.is_done(r):
            log(f"skip  {r.name}: finished before ({r.run_dir / R.DONE_FILE})")
        else:
            jobs_todo.append(R.train_job(r))
    launched = R.run_pool(jobs_todo, jobs, log=log)
    failed = [n for n, info in launched.items() if info["returncode"] != 0 or "error" in info]

    results, missing = load_results(plan)
    summary = S.summarize(results, labels, target=target, baseline=baseline)
    finals = {(r.method, r.seed): S.eval_curve(r.rows, r.group_size).accuracy[-1:] for r in results}
    by_run = {(r.method, r.seed): r for r in results}
    run_list = []
    for r in plan:
        res = by_run.get((r.method, r.seed))
        info = res.info if res else {}
        run_list.append({"name": r.name, "method": r.method, "seed": r.seed, "run_dir": str(r.run_dir),
                         "config": str(r.config_path), "status": "done" if res else ("failed" if r.name in failed
                                                                                      else "not finished"),
                         "final_accuracy": (finals[(r.method, r.seed)] or [None])[0] if res else None,
                         "wall_seconds": info.get("wall_seconds"), "peak_rss_mib": info.get("peak_rss_mib"),
                         "resumed": info.get("resumed"), "launch": info})
    machine["load_avg_end"] = list(os.getloadavg())
    machine["seconds"] = time.time() - t0
    res = {**summary, "command": command, "machine": machine, "runs": run_list, "missing": missing, "failed": failed,
           "methods_spec": {m.label: {"source": m.source, "overrides": m.overrides} for m in ms},
           "common_overrides": list(sets), "seeds": list(seeds)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(json_safe(res), indent=2, default=str))
    md = S.render_markdown(summary, command, missing)
    (out / "summary.md").write_text(md)
    png = S.plot_curves(summary, out / "curves.png") if summary["methods"] else None
    (out / "summary.html").write_text(S.render_html(summary, png, command=command, machine=machine, runs=run_list,
                                                    missing=missing))
    log(md)
    log(f"results: {out / 'results.json'}  table: {out / 'summary.md'}  page: {out / 'summary.html'}")
    return res
