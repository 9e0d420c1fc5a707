"""Rollout engines: ``generate(examples, n, sampling, seed) -> Trajectory``, registered by name."""

from __future__ import annotations

from dataclasses import dataclass

from finegrain.registry import Registry

ROLLOUT_ENGINES = Registry("rollout engine")


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy decoding; top_p 1.0 and top_k 0 mean no truncation."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64


def sample_seed(base_seed: int, step: int, stream: int = 0) -> int:
    """The seed for one generate call: a fixed function of (run seed, step, stream).

    stream separates independent draws at the same step (0 = training rollouts, 1 = eval, 2+ =
    refills of a filtered batch). Derived, never read from the surroundings, so a resumed run
    samples the same tokens as an uninterrupted one.

    >>> sample_seed(0, 3) == sample_seed(0, 3) and sample_seed(0, 3) != sample_seed(0, 4)
    True
    """
    return (base_seed * 1_000_003 + step * 9_176 + stream * 7_919_3) % (2**31 - 1)
