"""``Rollout``: a sampler plus an environment = batches of episodes as Trajectories.

The trainer and ``finegrain eval`` hold one ``Rollout``; ``generate(examples, n, sampling, seed)``
runs ``n`` episodes per example through ``run_episodes`` and assembles them with the one
trajectory builder.
"""

from __future__ import annotations

from typing import Sequence

from finegrain.envs.base import ENVIRONMENTS
from finegrain.envs.builder import build_trajectory
from finegrain.envs.runner import TextRenderer, run_episodes
from finegrain.sampling.base import Sampler, SamplingParams
from finegrain.tasks.base import Example
from finegrain.trajectory import Trajectory


class Rollout:
    """Episodes of environment ``env`` sampled with ``sampler``.

    Args:
        sampler: any ``Sampler`` (it holds the model and tokenizer).
        segmenter: step segmenter that fills ``step_ids``.
        env: name in ``ENVIRONMENTS``; ``env_kwargs`` go to its constructor (with ``task``).
        max_turns, max_total_tokens: per-episode limits (response tokens, observations included);
            defaults: the environment's own (``max_turns`` attribute) else 1, and
            max_turns × max_new_tokens.
        use_chat_template: wrap prompts in the tokenizer's chat template when it has one.
    """

    def __init__(self, sampler: Sampler, *, segmenter: str = "newline", env: str = "single_turn",
                 env_kwargs: dict | None = None, task=None, max_turns: int | None = None,
                 max_total_tokens: int | None = None, use_chat_template: bool = True, renderer=None):
        self.sampler, self.segmenter = sampler, segmenter
        self.env_name, self.env_kwargs, self.task = env, dict(env_kwargs or {}), task
        self.env_factory = ENVIRONMENTS.get(env)
        probe = self.env_factory(task=task, **self.env_kwargs)
        self.max_turns = max_turns or getattr(probe, "max_turns", 1)
        self.stop_strings = tuple(getattr(probe, "stop_strings", ()))
        self.max_total_tokens = max_total_tokens
        make_renderer = getattr(probe, "make_renderer", None)  # e.g. chat-template tool calls need the tokenizer
        self.renderer = (renderer or (make_renderer(sampler.tokenizer) if callable(make_renderer) else None)
                         or getattr(probe, "renderer", None) or TextRenderer(sampler.tokenizer, use_chat_template))

    @property
    def tokenizer(self):
        return self.sampler.tokenizer

    @property
    def model(self):
        return getattr(self.sampler, "model", None)

    @property
    def context_length(self) -> int | None:
        return self.sampler.context_length

    def prompt_fits(self, examples: Sequence[Example], max_new_tokens: int) -> list[bool]:
        """Whether each example's rendered prompt plus ``max_new_tokens`` fits the context."""
        ctx = self.context_length
        if ctx is None or not examples:
            return [True] * len(examples)
        lengths = [len(self.renderer.prompt(e.prompt)[1]) for e in examples]
        return [n + max_new_tokens <= ctx for n in lengths]

    def generate(self, examples: Sequence[Example], n: int, sampling: SamplingParams, seed: int,
                 group_offset: int = 0) -> Trajectory:
        """``n`` episodes for each example; rows of example i get group id ``group_offset + i``."""
        self._check_context(examples, sampling)
        episodes = run_episodes(self.sampler, lambda: self.env_factory(task=self.task, **self.env_kwargs), examples,
                                n, sampling, seed, renderer=self.renderer, group_offset=group_offset,
                                max_turns=self.max_turns, max_total_tokens=self.max_total_tokens,
                                stop_strings=self.stop_strings)
        device = getattr(self.model, "device", None)
        return build_trajectory(episodes, self.tokenizer, self.segmenter, device=device)

    def _check_context(self, examples: Sequence[Example], sampling: SamplingParams) -> None:
        ctx = self.context_length
        if ctx is None:
            return
        for e, ok in zip(examples, self.prompt_fits(examples, sampling.max_new_tokens)):
            if not ok:
                n = len(self.renderer.prompt(e.prompt)[1])
                raise ValueError(f"example '{e.id}': prompt of {n} tokens plus max_new_tokens={sampling.max_new_tokens} "
                                 f"exceeds the model's context of {ctx} tokens")


def hf_rollout(model, tokenizer, *, segmenter: str = "newline", max_batch: int = 256, use_chat_template: bool = True,
               env: str = "single_turn", env_kwargs: dict | None = None, task=None, **sampler_kwargs) -> Rollout:
    """A Rollout that samples with the Hugging Face sampler on ``model`` itself."""
    from finegrain.sampling.hf import HFSampler

    sampler = HFSampler(model, tokenizer, max_batch=max_batch, **sampler_kwargs)
    return Rollout(sampler, segmenter=segmenter, env=env, env_kwargs=env_kwargs, task=task,
                   use_chat_template=use_chat_template)
