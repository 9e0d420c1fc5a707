"""Rollout engines (``ROLLOUT_ENGINES``): generate(examples, n, sampling, seed) -> Trajectory."""

from finegrain.rollout.base import ROLLOUT_ENGINES, SamplingParams, sample_seed  # noqa: F401
from finegrain.rollout import hf  # noqa: E402,F401  (registers entries)
