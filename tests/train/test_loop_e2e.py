"""End-to-end RL runs on CPU with a micro model: report, reproducibility, exact resume, refusals."""

import json

import pytest
import torch

from finegrain.cli.main import demo_config
from finegrain.config import apply_overrides, from_dict, to_dict, validate, RunConfig
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from tests.conftest import tiny_run_overrides


def make_cfg(method, out_dir, cache, **extra):
    ov = tiny_run_overrides(out_dir, cache, **extra)
    d = apply_overrides(to_dict(demo_config(method)), ov)
    # a micro model with seconds of SFT rarely answers right; the length penalty gives every
    # group reward variance, so advantages (and the assertions below) are not trivially zero
    d["rewards"].append({"name": "overlong", "weight": 1.0, "kwargs": {"max_len": 24, "cache_len": 20}})
    if d["advantage"]["per_source"]:
        d["advantage"]["per_source"]["overlong"] = {"name": "prime_loo_exact", "kwargs": {"reward_at": "last"}}
    cfg = from_dict(RunConfig, d)
    validate(cfg)
    return cfg


def losses(path):
    return [(r["step"], r.get("loss/loss"), r.get("reward/verifier/accuracy")) for r in read_log(path) if "loss/loss" in r]


def test_grpo_run_writes_report_and_changes_params(tmp_path, sft_cache):
    cfg = make_cfg("grpo", tmp_path / "run", sft_cache)
    report = train(cfg, log=lambda s: None)
    ev = report["eval"]
    for key in ("accuracy_before", "accuracy_after", "n_problems"):
        assert key in ev
    assert ev["n_problems"] == 6 and report["wall_seconds"] > 0
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["eval"]["accuracy_after"] == ev["accuracy_after"]
    rows = losses(tmp_path / "run" / "metrics.jsonl")
    assert [r[0] for r in rows] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r[1])) for r in rows)
    assert any(r["adv/abs_mean"] > 0 for r in read_log(tmp_path / "run" / "metrics.jsonl") if "adv/abs_mean" in r)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    # parameters moved away from the warm start
    from finegrain.models.load import load_pretrained
    from finegrain.train.checkpoint import latest_checkpoint

    final, _ = load_pretrained(str(latest_checkpoint(tmp_path / "run") / "policy"), device="cpu")
    start, _ = load_pretrained(report["init"]["path"], device="cpu")
    diffs = [(a - b).abs().max().item() for a, b in zip(final.parameters(), start.parameters())]
    assert max(diffs) > 0


def test_same_seed_reproduces_and_resume_is_exact(tmp_path, sft_cache):
    full = make_cfg("grpo", tmp_path / "a", sft_cache, **{"train.steps": 4, "train.ppo_epochs": 2, "train.minibatches": 2})
    train(full, log=lambda s: None)
    again = make_cfg("grpo", tmp_path / "b", sft_cache, **{"train.steps": 4, "train.ppo_epochs": 2, "train.minibatches": 2})
    train(again, stop_after=2, log=lambda s: None)  # "killed" after the step-2 checkpoint
    report = train(again, log=lambda s: None)  # resumes at step 2
    a, b = losses(tmp_path / "a" / "metrics.jsonl"), losses(tmp_path / "b" / "metrics.jsonl")
    assert a == b and len(a) == 4
    ra = json.loads((tmp_path / "a" / "report.json").read_text())["eval"]
    assert ra["accuracy_after"] == report["eval"]["accuracy_after"]
    assert ra["accuracy_before"] == report["eval"]["accuracy_before"]


def test_prime_run_updates_prm_and_resumes(tmp_path, sft_cache):
    cfg = make_cfg("prime", tmp_path / "p", sft_cache, **{"train.steps": 3})
    train(cfg, stop_after=2, log=lambda s: None)
    train(cfg, log=lambda s: None)
    full = make_cfg("prime", tmp_path / "q", sft_cache, **{"train.steps": 3})
    train(full, log=lambda s: None)
    rows_p, rows_q = read_log(tmp_path / "p" / "metrics.jsonl"), read_log(tmp_path / "q" / "metrics.jsonl")
    key = "reward/implicit_prm/prm_loss"
    got = [r.get(key) for r in rows_p if "loss/loss" in r]
    assert got == [r.get(key) for r in rows_q if "loss/loss" in r]
    assert any(v is not None for v in got)


def test_level_mismatch_is_refused_before_any_work(tmp_path, sft_cache):
    cfg = make_cfg("prime", tmp_path / "x", sft_cache)
    cfg.advantage.per_source = {}
    cfg.advantage.name = "grpo"
    with pytest.raises(ValueError, match="advantage 'grpo' consumes outcome rewards but 'implicit_prm' gives token rewards"):
        validate(cfg)
    cfg.rewards[1].kwargs = {"level": "step"}
    with pytest.raises(ValueError, match="'implicit_prm' gives step rewards; use one of: .*prime_rloo"):
        validate(cfg)


@pytest.mark.parametrize("update,loss", [("after", "ce"), ("before", "ce"), ("none", "ce"), ("after", "dpo")])
def test_prm_update_modes(tmp_path, sft_cache, update, loss):
    cfg = make_cfg("prime", tmp_path / "m", sft_cache, **{"train.steps": 2, "train.save_every": 0})
    prm = next(r for r in cfg.rewards if r.name == "implicit_prm")
    prm.kwargs.update(update=update, loss=loss)  # every PRM setting lives in its reward's kwargs
    validate(cfg)
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "m" / "metrics.jsonl") if "loss/loss" in r]
    assert len(rows) == 2
    if update == "none":
        assert not any("reward/implicit_prm/prm_loss" in r for r in rows)
        # a frozen PRM equal to its reference gives exactly zero implicit rewards
        assert all(r["reward/implicit_prm/seq_sum"] == 0.0 for r in rows)
    else:
        assert all("reward/implicit_prm/prm_loss" in r for r in rows)
        key = "reward/implicit_prm/pair_acc" if loss == "dpo" else "reward/implicit_prm/acc"
        assert all(key in r for r in rows)
    if update == "before":
        # updated before scoring: the very first rewards already differ from zero
        assert rows[0]["reward/implicit_prm/seq_sum"] != 0.0
    if update == "after" and loss == "ce":
        assert rows[0]["reward/implicit_prm/seq_sum"] == 0.0 and rows[1]["reward/implicit_prm/seq_sum"] != 0.0
    if loss == "dpo":
        # the micro model answers nothing right: no correct/incorrect pair, so no PRM gradient
        assert all(r["reward/implicit_prm/n_pairs"] == 0 for r in rows)
        assert all(r["reward/implicit_prm/seq_sum"] == 0.0 for r in rows)


def test_tensorboard_events_written(tmp_path, sft_cache):
    cfg = make_cfg("grpo", tmp_path / "tb", sft_cache, **{"train.steps": 1, "train.tensorboard": True})
    train(cfg, log=lambda s: None)
    assert list((tmp_path / "tb" / "tb").glob("events.out.tfevents.*"))


def test_kl_as_token_reward_penalty_with_a_token_level_estimator(tmp_path, sft_cache):
    cfg = make_cfg("grpo", tmp_path / "kl", sft_cache, **{"train.steps": 2, "advantage.name": "reinforce_pp",
                                                          "loss.kl_coef": 0.1, "loss.kl_mode": "reward",
                                                          "train.save_every": 0})
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "kl" / "metrics.jsonl") if "loss/loss" in r]
    assert len(rows) == 2 and "loss/kl" not in rows[0]  # the KL went into the rewards, not the loss
    assert all(r["adv/abs_mean"] > 0 for r in rows)


def test_kl_reward_penalty_refused_for_an_outcome_estimator(tmp_path, sft_cache):
    with pytest.raises(ValueError, match="'kl_penalty' gives token rewards"):
        make_cfg("grpo", tmp_path / "kl2", sft_cache, **{"loss.kl_coef": 0.1, "loss.kl_mode": "reward"})


def test_exact_step_rewards_run_through_per_source_credit(tmp_path, sft_cache):
    cfg = make_cfg("step_oracle", tmp_path / "so", sft_cache, **{"train.steps": 2, "train.save_every": 0})
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "so" / "metrics.jsonl") if "loss/loss" in r]
    assert len(rows) == 2 and all("reward/step_labels/wrong_steps" in r for r in rows)
    assert all(r["adv/abs_mean"] > 0 for r in rows)


def test_a_step_with_every_group_filtered_still_evaluates_and_saves(tmp_path, sft_cache):
    """A micro model rarely answers right, so the accuracy band keeps no group: every step is
    skipped, yet the scheduled evals, the checkpoints and the final checkpoint still happen
    (they were skipped with the update, leaving `latest` behind the report)."""
    cfg = make_cfg("grpo", tmp_path / "run", sft_cache, **{
        "train.steps": 2, "train.eval_every": 1, "train.save_every": 1,
        "filters.filters": [{"name": "accuracy_band", "kwargs": {"low": 0.99, "high": 1.0}}],
        "filters.max_refills": 0})
    notes = []
    train(cfg, log=notes.append)
    assert sum("every group was filtered out" in n for n in notes) == 2
    rows = read_log(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 1, 2]  # before, step 1, after
    assert not any("loss/loss" in r for r in rows)
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "step_000001").is_dir() and (ck / "step_000002").is_dir()
    assert (ck / "latest").read_text().strip() == "step_000002"


@pytest.mark.parametrize("reward, kwargs", [("random", {}), ("laser_d", {"monitor_every": 2})])
def test_stateful_reward_resumes_its_state(tmp_path, sft_cache, reward, kwargs):
    # the random reward's generator and LASER-D's length window live in state.pt: a run killed
    # after step 2 and resumed logs the same rewards as an uninterrupted one
    def cfg(out):
        c = make_cfg("grpo", out, sft_cache, **{"train.steps": 4})
        d = to_dict(c)
        d["rewards"].append({"name": reward, "weight": 1.0, "kwargs": kwargs})
        c = from_dict(RunConfig, d)
        validate(c)
        return c

    train(cfg(tmp_path / "full"), log=lambda s: None)
    cut = cfg(tmp_path / "cut")
    train(cut, stop_after=2, log=lambda s: None)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step_000002" / "state.pt", weights_only=True)
    assert reward in state["reward_state"]
    train(cut, log=lambda s: None)
    key = f"reward/{reward}/mean"
    full = [r[key] for r in read_log(tmp_path / "full" / "metrics.jsonl") if key in r]
    resumed = [r[key] for r in read_log(tmp_path / "cut" / "metrics.jsonl") if key in r]
    assert len(full) == 4 and full == resumed


def test_stateful_filter_resumes_its_state(tmp_path, sft_cache):
    # RLPR's std filter keeps an EMA across steps; it is saved in state.pt and restored, so a run
    # killed after step 2 logs the same filter EMA afterwards as an uninterrupted one
    def cfg(out):
        std = [{"name": "std_ema", "kwargs": {"beta": 0.5, "ema_start_step": 1, "start_step": 2}}]
        return make_cfg("grpo", out, sft_cache, **{"train.steps": 4, "filters.filters": std, "filters.max_refills": 0,
                                                     "filters.outcome": "overlong"})  # varies, unlike the verifier

    train(cfg(tmp_path / "full"), log=lambda s: None)
    cut = cfg(tmp_path / "cut")
    train(cut, stop_after=2, log=lambda s: None)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step_000002" / "state.pt", weights_only=True)
    assert state["filter_state"]["0:std_ema"]["rounds"] == 2
    train(cut, log=lambda s: None)
    key = "filter/std_ema/ema"
    full = [r[key] for r in read_log(tmp_path / "full" / "metrics.jsonl") if key in r]
    resumed = [r[key] for r in read_log(tmp_path / "cut" / "metrics.jsonl") if key in r]
    assert len(full) == 4 and full == resumed and full[-1] > 0


def test_prime_evals_log_the_prm_first_wrong_step_accuracy(tmp_path, sft_cache):
    # the online implicit PRM is judged against arith's exact step labels at every evaluation; at
    # step 0 it equals its reference (log-ratio 0 everywhere), so it predicts "no error" for every
    # response and scores exactly the fraction of error-free eval samples
    cfg = make_cfg("prime", tmp_path / "p", sft_cache, **{"train.steps": 2, "train.eval_every": 1})
    report = train(cfg, log=lambda s: None)
    evals = [r for r in read_log(tmp_path / "p" / "metrics.jsonl") if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert all(0.0 <= r["eval/prm_first_wrong_step_accuracy"] <= 1.0 for r in evals)
    assert report["eval"]["prm_first_wrong_step_accuracy_after"] == evals[-1]["eval/prm_first_wrong_step_accuracy"]
    grpo = make_cfg("grpo", tmp_path / "g", sft_cache, **{"train.steps": 1})
    train(grpo, log=lambda s: None)
    assert not any("eval/prm_first_wrong_step_accuracy" in r for r in read_log(tmp_path / "g" / "metrics.jsonl"))
