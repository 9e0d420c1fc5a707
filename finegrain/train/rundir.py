"""What a run directory already holds, and whether this run may continue it.

Called by the trainer under the run's lock, before any model is loaded, so every refusal comes
before work and nothing on disk has been touched yet:

- ``train.resume=true``: continue from the newest valid checkpoint (a damaged newest one is
  skipped with a message and moved to ``checkpoints/damaged/``). Refused when the checkpoint was
  trained with a config that differs in a key that changes training (all keys but ``RESUME_SAFE``).
- ``train.resume=force``: the same, but the new config is applied and each changed key is
  appended to ``config_changes.jsonl``.
- ``train.resume=false``: refused when the directory already holds a run.
- A run that already finished (``report.json`` at the configured step count) is not run again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


from finegrain.config import RunConfig, load_yaml, to_dict, with_defaults
from finegrain.train.checkpoint import find_checkpoint

# keys that do not change what is trained; train.steps joins them when the LR schedule is constant
RESUME_SAFE = ("train.resume", "train.progress", "train.threads", "train.tensorboard", "train.wandb_project",
               "train.wandb_mode", "train.save_every", "train.eval_every", "train.out_dir", "sft.cache_dir", "model.device")
CHANGES_FILE = "config_changes.jsonl"


@dataclass
class Resume:
    """Where the run starts. ``checkpoint``/``state`` are None for a fresh start; ``finished`` holds
    the saved report when the run is already complete; ``changes`` are the forced config changes."""

    checkpoint: Path | None = None
    state: dict | None = None
    finished: dict | None = None
    changes: dict | None = None


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}, 'c': [1]} -> {'a.b': 1, 'c': [1]} (lists are values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict, now: dict, cfg: RunConfig) -> dict[str, tuple]:
    """{dotted key: (saved value, new value)} for every key that changes training."""
    safe = set(RESUME_SAFE) | ({"train.steps"} if cfg.optim.schedule == "constant" else set())
    a, b = flatten(saved), flatten(now)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in safe and not any(k.startswith(s + ".") for s in safe)}


def _fmt(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {v[0]!r} → {v[1]!r}" for k, v in changes.items())


def prepare(cfg: RunConfig, out: Path, log, record: bool = True) -> Resume:
    """Decide how the run in ``out`` starts (see the module docstring); raises one-line ValueErrors.

    ``record`` False (data-parallel ranks other than 0, which run after rank 0 has prepared the
    directory) does not append the train.resume=force record a second time."""
    mode = cfg.train.resume
    has_run = (out / "checkpoints").exists() or (out / "metrics.jsonl").exists()
    if mode is False:
        if has_run:
            raise ValueError(f"train.resume=false: {out} already holds a run (checkpoints/ or metrics.jsonl); "
                             f"resume it (train.resume=true), or choose another train.out_dir")
        return Resume()
    models = ("policy", "critic") if cfg.critic.enabled else ("policy",)  # a damaged critic/ falls back too
    found = find_checkpoint(out, models, quarantine=True)
    for line in found.problems:
        log(f"resume: {line}")
    if found.path is None:
        if (out / "metrics.jsonl").exists():  # killed before the first checkpoint: keep its log aside
            kept = _set_aside(out / "metrics.jsonl")
            log(f"resume: no valid checkpoint in {out}; starting at step 0 (the old log is kept as {kept.name})")
        return Resume()
    if found.problems:
        log(f"resume: using {found.path.name}, the newest valid checkpoint")
    state = found.state
    saved = state.get("config")
    if saved is None and (out / "config.yaml").is_file():  # checkpoints written before configs were saved in them
        saved = load_yaml((out / "config.yaml").read_text())
    changes = config_diff(with_defaults(saved), to_dict(cfg), cfg) if isinstance(saved, dict) else {}
    if changes and mode != "force":
        raise ValueError(f"train.resume: {out} was trained with another config ({_fmt(changes)}); "
                         f"use train.resume=force to continue with the new one (recorded), or another train.out_dir")
    step = state["step"]
    if step > cfg.train.steps:
        raise ValueError(f"train.steps: {cfg.train.steps}, but {out} already has a checkpoint at step {step}")
    report = out / "report.json"
    if step == cfg.train.steps and report.is_file():
        rep = json.loads(report.read_text())
        if rep.get("steps") == cfg.train.steps:
            log(f"{out}: this run already finished ({report}); raise train.steps to continue it")
            return Resume(found.path, state, finished=rep)
    if changes and record:
        with (out / CHANGES_FILE).open("a") as f:
            f.write(json.dumps({"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "changes": {k: list(v) for k, v in changes.items()}}) + "\n")
        log(f"resume: train.resume=force applies {_fmt(changes)} from step {step} (recorded in {CHANGES_FILE})")
    return Resume(found.path, state, changes=changes or None)


def _set_aside(path: Path) -> Path:
    k = 1
    while (dest := path.with_name(f"{path.stem}.stale-{k}{path.suffix}")).exists():
        k += 1
    path.rename(dest)
    return dest
