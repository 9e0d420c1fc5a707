"""Checkpoints that resume exactly: model (HF directory, safetensors), optimizers, schedulers, step.

Layout: ``<out_dir>/checkpoints/step_000025/{policy/, prm/, state.pt}`` and ``latest`` (a text
file naming the newest complete checkpoint; written last, so a kill mid-save leaves the previous
checkpoint in force). Sampling seeds and prompt order are functions of (seed, step), so no RNG
state needs saving.

What is guaranteed (docs/reliability.md):

- A checkpoint directory appears under its final name only once every file is written (it is
  written as ``.tmp_step_*`` and renamed), so a kill during a save leaves the previous one.
- ``state.pt`` holds only tensors and plain containers; it is read with ``weights_only=True``, so
  a crafted file cannot run code (it is refused, and the run falls back to an older checkpoint).
- ``latest`` is a pointer, never a path: it must name a ``step_NNNNNN`` directory inside
  ``checkpoints/``. Anything else (empty, missing directory, ``../x``, an absolute path) is
  ignored and the newest *valid* checkpoint is used instead, with a one-line message.
- Damaged checkpoints are moved to ``checkpoints/damaged/``, never deleted; pruning only removes
  checkpoints older than the one just saved.
"""

from __future__ import annotations

import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from finegrain.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_lora, save_adapters


_NAME = re.compile(r"step_(\d{6,})")
STATE_FILE = "state.pt"


def save_checkpoint(out_dir: Path, step: int, models: dict, state: dict, keep: int = 2,
                    state_dicts: dict | None = None) -> Path:
    """Write ``checkpoints/step_<step>`` atomically, point ``latest`` at it, prune older ones.

    ``models`` maps a sub-directory name to (model, tokenizer or None); ``state`` is a dict of
    tensors and plain values (optimizer and scheduler state dicts, counters). ``state_dicts``
    gives, per name, the weights to write instead of the model's own (a sharded model's gathered
    full state dict).
    """
    root = Path(out_dir) / "checkpoints"
    ck = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if tmp.exists():  # left by a kill during an earlier save of this step: never complete
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, (model, tok) in models.items():
        if is_lora(model):  # adapters only (adapter_model.safetensors + adapter_config.json)
            save_adapters(model, tmp / name)
        elif state_dicts and name in state_dicts:
            model.save_pretrained(tmp / name, state_dict=state_dicts[name])
        else:
            model.save_pretrained(tmp / name)
        if tok is not None:
            tok.save_pretrained(tmp / name)
    torch.save({"step": step, **state}, tmp / STATE_FILE)
    if ck.exists():  # the same step saved before (e.g. a replay after resume): this run supersedes it
        shutil.rmtree(ck)
    tmp.rename(ck)
    (root / "latest.tmp").write_text(ck.name)
    (root / "latest.tmp").replace(root / "latest")
    older = sorted((p for p in root.glob("step_*") if _step_of(p) is not None and _step_of(p) < step), key=_step_of)
    for old in older[:max(len(older) - (keep - 1), 0)]:  # keep the newest ``keep`` in all
        shutil.rmtree(old)
    return ck


def _step_of(path: Path) -> int | None:
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


@dataclass
class Found:
    """The checkpoint to resume from (None: there is none) and what was wrong on the way."""

    path: Path | None
    state: dict | None
    problems: list[str]  # one line per damaged or refused checkpoint / pointer


def check_checkpoint(ck: Path, model_dirs: tuple[str, ...] = ()) -> tuple[dict | None, str | None]:
    """(state, None) if ``ck`` is complete and safe to load, else (None, why).

    Complete: ``state.pt`` loads with ``weights_only=True`` and records the directory's step, and
    each of ``model_dirs`` (and each trainable signal the state names) has a ``config.json`` and
    at least one ``*.safetensors`` file, or is a LoRA adapter directory (``adapter_config.json``
    and ``adapter_model.safetensors``, ``finegrain/models/lora.py``).
    """
    f = ck / STATE_FILE
    if not f.is_file():
        return None, f"{ck.name}: no {STATE_FILE}"
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return None, f"{ck.name}: {STATE_FILE} refused or unreadable ({first})"
    if not isinstance(state, dict) or state.get("step") != _step_of(ck):
        return None, f"{ck.name}: {STATE_FILE} does not record step {_step_of(ck)}"
    signals = state.get("signals", {})
    for sub in (*model_dirs, *(signals if isinstance(signals, dict) else {})):
        d = ck / sub
        adapters = (d / ADAPTER_CONFIG).is_file() and (d / ADAPTER_WEIGHTS).is_file()
        if not adapters and (not (d / "config.json").is_file() or not any(d.glob("*.safetensors"))):
            return None, f"{ck.name}: {sub}/ lacks config.json or *.safetensors (or LoRA adapter files)"
    return state, None


def find_checkpoint(out_dir: Path, model_dirs: tuple[str, ...] = ("policy",), quarantine: bool = False) -> Found:
    """The newest valid checkpoint of ``out_dir``, trying ``latest`` first, then every
    ``step_*`` directory from the newest down.

    ``latest`` is read as a name, not a path: a value that is not ``step_NNNNNN`` is ignored.
    With ``quarantine`` (the trainer, which holds the run's lock), damaged checkpoints newer than
    the one found are moved to ``checkpoints/damaged/`` so that later saves cannot be confused by
    them; nothing is deleted.
    """
    root = Path(out_dir) / "checkpoints"
    problems: list[str] = []
    if not root.is_dir():
        return Found(None, None, problems)
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of, reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _NAME.fullmatch(name):
            problems.append(f"checkpoints/latest: {name[:80]!r} is not a checkpoint name (step_NNNNNN); ignored")
        elif not (root / name).is_dir():
            problems.append(f"checkpoints/latest: names {name}, which does not exist")
        else:  # the pointer's checkpoint first, then the others newest first
            candidates.sort(key=lambda p: p.name != name)
    elif candidates:
        problems.append("checkpoints/latest: missing")
    damaged = []
    for ck in candidates:
        state, why = check_checkpoint(ck, model_dirs)
        if state is not None:
            if quarantine:
                for d in damaged:
                    if _step_of(d) > _step_of(ck):
                        _move_aside(d)
            return Found(ck, state, problems)
        problems.append(why)
        damaged.append(ck)
    return Found(None, None, problems)


def _move_aside(ck: Path) -> Path:
    dest_root = ck.parent / "damaged"
    dest_root.mkdir(exist_ok=True)
    dest, k = dest_root / ck.name, 1
    while dest.exists():
        dest, k = dest_root / f"{ck.name}.{k}", k + 1
    ck.rename(dest)
    return dest


def latest_checkpoint(out_dir: Path, model_dirs: tuple[str, ...] = ()) -> Path | None:
    """The newest valid checkpoint directory, or None (read-only; see ``find_checkpoint``)."""
    return find_checkpoint(out_dir, model_dirs).path


def load_state(ck: Path) -> dict:
    """``state.pt`` of a checkpoint, loaded without unpickling code (``weights_only=True``)."""
    state, why = check_checkpoint(Path(ck))
    if state is None:
        raise ValueError(f"checkpoint {ck}: {why}")
    return state
