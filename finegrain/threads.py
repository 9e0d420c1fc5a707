"""CPU threads for torch: explicit settings first, else the CPUs other jobs leave free; passive OpenMP waits.

Measured reasoning (issue finding 12). torch's CPU wheels run intra-op parallelism on GNU OpenMP
(``torch/lib/libgomp.so.1``; Intel's ``libiomp5`` is not loaded, so ``KMP_BLOCKTIME`` does nothing)
with one thread per CPU, 2 here. A tiny model's ops take microseconds, far less than a scheduler
time slice, and libgomp's default wait spins ``GOMP_SPINCOUNT=300000`` iterations at every barrier
before sleeping. Beside another CPU-bound job one of the two threads shares a core with it: the
spinning thread burns the core the late thread needs, and every region waits a time slice.
Micro-benchmark (one demo RL step: sample 128 rows x 48 tokens, forward/backward; seconds for
2 steps, 2-core machine, each config in a fresh process, medians of 2 rounds, burners in our
session; "x" = against the same config with no burner; other people's jobs used up to ~1 CPU
besides, load1 2.6-4.2):

    threads  wait     0 burners   1 burner       2 burners
    2        default  3.6         23.0 (6.3x)    41.5 (11.4x)
    2        active   4.0         35.0 (8.8x)    27.9 (7.0x)
    2        passive  6.2 (*)     8.2            8.7
    1        default  8.0 (*)     8.3            17.1
    (*) a foreign job hit one of the two idle runs; in the quietest runs 2/default took 3.4 s,
        2/passive 4.2 s (1.2x) and 1 thread 5.0-5.4 s (1.5x).

Burners in their own sessions (scheduler autogroups, as other people's jobs): 2/default 52 s and
91 s beside 1 and 2 of them, 2/passive 11 s and 20 s, 1 thread 9-16 s and 13-17 s. With one CPU
busy with someone else's pytest, 2/default took 32.5 s, 1 thread 6.7 s, 2/passive 8.6 s;
``GOMP_SPINCOUNT=3000`` (9.2 s) and ``30000`` (11.7 s) were no better than passive. Inter-op
threads (``torch.set_num_interop_threads(1)``) changed nothing: eager models never use that pool.

So: fewer threads than busy CPUs is what matters, and passive waiting bounds the damage when a
job starts after we chose 2 threads, at ~1.2x on a quiet machine. ``torch.set_num_threads``
works at any time; the wait policy is read once, when ``import torch`` loads libgomp, so
``prepare_openmp()`` must run before that (the CLI imports torch only after parsing arguments).

Thread policy (``choose_threads``), in order:

1. an explicit request (a ``--threads N`` flag or a config value, N >= 1) wins;
2. ``FINEGRAIN_THREADS``: ``N``, ``auto`` (step 4) or ``torch`` (leave torch's default alone,
   wait policy included: the old behaviour);
3. ``OMP_NUM_THREADS`` set by the user: left to torch, which already obeys it;
4. otherwise ``round(cpus - load)`` clamped to ``[1, cpus]``: ``cpus`` are the CPUs this process
   may run on (``os.sched_getaffinity``, capped by a cgroup CPU quota), ``load`` the smaller of
   the 1-minute load average (``os.getloadavg``) and the CPUs busy during a 0.3 s look at
   ``/proc/stat``. A quiet 2-core machine gets 2 threads, one CPU busy with other jobs 1.

Why both: the load average lags by a minute. Alone, it counted a demo run that had just ended
against the next one, which then ran on 1 thread on a quiet machine, 1.5x slower (20 s against
13.7 s); the busy look alone would count a short burst. The choice is made once, when a command
starts; a job that starts later meets 2 passive-waiting threads (the bounded case above).
"""

from __future__ import annotations

import math
import os
import time

ENV = "FINEGRAIN_THREADS"
OPENMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def prepare_openmp(environ=None) -> bool:
    """Before torch is imported: ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a wait policy
    (any of ``OPENMP_WAIT_VARS``) or ``FINEGRAIN_THREADS=torch``. True if it was set; False, and
    nothing changed, when torch is already imported (libgomp has read its environment by then).
    """
    import sys

    env = os.environ if environ is None else environ
    if "torch" in sys.modules or env.get(ENV, "").strip().lower() == "torch":
        return False
    if any(env.get(v, "").strip() for v in OPENMP_WAIT_VARS):
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup (v2 or v1) CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup quota (``cpu.max`` or ``cpu.cfs_quota_us``), None if unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def busy_cpus(window: float = 0.3) -> float | None:
    """CPUs the whole machine kept busy over the next ``window`` seconds (``/proc/stat``; this
    process sleeps meanwhile, so it is other jobs), None where unavailable."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v) - v[3] - v[4], sum(v)  # busy, total (idle and iowait are not busy)

    try:
        b0, t0 = read()
        time.sleep(window)
        b1, t1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return (b1 - b0) / (t1 - t0) * (os.cpu_count() or 1) if t1 > t0 else None


def load_average() -> float:
    """The 1-minute load average (runnable jobs), 0.0 where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def others_load() -> float:
    """CPUs other jobs use: the smaller of the 1-minute load average and the CPUs busy right now,
    so a job that ended a moment ago (say, the previous run) is not counted against this one."""
    load, now = load_average(), busy_cpus()
    return load if now is None else min(load, now)


def auto_threads(cpus: int, load: float) -> int:
    """Intra-op threads for ``cpus`` usable CPUs when other jobs keep ``load`` of them busy."""
    return max(1, min(cpus, int(math.floor(cpus - load + 0.5))))


def choose_threads(requested: int | None = None, environ=None) -> int | None:
    """The thread count to set, or None to leave torch's default (see the module docstring).

    ``requested`` None or 0 means the user did not choose; a negative value is an error.
    """
    env = os.environ if environ is None else environ
    if requested is not None and requested < 0:
        raise ValueError(f"--threads: expected >= 0, got {requested}")
    if requested:
        return int(requested)
    own = env.get(ENV, "").strip().lower()
    if own == "torch":
        return None
    if own and own != "auto":
        try:
            n = int(own)
        except ValueError:
            n = -1
        if n < 0:
            raise ValueError(f"{ENV}: expected a thread count, 'auto' or 'torch', got '{env[ENV]}'")
        if n:
            return n
    if env.get("OMP_NUM_THREADS", "").strip():
        return None
    return auto_threads(available_cpus(), others_load())


def configure_threads(requested: int | None = None, environ=None) -> int:
    """Apply ``choose_threads`` to torch (importing it) and return the intra-op threads in force."""
    import torch

    n = choose_threads(requested, environ)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
