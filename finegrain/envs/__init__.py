"""Environments (``ENVIRONMENTS``), the episode runner and the one trajectory builder."""

from finegrain.envs.base import ENVIRONMENTS, Environment, Episode, Observation, Segment  # noqa: F401
from finegrain.envs import single_turn  # noqa: E402,F401  (registers entries)
from finegrain.envs.builder import build_trajectory  # noqa: E402,F401
from finegrain.envs.rollout import Rollout, hf_rollout  # noqa: E402,F401
