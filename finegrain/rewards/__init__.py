"""Reward signals (``REWARDS``), the RewardOutput contract and the combiner.

Entries are classes built as ``cls.from_context(ctx, **kwargs)``; ``ctx`` (a ``RewardContext``)
carries the task, tokenizer and models a signal may need.
"""

from finegrain.rewards.base import REWARDS, RewardOutput, RewardSignal  # noqa: F401
from finegrain.rewards import length, online_prm, step_labels, verifiers  # noqa: E402,F401  (registers entries)
from finegrain.rewards import agents  # noqa: E402,F401  (registers entries)
from finegrain.rewards.functions import RewardFunction, register_reward_function  # noqa: E402,F401
from finegrain.rewards import random  # noqa: E402,F401  (registers the random baseline)
from finegrain.rewards import laser, pear  # noqa: E402,F401  (registers the length and entropy shaping rewards)
from finegrain.rewards import rlpr, sar  # noqa: E402,F401  (registers the policy-probability rewards RLPR and SAR)
from finegrain.rewards import r3, spae  # noqa: E402,F401  (registers the probe rewards of DRO and SPAE)
from finegrain.rewards import p2s  # noqa: E402,F401  (registers the P2S path-faithfulness reward)
from finegrain.rewards import disc_prm  # noqa: E402,F401  (registers the discriminative step-classifier PRM)
from finegrain.rewards import judge  # noqa: E402,F401  (registers the rubric / checklist judge)
from finegrain.rewards import think_rm  # noqa: E402,F401  (registers think_rm, Think-RM pairwise judge)
from finegrain.rewards import fgrlhf  # noqa: E402,F401  (registers fg_rlhf, Fine-Grained RLHF segment reward models)
