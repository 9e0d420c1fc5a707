"""PPO with a critic end to end on CPU: the critic model, its config checks, its training, and an
exact resume of a run with it (configs/arith_ppo_gae.yaml on a micro model)."""

from pathlib import Path

import pytest
import torch

from finegrain.config import load_config, validate
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.models.value import Critic, ValueModel
from finegrain.train.checkpoint import latest_checkpoint
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from tests.conftest import tiny_run_overrides

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "arith_ppo_gae.yaml"
quiet = lambda s: None  # noqa: E731


def ppo_cfg(out_dir, cache, **extra):
    return load_config(CONFIG, tiny_run_overrides(out_dir, cache, **extra))


def rows(path):
    return [r for r in read_log(path) if "loss/loss" in r]


def critic_keys(row):
    return {k: v for k, v in row.items() if k.startswith(("critic/", "loss/", "adv/"))}


# ------------------------------------------------------------------------------ the value model

def _policy():
    tok = char_tokenizer("0123456789+=\n")
    return tiny_causal_lm(tok, size="micro"), tok


def test_value_model_shapes_head_and_independent_copy():
    policy, tok = _policy()
    critic = Critic.build("policy", policy, tok, lr=1e-3)
    ids = torch.randint(0, len(tok), (3, 9))
    am = torch.ones(3, 9, dtype=torch.bool)
    am[0, :3] = False  # left padding
    v = critic.model(ids, am, 4)
    assert v.shape == (3, 4) and v.dtype == torch.float32
    assert torch.equal(v, torch.zeros(3, 4))  # zero-initialised head
    ours = {p.data_ptr() for p in critic.model.parameters()}
    assert not ours & {p.data_ptr() for p in policy.parameters()}  # a copy: shares nothing with the policy
    tiny = Critic.build("tiny", policy, tok, lr=1e-3, size="micro")
    assert tiny.model(ids, am, 4).shape == (3, 4)
    with pytest.raises(ValueError, match="critic.init: expected 'policy' or 'tiny'"):
        Critic.build("shared", policy, tok, lr=1e-3)


def test_value_model_save_load_roundtrip(tmp_path):
    policy, tok = _policy()
    model = ValueModel.from_policy(policy)
    with torch.no_grad():
        model.value_head.weight.normal_(generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, len(tok), (2, 7), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 7, dtype=torch.bool)
    model.save_pretrained(tmp_path / "critic")
    assert {p.name for p in (tmp_path / "critic").iterdir()} == {"config.json", "model.safetensors"}
    again = ValueModel.from_pretrained(tmp_path / "critic")
    assert torch.equal(again(ids, am, 3), model(ids, am, 3))
    fresh = ValueModel.from_policy(policy)
    fresh.load_weights(tmp_path / "critic")
    assert torch.equal(fresh(ids, am, 3), model(ids, am, 3))


# ------------------------------------------------------------------------------ config

def test_config_ties_the_critic_to_an_estimator_that_reads_values(tmp_path, sft_cache):
    cfg = ppo_cfg(tmp_path / "c", sft_cache)
    cfg.critic.enabled = False
    with pytest.raises(ValueError, match=r"^advantage.name: 'gae' reads a critic's values; set critic.enabled=true"):
        validate(cfg)
    cfg.critic.enabled, cfg.advantage.name, cfg.advantage.kwargs = True, "reinforce_pp", {}
    with pytest.raises(ValueError, match=r"^critic.enabled: no advantage estimator reads the critic's values"):
        validate(cfg)
    cfg.advantage.per_source = {"verifier": {"name": "gae"}, "step_labels": {"name": "gae"},
                                "kl_penalty": {"name": "gae"}}
    with pytest.raises(ValueError, match=r"^advantage.per_source.verifier.name: 'gae' reads the critic's values"):
        validate(cfg)


# ------------------------------------------------------------------------------ training and resume

def test_critic_trains_and_its_metrics_are_logged(tmp_path, sft_cache):
    cfg = ppo_cfg(tmp_path / "run", sft_cache, **{"train.steps": 2, "train.save_every": 0})
    train(cfg, log=quiet)
    logged = rows(tmp_path / "run" / "metrics.jsonl")
    assert len(logged) == 2
    for key in ("critic/loss", "critic/clipfrac", "critic/explained_var", "critic/value_mean",
                "critic/return_mean", "critic/grad_norm"):
        assert all(key in r and torch.isfinite(torch.tensor(r[key])) for r in logged), key
    assert logged[0]["critic/value_mean"] != 0.0  # 2 epochs × 2 minibatches: the head moved within step 1
    ck = latest_checkpoint(tmp_path / "run")
    saved = ValueModel.from_pretrained(ck / "critic")
    start = Critic.build("policy", *_warm_policy(cfg), lr=1e-3).model
    moved = [(a - b).abs().max().item() for a, b in zip(saved.parameters(), start.parameters())]
    assert moved[-1] > 0 and max(moved[:-2]) > 0  # the head and the backbone both changed


def _warm_policy(cfg):
    """The warm-started policy the run began from (cached by the session's SFT)."""
    from finegrain.train.stages import build_policy, task_for

    model, tok, _ = build_policy(cfg, task_for(cfg), quiet)
    return model, tok


def test_kill_after_step_2_and_resume_equals_the_uninterrupted_run(tmp_path, sft_cache):
    extra = {"train.steps": 4}
    full = ppo_cfg(tmp_path / "a", sft_cache, **extra)
    train(full, log=quiet)
    again = ppo_cfg(tmp_path / "b", sft_cache, **extra)
    train(again, stop_after=2, log=quiet)  # "killed" after the step-2 checkpoint
    assert (latest_checkpoint(tmp_path / "b") / "critic" / "model.safetensors").is_file()
    train(again, log=quiet)  # resumes at step 2: policy, critic and both optimizers from the checkpoint
    a, b = rows(tmp_path / "a" / "metrics.jsonl"), rows(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert [critic_keys(r) for r in a] == [critic_keys(r) for r in b]
    ca, cb = (ValueModel.from_pretrained(latest_checkpoint(tmp_path / d) / "critic") for d in ("a", "b"))
    assert all(torch.equal(p, q) for p, q in zip(ca.parameters(), cb.parameters()))
