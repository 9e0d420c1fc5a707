"""``single_turn``: the prompt, one sampled response, done (finegrain's behaviour before environments)."""

from __future__ import annotations

from finegrain.envs.base import ENVIRONMENTS, Observation


@ENVIRONMENTS.register("single_turn", multi_turn=False)
class SingleTurn:
    """reset -> the example's prompt; step(response) -> done, reward None (rewards come from the
    reward signals, e.g. the task verifier)."""

    def __init__(self, *, task=None):
        self.task = task

    def reset(self, seed: int | None = None, **example) -> Observation:
        return Observation(text=example["prompt"])

    def step(self, action: str) -> Observation:
        return Observation(done=True)
