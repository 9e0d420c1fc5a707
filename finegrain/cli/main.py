"""``finegrain`` command line: demo | train | sft | eval | prm | compare | config.

    finegrain demo [--method grpo|prime|rloo] [--out runs/demo] [key=value ...]
    finegrain train CONFIG.yaml [key=value ...]
    finegrain config [CONFIG.yaml] [key=value ...]     print the resolved config
    finegrain eval --model RUN_DIR_OR_PATH --task arith ...   report directory (see docs/eval.md)
    finegrain prm train|score ...                     offline implicit PRM (see docs/prm_offline.md)
    finegrain judge train ...                         fine-tune a judge on exact verdicts (docs/algorithms/judge.md)
    finegrain compare --methods grpo,prime --seeds 0,1,2 --out DIR [--set key=value ...]   methods × seeds, one table
    finegrain train --help-config                     every config key with its default and help
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finegrain.config import RunConfig, apply_overrides, describe, dump_config, from_dict, load_config, to_dict, validate


def demo_config(method: str = "grpo") -> RunConfig:
    """The CPU demo: arith task, tiny Qwen2-shaped model warm-started by SFT, RL with a verifier."""
    from finegrain.recipes import DEMO_METHODS

    if method not in DEMO_METHODS:
        raise ValueError(f"--method: expected one of {', '.join(DEMO_METHODS)}, got '{method}'")
    return from_dict(RunConfig, DEMO_METHODS[method]())


def _print_report(report: dict, out: Path, task: str) -> None:
    from rich.console import Console
    from rich.table import Table

    if "eval" not in report:  # a data-parallel rank other than 0 (rank 0 reports), or a stopped run
        return
    ev = report["eval"]
    t = Table(title=f"held-out {task}: {ev['n_problems']} problems × {ev.get('samples_per_problem_after', '?')}")
    t.add_column("metric")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    for k in ("accuracy", "pass@1", "pass@4", "greedy_accuracy", "truncated_frac"):
        if f"{k}_before" in ev:
            t.add_row(k, f"{ev[f'{k}_before']:.3f}", f"{ev[f'{k}_after']:.3f}")
    Console().print(t)
    print(f"95% interval after: [{ev['accuracy_lo_after']:.3f}, {ev['accuracy_hi_after']:.3f}]   "
          f"wall time {report['wall_seconds']:.0f}s   run directory: {out}")


def _register_reward_function(spec: str) -> None:
    """``--reward-function pkg.module:fn``: import it and register it in REWARDS.

    The import is the user's explicit request on the command line (like running their script);
    config files never name code to import.
    """
    import importlib

    from finegrain.rewards import register_reward_function

    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"--reward-function: expected MODULE:FUNCTION (e.g. my_rewards:reward_len), got '{spec}'")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a module beside the config, as `python -m` would find it
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ValueError(f"--reward-function: cannot import module '{module}' ({e})") from None
    except AttributeError:
        raise ValueError(f"--reward-function: module '{module}' has no '{attr}'") from None
    register_reward_function(fn, attr)


def _fail(msg: str) -> None:
    print(f"finegrain: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    from finegrain.threads import prepare_openmp

    prepare_openmp()  # before torch is imported: OpenMP reads its wait policy once, when it loads
    from finegrain.cli.prm_cmd import _OneLineParser

    ap = _OneLineParser(prog="finegrain", description="RL for language models with fine-grained rewards")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_OneLineParser)
    d = sub.add_parser("demo", help="train a tiny model on the synthetic arithmetic task on CPU, before/after table")
    d.add_argument("--method", default="grpo", help="grpo | rloo | prime | step_oracle (arith) | agent | agent_igpo | agent_matchtir (lookup "
                                                        "with a tool, multi-turn)")
    d.add_argument("--out", default=None, help="run directory (default runs/demo-<method>)")
    d.add_argument("overrides", nargs="*", help="key=value config overrides")
    t = sub.add_parser("train", help="RL from a YAML config")
    t.add_argument("config", nargs="?", help="YAML RunConfig")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=50")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    t.add_argument("--reward-function", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="import a TRL-style reward function and register it under its name, so the config's "
                        "rewards can use it (repeatable; see docs/reward_functions.md)")
    c = sub.add_parser("config", help="print the resolved config as YAML")
    c.add_argument("config", nargs="?")
    c.add_argument("overrides", nargs="*")
    s = sub.add_parser("sft", help="supervised warm start of a tiny model on a task (cached)")
    s.add_argument("config", nargs="?")
    s.add_argument("overrides", nargs="*")
    from finegrain.cli import compare_cmd, eval_cmd, judge_cmd, prm_cmd

    prm_cmd.add_parser(sub)
    judge_cmd.add_parser(sub)
    eval_cmd.add_parser(sub)
    compare_cmd.add_parser(sub)
    args = ap.parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        args.overrides, args.config = [args.config, *args.overrides], None  # `finegrain config key=value`
    if args.cmd == "prm":
        from finegrain.threads import configure_threads

        configure_threads(None)
        prm_cmd.run(args)
        return
    if args.cmd == "judge":
        from finegrain.threads import configure_threads

        configure_threads(None)
        judge_cmd.run(args)
        return
    if args.cmd == "eval":
        eval_cmd.run(args)
        return
    if args.cmd == "compare":
        compare_cmd.run(args, argv)
        return

    try:
        for spec in getattr(args, "reward_function", []):
            _register_reward_function(spec)
        if args.cmd == "train" and args.help_config:
            print("\n".join(describe()))
            return
        if args.cmd == "demo":
            base = to_dict(demo_config(args.method))
            base["train"]["out_dir"] = args.out or f"runs/demo-{args.method}"
            cfg = from_dict(RunConfig, apply_overrides(base, args.overrides))
            validate(cfg)
        elif args.config is None and args.cmd == "train":
            _fail("train needs a CONFIG.yaml (see configs/), or --help-config")
        else:
            cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(str(e).strip('"'))

    if args.cmd == "config":
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return
    if args.cmd in ("demo", "train", "sft"):
        from finegrain.threads import configure_threads

        configure_threads(cfg.train.threads or None)
    if args.cmd == "sft":
        from finegrain.train.sft import warm_started_tiny
        from finegrain.tasks import TASKS

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        task = TASKS.get(cfg.task.name)(**cfg.task.kwargs)
        _, _, info = warm_started_tiny(task, cfg.task.kwargs, cfg.model, cfg.sft)
        print(json.dumps(info, indent=2))
        return
    from transformers.utils import logging as hf_logging

    from finegrain.train.loop import train

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars drown the run's own progress
    from finegrain.lock import RunLocked

    try:
        report = train(cfg)
    except (ValueError, FileNotFoundError, ImportError, RunLocked) as e:
        _fail(str(e))
    _print_report(report, Path(cfg.train.out_dir), cfg.task.name)


if __name__ == "__main__":
    main()
