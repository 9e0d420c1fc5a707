"""Metric logging: JSONL (always) and TensorBoard (optional). The trainer adds the namespaces."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def to_float(v) -> float:
    return float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)


def prefixed(prefix: str, metrics: dict) -> dict[str, float]:
    """{'clipfrac': t} -> {'loss/clipfrac': float(t)}."""
    return {f"{prefix}/{k}": to_float(v) for k, v in metrics.items()}


def _eval_only(row: dict) -> bool:
    """The before/after evaluation rows hold eval/* keys only (periodic evals join a step's row)."""
    return all(k == "step" or k.startswith("eval/") for k in row)


def kept_rows(rows: list[dict], resume_step: int) -> list[dict]:
    """The rows a run resumed at step k keeps: steps ≤ k, except a final evaluation at k itself
    (k > 0), which the resumed run writes again. So a killed-and-resumed run, or a re-run of a
    finished one, has exactly the rows of an uninterrupted run.

    >>> rows = [{"step": 0, "eval/a": 1}, {"step": 1, "loss/l": 2}, {"step": 1, "eval/a": 3}, {"step": 2, "loss/l": 4}]
    >>> [r["step"] for r in kept_rows(rows, 1)]
    [0, 1]
    """
    return [r for r in rows if r["step"] < resume_step or (r["step"] == resume_step and not (resume_step and _eval_only(r)))]


class RunLogger:
    """Appends one JSON object per step to ``metrics.jsonl``; mirrors scalars to TensorBoard and,
    when configured, Weights & Biases.

    On resume from step k, the rows ``kept_rows`` drops are removed first, and TensorBoard is
    opened with ``purge_step=k`` (events at steps ≥ k from the killed run are hidden by
    TensorBoard's reader) and the kept step-k row is written again, so no step appears twice.
    A fresh run never deletes an existing log: the trainer has set it aside before (rundir.py).
    """

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int | None = None, wandb: dict | None = None):
        out_dir = Path(out_dir)
        self.path = out_dir / "metrics.jsonl"
        replay: list[dict] = []
        if resume_step is not None and self.path.exists():
            kept = kept_rows(read_log(self.path), resume_step)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)
            replay = [r for r in kept if r["step"] == resume_step]
        elif self.path.exists():
            raise FileExistsError(f"{self.path}: exists; a fresh run does not overwrite a log")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb_dir = out_dir / "tb"
                purge = resume_step if resume_step is not None else (0 if tb_dir.exists() else None)
                self.tb = SummaryWriter(str(tb_dir), purge_step=purge)
            except ImportError:
                print("tensorboard not installed (pip install 'finegrain[tensorboard]'); logging to JSONL only")
        self.wandb = _wandb_run(wandb, resume_step) if wandb else None
        for row in replay:
            self._mirror(row)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: to_float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._mirror(row)

    def _mirror(self, row: dict) -> None:
        step = row["step"]
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def wandb_settings(cfg, out_dir: Path) -> dict | None:
    """The W&B run settings of a config, None when W&B logging is off (train.wandb_project '')."""
    if not cfg.train.wandb_project:
        return None
    from finegrain.config import to_dict

    return {"project": cfg.train.wandb_project, "mode": cfg.train.wandb_mode, "dir": str(out_dir),
            "name": Path(out_dir).name, "config": to_dict(cfg)}


def require_wandb(cfg) -> None:
    """Fail before any work when W&B logging is configured but wandb is not installed."""
    if cfg.train.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ImportError("train.wandb_project is set but wandb is not installed: "
                              "pip install 'finegrain[wandb]'") from None


def _wandb_run(settings: dict, resume_step: int | None):
    """Start (or, on resume, continue) the W&B run of a run directory.

    The run id is kept in ``<out_dir>/wandb_run_id`` so a resumed finegrain run continues the same
    W&B run; W&B ignores steps at or below the last one it has, so a resumed run's replayed steps
    are not duplicated there either. ``WANDB_MODE`` in the environment wins over the config.
    """
    import os

    import wandb
    import uuid

    id_file = Path(settings["dir"]) / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() and resume_step is not None else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(project=settings["project"], name=settings["name"], dir=settings["dir"], id=run_id,
                      resume="allow", config=settings["config"], mode=os.environ.get("WANDB_MODE", settings["mode"]))


def read_log(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
