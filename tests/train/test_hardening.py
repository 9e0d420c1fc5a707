"""The hardening findings, one test each: damaged checkpoints, code from files, non-finite steps,
changed-config resumes, failed re-runs, the run lock, unbounded work, duplicate log rows, and a
kill during a checkpoint save. Each failed before its fix (see docs/reliability.md)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from finegrain.train.checkpoint import find_checkpoint, save_checkpoint
from finegrain.guards import NonFiniteError, clip_and_step
from finegrain.lock import RunLock, RunLocked
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from tests.train.test_loop_e2e import losses, make_cfg

REPO = Path(__file__).resolve().parents[2]
quiet = lambda s: None  # noqa: E731


class _Tiny(torch.nn.Module):
    """Just enough of a model for save_checkpoint: one weight, save_pretrained writes safetensors."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((2,), float(value)))

    def save_pretrained(self, d):
        from safetensors.torch import save_file

        Path(d).mkdir(parents=True, exist_ok=True)
        save_file({"w": self.w.detach()}, str(Path(d) / "model.safetensors"))
        (Path(d) / "config.json").write_text("{}")


def _fake_run(tmp_path, steps=(2, 4)):
    for s in steps:
        save_checkpoint(tmp_path, s, {"policy": (_Tiny(s), None)}, {"x": torch.tensor(float(s))}, keep=5)
    return tmp_path / "checkpoints"


# ---- 1. damaged newest checkpoint: fall back, say so, delete nothing

@pytest.mark.parametrize("damage", ["no_state", "empty_latest", "latest_missing_dir", "no_latest", "no_weights"])
def test_damaged_newest_checkpoint_falls_back_to_the_newest_valid(tmp_path, damage):
    root = _fake_run(tmp_path)
    if damage == "no_state":
        (root / "step_000004" / "state.pt").unlink()
    elif damage == "empty_latest":
        (root / "latest").write_text("")
    elif damage == "latest_missing_dir":
        (root / "latest").write_text("step_000009")
    elif damage == "no_latest":
        (root / "latest").unlink()
    elif damage == "no_weights":
        (root / "step_000004" / "policy" / "model.safetensors").unlink()
    found = find_checkpoint(tmp_path, ("policy",))
    broken_4 = damage in ("no_state", "no_weights")
    assert found.path.name == ("step_000002" if broken_4 else "step_000004")
    assert float(found.state["x"]) == (2.0 if broken_4 else 4.0)
    assert found.problems and all("\n" not in p for p in found.problems)
    assert (root / "step_000002").is_dir() and (root / "step_000004").is_dir()  # read-only: nothing moved


def test_trainer_quarantine_moves_damaged_checkpoints_aside_never_deletes(tmp_path):
    root = _fake_run(tmp_path)
    (root / "step_000004" / "state.pt").unlink()
    found = find_checkpoint(tmp_path, ("policy",), quarantine=True)
    assert found.path.name == "step_000002"
    assert (root / "damaged" / "step_000004" / "policy" / "model.safetensors").is_file()


def test_damaged_newest_checkpoint_resumes_from_older_and_keeps_history(tmp_path, sft_cache):
    kw = {"train.steps": 4, "train.save_every": 2}
    full = make_cfg("grpo", tmp_path / "full", sft_cache, **kw)
    train(full, log=quiet)
    cfg = make_cfg("grpo", tmp_path / "run", sft_cache, **kw)
    train(cfg, log=quiet)
    (tmp_path / "run" / "report.json").unlink()  # as if killed after the step-4 save, before the report
    (tmp_path / "run" / "checkpoints" / "step_000004" / "state.pt").unlink()
    messages = []
    train(cfg, log=messages.append)
    assert any("step_000004: no state.pt" in m for m in messages)
    assert any("resumed from" in m and "step_000002" in m for m in messages)
    assert losses(tmp_path / "run" / "metrics.jsonl") == losses(tmp_path / "full" / "metrics.jsonl")
    assert (tmp_path / "run" / "checkpoints" / "damaged" / "step_000004").is_dir()


# ---- 2. nothing loaded from a file runs code

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_state_file_is_refused_not_executed(tmp_path):
    root = _fake_run(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"step": 4, "x": _Payload(marker)}, root / "step_000004" / "state.pt")
    found = find_checkpoint(tmp_path, ("policy",))
    assert not marker.exists()
    assert found.path.name == "step_000002"
    assert any("step_000004: state.pt refused" in p for p in found.problems)


@pytest.mark.parametrize("pointer", ["../../outside", "/etc", "step_000002/../../x", "..", "policy"])
def test_latest_pointer_cannot_leave_the_run_directory(tmp_path, pointer):
    root = _fake_run(tmp_path, steps=(2,))
    outside = tmp_path.parent / "outside"
    outside.mkdir(exist_ok=True)
    (root / "latest").write_text(pointer)
    found = find_checkpoint(tmp_path, ("policy",))
    assert found.path == root / "step_000002"
    assert found.path.resolve().is_relative_to(root.resolve())


# ---- 3. non-finite numbers stop the step before the optimizer, and before any save

def test_non_finite_gradient_stops_before_the_optimizer_step():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    (w * torch.tensor([1.0, float("nan"), 1.0])).sum().backward()
    with pytest.raises(NonFiniteError, match="^policy update: gradient norm is nan"):
        clip_and_step([w], opt, 1.0, "policy update")
    assert torch.equal(w.detach(), torch.ones(3))


def test_non_finite_advantages_stop_the_run_with_the_last_checkpoint_intact(tmp_path, sft_cache, monkeypatch):
    import finegrain.train.loop as loop

    real = loop.compute_advantages
    calls = []

    def poisoned(cfg, per_source, traj, **kw):
        calls.append(1)
        adv = real(cfg, per_source, traj, **kw)
        return adv * float("nan") if len(calls) == 3 else adv

    monkeypatch.setattr(loop, "compute_advantages", poisoned)
    cfg = make_cfg("grpo", tmp_path / "nan", sft_cache, **{"train.steps": 4, "train.save_every": 2})
    with pytest.raises(NonFiniteError, match="^step 3: advantages: .* non-finite"):
        train(cfg, log=quiet)
    found = find_checkpoint(tmp_path / "nan", ("policy",))
    assert found.path.name == "step_000002"
    assert not (tmp_path / "nan" / "checkpoints" / "step_000004").exists()
    from safetensors.torch import load_file

    weights = load_file(str(found.path / "policy" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


# ---- 4 and 5. a changed config is refused on resume (or forced and recorded); a failed re-run
# leaves the finished run's config.yaml as it was

def test_resume_with_changed_config_is_refused_and_leaves_config_yaml(tmp_path, sft_cache):
    cfg = make_cfg("grpo", tmp_path / "r", sft_cache, **{"train.steps": 3, "train.save_every": 1})
    train(cfg, stop_after=1, log=quiet)
    saved = (tmp_path / "r" / "config.yaml").read_bytes()
    changed = make_cfg("grpo", tmp_path / "r", sft_cache, **{"train.steps": 3, "train.save_every": 1,
                                                            "optim.lr": 5e-3, "rollout.group_size": 2})
    with pytest.raises(ValueError, match=r"^train.resume: .* another config \(optim.lr 0.0001 → 0.005, "
                                         r"rollout.group_size 4 → 2\); use train.resume=force"):
        train(changed, log=quiet)
    assert (tmp_path / "r" / "config.yaml").read_bytes() == saved


def test_resume_force_applies_and_records_the_change(tmp_path, sft_cache):
    kw = {"train.steps": 3, "train.save_every": 1}
    cfg = make_cfg("grpo", tmp_path / "f", sft_cache, **kw)
    train(cfg, stop_after=1, log=quiet)
    forced = make_cfg("grpo", tmp_path / "f", sft_cache, **kw, **{"optim.lr": 5e-3, "train.resume": "force"})
    train(forced, log=quiet)
    change = json.loads((tmp_path / "f" / "config_changes.jsonl").read_text().splitlines()[0])
    assert change["step"] == 1 and change["changes"] == {"optim.lr": [1e-4, 5e-3]}
    lrs = {r["step"]: r["optim/lr"] for r in read_log(tmp_path / "f" / "metrics.jsonl") if "optim/lr" in r}
    assert lrs[1] == pytest.approx(1e-4) and lrs[2] == pytest.approx(5e-3) and lrs[3] == pytest.approx(5e-3)
    assert "lr: 0.005" in (tmp_path / "f" / "config.yaml").read_text()


def test_failed_rerun_leaves_a_finished_runs_config(tmp_path, sft_cache):
    cfg = make_cfg("grpo", tmp_path / "done", sft_cache, **{"train.steps": 1})
    train(cfg, log=quiet)
    saved = (tmp_path / "done" / "config.yaml").read_bytes()
    bad = make_cfg("grpo", tmp_path / "done", sft_cache, **{"train.steps": 2, "train.resume": "force",
                                                           "model.path": str(tmp_path / "no_model")})
    with pytest.raises(FileNotFoundError, match="no_model': no such directory"):
        train(bad, log=quiet)
    assert (tmp_path / "done" / "config.yaml").read_bytes() == saved


def test_resume_false_refuses_a_directory_that_holds_a_run(tmp_path, sft_cache):
    cfg = make_cfg("grpo", tmp_path / "x", sft_cache, **{"train.steps": 1})
    train(cfg, log=quiet)
    before = (tmp_path / "x" / "metrics.jsonl").read_bytes()
    fresh = make_cfg("grpo", tmp_path / "x", sft_cache, **{"train.steps": 1, "train.resume": False})
    with pytest.raises(ValueError, match="^train.resume=false: .* already holds a run"):
        train(fresh, log=quiet)
    assert (tmp_path / "x" / "metrics.jsonl").read_bytes() == before


# ---- 6. one process per run directory; a dead holder's lock is stale by construction

def test_second_run_into_a_locked_directory_is_refused_naming_the_holder(tmp_path, sft_cache):
    cfg = make_cfg("grpo", tmp_path / "l", sft_cache, **{"train.steps": 1})
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from finegrain.lock import RunLock
        with RunLock({str(tmp_path / 'l')!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=rf"in use by another finegrain process \(pid {holder.pid} on "):
            train(cfg, log=quiet)
        assert not (tmp_path / "l" / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train(cfg, log=quiet)  # the holder died by kill -9: its lock went with it
    assert (tmp_path / "l" / "report.json").is_file()


def test_lock_file_left_by_a_dead_process_is_taken(tmp_path):
    (tmp_path / ".finegrain.lock").write_text(json.dumps({"pid": 999999, "host": "gone"}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".finegrain.lock").read_text())["pid"] == os.getpid()


# ---- 7. unbounded work is refused before it starts

def test_prompts_per_step_beyond_the_pool_is_refused_before_loading(tmp_path, sft_cache, monkeypatch):
    import finegrain.train.stages as stages

    monkeypatch.setattr(stages, "build_policy", lambda *a: pytest.fail("model loaded before the check"))
    cfg = make_cfg("grpo", tmp_path / "big", sft_cache, **{"rollout.prompts_per_step": 10_000_000})
    with pytest.raises(ValueError, match=r"^rollout.prompts_per_step: 10000000 exceeds the \d+ training problems"):
        train(cfg, log=quiet)


def test_prompt_longer_than_the_context_is_dropped_or_refused_quickly(sft_cache):
    from finegrain.models.tiny import tiny_causal_lm
    from finegrain.models.tokenizer import char_tokenizer
    from finegrain.envs import hf_rollout
    from finegrain.sampling import SamplingParams
    from finegrain.tasks.base import Example
    from finegrain.train.loop import fitting_prompts

    tok = char_tokenizer(list("abc0123456789 ?"))
    engine = hf_rollout(tiny_causal_lm(tok, size="micro", max_positions=64), tok)
    short, huge = Example("s", "abc?", "1"), Example("h", "a" * 1_000_000, "1")
    assert engine.prompt_fits([short, huge], 16) == [True, False]
    msgs = []
    assert fitting_prompts(engine, [short, huge], 16, "training", msgs.append) == [short]
    assert msgs == ["dropped 1 of 2 training problems whose prompt plus 16 new tokens exceeds the model's "
                    "context of 64 tokens"]
    with pytest.raises(ValueError, match="^example 'h': prompt of 1000001 tokens plus max_new_tokens=16 exceeds"):
        engine.generate([huge], 1, SamplingParams(1.0, 1.0, 0, 16), seed=0)
    with pytest.raises(ValueError, match="^every held-out prompt is too long"):
        fitting_prompts(engine, [huge], 16, "held-out", msgs.append)


# ---- 10. no duplicate rows: a finished run re-run, a kill after the final eval row, TensorBoard

def test_rerun_of_a_finished_run_changes_nothing(tmp_path, sft_cache):
    cfg = make_cfg("grpo", tmp_path / "fin", sft_cache, **{"train.steps": 2})
    report = train(cfg, log=quiet)
    log_before = (tmp_path / "fin" / "metrics.jsonl").read_bytes()
    msgs = []
    again = train(cfg, log=msgs.append)
    assert again == report and any("already finished" in m for m in msgs)
    assert (tmp_path / "fin" / "metrics.jsonl").read_bytes() == log_before


def test_kill_after_the_final_eval_row_gives_one_final_row(tmp_path, sft_cache):
    cfg = make_cfg("grpo", tmp_path / "k", sft_cache, **{"train.steps": 2})
    train(cfg, log=quiet)
    (tmp_path / "k" / "report.json").unlink()  # killed after logging the final eval, before the report
    train(cfg, log=quiet)
    rows = read_log(tmp_path / "k" / "metrics.jsonl")
    final = [r for r in rows if r["step"] == 2 and all(k == "step" or k.startswith("eval/") for k in r)]
    assert len(final) == 1 and [r["step"] for r in rows] == [0, 1, 2, 2]


def test_tensorboard_has_each_step_once_after_a_resume(tmp_path, sft_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    kw = {"train.steps": 3, "train.save_every": 1, "train.tensorboard": True}
    cfg = make_cfg("grpo", tmp_path / "tb", sft_cache, **kw)
    train(cfg, stop_after=2, log=quiet)
    (tmp_path / "tb" / "checkpoints" / "step_000002" / "state.pt").unlink()  # resume replays step 2
    train(cfg, log=quiet)
    acc = EventAccumulator(str(tmp_path / "tb" / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss/loss")]
    assert steps == [1, 2, 3]
    jsonl = {r["step"]: r["loss/loss"] for r in read_log(tmp_path / "tb" / "metrics.jsonl") if "loss/loss" in r}
    assert [e.value for e in acc.Scalars("loss/loss")] == pytest.approx([jsonl[1], jsonl[2], jsonl[3]], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 3]


# ---- a kill during a checkpoint save: the previous checkpoint stays in force, resume is exact

_KILL_DURING_SAVE = """
import os, signal, sys
import torch
import finegrain.train.checkpoint as C
from finegrain.config import load_config
from finegrain.train.loop import train

torch.set_num_threads(1)
real_save = torch.save
def save_then_die(obj, path, *a, **k):
    if obj.get("step") == int(sys.argv[2]):
        with open(path, "wb") as f:
            f.write(b"half a state file")  # a partial write, then kill -9
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *a, **k)
C.torch.save = save_then_die
train(load_config(sys.argv[1]), log=lambda s: None)
"""


def test_kill_during_checkpoint_save_then_resume_matches_uninterrupted(tmp_path, sft_cache):
    from finegrain.config import dump_config

    kw = {"train.steps": 4, "train.save_every": 2}
    full = make_cfg("grpo", tmp_path / "full", sft_cache, **kw)
    train(full, log=quiet)  # also warms the SFT cache for the child
    cfg = make_cfg("grpo", tmp_path / "killed", sft_cache, **kw)
    dump_config(cfg, tmp_path / "killed.yaml")
    script = tmp_path / "child.py"
    script.write_text(_KILL_DURING_SAVE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, str(script), str(tmp_path / "killed.yaml"), "4"], cwd=REPO, env=env,
                           capture_output=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    root = tmp_path / "killed" / "checkpoints"
    assert (root / "latest").read_text() == "step_000002" and (root / ".tmp_step_000004").is_dir()
    assert not (root / "step_000004").exists()
    msgs = []
    train(cfg, log=msgs.append)
    assert any("resumed from" in m and "step_000002" in m for m in msgs)
    assert losses(tmp_path / "killed" / "metrics.jsonl") == losses(tmp_path / "full" / "metrics.jsonl")
    assert not (root / ".tmp_step_000004").exists()


def test_a_waiting_lock_blocks_until_the_holder_is_done(tmp_path):
    """The SFT cache uses RunLock(wait=True): a second run waits for the first to build it."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from finegrain.lock import RunLock
        with RunLock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(1.5)
            open({str(tmp_path / 'built')!r}, "w").close()
    """)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with RunLock(tmp_path, wait=True):
            assert (tmp_path / "built").exists()  # only after the holder finished
    finally:
        holder.kill()
        holder.wait()


def test_a_resumed_run_keeps_the_thread_count_it_started_with(tmp_path, sft_cache, monkeypatch):
    """The automatic thread count depends on the machine's load; a resume under another load must
    not change how reductions are split (exact resume), unless the user chose a count."""
    monkeypatch.delenv("FINEGRAIN_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = make_cfg("grpo", tmp_path / "th", sft_cache, **{"train.steps": 2, "train.save_every": 1})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(cfg, stop_after=1, log=quiet)
        torch.set_num_threads(2)  # as if the automatic choice differed on resume
        msgs = []
        train(cfg, log=msgs.append)
        assert torch.get_num_threads() == 1
        assert any("using 1 torch threads, as the run did before" in m for m in msgs)
    finally:
        torch.set_num_threads(before)
