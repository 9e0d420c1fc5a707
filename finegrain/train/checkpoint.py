"""Checkpoints that resume exactly: model (HF directory, safetensors), optimizers, schedulers, step.

Layout: ``<out_dir>/checkpoints/step_000025/{policy/, prm/, state.pt}`` and ``latest`` (a text
file naming the newest complete checkpoint; written last, so a kill mid-save leaves the previous
checkpoint in force). Sampling seeds and prompt order are functions of (seed, step), so no RNG
state needs saving.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def save_checkpoint(out_dir: Path, step: int, models: dict, state: dict, keep: int = 2) -> Path:
    root = Path(out_dir) / "checkpoints"
    ck = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, (model, tok) in models.items():
        model.save_pretrained(tmp / name)
        if tok is not None:
            tok.save_pretrained(tmp / name)
    torch.save({"step": step, **state}, tmp / "state.pt")
    if ck.exists():
        shutil.rmtree(ck)
    tmp.rename(ck)
    (root / "latest.tmp").write_text(ck.name)
    (root / "latest.tmp").replace(root / "latest")
    older = sorted(p for p in root.glob("step_*") if p != ck)
    for old in older[:max(len(older) - (keep - 1), 0)]:  # keep the newest ``keep`` in all
        shutil.rmtree(old)
    return ck


def latest_checkpoint(out_dir: Path) -> Path | None:
    f = Path(out_dir) / "checkpoints" / "latest"
    if not f.exists():
        return None
    ck = f.parent / f.read_text().strip()
    return ck if (ck / "state.pt").exists() else None


def load_state(ck: Path) -> dict:
    return torch.load(ck / "state.pt", map_location="cpu", weights_only=False)


def load_weights_into(model, directory: Path) -> None:
    """Copy saved safetensors weights into an existing model (keeps device and dtype)."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {directory}: no *.safetensors file")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # tied embeddings are saved once; lm_head.weight is then legitimately missing
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {directory}: missing {missing[:3]}, unexpected {unexpected[:3]}")
