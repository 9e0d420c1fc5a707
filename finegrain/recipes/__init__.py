"""Built-in configs as plain dicts (the demo uses them). ``configs/demo_cpu.yaml`` is the dump of
``demo_grpo``; ``configs/regimes/skill_gap_*.yaml`` hold the same runs under the regime's name
with 100 steps. ``configs/arith_*.yaml`` are the earlier demo on plain arith (random slips), kept
as the baseline regime of docs/testbed.md."""

from __future__ import annotations

import copy

from finegrain.tasks.regimes import REGIMES


def demo_grpo() -> dict:
    """Outcome-only GRPO on arith's ``skill_gap`` regime: the CPU demo's default.

    The warm start learns one operation wrong (80% of its ``*`` lines written as ``(a+1)*b``,
    docs/testbed.md), so it is wrong greedily on most problems with a ``*`` (held-out greedy
    accuracy 0.29) and RL has a skill to teach, not only sampling slips to remove: greedy
    accuracy reached 0.74-0.81 after 40 steps and 0.77-0.87 after 50 over 3 seeds
    (docs/testbed.md). The earlier demo
    on plain arith started at greedy 0.96 and could only sharpen sampling."""
    return {
        "task": {"name": "arith", "kwargs": copy.deepcopy(REGIMES["skill_gap"].task_kwargs)},
        "model": {"family": "qwen2", "size": "tiny", "device": "cpu"},
        "sft": {"n_examples": 30000, "flawed_fraction": 0.0, "epochs": 1, "batch_size": 64, "lr": 3e-3},
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
        # 40 steps and no mid-run evaluation keep the cold demo near 5 minutes on 2 cores
        "train": {"steps": 40, "eval_every": 0, "save_every": 20, "out_dir": "runs/demo-grpo"},
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
    """A tool-using agent: multi-hop lookup questions (2–4 hops) answered by calling a ``lookup``
    tool over several turns (the ``tool_use`` environment); tool outputs are never trained on.
    Outcome-only GRPO with the task verifier; 30% of the SFT traces are deliberately flawed (wrong
    tool, redundant call, wrong argument, answer without looking up, wrong answer), so the warm
    start answers right greedily but often not when sampling, and RL has those habits to remove.

    Sized for the 10-minute CPU demo (docs/benchmarks.md, "Agent demo"): the tiny model needs
    ~500 small SFT steps to learn to copy entity names from tool results into the next call
    (before that it guesses names and solves ~1%); batches of 16 get there in about half the
    compute of batches of 32. No accuracy-band filter: with a warm start near 50% most groups are
    mixed anyway, and the filter's refills would cost generation time."""
    cfg = demo_grpo()
    cfg["task"] = {"name": "lookup", "kwargs": {}}
    cfg["sft"] = {"n_examples": 3868, "flawed_fraction": 0.3, "epochs": 2, "batch_size": 16, "lr": 3e-3,
                  "warmup_steps": 20}
    cfg["rollout"] = {"prompts_per_step": 8, "group_size": 8, "temperature": 1.0, "max_new_tokens": 48,
                      "env": "tool_use", "max_turns": 6}
    cfg["filters"] = {"filters": []}
    cfg["optim"] = {"lr": 3e-4, "grad_clip": 1.0}
    cfg["eval"] = {"n_problems": 200, "samples": 2, "temperature": 1.0, "max_new_tokens": 48}
    cfg["train"] = {"steps": 20, "eval_every": 0, "save_every": 10, "out_dir": "runs/demo-agent"}
    return cfg


def demo_agent_igpo() -> dict:
    """``demo_agent`` with IGPO: information-gain turn rewards (the policy's probability of the
    gold answer after each turn, docs/algorithms/igpo.md) next to the verifier, IGPO's turn
    advantage."""
    cfg = demo_agent()
    cfg["rewards"] = [{"name": "info_gain", "weight": 1.0, "kwargs": {"kind": "prob_diff"}},
                      {"name": "verifier", "weight": 1.0}]
    cfg["advantage"] = {"name": "igpo", "kwargs": {"norm_mode": "separate"}}
    cfg["train"]["out_dir"] = "runs/demo-agent_igpo"
    return cfg


def demo_agent_matchtir() -> dict:
    """``demo_agent`` with MatchTIR: tool calls matched to the gold trace as turn rewards
    (optimal assignment, docs/algorithms/matchtir.md) next to the verifier, the dual-level
    trajectory + turn advantage."""
    cfg = demo_agent()
    cfg["rewards"] = [{"name": "tool_call_match", "weight": 1.0, "kwargs": {"assignment": "optimal"}},
                      {"name": "verifier", "weight": 1.0}]
    cfg["advantage"] = {"name": "matchtir", "kwargs": {"lam": 0.9}}
    cfg["train"]["out_dir"] = "runs/demo-agent_matchtir"
    return cfg


DEMO_METHODS = {"grpo": demo_grpo, "rloo": demo_rloo, "prime": demo_prime, "step_oracle": demo_step_oracle,
                "agent": demo_agent, "agent_igpo": demo_agent_igpo, "agent_matchtir": demo_agent_matchtir}
