"""The shipped LASER-D and PEAR configs: each loads, validates, differs from arith_grpo.yaml only in
its rewards (and the outcome the filters read), and trains end to end for two micro steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from finegrain.config import load_config, to_dict, validate
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from tests.conftest import tiny_run_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SIGNALS = {"laser_d": "arith_laser_d.yaml", "pear": "arith_pear.yaml"}


@pytest.mark.parametrize("signal", SIGNALS)
def test_config_loads_validates_and_only_swaps_the_reward(signal):
    cfg = load_config(CONFIGS / SIGNALS[signal])
    validate(cfg)
    assert [(r.name, r.weight) for r in cfg.rewards] == [("verifier", 0.0), (signal, 1.0)]
    # the accuracy-band filter keeps judging groups by verifier accuracy, not by the shaped reward
    assert cfg.filters.outcome == "verifier" and cfg.filters.filters
    mine, base = to_dict(cfg), to_dict(load_config(CONFIGS / "arith_grpo.yaml"))
    for d in (mine, base):
        d.pop("rewards"), d["filters"].pop("outcome"), d["train"].pop("out_dir")
    assert mine == base


# kwargs that make the signal do its work within two micro steps: LASER-D refreshes its targets
# after every batch; nothing else is changed from the shipped config
RUN_KWARGS = {"laser_d": {"monitor_every": 1}, "pear": {}}


@pytest.mark.parametrize("signal", SIGNALS)
def test_tiny_run_end_to_end(tmp_path, sft_cache, signal):
    overrides = tiny_run_overrides(tmp_path / "run", sft_cache, steps=2, **{"train.save_every": 0})
    overrides += [f"rewards.1.kwargs.{k}={v}" for k, v in RUN_KWARGS[signal].items()]
    cfg = load_config(CONFIGS / SIGNALS[signal], overrides)
    validate(cfg)
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/loss"]) and math.isfinite(r[f"reward/{signal}/mean"]) for r in rows)
    if signal == "laser_d":
        for r in rows:  # targets within (0, max_new_tokens = 24]; the grid is 6, 7, …, 24
            assert all(0 < r[f"reward/laser_d/target_{b}"] <= 24 for b in ("low", "medium", "high"))
            assert 0 <= r["reward/laser_d/within_target"] <= 1
    else:
        assert all(r["reward/pear/h_think"] > 0 for r in rows)  # a micro model is far from deterministic
        assert all(0 <= r["reward/pear/marker_found"] <= 1 for r in rows)
