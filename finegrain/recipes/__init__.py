"""Built-in configs as plain dicts (the demo uses them; configs/*.yaml are their dumps)."""

from __future__ import annotations


def demo_grpo() -> dict:
    """Outcome-only GRPO on arith: the CPU demo's default."""
    return {
        "task": {"name": "arith", "kwargs": {"min_steps": 2, "max_steps": 4}},
        "model": {"family": "qwen2", "size": "tiny", "device": "cpu"},
        "sft": {"n_examples": 30000, "flawed_fraction": 0.3, "epochs": 1, "batch_size": 64, "lr": 3e-3},
        "rollout": {"prompts_per_step": 16, "group_size": 8, "temperature": 1.0, "max_new_tokens": 48},
        "rewards": [{"name": "verifier", "weight": 1.0}],
        "advantage": {"name": "grpo"},
        # PRIME's online accuracy filter, shared by every demo method so that they differ only in
        # rewards and credit; groups that are all right or all wrong teach GRPO/RLOO nothing anyway
        "filters": {"filters": [{"name": "accuracy_band", "kwargs": {"low": 0.2, "high": 0.8}}],
                    "oversample": 1.5, "max_refills": 2},
        "loss": {"name": "ppo_clip", "aggregation": "token-mean"},
        "optim": {"lr": 1e-4, "grad_clip": 1.0},
        "eval": {"n_problems": 200, "samples": 4, "temperature": 1.0, "max_new_tokens": 48},
        "train": {"steps": 100, "eval_every": 25, "save_every": 25, "out_dir": "runs/demo-grpo"},
    }


def demo_rloo() -> dict:
    cfg = demo_grpo()
    cfg["advantage"] = {"name": "rloo"}
    cfg["train"]["out_dir"] = "runs/demo-rloo"
    return cfg


def demo_prime() -> dict:
    """PRIME: verifier + online implicit PRM, per-source leave-one-out returns, whitened; PRIME's
    accuracy-band filter. Differs from demo_grpo only in rewards and credit."""
    cfg = demo_grpo()
    cfg["rewards"] = [{"name": "verifier", "weight": 1.0},
                      {"name": "implicit_prm", "weight": 1.0,
                       "kwargs": {"beta": 0.05, "update": "after", "loss": "ce", "lr": 2e-4, "ref": "initial"}}]
    cfg["advantage"] = {"per_source": {
        "verifier": {"name": "prime_loo_exact", "coef": 1.0, "kwargs": {"reward_at": "last"}},
        "implicit_prm": {"name": "prime_rloo", "coef": 1.0, "kwargs": {"reward_at": "token"}}}, "whiten": True}
    cfg["train"]["out_dir"] = "runs/demo-prime"
    return cfg


def demo_step_oracle() -> dict:
    """Exact process rewards from the task's step labels (−1 per wrong step) next to the verifier,
    per-source leave-one-out credit: the upper bound a learned PRM could reach on this task."""
    cfg = demo_grpo()
    cfg["rewards"] = [{"name": "verifier", "weight": 1.0}, {"name": "step_labels", "weight": 0.5}]
    cfg["advantage"] = {"per_source": {
        "verifier": {"name": "prime_loo_exact", "coef": 1.0, "kwargs": {"reward_at": "last"}},
        "step_labels": {"name": "prime_loo_exact", "coef": 1.0, "kwargs": {"reward_at": "step_end"}}}, "whiten": True}
    cfg["train"]["out_dir"] = "runs/demo-step_oracle"
    return cfg


def demo_agent() -> dict:
    """A tool-using agent: multi-hop lookup questions answered by calling a ``lookup`` tool over
    several turns (the ``tool_use`` environment); tool outputs are never trained on. Outcome-only
    GRPO with the task verifier; the SFT traces include deliberately flawed tool use.

    Not yet measured end to end (time from a cold cache, held-out gain): see docs/benchmarks.md
    before relying on its settings."""
    cfg = demo_grpo()
    cfg["task"] = {"name": "lookup", "kwargs": {}}
    cfg["sft"] = {"n_examples": 3800, "flawed_fraction": 0.3, "epochs": 2, "batch_size": 32, "lr": 3e-3}
    cfg["rollout"] = {"prompts_per_step": 16, "group_size": 8, "temperature": 1.0, "max_new_tokens": 48,
                      "env": "tool_use", "max_turns": 6}
    cfg["eval"] = {"n_problems": 200, "samples": 4, "temperature": 1.0, "max_new_tokens": 48}
    cfg["train"]["out_dir"] = "runs/demo-agent"
    return cfg


DEMO_METHODS = {"grpo": demo_grpo, "rloo": demo_rloo, "prime": demo_prime, "step_oracle": demo_step_oracle,
                "agent": demo_agent}
