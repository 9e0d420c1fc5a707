"""PRIME against outcome-only GRPO and RLOO on the arith task: learning, process quality, cost.

    FINEGRAIN_CACHE=/tmp/fgcache python benchmarks/prime_vs_outcome.py --methods grpo,rloo,prime \\
        --seeds 0,1,2 --steps 50 --eval-every 5 --eval-problems 200 --eval-samples 2 \\
        --pq-problems 150 --pq-samples 2 --target 0.62 --cost-steps 12 --cost-rounds 2 \\
        --out /tmp/prime_vs_outcome --jobs 2      # ~25 min on a loaded 2-core machine

Every (method, seed) run is ``finegrain.train.loop.train`` on the CPU demo config of that method
(``finegrain.cli.main.demo_config``; the saved configs show which sections differ),
started from the same cached SFT model (set ``FINEGRAIN_CACHE``; default /tmp/fgcache), in its own
subprocess with one torch thread, at most ``--jobs`` at a time. Overrides applied to each run:
train.seed, train.steps, train.eval_every, train.save_every = steps, train.out_dir,
train.tensorboard = false, train.progress = false, eval.n_problems, eval.samples,
eval.greedy_too = false. The parent records each child's wall time and peak RSS (``os.wait4``).

Then, per run and for the SFT policy, a process-quality subprocess (``process_quality.py``)
samples held-out problems that are disjoint from the eval problems, labels every step exactly
with ``ArithTask.label_steps`` and scores steps with PRIME's implicit PRM (``step_quality``).

Aggregation (written to ``<out>/results.json`` and ``<out>/summary.md``, curve PNG at ``--png``):

* learning: held-out accuracy (``eval/accuracy``) against cumulative *generated* rollouts
  (Σ filter/generated_prompts × group_size, so PRIME's filter oversampling counts against it),
  mean ± std over seeds; final accuracy after ``--steps`` steps; accuracy at the common rollout
  budget (the smallest final budget of any method, linear interpolation between eval points);
  rollouts until the first eval with accuracy ≥ ``--target``;
* process quality: see ``process_quality.py``;
* cost: ``time/step`` from metrics.jsonl (rollout + scoring + update; eval excluded), mean and
  median per method over all steps of all seeds, the PRIME / GRPO ratio, and peak RSS; with
  ``--cost-steps S`` also a controlled timing: ``--cost-rounds`` short GRPO and PRIME runs of
  the demo config, one at a time, alternating (step 1 left out), under ``<out>/cost/``.
* a check that the seeds of each method ran the same config (the saved config.yaml files) and
  which config sections differ between methods.

``--skip-existing`` (default on) reuses finished runs (report.json + run_info.json present), so a
second call only aggregates; ``--force`` retrains.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

DEFAULT_CACHE = "/tmp/fgcache"


# ---------------------------------------------------------------------------------------------
# workers (run in subprocesses)

def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def run_config(method: str, seed: int, steps: int, eval_every: int, eval_problems: int, eval_samples: int,
               out_dir: str):
    """The demo config of ``method`` with this benchmark's overrides."""
    from finegrain.cli.main import demo_config
    from finegrain.config import RunConfig, apply_overrides, from_dict, to_dict, validate

    base = to_dict(demo_config(method))
    cfg = from_dict(RunConfig, apply_overrides(base, [
        f"train.seed={seed}", f"train.steps={steps}", f"train.eval_every={eval_every}", f"train.save_every={steps}",
        f"train.out_dir={out_dir}", "train.tensorboard=false", "train.progress=false", "train.resume=false",
        f"eval.n_problems={eval_problems}", f"eval.samples={eval_samples}", "eval.greedy_too=false"]))
    validate(cfg)
    return cfg


def worker_train(a) -> None:
    _one_thread()
    from finegrain.train.loop import train

    cfg = run_config(a.method, a.seed, a.steps, a.eval_every, a.eval_problems, a.eval_samples, a.run_dir)
    train(cfg, log=lambda m: print(m, flush=True))


# ---------------------------------------------------------------------------------------------
# orchestration

def _launch(cmd: list[str], log_path: Path) -> dict:
    """Run cmd to completion; wall seconds, exit code and the child's own peak RSS (MiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "FINEGRAIN_CACHE": os.environ.get("FINEGRAIN_CACHE", DEFAULT_CACHE), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        _, status, ru = os.wait4(p.pid, 0)  # rusage of this child only (ru_maxrss in KiB on Linux)
        p.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_seconds": time.time() - t0, "returncode": p.returncode, "peak_rss_mib": ru.ru_maxrss / 1024,
            "user_seconds": ru.ru_utime, "sys_seconds": ru.ru_stime, "cmd": cmd}


def run_pool(jobs: list[tuple[str, list[str], Path, Path]], n_parallel: int) -> dict[str, dict]:
    """jobs: (name, cmd, log path, info path). At most n_parallel at a time, in the given order."""
    queue, results, lock = list(jobs), {}, threading.Lock()

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                name, cmd, log_path, info_path = queue.pop(0)
            print(f"[{time.strftime('%H:%M:%S')}] start {name}", flush=True)
            info = _launch(cmd, log_path)
            info["load_avg_end"] = os.getloadavg()
            if info["returncode"] == 0:
                info_path.write_text(json.dumps(info, indent=2))
            with lock:
                results[name] = info
            print(f"[{time.strftime('%H:%M:%S')}] done  {name}: rc={info['returncode']} "
                  f"{info['wall_seconds']:.0f}s peak RSS {info['peak_rss_mib']:.0f} MiB", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(max(1, n_parallel))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---------------------------------------------------------------------------------------------
# aggregation

def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def curve(rows: list[dict], group_size: int) -> dict:
    """Eval points (step, cumulative generated rollouts, accuracy), per-step times and totals."""
    cum, by_step = 0, {}
    times, gen_prompts, kept_prompts = [], [], []
    phases = {"generate": [], "score": [], "update": []}
    for r in sorted(rows, key=lambda r: r["step"]):
        for ph, v in phases.items():
            if f"time/{ph}" in r:
                v.append(r[f"time/{ph}"])
        if "filter/generated_prompts" in r:
            cum += r["filter/generated_prompts"] * group_size
            gen_prompts.append(r["filter/generated_prompts"])
            kept_prompts.append(r.get("filter/kept_prompts", 0.0))
        if "time/step" in r:
            times.append(r["time/step"])
        by_step.setdefault(r["step"], {})["rollouts"] = cum
        if "eval/accuracy" in r:
            by_step[r["step"]]["accuracy"] = r["eval/accuracy"]
    pts = [(s, v["rollouts"], v["accuracy"]) for s, v in sorted(by_step.items()) if "accuracy" in v]
    return {"steps": [p[0] for p in pts], "rollouts": [p[1] for p in pts], "accuracy": [p[2] for p in pts],
            "time_step": times, "time_phases": phases, "generated_prompts": gen_prompts, "kept_prompts": kept_prompts,
            "total_rollouts": cum}


def interp(x: list[float], y: list[float], at: float) -> float:
    """Linear interpolation of y(x) at ``at``; NaN outside [x0, x_last]."""
    if not x or at < x[0] or at > x[-1]:
        return float("nan")
    for i in range(1, len(x)):
        if at <= x[i]:
            if x[i] == x[i - 1]:
                return y[i]
            w = (at - x[i - 1]) / (x[i] - x[i - 1])
            return y[i - 1] + w * (y[i] - y[i - 1])
    return y[-1]


def mean_std(xs: list[float]) -> tuple[float, float, int]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan"), 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def fmt(m: float, s: float, digits: int = 3) -> str:
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def plot(runs: dict, methods: list[str], target: float, budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"grpo": "tab:blue", "rloo": "tab:orange", "prime": "tab:green"}
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for m in methods:
        cs = [runs[(m, s)]["curve"] for s in sorted(s for (mm, s) in runs if mm == m)]
        if not cs:
            continue
        c = colors.get(m, None)
        for cv in cs:
            ax.plot(cv["rollouts"], cv["accuracy"], color=c, alpha=0.25, lw=0.8)
        n = min(len(cv["accuracy"]) for cv in cs)  # eval points by index (same eval steps in every seed)
        xs = [statistics.fmean(cv["rollouts"][i] for cv in cs) for i in range(n)]
        ys = [mean_std([cv["accuracy"][i] for cv in cs]) for i in range(n)]
        mu = [y[0] for y in ys]
        sd = [y[1] for y in ys]
        ax.plot(xs, mu, color=c, marker="o", ms=3, lw=1.8, label=f"{m} (mean of {len(cs)} seeds)")
        ax.fill_between(xs, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)], color=c, alpha=0.15)
    ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target:.2f}")
    if budget and not math.isnan(budget):
        ax.axvline(budget, color="grey", ls=":", lw=0.8, label="common rollout budget")
    ax.set_xlabel("generated rollouts (cumulative, incl. filtered-out groups)")
    ax.set_ylabel("held-out accuracy (sampled, T=1)")
    ax.set_title(f"arith, tiny SFT model: {' vs '.join(methods)} (band = ±1 std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in ("advantage.per_source",):
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True)
    return out


def config_report(configs: dict) -> dict:
    """Config keys that differ between seeds of one method (should be none besides seed/out_dir)
    and between each method and the first method."""
    skip = {"train.seed", "train.out_dir"}
    flat = {k: {kk: vv for kk, vv in _flat(v).items() if kk not in skip} for k, v in configs.items()}
    by_method: dict = {}
    for (m, s), f in flat.items():
        by_method.setdefault(m, []).append(f)
    within = {m: sorted({k for f in fs for k in set(f) | set(fs[0]) if f.get(k) != fs[0].get(k)})
              for m, fs in by_method.items()}
    first = next(iter(by_method), None)
    between = {m: sorted({k.split(".")[0] for k in set(fs[0]) | set(by_method[first][0])
                          if fs[0].get(k) != by_method[first][0].get(k)})
               for m, fs in by_method.items() if m != first}
    return {"within_method": within, "vs_" + str(first): between}


def aggregate(a, methods: list[str], seeds: list[int], out: Path) -> dict:
    runs, configs = {}, {}
    group_size = None
    for m in methods:
        for s in seeds:
            d = out / f"{m}-s{s}"
            if not (d / "metrics.jsonl").exists() or not (d / "run_info.json").exists():
                print(f"missing run {d}; left out", file=sys.stderr)
                continue
            import yaml

            cfg = yaml.safe_load((d / "config.yaml").read_text())
            configs[(m, s)] = cfg
            group_size = cfg["rollout"]["group_size"]
            rows = read_metrics(d / "metrics.jsonl")
            info = json.loads((d / "run_info.json").read_text())
            pq = json.loads((d / "process_quality.json").read_text()) if (d / "process_quality.json").exists() else None
            runs[(m, s)] = {"curve": curve(rows, group_size), "info": info, "pq": pq}
    sft_pq_path = out / "sft" / "process_quality.json"
    sft_pq = json.loads(sft_pq_path.read_text()) if sft_pq_path.exists() else None

    # the largest budget every run reached, so that every run is interpolated, none extrapolated
    budget = min((r["curve"]["total_rollouts"] for r in runs.values()), default=float("nan"))
    table = {}
    for m in methods:
        rs = [runs[(m, s)] for s in seeds if (m, s) in runs]
        if not rs:
            continue
        final = [r["curve"]["accuracy"][-1] for r in rs]
        start = [r["curve"]["accuracy"][0] for r in rs]
        at_budget = [interp(r["curve"]["rollouts"], r["curve"]["accuracy"], budget) for r in rs]
        to_target = []
        for r in rs:
            hit = next((x for x, y in zip(r["curve"]["rollouts"], r["curve"]["accuracy"]) if y >= a.target), None)
            to_target.append(hit)
        reached = [x for x in to_target if x is not None]
        times = [t for r in rs for t in r["curve"]["time_step"]]
        per_seed_mean_t = [statistics.fmean(r["curve"]["time_step"]) for r in rs if r["curve"]["time_step"]]
        table[m] = {
            "n_seeds": len(rs), "seeds": [s for s in seeds if (m, s) in runs],
            "start_accuracy": mean_std(start), "final_accuracy": mean_std(final), "final_per_seed": final,
            "accuracy_at_budget": mean_std(at_budget), "at_budget_per_seed": at_budget,
            "total_rollouts": mean_std([r["curve"]["total_rollouts"] for r in rs]),
            "rollouts_to_target_per_seed": to_target,
            "rollouts_to_target": mean_std([float(x) for x in reached]) if reached else (float("nan"), float("nan"), 0),
            "n_reached": len(reached),
            "time_step_mean": statistics.fmean(times) if times else float("nan"),
            "time_step_median": statistics.median(times) if times else float("nan"),
            "time_step_per_seed_mean": per_seed_mean_t,
            "time_phases_mean": {ph: statistics.fmean(x for r in rs for x in r["curve"]["time_phases"][ph])
                                 for ph in ("generate", "score", "update")},
            "peak_rss_mib": mean_std([r["info"]["peak_rss_mib"] for r in rs]),
            "peak_rss_max_mib": max(r["info"]["peak_rss_mib"] for r in rs),
            "wall_seconds": mean_std([r["info"]["wall_seconds"] for r in rs]),
            "generated_prompts_per_step": statistics.fmean(x for r in rs for x in r["curve"]["generated_prompts"]),
            "kept_prompts_per_step": statistics.fmean(x for r in rs for x in r["curve"]["kept_prompts"]),
        }
        pqs = [r["pq"] for r in rs if r["pq"]]
        if pqs:
            table[m]["miracle_among_correct"] = mean_std([p["policy"]["miracle"]["among_correct"] for p in pqs])
            table[m]["miracle_overall"] = mean_std([p["policy"]["miracle"]["overall"] for p in pqs])
            table[m]["pq_accuracy"] = mean_std([p["policy"]["accuracy"] for p in pqs])
            table[m]["all_steps_correct"] = mean_std([p["policy"]["all_steps_correct"] for p in pqs])
            prm = [p["prm_after"] for p in pqs if p.get("prm_after")]
            if prm:
                agg = {}
                for on in prm[0]:
                    agg[on] = {k: mean_std([p[on][k] for p in prm])
                               for k in ("auroc", "first_wrong_acc", "first_wrong_acc_trivial", "f1")}
                table[m]["prm_after"] = agg
    ratio = float("nan")
    if "prime" in table and "grpo" in table:
        ratio = table["prime"]["time_step_mean"] / table["grpo"]["time_step_mean"]
    res = {"methods": table, "budget_rollouts": budget, "target": a.target, "prime_over_grpo_time": ratio,
           "prime_over_grpo_time_median": (table["prime"]["time_step_median"] / table["grpo"]["time_step_median"]
                                           if "prime" in table and "grpo" in table else float("nan")),
           "sft_pq": sft_pq, "group_size": group_size, "config_check": config_report(configs),
           "runs": {f"{m}-s{s}": {"curve": {k: v for k, v in r["curve"].items() if k not in ("time_step", "time_phases")},
                                  "info": r["info"]} for (m, s), r in runs.items()}}
    cost = {}
    for m in ("grpo", "prime"):
        ds = sorted((out / "cost").glob(f"{m}-r*")) if (out / "cost").exists() else []
        ds = [d for d in ds if (d / "run_info.json").exists()]
        if not ds:
            continue
        t = [r["time/step"] for d in ds for r in read_metrics(d / "metrics.jsonl") if "time/step" in r and r["step"] > 1]
        ph = {p: statistics.fmean(r[f"time/{p}"] for d in ds for r in read_metrics(d / "metrics.jsonl")
                                  if f"time/{p}" in r and r["step"] > 1) for p in ("generate", "score", "update")}
        cost[m] = {"runs": len(ds), "steps_timed": len(t), "time_step_mean": statistics.fmean(t),
                   "time_step_median": statistics.median(t), "phases": ph,
                   "peak_rss_mib": max(json.loads((d / "run_info.json").read_text())["peak_rss_mib"] for d in ds),
                   "load_avg_end": [json.loads((d / "run_info.json").read_text())["load_avg_end"] for d in ds]}
    if "grpo" in cost and "prime" in cost:
        cost["ratio_mean"] = cost["prime"]["time_step_mean"] / cost["grpo"]["time_step_mean"]
        cost["ratio_median"] = cost["prime"]["time_step_median"] / cost["grpo"]["time_step_median"]
    res["cost"] = cost
    if runs:
        plot(runs, methods, a.target, budget, Path(a.png))
    return res


def summary_md(res: dict, a, cmdline: str) -> str:
    T = res["methods"]
    L = [f"Command: `{cmdline}`", ""]
    L.append(f"Rollout budget compared: {res['budget_rollouts']:.0f} generated rollouts (the smallest final budget "
             f"of any run); target accuracy {res['target']:.2f}.")
    cc = res.get("config_check", {})
    bad = {m: ks for m, ks in cc.get("within_method", {}).items() if ks}
    if bad:
        L.append(f"WARNING: seeds of one method ran different configs: {bad}")
    for k, v in cc.items():
        if k.startswith("vs_"):
            L.append(f"Config sections that differ from {k[3:]}: " + "; ".join(
                f"{m}: {', '.join(ks) or 'none'}" for m, ks in v.items()))
    L.append("")
    L.append("| method | seeds | start acc | final acc (after steps) | acc at common budget | rollouts generated | "
             "rollouts to target | time/step mean (median) | peak RSS |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for m, t in T.items():
        tt = (fmt(*t["rollouts_to_target"][:2], 0) + f" ({t['n_reached']}/{t['n_seeds']} reached)"
              if t["n_reached"] else f"not reached (0/{t['n_seeds']})")
        L.append(f"| {m} | {t['n_seeds']} | {fmt(*t['start_accuracy'][:2])} | {fmt(*t['final_accuracy'][:2])} | "
                 f"{fmt(*t['accuracy_at_budget'][:2])} | {fmt(*t['total_rollouts'][:2], 0)} | {tt} | "
                 f"{t['time_step_mean']:.1f} s ({t['time_step_median']:.1f} s) | {t['peak_rss_max_mib']:.0f} MiB |")
    L.append("")
    L.append(f"PRIME / GRPO time per RL step: {res['prime_over_grpo_time']:.2f}x (mean), "
             f"{res['prime_over_grpo_time_median']:.2f}x (median).")
    L.append("")
    L.append("| method | generated prompts / step | kept prompts / step | generate | score | update | step |")
    L.append("|---|---|---|---|---|---|---|")
    for m, t in T.items():
        ph = t["time_phases_mean"]
        L.append(f"| {m} | {t['generated_prompts_per_step']:.1f} | {t['kept_prompts_per_step']:.1f} | "
                 f"{ph['generate']:.2f} s | {ph['score']:.2f} s | {ph['update']:.2f} s | {t['time_step_mean']:.2f} s |")
    L.append("")
    c = res.get("cost", {})
    if "ratio_mean" in c:
        L.append(f"Controlled timing (one run at a time, {c['grpo']['runs']} alternating runs per method, "
                 f"step 1 left out, eval excluded):")
        L.append("")
        L.append("| method | steps timed | time/step mean (median) | generate | score | update | peak RSS |")
        L.append("|---|---|---|---|---|---|---|")
        for m in ("grpo", "prime"):
            t = c[m]
            L.append(f"| {m} | {t['steps_timed']} | {t['time_step_mean']:.2f} s ({t['time_step_median']:.2f} s) | "
                     f"{t['phases']['generate']:.2f} s | {t['phases']['score']:.2f} s | {t['phases']['update']:.2f} s | "
                     f"{t['peak_rss_mib']:.0f} MiB |")
        L.append("")
        L.append(f"PRIME / GRPO time per step, controlled: {c['ratio_mean']:.2f}x (mean), {c['ratio_median']:.2f}x (median).")
        L.append("")
    L.append("Per-seed final accuracy: " + "; ".join(
        f"{m}: " + ", ".join(f"{x:.3f}" for x in t["final_per_seed"]) for m, t in T.items()))
    L.append("")
    L.append("Per-seed rollouts to target: " + "; ".join(
        f"{m}: " + ", ".join("—" if x is None else f"{x:.0f}" for x in t["rollouts_to_target_per_seed"])
        for m, t in T.items()))
    L.append("")
    sft = res.get("sft_pq")
    L.append("| policy | accuracy (PQ set) | all steps correct | miracle rate among correct | miracle rate overall |")
    L.append("|---|---|---|---|---|")
    if sft:
        p = sft["policy"]
        L.append(f"| SFT (start) | {p['accuracy']:.3f} | {p['all_steps_correct']:.3f} | "
                 f"{p['miracle']['among_correct']:.3f} | {p['miracle']['overall']:.3f} |")
    for m, t in T.items():
        if "miracle_among_correct" in t:
            L.append(f"| {m} | {fmt(*t['pq_accuracy'][:2])} | {fmt(*t['all_steps_correct'][:2])} | "
                     f"{fmt(*t['miracle_among_correct'][:2])} | {fmt(*t['miracle_overall'][:2])} |")
    L.append("")
    L.append("| step scorer | responses scored | step AUROC | first-wrong-step acc | trivial first-wrong acc | "
             "ProcessBench F1 |")
    L.append("|---|---|---|---|---|---|")
    names = {"sft_samples": "SFT policy samples", "own_samples": "PRIME policy's own samples"}
    if sft:
        for key, label in (("prm_before", "implicit PRM before training (PRM = ref = SFT)"),
                           ("sft_loglik", "baseline: SFT mean token log-prob per step (not a PRM)")):
            q = sft.get(key)
            if q:
                L.append(f"| {label} | SFT policy samples | {q['auroc']:.3f} | {q['first_wrong_acc']:.3f} | "
                         f"{q['first_wrong_acc_trivial']:.3f} | {q['f1']:.3f} |")
    if "prime" in T and "prm_after" in T["prime"]:
        for on, q in T["prime"]["prm_after"].items():
            L.append(f"| implicit PRM after PRIME (mean ± std over seeds) | {names.get(on, on)} | "
                     f"{fmt(*q['auroc'][:2])} | {fmt(*q['first_wrong_acc'][:2])} | "
                     f"{fmt(*q['first_wrong_acc_trivial'][:2])} | {fmt(*q['f1'][:2])} |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="grpo,rloo,prime", help="demo methods to compare (comma list)")
    ap.add_argument("--seeds", default="0,1,2", help="train.seed values (comma list)")
    ap.add_argument("--steps", type=int, default=40, help="RL steps per run")
    ap.add_argument("--eval-every", type=int, default=10, help="held-out eval every N steps")
    ap.add_argument("--eval-problems", type=int, default=200, help="held-out eval problems")
    ap.add_argument("--eval-samples", type=int, default=2, help="eval samples per problem (T=1)")
    ap.add_argument("--target", type=float, default=0.62, help="held-out accuracy target (rollouts-to-target)")
    ap.add_argument("--pq-problems", type=int, default=150,
                    help="held-out problems per process-quality split (tune split + report split)")
    ap.add_argument("--pq-samples", type=int, default=2, help="samples per problem for process quality")
    ap.add_argument("--out", default="/tmp/prime_vs_outcome", help="directory of the runs and results")
    ap.add_argument("--png", default=str(ROOT / "docs" / "img" / "prime_vs_outcome.png"), help="curve PNG")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    ap.add_argument("--force", action="store_true", help="rerun finished runs")
    ap.add_argument("--skip-pq", action="store_true", help="no process-quality phase")
    ap.add_argument("--aggregate-only", action="store_true")
    ap.add_argument("--cost-steps", type=int, default=0,
                    help="also time GRPO and PRIME alone: --cost-rounds alternating runs of this many steps, one "
                         "at a time, eval on 16 problems only (0 = skip)")
    ap.add_argument("--cost-rounds", type=int, default=2)
    # worker mode (internal)
    ap.add_argument("--worker", choices=["train"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker == "train":
        worker_train(a)
        return

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cmdline = "python benchmarks/prime_vs_outcome.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env_info = {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg(), "python": platform.python_version(),
                "platform": platform.platform(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "cache": os.environ.get("FINEGRAIN_CACHE", DEFAULT_CACHE)}
    t0 = time.time()
    me = str(Path(__file__).resolve())
    pq_script = str(HERE / "process_quality.py")

    if not a.aggregate_only:
        # ---- phase 1: training, seed-major so that methods of one seed run side by side
        jobs = []
        for s in seeds:
            for m in methods:
                d = out / f"{m}-s{s}"
                if not a.force and (d / "report.json").exists() and (d / "run_info.json").exists():
                    continue
                if d.exists():
                    shutil.rmtree(d)
                d.mkdir(parents=True)
                cmd = [sys.executable, me, "--worker", "train", "--method", m, "--seed", str(s), "--run-dir", str(d),
                       "--steps", str(a.steps), "--eval-every", str(a.eval_every),
                       "--eval-problems", str(a.eval_problems), "--eval-samples", str(a.eval_samples)]
                jobs.append((f"train {m} seed {s}", cmd, d / "train.log", d / "run_info.json"))
        run_pool(jobs, a.jobs)
        t_train = time.time() - t0
        # ---- phase 2: process quality (SFT policy once, then every run's final policy / PRM)
        if not a.skip_pq:
            common = ["--eval-problems", str(a.eval_problems), "--pq-problems", str(a.pq_problems),
                      "--pq-samples", str(a.pq_samples)]
            jobs = []
            sft_dir = out / "sft"
            sft_dir.mkdir(exist_ok=True)
            if a.force or not (sft_dir / "process_quality.json").exists():
                ref_run = next((out / f"{m}-s{s}" for s in seeds for m in methods
                                if (out / f"{m}-s{s}" / "config.yaml").exists()), None)
                if ref_run is not None:
                    jobs.append(("pq sft", [sys.executable, pq_script, "--sft", "--run-dir", str(ref_run),
                                            "--out-json", str(sft_dir / "process_quality.json"), *common],
                                 sft_dir / "pq.log", sft_dir / "pq_info.json"))
            for s in seeds:
                for m in methods:
                    d = out / f"{m}-s{s}"
                    if not (d / "report.json").exists():
                        continue
                    if a.force or not (d / "process_quality.json").exists():
                        jobs.append((f"pq {m} seed {s}", [sys.executable, pq_script, "--run-dir", str(d),
                                                          "--out-json", str(d / "process_quality.json"), *common],
                                     d / "pq.log", d / "pq_info.json"))
            run_pool(jobs, a.jobs)
        env_info["train_phase_seconds"] = t_train
        # ---- phase 3: controlled cost, one run at a time, GRPO and PRIME alternating
        if a.cost_steps > 0:
            jobs = []
            for r in range(a.cost_rounds):
                for m in ("grpo", "prime"):
                    d = out / "cost" / f"{m}-r{r}"
                    if not a.force and (d / "run_info.json").exists():
                        continue
                    if d.exists():
                        shutil.rmtree(d)
                    d.mkdir(parents=True)
                    cmd = [sys.executable, me, "--worker", "train", "--method", m, "--seed", "0", "--run-dir", str(d),
                           "--steps", str(a.cost_steps), "--eval-every", "0", "--eval-problems", "16",
                           "--eval-samples", "1"]
                    jobs.append((f"cost {m} round {r}", cmd, d / "train.log", d / "run_info.json"))
            run_pool(jobs, 1)
    env_info["load_avg_end"] = os.getloadavg()
    env_info["total_seconds"] = time.time() - t0

    res = aggregate(a, methods, seeds, out)
    res["env"] = env_info
    res["args"] = vars(a)
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    md = summary_md(res, a, cmdline)
    (out / "summary.md").write_text(md)
    print(md)
    print(f"results: {out / 'results.json'}  summary: {out / 'summary.md'}  curve: {a.png}")


if __name__ == "__main__":
    main()
