"""A random reward: the baseline every other signal should beat, in training and at test time.

r_i ~ U[0, 1), independent across responses, drawn from ``numpy.random.default_rng(seed)``.
In training it is a reward that carries no information about correctness (useful to check how
much of an improvement a real signal owes to its information, and not to the mere presence of a
reward); in ``finegrain eval`` best-of-N with it is a uniform pick, so its expected curve is flat
at the mean accuracy (``finegrain.eval.selection.random_curve``), and one run is one draw.

Randomness is passed in: ``seed`` defaults to ``ctx.cfg.train.seed`` (in ``finegrain eval``,
``--seed``). The generator is created once, so the values depend on the seed and on the order and
sizes of the batches scored. The generator's state is checkpointed (``stateful``: the trainer
saves ``state_dict()`` with every checkpoint), so a resumed run continues the same stream.

>>> from types import SimpleNamespace
>>> traj = SimpleNamespace(batch_size=3, response_ids=torch.zeros(3, 1))
>>> a, b = RandomReward(seed=0)(traj), RandomReward(seed=0)(traj)
>>> torch.equal(a.values, b.values), bool(((0 <= a.values) & (a.values < 1)).all()), a.level
(True, True, 'outcome')
"""

from __future__ import annotations

import json

import numpy as np
import torch

from finegrain.rewards.base import REWARDS, RewardOutput


@REWARDS.register("random", level="outcome", bounds={"seed": "[0, inf)"}, stateful=True,
                  vote="identity", center=0.5, search_value="last")
class RandomReward:
    """r_i ~ U[0, 1) per response, from ``numpy.random.default_rng(seed)`` (level 'outcome')."""

    name = "random"
    level = "outcome"

    def __init__(self, *, seed: int):
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_context(cls, ctx, *, seed: int | None = None):
        return cls(seed=ctx.cfg.train.seed if seed is None else seed)

    def state_dict(self) -> dict:
        """The generator's state as JSON text (its 128-bit integers survive ``weights_only`` loading)."""
        return {"bit_generator": json.dumps(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.rng.bit_generator.state = json.loads(state["bit_generator"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"random.load_state_dict: expected {{'bit_generator': <JSON state>}}, got {e}") from None

    def __call__(self, traj) -> RewardOutput:
        values = torch.tensor(self.rng.random(traj.batch_size), dtype=torch.float32,
                              device=traj.response_ids.device)  # (B,)
        return RewardOutput(values=values, mask=torch.ones_like(values, dtype=torch.bool), level="outcome")
