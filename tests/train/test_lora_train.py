"""LoRA in the RL trainer on a micro model: a step moves the adapters only, the reference (the base
with adapters disabled) gives the initial policy's log-probs exactly and does not move, the
optimizer holds the adapters only, checkpoint → resume repeats an uninterrupted run, a resume with
another model.lora is refused, and ``finegrain eval`` reads the finished run."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

pytest.importorskip("peft")

from finegrain.cli.main import demo_config  # noqa: E402
from finegrain.config import RunConfig, apply_overrides, from_dict, to_dict, validate  # noqa: E402
from finegrain.models import lora  # noqa: E402
from finegrain.train.logging import read_log  # noqa: E402
from finegrain.train.loop import train  # noqa: E402
from tests.conftest import tiny_run_overrides  # noqa: E402


def quiet(_):
    pass


def make_cfg(out_dir, cache, **extra):
    ov = {"model.lora.enabled": True, "model.lora.r": 4, "model.lora.alpha": 16.0, "loss.kl_coef": 0.1,
          "optim.lr": 1e-2, "train.steps": 4, "train.ppo_epochs": 2, "train.minibatches": 2, **extra}
    d = apply_overrides(to_dict(demo_config("grpo")), tiny_run_overrides(out_dir, cache, **ov))
    # the length penalty gives every group reward variance, so the updates are not all zero
    d["rewards"].append({"name": "overlong", "weight": 1.0, "kwargs": {"max_len": 24, "cache_len": 20}})
    cfg = from_dict(RunConfig, d)
    validate(cfg)
    return cfg


def test_a_step_moves_adapters_only_and_the_reference_stays(tmp_path, sft_cache):
    from finegrain.train.stages import (build_run, collect_batch, compute_advantages, score_batch, task_for,
                                        update_policy)
    from finegrain.train.update import batch_logprobs

    cfg = make_cfg(tmp_path / "run", sft_cache)
    task = task_for(cfg)
    torch.manual_seed(0)
    run = build_run(cfg, task, quiet)
    assert lora.is_lora(run.policy) and isinstance(run.ref, lora.FrozenBase)
    # the optimizer holds exactly the adapter parameters
    opt_params = [p for g in run.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == {id(p) for p in lora.adapter_parameters(run.policy)}
    base_before = {n: t.clone() for n, t in run.policy.state_dict().items() if ".lora_" not in n}
    adapters_before = {n: t.clone() for n, t in run.policy.state_dict().items() if ".lora_" in n}

    pool = task.examples("train")
    traj, pre, _ = collect_batch(cfg, run.engine, pool, run.signals, run.filters, 0, outcome=run.outcome)
    scored = score_batch(run, traj, pre, 0)
    T = cfg.rollout.temperature
    with torch.no_grad():
        policy_lp0 = batch_logprobs(run.policy, traj, T, 64)
    mask = traj.response_mask
    # step 0: the reference's log-probs are the initial policy's, exactly
    assert torch.equal(scored.ref_logprobs[mask], policy_lp0[mask])
    adv = compute_advantages(cfg, scored.per_source, traj, values=scored.values)
    assert adv[traj.loss_mask].abs().max() > 0
    update_policy(run, traj, adv, scored, 0)

    after = run.policy.state_dict()
    for n, t in base_before.items():
        assert torch.equal(after[n], t), n
    moved = [n for n, t in adapters_before.items() if not torch.equal(after[n], t)]
    assert len(moved) == len(adapters_before)
    with torch.no_grad():
        policy_lp1 = batch_logprobs(run.policy, traj, T, 64)
        ref_lp1 = batch_logprobs(run.ref, traj, T, 64)
    assert torch.equal(ref_lp1[mask], scored.ref_logprobs[mask])          # the reference did not move
    assert (policy_lp1[mask] - policy_lp0[mask]).abs().max() > 1e-4        # the policy did
    # no second copy: what the reference reads is the policy's own base storage
    ref_ptrs = {p.data_ptr() for p in run.ref.parameters()}
    assert ref_ptrs == {p.data_ptr() for n, p in run.policy.named_parameters() if ".lora_" not in n}


def metrics(path):
    keys = ("loss/loss", "loss/kl", "loss/grad_norm", "reward/overlong/mean", "adv/abs_mean")
    return [(r["step"], *[r.get(k) for k in keys]) for r in read_log(path) if "loss/loss" in r]


def test_resume_is_exact_and_checkpoints_hold_adapters_only(tmp_path, sft_cache):
    full = make_cfg(tmp_path / "a", sft_cache)
    report = train(full, log=quiet)
    cut = make_cfg(tmp_path / "b", sft_cache)
    train(cut, stop_after=2, log=quiet)   # "killed" after the step-2 checkpoint
    again = train(cut, log=quiet)         # resumes at step 2: adapters, optimizer, schedule
    a, b = metrics(tmp_path / "a" / "metrics.jsonl"), metrics(tmp_path / "b" / "metrics.jsonl")
    assert a == b and len(a) == 4
    assert any(row[2] > 0 for row in a)   # the KL term is live: the policy left its reference
    timing = ("seconds_before", "seconds_after")
    assert {k: v for k, v in report["eval"].items() if k not in timing} == \
        {k: v for k, v in again["eval"].items() if k not in timing}
    policy_dir = tmp_path / "a" / "checkpoints" / "step_000004" / "policy"
    files = sorted(os.listdir(policy_dir))
    assert files == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"]

    # a resume with another LoRA config is refused like any other change, before any work
    other = make_cfg(tmp_path / "b", sft_cache, **{"model.lora.r": 8, "train.steps": 6})
    with pytest.raises(ValueError) as e:
        train(other, log=quiet)
    assert "model.lora.r 4 → 8" in str(e.value) and "\n" not in str(e.value)

    # finegrain eval on the finished run: the base from report.json, the adapters merged in
    from finegrain.cli import eval_cmd
    from finegrain.models.load import load_pretrained
    from finegrain.models.weights import engine_weights
    from finegrain.train.stages import with_lora

    model, _ = eval_cmd._load_policy(str(policy_dir), tmp_path / "a", "cpu")
    assert not lora.is_lora(model)
    base, _ = load_pretrained(report["init"]["path"], device="cpu")
    trained = with_lora(full, base, quiet)
    lora.load_adapters(trained, policy_dir)
    want = dict(engine_weights(trained))
    got = model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[n], t) for n, t in want.items())

    ap = argparse.ArgumentParser(prog="finegrain")
    eval_cmd.add_parser(ap.add_subparsers(dest="cmd"))
    m = eval_cmd.run(ap.parse_args(["eval", "--model", str(tmp_path / "a"), "--n-problems", "2", "--samples", "2",
                                    "--max-new-tokens", "12", "--out", str(tmp_path / "eval"), "--quiet"]))
    assert m["accuracy"]["n"] == 4 and (tmp_path / "eval" / "metrics.json").is_file()


def test_a_critic_beside_a_lora_policy_trains_from_the_base(tmp_path, sft_cache):
    cfg = make_cfg(tmp_path / "gae", sft_cache, **{"advantage.name": "gae", "critic.enabled": True,
                                                   "train.steps": 2, "loss.kl_coef": 0.0})
    train(cfg, log=quiet)
    rows = read_log(tmp_path / "gae" / "metrics.jsonl")
    logged = [r for r in rows if "critic/loss" in r]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(r["critic/loss"])) for r in logged)
    assert logged[0]["critic/value_mean"] != 0.0   # the critic trained (its head starts at 0)
    ck = tmp_path / "gae" / "checkpoints" / "step_000002"
    assert (ck / "critic" / "model.safetensors").is_file() and (ck / "policy" / "adapter_config.json").is_file()


def _config_with_lora(path, out_dir, cache):
    import yaml

    d = yaml.safe_load(open(path))
    ov = tiny_run_overrides(out_dir, cache, steps=2, **{"model.lora.enabled": True, "model.lora.r": 4,
                                                        "filters.outcome": "", "train.save_every": 1})
    cfg = from_dict(RunConfig, apply_overrides(d, ov))
    validate(cfg)
    return cfg


@pytest.mark.parametrize("config", ["arith_prime.yaml", "arith_r3.yaml"])
def test_rewards_on_a_second_model_run_beside_a_lora_policy(config, tmp_path, sft_cache):
    """PRIME's online PRM starts from a plain copy with the merged weights (trained and saved in
    full), and R3 probes the initial policy, which for LoRA is the adapter-disabled base: both run,
    checkpoint and resume."""
    from pathlib import Path

    cfg = _config_with_lora(Path(__file__).parents[2] / "configs" / config, tmp_path / "run", sft_cache)
    train(cfg, log=quiet)
    ck = tmp_path / "run" / "checkpoints" / "step_000002"
    assert (ck / "policy" / lora.ADAPTER_WEIGHTS).is_file()
    if config == "arith_prime.yaml":
        prm_dirs = [d for d in ck.iterdir() if d.is_dir() and d.name != "policy"]
        assert prm_dirs and all((d / "config.json").is_file() for d in prm_dirs)   # the PRM in full
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss/loss"])) for r in rows)
    cfg.train.steps = 3
    train(cfg, log=quiet)   # resumes from step 2
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
