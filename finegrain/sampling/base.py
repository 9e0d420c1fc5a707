"""The sampling contract: continue a batch of token prefixes, return new tokens and their log-probs.

Every generation in finegrain goes through a ``Sampler``: training rollouts (single- and
multi-turn, through the environment runner), ``finegrain eval``, best-of-N and the step searches.
Implementations are registered in ``SAMPLERS`` by name (``hf``; vLLM and an OpenAI-compatible
client plug in here), built as ``SAMPLERS.get(name)(model, tokenizer, **options)``.

A sampler works on token ids, not text, so that multi-turn rollouts can append observation tokens
between turns and the trainer sees exactly the tokens that were sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from finegrain.registry import Registry

SAMPLERS = Registry("sampler")

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prefix.

    temperature 0 means greedy decoding; top_p 1.0 and top_k 0 mean no truncation.
    A continuation ends after ``max_new_tokens`` new tokens, at the tokenizer's EOS, at any of
    ``stop_token_ids`` or once its text ends with any of ``stop_strings`` (the stop token or the
    tokens completing the stop string are kept in the continuation).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: bool = True  # False: the caller does not need them (search), so none are computed


@dataclass
class Completions:
    """``n`` continuations of each of P prefixes, flattened prefix-major (row r continues prefix r // n).

    token_ids: P·n lists of new token ids, each cut after its stop (EOS, stop token or the token
        completing a stop string); at most ``max_new_tokens`` long, at least 0.
    logprobs: P·n lists, same lengths: log softmax(logits / T) of each new token under the sampling
        policy (T = 1 when greedy), untruncated by top-p / top-k (what the PPO ratio is taken against);
        None per row when ``SamplingParams.logprobs`` is False.
    finish: P·n of "stop" (ended by EOS / a stop) or "length" (ran out of ``max_new_tokens``).
    """

    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float] | None] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not len(self.token_ids) == len(self.logprobs) == len(self.finish):
            raise ValueError(f"Completions: {len(self.token_ids)} token rows, {len(self.logprobs)} log-prob rows, "
                             f"{len(self.finish)} finish reasons")
        for i, (t, lp) in enumerate(zip(self.token_ids, self.logprobs)):
            if lp is not None and len(t) != len(lp):
                raise ValueError(f"Completions row {i}: {len(t)} tokens but {len(lp)} log-probs")


@runtime_checkable
class Sampler(Protocol):
    tokenizer: object

    @property
    def context_length(self) -> int | None:
        """Longest prefix + continuation the model takes (None if unknown)."""

    def sample(self, prefixes: Sequence[Sequence[int]], n: int, params: SamplingParams, seed: int) -> Completions:
        """``n`` continuations of every prefix; the same seed gives the same tokens."""

    def sync_weights(self) -> None:
        """Make sampling follow the policy's current weights (a no-op when the sampler holds the
        trained model itself, as the HF sampler does)."""


def sample_seed(base_seed: int, step: int, stream: int = 0) -> int:
    """The seed for one sampling call: a fixed function of (run seed, step, stream).

    stream separates independent draws at the same step (0 = training rollouts, 1 = eval, 2+ =
    refills of a filtered batch). Derived, never read from the surroundings, so a resumed run
    samples the same tokens as an uninterrupted one.

    >>> sample_seed(0, 3) == sample_seed(0, 3) and sample_seed(0, 3) != sample_seed(0, 4)
    True
    """
    return (base_seed * 1_000_003 + step * 9_176 + stream * 7_919_3) % (2**31 - 1)
