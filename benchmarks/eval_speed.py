"""Wall time of ``finegrain eval`` on 500 arith problems x 16 samples with the demo model.

    FINEGRAIN_CACHE=/tmp/fgcache python benchmarks/eval_speed.py [--n-problems 500] [--samples 16] \\
        [--prm DIR] [--out /tmp/eval_speed]

The demo model is the SFT warm start of the CPU demo (``finegrain sft`` on ``demo_config('grpo')``,
cached). Scorers (rewards of ``finegrain.rewards.REWARDS``): verifier, implicit_prm, random. The
implicit PRM is ``--prm`` if given (e.g. the one ``benchmarks/bon_arith.py`` trains) and otherwise
the policy itself with the SFT model as reference; the cost is the same (one PRM and one reference
forward per response). Prints the total wall time (model loading included), the breakdown from
metrics.json and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform string)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    """Time one evaluation and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-problems", type=int, default=500)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--prm", default=None)
    ap.add_argument("--out", default="/tmp/eval_speed")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)

    from bon_arith import demo_policy  # same directory; trains and caches the demo SFT model on first use

    from finegrain.cli import eval_cmd

    _, _, sft_dir, cfg = demo_policy()
    argv_eval = ["--model", sft_dir, "--task", "arith", "--task-kwargs", json.dumps(cfg.task.kwargs),
                 "--n-problems", str(a.n_problems), "--samples", str(a.samples), "--temperature", "1.0",
                 "--max-new-tokens", str(cfg.eval.max_new_tokens), "--scorers", "verifier,implicit_prm,random",
                 "--prm", a.prm or sft_dir, "--prm-ref", sft_dir, "--out", a.out, "--seed", "0", "--quiet"]
    if a.threads:
        argv_eval += ["--threads", str(a.threads)]
    p = argparse.ArgumentParser(prog="finegrain")
    eval_cmd.add_parser(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["eval", *argv_eval])
    load_before = os.getloadavg()
    t0 = time.time()
    m = eval_cmd.run(args)
    wall = time.time() - t0
    t = m["timing"]
    print("command: finegrain eval " + " ".join(argv_eval))
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, no GPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; load average before {load_before}")
    print(f"problems {m['meta']['n_problems']} x samples {m['meta']['samples']} = {m['accuracy']['n']} responses, "
          f"mean {m['mean_response_tokens']:.1f} tokens")
    print(f"wall time (model loading included): {wall:.1f} s")
    print(f"  generate {t['generate_s']:.1f} s; score " +
          ", ".join(f"{k} {v:.1f} s" for k, v in t["score_s"].items()) +
          f"; records {t['records_s']:.1f} s; metrics {t['metrics_s']:.1f} s; report {t['report_s']:.1f} s")
    print(f"load average after: {os.getloadavg()}")
    print(f"accuracy {m['accuracy']['mean']:.3f}; report: {a.out}/report.html")

if __name__ == "__main__":
    main()
