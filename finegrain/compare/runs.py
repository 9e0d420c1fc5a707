"""The runs of a comparison: methods and their resolved configs, the checks made before anything
is launched, and the launches (parallel subprocesses, one torch thread each).

A method is ``[LABEL=]SOURCE``: SOURCE is a recipe name in ``finegrain.recipes.DEMO_METHODS``
(grpo, rloo, prime, step_oracle, agent) or a YAML RunConfig file, loaded as ``finegrain train
CONFIG`` loads it; LABEL (default: the recipe name, or the file's stem) names the method in the
table and its run directories, so one source can run twice under different ``--method-set
LABEL:key=value`` overrides. Each run's config is, in order: the source, the common ``--set``
overrides, the method's own overrides, then what compare sets itself: ``train.seed``,
``train.out_dir``, ``train.resume=true``, ``train.tensorboard=false``, ``train.progress=false``.

Overrides use ``finegrain train``'s ``key=value`` syntax (``finegrain.config.apply_overrides``: the
value is YAML, a number part of the key indexes a list, ``rewards.1.kwargs.lr=1e-5``).

Layout of ``<out>``:

    configs/<label>-s<seed>.yaml    the config each run trains (rewritten on every call)
    runs/<label>-s<seed>/           a normal run directory (``finegrain eval --model`` works on it)
        compare.log                 the training subprocess's output, appended on every launch
        compare_done.json           written by compare only after the subprocess exited 0 and left a
                                    report.json for the configured step count; holds wall time
                                    and peak RSS of that last launch (the killed launches of a
                                    resumed run are not counted)

Before anything is launched: every run's config is resolved and validated; configs of different
methods may differ only in ``METHOD_KEYS`` and the keys a method's ``--method-set`` names
(``check_comparable``); and a run directory that already holds a run must have been run with
the same config (``check_existing``; ``RERUN_IGNORED`` keys aside). A run with a done marker is
never launched again; any other is launched with ``train.resume=true``, so the trainer resumes
it from its newest valid checkpoint, or starts it again when it has none (finegrain/train/rundir.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from finegrain.config import (RunConfig, apply_overrides, from_dict, load_config, load_yaml, to_dict, validate,
                              with_defaults)
from finegrain.recipes import DEMO_METHODS
from finegrain.train.rundir import flatten  # dotted keys of a nested config, as resume compares them

# dotted keys (and every key under them) in which the configs of two methods may differ
METHOD_KEYS = ("rewards", "advantage", "loss", "filters", "train.out_dir", "train.seed")
# keys compare sets for every run
COMPARE_KEYS = ("train.seed", "train.out_dir", "train.resume", "train.tensorboard", "train.progress")
# keys that do not change a run's numbers: a rerun may differ from the saved config.yaml in these
RERUN_IGNORED = ("train.resume", "train.progress", "train.threads", "train.tensorboard", "train.wandb_project",
                 "train.wandb_mode", "train.out_dir", "sft.cache_dir")
DONE_FILE = "compare_done.json"
LOG_FILE = "compare.log"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class Method:
    """A method of the comparison: its label, source (recipe name or YAML path) and own overrides."""

    label: str
    source: str
    overrides: list[str] = field(default_factory=list)

    @property
    def set_keys(self) -> list[str]:
        return [ov.split("=", 1)[0].strip() for ov in self.overrides]


@dataclass
class Run:
    """One (method, seed) run: where it lives and the resolved, validated config it trains."""

    method: str
    seed: int
    run_dir: Path
    config_path: Path
    config: dict

    @property
    def name(self) -> str:
        return f"{self.method}-s{self.seed}"


# ---------------------------------------------------------------------------------------------
# methods and configs


def parse_methods(spec: str, method_sets: list[str] = ()) -> list[Method]:
    """``'grpo,prime_lr=prime,cfg.yaml'`` and ``['prime_lr:rewards.1.kwargs.lr=1e-5']`` -> methods."""
    methods: list[Method] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        label, sep, source = item.partition("=")
        if not sep:
            label, source = (item if item in DEMO_METHODS else Path(item).stem), item
        label, source = label.strip(), source.strip()
        if source not in DEMO_METHODS and not (source.endswith((".yaml", ".yml")) or Path(source).is_file()):
            raise ValueError(f"--methods: '{source}' is neither a recipe ({', '.join(DEMO_METHODS)}) nor a YAML "
                             f"config file")
        if not _LABEL.match(label):
            raise ValueError(f"--methods: label '{label}' must be letters, digits, '_', '.', '+' or '-' "
                             f"(it names run directories)")
        if any(m.label == label for m in methods):
            raise ValueError(f"--methods: '{label}' appears twice; name variants LABEL=SOURCE (e.g. {label}2={source})")
        methods.append(Method(label, source))
    if not methods:
        raise ValueError("--methods: expected a comma-separated list, e.g. grpo,prime")
    by_label = {m.label: m for m in methods}
    for ms in method_sets:
        label, sep, ov = ms.partition(":")
        if not sep or "=" not in ov:
            raise ValueError(f"--method-set '{ms}': expected LABEL:key=value, e.g. prime:optim.lr=5e-5")
        if label not in by_label:
            raise ValueError(f"--method-set '{ms}': no method labelled '{label}' (methods: {', '.join(by_label)})")
        _refuse_compare_keys(ov, "--method-set")
        by_label[label].overrides.append(ov)
    return methods


def _refuse_compare_keys(override: str, flag: str) -> None:
    key = override.split("=", 1)[0].strip()
    if key in ("train.seed", "train.out_dir"):
        raise ValueError(f"{flag} {key}: compare sets it for every run (use --seeds and --out)")


def base_config(source: str) -> dict:
    """The full config dict of a recipe or a YAML file (every key present, validated)."""
    if source in DEMO_METHODS:
        cfg = from_dict(RunConfig, DEMO_METHODS[source]())
        validate(cfg)
        return to_dict(cfg)
    return to_dict(load_config(source))


def plan_runs(methods: list[Method], seeds: list[int], out: Path, sets: list[str] = ()) -> list[Run]:
    """Every (method, seed) run with its resolved and validated config, seed-major (the methods of
    one seed run side by side, under the same load). Raises one-line ValueErrors naming the method."""
    for ov in sets:
        _refuse_compare_keys(ov, "--set")
    runs = []
    bases = {}
    for m in methods:
        try:
            bases[m.label] = base_config(m.source)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise ValueError(f"method '{m.label}': {str(e).strip(chr(34))}") from None
    for seed in seeds:
        for m in methods:
            run_dir = out / "runs" / f"{m.label}-s{seed}"
            try:
                data = apply_overrides(json.loads(json.dumps(bases[m.label])), [*sets, *m.overrides])
                data.setdefault("train", {}).update(seed=seed, out_dir=str(run_dir), resume=True, tensorboard=False,
                                                    progress=False)
                cfg = from_dict(RunConfig, data)
                validate(cfg)
            except (ValueError, KeyError) as e:
                raise ValueError(f"method '{m.label}': {str(e).strip(chr(34))}") from None
            runs.append(Run(m.label, seed, run_dir, out / "configs" / f"{m.label}-s{seed}.yaml", to_dict(cfg)))
    return runs


# ---------------------------------------------------------------------------------------------
# checks before launch

_UNSET = object()


def _under(key: str, prefixes) -> bool:
    """key is one of prefixes, under one, or (for a set key inside a list value) above one."""
    return any(key == p or key.startswith(p + ".") or p.startswith(key + ".") for p in prefixes)


def _show(v) -> str:
    return "unset" if v is _UNSET else json.dumps(v, sort_keys=True)


def first_difference(a: dict, b: dict, skip=()) -> tuple[str, object, object] | None:
    """The first dotted key (in a's order, then b's) whose values differ, skipping keys under ``skip``."""
    fa, fb = flatten(a), flatten(b)
    for k in dict.fromkeys([*fa, *fb]):
        va, vb = fa.get(k, _UNSET), fb.get(k, _UNSET)
        if va != vb and not _under(k, skip):
            return k, va, vb
    return None


def check_comparable(runs: list[Run], methods: list[Method]) -> None:
    """Refuse (ValueError, one line) when two methods' configs differ outside the method keys.

    Every pair of methods is compared (on their first seed's config; seeds differ only in
    train.seed and train.out_dir); a key may differ when it is under ``METHOD_KEYS`` or under a
    key that either method's ``--method-set`` names.
    """
    first = {}
    for r in runs:
        first.setdefault(r.method, r.config)
    sets = {m.label: m.set_keys for m in methods}
    labels = list(first)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            diff = first_difference(first[a], first[b], skip=(*METHOD_KEYS, *sets[a], *sets[b]))
            if diff:
                k, va, vb = diff
                raise ValueError(f"configs differ in '{k}' ({a}: {_show(va)}, {b}: {_show(vb)}); only "
                                 f"method keys may differ: {', '.join(METHOD_KEYS)} and each method's --method-set keys")


def check_existing(runs: list[Run], force: bool) -> list[Run]:
    """The runs whose directory holds a run made with another config (``config.yaml`` there).

    Without ``force`` the first one is refused with a one-line ValueError naming the key; with
    it they are returned, for the caller to delete and run again."""
    stale = []
    for r in runs:
        saved_path = r.run_dir / "config.yaml"
        if not saved_path.is_file():
            continue
        saved = with_defaults(load_yaml(saved_path.read_text()) or {})  # fields added since: their defaults
        diff = first_difference(saved, r.config, skip=RERUN_IGNORED)
        if diff is None:
            continue
        if not force:
            k, va, vb = diff
            raise ValueError(f"{r.run_dir} was run with another config ('{k}': {_show(va)} there, "
                             f"{_show(vb)} now); use a new --out, or --force to delete and redo the runs whose "
                             f"config changed")
        stale.append(r)
    return stale


def is_done(r: Run) -> bool:
    return (r.run_dir / DONE_FILE).is_file() and (r.run_dir / "report.json").is_file()


def reset(r: Run) -> None:
    """Delete a run directory (``--force`` on a run whose config changed)."""
    if r.run_dir.exists():
        shutil.rmtree(r.run_dir)


def write_config(r: Run) -> None:
    r.config_path.parent.mkdir(parents=True, exist_ok=True)
    r.config_path.write_text(yaml.safe_dump(r.config, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# launching


def one_thread_env(environ=None) -> dict:
    """The environment of a training subprocess: one torch/OpenMP/MKL thread, unbuffered output,
    and this finegrain package first on the path."""
    env = dict(os.environ if environ is None else environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FINEGRAIN_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def _die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn: the child gets SIGTERM when compare dies (Linux prctl PR_SET_PDEATHSIG), so a
    killed comparison leaves no training process behind to hold a run directory's lock."""
    def set_signal() -> None:
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)
    return set_signal


@dataclass
class Job:
    """A command to run to completion; ``on_success(info)`` runs in the parent when it exits 0."""

    name: str
    cmd: list[str]
    log_path: Path
    on_success: Callable[[dict], None] | None = None
    note: str = ""


def run_pool(jobs: list[Job], n_parallel: int, log: Callable[[str], None] = print, poll: float = 0.2) -> dict[str, dict]:
    """Run jobs, at most ``n_parallel`` at a time, in the given order; one line per start and finish.

    Returns {name: info}: wall_seconds, returncode, and the child's own peak RSS in MiB and CPU
    seconds from ``os.wait4`` (``ru_maxrss`` is in KiB on Linux). Interrupted (Ctrl-C, an
    exception), it terminates the running children before re-raising.
    """
    queue, running, results = list(jobs), {}, {}
    total, finished = len(jobs), 0
    env = one_thread_env()
    die_with_parent = _die_with_parent(os.getpid()) if sys.platform.startswith("linux") else None
    try:
        while queue or running:
            while queue and len(running) < max(1, n_parallel):
                job = queue.pop(0)
                job.log_path.parent.mkdir(parents=True, exist_ok=True)
                logf = open(job.log_path, "a")
                logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(job.cmd)}\n")
                logf.flush()
                p = subprocess.Popen(job.cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
                running[p.pid] = (job, p, logf, time.time())
                log(f"[{time.strftime('%H:%M:%S')}] start {job.name}{job.note}")
            time.sleep(poll)
            for pid in list(running):
                got, status, ru = os.wait4(pid, os.WNOHANG)
                if got == 0:
                    continue
                job, p, logf, t0 = running.pop(pid)
                logf.close()
                p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
                info = {"wall_seconds": time.time() - t0, "returncode": p.returncode,
                        "peak_rss_mib": ru.ru_maxrss / 1024, "user_seconds": ru.ru_utime, "sys_seconds": ru.ru_stime,
                        "load_avg_end": list(os.getloadavg()), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
                finished += 1
                ok = p.returncode == 0
                if ok and job.on_success is not None:
                    try:
                        job.on_success(info)
                    except ValueError as e:
                        ok, info["error"] = False, str(e)
                results[job.name] = info
                what = (f"done  {job.name} in {info['wall_seconds']:.1f} s, peak RSS {info['peak_rss_mib']:.0f} MiB"
                        if ok else f"FAILED {job.name} after {info['wall_seconds']:.1f} s "
                                   f"(exit {p.returncode}{'; ' + info['error'] if 'error' in info else ''}); "
                                   f"see {job.log_path}")
                log(f"[{time.strftime('%H:%M:%S')}] {what} ({finished}/{total})")
    except BaseException:
        for job, p, logf, _ in running.values():
            p.terminate()
        for pid, (job, p, logf, _) in running.items():
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            p.returncode = -15
            logf.close()
        raise
    return results


def train_job(r: Run) -> Job:
    """The job that trains one run (``python -m finegrain train <its config>``); on success it
    writes the run's done marker."""
    resuming = (r.run_dir / "checkpoints").exists()

    def mark_done(info: dict) -> None:
        report = r.run_dir / "report.json"
        steps = r.config["train"]["steps"]
        if not report.is_file() or json.loads(report.read_text()).get("steps") != steps:
            raise ValueError(f"exited 0 without a report.json for {steps} steps")
        marker = {"run": r.name, "method": r.method, "seed": r.seed, **info, "resumed": resuming}
        tmp = r.run_dir / (DONE_FILE + ".tmp")
        tmp.write_text(json.dumps(marker, indent=2))
        tmp.replace(r.run_dir / DONE_FILE)  # atomic: a marker is whole or absent

    return Job(r.name, [sys.executable, "-m", "finegrain", "train", str(r.config_path)], r.run_dir / LOG_FILE,
               on_success=mark_done, note=" (resuming from its checkpoint)" if resuming else "")
