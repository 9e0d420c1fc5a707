"""Environments (``ENVIRONMENTS``), the episode runner and the one trajectory builder."""

from finegrain.envs.base import ENVIRONMENTS, Environment, Episode, Observation, Segment  # noqa: F401
from finegrain.envs import single_turn  # noqa: E402,F401  (registers entries)
from finegrain.envs import chat  # noqa: E402,F401  (chat-template tool calls)
from finegrain.envs import tool_use  # noqa: E402,F401  (registers entries)
from finegrain.envs import adapters  # noqa: E402,F401  (register_environment)
from finegrain.envs.builder import build_trajectory  # noqa: E402,F401
from finegrain.envs.rollout import Rollout, hf_rollout  # noqa: E402,F401
