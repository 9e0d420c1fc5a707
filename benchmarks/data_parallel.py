"""Data parallel on this machine: the same RL run with 1 process and with 2 (gloo), side by side.

    python benchmarks/data_parallel.py [--steps 6] [--prompts 8] [--group 8] [--size tiny] [--out /tmp/fg_dp]

Each setting runs ``finegrain train`` (the library's CLI, nothing copied) on the demo config with
a small warm start, ``--prompts`` prompts × ``--group`` samples per step, no filters and no
mid-run eval, in a fresh run directory; the SFT cache is built once before the timed runs.
Settings: 1 process × 1 thread, 1 process × 2 threads, 2 processes × 1 thread each (accelerate,
examples/accelerate/cpu_2proc.yaml), and the same 2 processes with the policy sharded
(``train.fsdp=true``, examples/accelerate/cpu_2proc_fsdp.yaml). Printed: median ``time/step`` of steps 2.. (rank 0's log;
the first step warms up), the ratio to 1 × 1, and the load average before and after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, out: Path, procs: int, threads: int, fsdp: bool = False) -> dict:
    if out.exists():
        shutil.rmtree(out)
    ov = [f"train.out_dir={out}", f"train.steps={args.steps}", "train.eval_every=0", "train.save_every=0",
          "train.tensorboard=false", "train.progress=false", f"rollout.prompts_per_step={args.prompts}",
          f"rollout.group_size={args.group}", "filters.filters=[]", f"model.size={args.size}",
          "sft.n_examples=2000", "eval.n_problems=8", "eval.samples=1", "eval.greedy_too=false",
          f"sft.cache_dir={args.out}/sft", *(["train.fsdp=true"] if fsdp else [])]
    env = {**os.environ, "FINEGRAIN_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    if procs == 1:
        cmd = [sys.executable, "-m", "finegrain", "train", str(ROOT / "configs/demo_cpu.yaml"), *ov]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / f"examples/accelerate/cpu_2proc{'_fsdp' if fsdp else ''}.yaml"), "--num_processes", str(procs),
               "-m", "finegrain",
               "train", str(ROOT / "configs/demo_cpu.yaml"), *ov]
    load0 = os.getloadavg()[0]
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode:
        raise SystemExit(f"{procs} process(es): failed\n{p.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["time/step"] for r in rows if "time/step" in r][1:]
    return {"procs": procs, "threads": threads, "fsdp": fsdp, "step_s": statistics.median(steps), "wall_s": wall,
            "rows": [r for r in rows if "time/step" in r][-1]["rollout/rows"], "load": (load0, os.getloadavg()[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--out", default="/tmp/fg_dp")
    args = ap.parse_args()
    base = Path(args.out)
    run(args, base / "warm", 1, 2)  # builds the SFT cache
    res = [run(args, base / f"p{p}t{t}{'f' if f else ''}", p, t, f)
           for p, t, f in ((1, 1, False), (1, 2, False), (2, 1, False), (2, 1, True))]
    print(f"{args.steps} steps, {args.prompts} prompts x {args.group} samples, model {args.size}")
    print("| processes x threads | median time/step (s) | vs 1 x 1 | rows/step | load before -> after |")
    print("|---|---|---|---|---|")
    for r in res:
        print(f"| {r['procs']} x {r['threads']}{' FSDP' if r['fsdp'] else ''} | {r['step_s']:.2f} | {res[0]['step_s'] / r['step_s']:.2f}x | "
              f"{r['rows']:.0f} | {r['load'][0]:.2f} -> {r['load'][1]:.2f} |")


if __name__ == "__main__":
    main()
