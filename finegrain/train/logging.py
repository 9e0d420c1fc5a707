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


class RunLogger:
    """Appends one JSON object per step to ``metrics.jsonl``; mirrors scalars to TensorBoard.

    On resume from step k, lines with step > k are dropped first, so the log of a resumed run
    equals the log of an uninterrupted one.
    """

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
            except ImportError:
                print("tensorboard not installed (pip install 'finegrain[tensorboard]'); logging to JSONL only")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: to_float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_log(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
