"""PRIME against outcome-only GRPO and RLOO on the arith task: ``finegrain compare``, then process quality.

    FINEGRAIN_CACHE=/tmp/fgcache python benchmarks/prime_vs_outcome.py --methods grpo,rloo,prime \\
        --seeds 0,1,2 --steps 50 --eval-every 5 --eval-problems 200 --eval-samples 2 \\
        --pq-problems 150 --pq-samples 2 --target 0.62 --out /tmp/prime_vs_outcome --jobs 2

Training and the comparison table are the library's ``finegrain.compare.run_comparison``, the
same as

    finegrain compare --methods M --seeds S --out OUT --jobs J [--target T] --set train.steps=N \\
        train.eval_every=E train.save_every=N eval.n_problems=P eval.samples=K eval.greedy_too=false

(run directories in ``<out>/runs/``; ``results.json``, ``summary.md``, ``curves.png`` and
``summary.html`` in ``<out>``; a rerun trains only unfinished runs). ``--set`` passes further
overrides to every run; ``--png`` also copies ``curves.png`` there.

Then, unless ``--skip-pq``, a process-quality subprocess (``process_quality.py``, launched with
the library's ``run_pool``: one torch thread each, at most ``--jobs`` at a time) for every
finished run and for the SFT policy: held-out problems disjoint from the eval problems, every
step labelled exactly by ``ArithTask.label_steps``, miracle-step rate of the policy and, for runs
with an implicit PRM (PRIME), its step AUROC and first-wrong-step accuracy. Written to
``<out>/process_quality.json`` and ``<out>/process_quality.md``; a run's
``process_quality.json`` is reused unless ``--force``.

Dropped when this script became a wrapper (the numbers in docs/benchmarks.md came from the
earlier, standalone version): the controlled-timing phase (``--cost-steps``/``--cost-rounds``:
short GRPO and PRIME runs one at a time, alternating; ``finegrain compare --jobs 1`` with a small
``train.steps`` measures the same), accuracy at the common rollout budget, and the per-phase
time table (``time/generate|score|update`` stay in each run's metrics.jsonl). Run directories of
the old layout (``<out>/<method>-s<seed>/``) are not reused.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(ms: tuple[float, float]) -> str:
    return "n/a" if math.isnan(ms[0]) else f"{ms[0]:.3f} ± {ms[1]:.3f}"


def process_quality(res: dict, a, out: Path) -> dict:
    """Process quality of every finished run and the SFT policy; {'sft': ..., 'methods': {label: ...}}."""
    from finegrain.compare.runs import Job, run_pool

    common = ["--eval-problems", str(a.eval_problems), "--pq-problems", str(a.pq_problems),
              "--pq-samples", str(a.pq_samples)]
    script = str(HERE / "process_quality.py")
    done = [r for r in res["runs"] if r["status"] == "done"]
    jobs = []
    if done:
        sft_json = out / "sft" / "process_quality.json"
        if a.force or not sft_json.exists():
            jobs.append(Job("pq sft", [sys.executable, script, "--sft", "--run-dir", done[0]["run_dir"],
                                       "--out-json", str(sft_json), *common], out / "sft" / "pq.log"))
    for r in done:
        pq = Path(r["run_dir"]) / "process_quality.json"
        if a.force or not pq.exists():
            jobs.append(Job(f"pq {r['name']}", [sys.executable, script, "--run-dir", r["run_dir"],
                                                "--out-json", str(pq), *common], Path(r["run_dir"]) / "pq.log"))
    run_pool(jobs, a.jobs)

    def load(p: Path):
        return json.loads(p.read_text()) if p.exists() else None

    table = {}
    for m in res["methods"]:
        pqs = [q for r in done if r["method"] == m and (q := load(Path(r["run_dir"]) / "process_quality.json"))]
        if not pqs:
            continue
        t = {"n": len(pqs), "accuracy": mean_std([p["policy"]["accuracy"] for p in pqs]),
             "all_steps_correct": mean_std([p["policy"]["all_steps_correct"] for p in pqs]),
             "miracle_among_correct": mean_std([p["policy"]["miracle"]["among_correct"] for p in pqs]),
             "miracle_overall": mean_std([p["policy"]["miracle"]["overall"] for p in pqs])}
        prm = [p["prm_after"] for p in pqs if p.get("prm_after")]
        if prm:
            t["prm_after"] = {on: {k: mean_std([p[on][k] for p in prm])
                                   for k in ("auroc", "first_wrong_acc", "first_wrong_acc_trivial", "f1")}
                              for on in prm[0]}
        table[m] = t
    return {"sft": load(out / "sft" / "process_quality.json"), "methods": table}


def pq_markdown(pq: dict) -> str:
    L = ["| policy | accuracy (PQ set) | all steps correct | miracle rate among correct | miracle rate overall |",
         "|---|---|---|---|---|"]
    sft = pq["sft"]
    if sft:
        p = sft["policy"]
        L.append(f"| SFT (start) | {p['accuracy']:.3f} | {p['all_steps_correct']:.3f} | "
                 f"{p['miracle']['among_correct']:.3f} | {p['miracle']['overall']:.3f} |")
    for m, t in pq["methods"].items():
        L.append(f"| {m} | {fmt(t['accuracy'])} | {fmt(t['all_steps_correct'])} | "
                 f"{fmt(t['miracle_among_correct'])} | {fmt(t['miracle_overall'])} |")
    L += ["", "| step scorer | responses scored | step AUROC | first-wrong-step acc | trivial first-wrong acc | "
              "ProcessBench F1 |", "|---|---|---|---|---|---|"]
    if sft:
        for key, label in (("prm_before", "implicit PRM before training (PRM = ref = SFT)"),
                           ("sft_loglik", "baseline: SFT mean token log-prob per step (not a PRM)")):
            q = sft.get(key)
            if q:
                L.append(f"| {label} | SFT policy samples | {q['auroc']:.3f} | {q['first_wrong_acc']:.3f} | "
                         f"{q['first_wrong_acc_trivial']:.3f} | {q['f1']:.3f} |")
    names = {"sft_samples": "SFT policy samples", "own_samples": "the policy's own samples"}
    for m, t in pq["methods"].items():
        for on, q in t.get("prm_after", {}).items():
            L.append(f"| implicit PRM after {m} (mean ± std over seeds) | {names.get(on, on)} | {fmt(q['auroc'])} | "
                     f"{fmt(q['first_wrong_acc'])} | {fmt(q['first_wrong_acc_trivial'])} | {fmt(q['f1'])} |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="grpo,rloo,prime", help="methods to compare ([LABEL=]recipe or YAML, comma list)")
    ap.add_argument("--seeds", default="0,1,2", help="train.seed values (comma list)")
    ap.add_argument("--steps", type=int, default=40, help="RL steps per run")
    ap.add_argument("--eval-every", type=int, default=10, help="held-out eval every N steps")
    ap.add_argument("--eval-problems", type=int, default=200, help="held-out eval problems")
    ap.add_argument("--eval-samples", type=int, default=2, help="eval samples per problem (T=1)")
    ap.add_argument("--target", type=float, default=None,
                    help="held-out accuracy target (default: the lowest final mean accuracy of any method)")
    ap.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="further overrides for every run")
    ap.add_argument("--pq-problems", type=int, default=150,
                    help="held-out problems per process-quality split (tune split + report split)")
    ap.add_argument("--pq-samples", type=int, default=2, help="samples per problem for process quality")
    ap.add_argument("--out", default="/tmp/prime_vs_outcome", help="directory of the runs and results")
    ap.add_argument("--png", default=None, help="also copy the curve PNG here (e.g. docs/img/prime_vs_outcome.png)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    ap.add_argument("--force", action="store_true",
                    help="redo runs whose saved config differs, and recompute process quality")
    ap.add_argument("--skip-pq", action="store_true", help="no process-quality phase")
    a = ap.parse_args(argv)

    from finegrain.compare import run_comparison

    out = Path(a.out).resolve()
    sets = [f"train.steps={a.steps}", f"train.eval_every={a.eval_every}", f"train.save_every={a.steps}",
            f"eval.n_problems={a.eval_problems}", f"eval.samples={a.eval_samples}", "eval.greedy_too=false", *a.sets]
    command = "python benchmarks/prime_vs_outcome.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = run_comparison(a.methods, [int(s) for s in a.seeds.split(",") if s.strip()], out, sets=sets, jobs=a.jobs,
                         target=a.target, force=a.force, command=command)
    if a.png:
        Path(a.png).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "curves.png", a.png)
    if not a.skip_pq:
        pq = process_quality(res, a, out)
        (out / "process_quality.json").write_text(json.dumps(pq, indent=2, default=str))
        md = pq_markdown(pq)
        (out / "process_quality.md").write_text(md)
        print(md)
    if res["failed"]:
        raise SystemExit(f"{len(res['failed'])} run(s) failed: {', '.join(res['failed'])}")


if __name__ == "__main__":
    main()
