"""Wall time of a shortened CPU demo idle and beside 1 and 2 CPU-bound processes, per thread policy.

    FINEGRAIN_CACHE=/tmp/fgcache finegrain demo train.steps=1 eval.n_problems=8 --out /tmp/warm  # once
    FINEGRAIN_CACHE=/tmp/fgcache python benchmarks/load.py [--reps 2] [--loads 0,1,2] \\
        [--policies torch,auto] [--settle 45] [--timeout 600] [--json FILE] [-- demo overrides ...]

Each run is a fresh ``finegrain demo --out TMP train.steps=5 eval.n_problems=32`` (overrides after
``--`` replace those two), started through the CLI's own ``main`` after
``finegrain.threads.prepare_openmp`` and ``configure_threads``, with ``FINEGRAIN_THREADS`` set to the policy:

* ``torch``: torch's default intra-op threads (one per CPU), what the demo did before;
* ``auto``: ``finegrain.threads``' default (free CPUs from affinity and quota less the smaller of
  the load average and the CPUs busy now; ``OMP_WAIT_POLICY=PASSIVE`` set before torch is imported);
* a number: that many threads.

Loads are blocks: N burners (pure-Python busy loops in subprocesses, each bounded by a deadline
and killed in a ``finally``) start, then ``--settle`` seconds pass so that the 1-minute load
average sees them as it sees long-running jobs, then the policies alternate (ABBA order) for
``--reps`` runs each. Idle comes first (on a shared machine "idle" means no burners: the
"foreign CPUs" column says what other people's jobs used meanwhile). Printed: the
per-run lines, a markdown table (median wall seconds, ratio against the same policy idle and
against ``torch`` at the same load), the command, threads and load averages. "foreign CPUs" is
the CPU time that neither the demo nor the burners used, over the run's wall time: other
people's jobs on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_DEMO = ["train.steps=5", "eval.n_problems=32"]
# The library's own entry points: the thread policy, then the CLI exactly as `finegrain` runs it.
BOOT = (
    "import json, sys\n"
    "from finegrain.threads import configure_threads, prepare_openmp\n"
    "prepare_openmp()\n"
    "import torch\n"
    "n = configure_threads(None)\n"
    "print('@@threads ' + json.dumps({'intra': n, 'interop': torch.get_num_interop_threads(), 'wait': __import__('os').environ.get('OMP_WAIT_POLICY')}), file=sys.stderr, flush=True)\n"
    "from finegrain.cli.main import main\n"
    "main(sys.argv[1:])\n"
)
BURN = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def busy_seconds() -> float:
    """CPU-seconds all CPUs spent busy since boot (/proc/stat), 0.0 where unavailable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU-seconds used so far by process ``pid`` (0.0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_demo(policy: str, demo_args: list[str], timeout: float, burners: list, tmp: str) -> dict:
    """One demo run under ``policy``; wall time, threads, loads and foreign CPU use."""
    out_dir = tempfile.mkdtemp(prefix="demo-", dir=tmp)
    env = dict(os.environ, FINEGRAIN_THREADS=policy)
    cmd = [sys.executable, "-c", BOOT, "demo", "--out", out_dir, *demo_args]
    load0 = os.getloadavg()
    busy0, kids0, burn0 = busy_seconds(), children_cpu(), sum(proc_cpu(p.pid) for p in burners)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:  # run() kills the child before raising
        rc, err = "timeout", (e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr) or ""
    wall = time.monotonic() - t0
    busy = busy_seconds() - busy0
    ours = (children_cpu() - kids0) + (sum(proc_cpu(p.pid) for p in burners) - burn0)
    threads = {}
    for line in err.splitlines():
        if line.startswith("@@threads "):
            threads = json.loads(line[len("@@threads "):])
    rec = {"policy": policy, "rc": rc, "wall": wall, "threads": threads.get("intra"),
           "interop": threads.get("interop"), "wait": threads.get("wait") or "default", "load_before": load0, "load_after": os.getloadavg(),
           "foreign_cpus": max(0.0, busy - ours) / wall if busy else None}
    report = os.path.join(out_dir, "report.json")
    if os.path.exists(report):
        with open(report) as f:
            rep = json.load(f)
        rec["wall_seconds_reported"] = rep.get("wall_seconds")
        rec["accuracy_after"] = rep.get("eval", {}).get("accuracy_after")
    if rc != 0:
        rec["stderr_tail"] = err[-800:]
    return rec


def start_burners(n: int, seconds: float) -> list:
    # own sessions, hence own scheduler autogroups, like other people's jobs
    return [subprocess.Popen([sys.executable, "-c", BURN, str(seconds)], start_new_session=True) for _ in range(n)]


def stop(burners: list) -> None:
    for p in burners:
        if p.poll() is None:
            p.kill()
        p.wait()


def table(records: list[dict], policies: list[str], loads: list[int]) -> str:
    def med(load, pol, key="wall"):
        xs = [r[key] for r in records if r["burners"] == load and r["policy"] == pol and r["rc"] == 0]
        return statistics.median(xs) if xs else None

    def fmt(x, spec=".0f"):
        return "—" if x is None else format(x, spec)

    rows = ["| burners | policy | intra-op threads | runs ok | median wall s | vs idle (same policy) "
            "| vs torch default (same load) | load1 before runs | foreign CPUs |",
            "|---|---|---|---|---|---|---|---|---|"]
    for load in loads:
        for pol in policies:
            rs = [r for r in records if r["burners"] == load and r["policy"] == pol]
            if not rs:
                continue
            w, idle, ref = med(load, pol), med(loads[0], pol) if loads[0] == 0 else None, med(load, policies[0])
            ok = sum(r["rc"] == 0 for r in rs)
            thr = sorted({f"{r['threads']} ({r['wait']} wait)" for r in rs})
            loads1 = ", ".join(f"{r['load_before'][0]:.2f}" for r in rs)
            foreign = [r["foreign_cpus"] for r in rs if r["foreign_cpus"] is not None]
            timeouts = sum(r["rc"] == "timeout" for r in rs)
            wtxt = fmt(w) + (f" (+{timeouts} > timeout)" if timeouts else "")
            rows.append(f"| {load} | {pol} | {'/'.join(thr)} | {ok}/{len(rs)} | {wtxt} "
                        f"| {fmt(w / idle if w and idle else None, '.2f')} | {fmt(w / ref if w and ref else None, '.2f')} "
                        f"| {loads1} | {fmt(statistics.median(foreign) if foreign else None, '.2f')} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2, help="runs per policy and load")
    ap.add_argument("--loads", default="0,1,2", help="burner counts, comma-separated, in block order")
    ap.add_argument("--policies", default="torch,auto", help="FINEGRAIN_THREADS values; the first is the reference")
    ap.add_argument("--settle", type=float, default=45.0, help="seconds between starting burners and the first run")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before a demo run is killed")
    ap.add_argument("--json", default=None, help="write every record here")
    ap.add_argument("demo", nargs="*", help="demo overrides (after --); default: " + " ".join(DEFAULT_DEMO))
    args = ap.parse_args(argv)
    loads = [int(x) for x in args.loads.split(",")]
    policies = args.policies.split(",")
    demo_args = args.demo or DEFAULT_DEMO
    budget = args.settle + len(policies) * args.reps * args.timeout + 60  # a burner never outlives its block
    records = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below kills the burners
    print(f"# cpus {len(os.sched_getaffinity(0))}, FINEGRAIN_CACHE={os.environ.get('FINEGRAIN_CACHE', '(unset)')}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, load {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fg-load-") as tmp:
        for load in loads:
            burners = []
            try:
                burners = start_burners(load, budget)
                time.sleep(args.settle)
                for rep in range(args.reps):
                    order = policies if rep % 2 == 0 else policies[::-1]
                    for pol in order:
                        rec = run_demo(pol, demo_args, args.timeout, burners, tmp)
                        rec.update(burners=load, rep=rep)
                        records.append(rec)
                        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rec.items()
                                          if k != "stderr_tail"}), flush=True)
                        if rec["rc"] != 0:
                            print(f"# run failed ({rec['rc']}): {rec.get('stderr_tail', '')}", flush=True)
            finally:
                stop(burners)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print()
    print(table(records, policies, loads))
    print()
    cmd = "finegrain demo --out TMP " + " ".join(shlex.quote(a) for a in demo_args)
    print(f"command: FINEGRAIN_THREADS=<policy> {cmd}   (via finegrain.threads.prepare_openmp, "
          f"configure_threads, then finegrain.cli.main.main; {args.reps} runs per cell, ABBA order, {args.settle:.0f}s settle per block)")
    print(f"load averages (1, 5, 15 min) at the end: {tuple(round(x, 2) for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
