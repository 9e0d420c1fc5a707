"""Demo-style configs for the arith testbed regimes (``finegrain.tasks.regimes``, docs/testbed.md).

``regime_config(regime, method)`` is the demo config of ``method`` (``finegrain.recipes``) with
the regime's task kwargs and the run settings that must change with them. The shipped
``configs/regimes/<regime>_<method>.yaml`` are its dumps for every method of ``METHODS``.

>>> cfg = regime_config("long_chains", "step_oracle")
>>> cfg["task"]["kwargs"]["max_steps"], cfg["rollout"]["max_new_tokens"], cfg["train"]["out_dir"]
(16, 160, 'runs/regime-long_chains-step_oracle')
>>> [r["name"] for r in cfg["rewards"]]
['verifier', 'step_labels']
"""

from __future__ import annotations

import copy

import finegrain.recipes as recipes  # attribute access at call time: safe to import from recipes/__init__
from finegrain.tasks.regimes import REGIMES

# Methods whose demo config trains on arith (the agent demos use other tasks).
METHODS = ("grpo", "rloo", "prime", "step_oracle")

# What changes with each regime besides task.kwargs. max_new_tokens (rollout and eval; one token
# per character) covers the longest gold solution + 8 and the longest SFT trace of the regime's
# corpus + 1 (EOS); tests/tasks/test_regimes.py checks both. The demo's 48 does for the 2–4
# operation regimes (gold ≤ 37, SFT traces ≤ 43 characters); long chains have gold ≤ 133 and SFT
# traces ≤ 152. sft.n_examples for long chains keeps the demo's SFT token budget (~1.4M tokens:
# 10,000 traces of ~140 characters against the demo's 30,000 of ~46).
SETTINGS = {
    "long_chains": {"max_new_tokens": 160, "sft": {"n_examples": 10000, "flawed_fraction": 0.3}},
    # no random slips: the systematic * rule is the only flaw the warm start learns
    "skill_gap": {"max_new_tokens": 48, "sft": {"n_examples": 30000, "flawed_fraction": 0.0}},
    # the demo's slips kept, so the miracle traces are the only difference from the demo corpus
    "miracle": {"max_new_tokens": 48, "sft": {"n_examples": 30000, "flawed_fraction": 0.3}},
    # gold <= 69 characters, gap traces a little longer. 30,000 traces of ~2x the demo's length:
    # twice its SFT token budget, because with 15,000 (the demo's budget) the warm start solved
    # only 2.6% of held-out problems (sampled), below the 5-30% this regime is meant to start at
    "skill_gap_long": {"max_new_tokens": 96, "sft": {"n_examples": 30000, "flawed_fraction": 0.0}},
}


def regime_config(regime: str, method: str = "grpo") -> dict:
    """The full run config (a plain dict, as ``finegrain.recipes.demo_*`` return) of ``method``
    on ``regime``: the demo config of ``method`` with ``task.kwargs`` set to the regime's,
    ``rollout``/``eval.max_new_tokens`` and ``sft.n_examples``/``flawed_fraction`` from
    ``SETTINGS``, and ``train.out_dir`` ``runs/regime-<regime>-<method>``."""
    if regime not in REGIMES:
        raise ValueError(f"regime: expected one of {', '.join(REGIMES)}, got {regime!r}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    cfg = recipes.DEMO_METHODS[method]()
    settings = SETTINGS[regime]
    cfg["task"] = {"name": "arith", "kwargs": copy.deepcopy(REGIMES[regime].task_kwargs)}
    cfg["sft"].update(settings["sft"])
    cfg["rollout"]["max_new_tokens"] = settings["max_new_tokens"]
    cfg["eval"]["max_new_tokens"] = settings["max_new_tokens"]
    cfg["train"]["out_dir"] = f"runs/regime-{regime}-{method}"
    cfg["train"].update(steps=100, eval_every=25, save_every=25)  # a regime run is a study, not the 5-minute demo
    return cfg
