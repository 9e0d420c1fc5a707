"""Weights & Biases logging (offline mode, no network): the run logs there, and a resumed run
continues the same W&B run."""

import pytest

from finegrain.train.loop import train
from tests.train.test_loop_e2e import make_cfg

wandb = pytest.importorskip("wandb")


def test_wandb_offline_run_logs_and_resume_continues_the_same_run(tmp_path, sft_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    cfg = make_cfg("grpo", out, sft_cache, **{"train.steps": 2, "train.save_every": 1, "train.wandb_project": "fg-test"})
    train(cfg, stop_after=1, log=lambda s: None)
    run_id = (out / "wandb_run_id").read_text().strip()
    train(cfg, log=lambda s: None)
    assert (out / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    data = b"".join(f.read_bytes() for r in runs for f in r.glob("run-*.wandb"))
    for key in (b"loss/loss", b"eval/accuracy", b"fg-test"):
        assert key in data


def test_wandb_project_without_the_package_is_one_clear_error(tmp_path, sft_cache, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    import finegrain.train.stages as stages

    monkeypatch.setattr(stages, "build_policy", lambda *a: pytest.fail("model loaded before the check"))
    cfg = make_cfg("grpo", tmp_path / "nw", sft_cache, **{"train.steps": 1, "train.wandb_project": "p"})
    with pytest.raises(ImportError, match=r"pip install 'finegrain\[wandb\]'"):
        train(cfg, log=lambda s: None)
