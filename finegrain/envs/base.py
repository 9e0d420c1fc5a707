"""The environment contract (OpenEnv-shaped) and the episode record the runner fills.

An environment is one episode's world: ``reset(seed, **task_example) -> Observation`` starts it
(the observation's text is the prompt), ``step(action) -> Observation`` answers the model's turn.
``Observation.reward`` is the reward *of that turn* (None = not applicable; outcome and
process rewards also come from reward signals, see ``finegrain.rewards``); ``done`` ends the
episode. Environments are registered in ``ENVIRONMENTS`` as factories called once per episode:
``ENVIRONMENTS.get(name)(task=task, **kwargs) -> Environment``.

Adapters (``finegrain.envs.adapters``) run environments written for OpenEnv, TRL's
``environment_factory`` and gymnasium unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from finegrain.registry import Registry

ENVIRONMENTS = Registry("environment")


@dataclass
class Observation:
    """What the environment answers.

    text: what the model sees next: the prompt after ``reset``; a tool's output (or an error
        message) after ``step``; '' for nothing.
    done: the episode is over (no further turn is sampled).
    reward: the turn reward of the action just taken; None = not applicable (not zero).
    metadata: anything for logging and reward signals (tool name, error kind, ...).
    """

    text: str = ""
    done: bool = False
    reward: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    def reset(self, seed: int | None = None, **task_example: Any) -> Observation:
        """Start an episode for one task example (its fields: id, prompt, answer, solution, meta)."""

    def step(self, action: str) -> Observation:
        """The model's turn (decoded text) -> the environment's answer."""


@dataclass
class Segment:
    """A run of response tokens from one source within one turn.

    sampled segments are the model's own tokens (trained on, with behaviour log-probs);
    observation segments are the environment's tokens (never trained on, no log-probs).
    """

    token_ids: list[int]
    turn: int
    sampled: bool
    logprobs: list[float] | None = None  # sampled segments only, one per token


@dataclass
class Episode:
    """One rollout: the prompt, the response as segments, and what the environment said.

    turn_rewards[k] is the reward of turn k (None = not applicable); truncated is True when the
    episode stopped on a limit (tokens, turns, max_new_tokens) rather than by ``done`` or EOS.
    """

    example: Any
    group: int
    prompt_text: str
    prompt_ids: list[int]
    segments: list[Segment] = field(default_factory=list)
    turn_rewards: list[float | None] = field(default_factory=list)
    turn_metadata: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    truncated: bool = False

    @property
    def response_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.token_ids]

    @property
    def num_turns(self) -> int:
        return len(self.turn_rewards)


def example_fields(example) -> dict[str, Any]:
    """The keyword arguments ``reset`` receives for a task example."""
    return {"id": example.id, "prompt": example.prompt, "answer": example.answer, "solution": example.solution,
            "meta": example.meta}
