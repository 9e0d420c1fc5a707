"""``finegrain compare``: methods × seeds, trained in parallel subprocesses, then one table.

    finegrain compare --methods grpo,prime,step_oracle --seeds 0,1,2 --out /tmp/cmp \\
        [--set train.steps=50 eval.n_problems=200 ...] [--method-set prime:rewards.1.kwargs.lr=1e-5 ...] \\
        [--jobs 2] [--target 0.7] [--baseline grpo] [--force]

What runs, what may differ and what a rerun does: ``finegrain/compare/runs.py``; the table's
columns: ``finegrain/compare/summary.py``. Errors in the arguments or the configs are one line
with exit status 2, before anything starts; a failed training run gives exit status 1 after the
summary of the others is written.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def _fail(msg: str, code: int = 2) -> None:
    print(f"finegrain compare: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,1,2, got '{text}'") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers ≥ 0, got '{text}'")
    return seeds


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected ≥ 1, got {n}")
    return n


def _unit(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got '{text}'") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return x


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help="train methods × seeds (parallel, resumable) and compare them in one table",
                              description="Train every (method, seed) run with the library's trainer in parallel "
                                          "subprocesses, then write results.json, summary.md, curves.png and "
                                          "summary.html to --out. Rerunning the same command trains only the runs "
                                          "that are not finished.")
    p.add_argument("--methods", required=True,
                   help="comma list of [LABEL=]SOURCE; SOURCE: a recipe (grpo, rloo, prime, step_oracle, agent, agent_igpo, "
                        "agent_matchtir) or a YAML config file; LABEL names a variant, e.g. grpo,prime_lr=prime")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="train.seed values, comma list (default 0,1,2)")
    p.add_argument("--out", required=True, help="output directory: runs/, configs/ and the summary files")
    p.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides applied to every run, e.g. train.steps=50 eval.n_problems=200")
    p.add_argument("--method-set", dest="method_sets", nargs="+", action="extend", default=[],
                   metavar="LABEL:KEY=VALUE", help="an override of one method; its key may then differ between methods")
    p.add_argument("--jobs", type=_jobs, default=2, help="runs at a time, one torch thread each (default 2)")
    p.add_argument("--target", type=_unit, default=None,
                   help="held-out accuracy for 'rollouts to target' (default: the lowest final mean accuracy of "
                        "any method)")
    p.add_argument("--baseline", default=None, help="method label the rollout ratio is taken against (default: the first)")
    p.add_argument("--force", action="store_true",
                   help="delete and run again the run directories whose saved config differs from the new one "
                        "(default: refuse)")
    return p


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    from finegrain.compare import run_comparison

    command = "finegrain " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        res = run_comparison(args.methods, args.seeds, args.out, sets=args.sets, method_sets=args.method_sets,
                             jobs=args.jobs, target=args.target, baseline=args.baseline, force=args.force,
                             command=command, log=lambda m: print(m, flush=True))
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(str(e).strip('"').splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        _fail("interrupted; finished runs are kept, rerun the same command to train the rest", 130)
    if res["failed"]:
        _fail(f"{len(res['failed'])} run(s) failed: {', '.join(res['failed'])} (their compare.log has the error); "
              f"rerun the same command to retry them", 1)
    return res
