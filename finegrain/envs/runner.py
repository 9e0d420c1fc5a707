"""Run episodes: sample a turn for every live episode in one sampler call, let each environment
answer, append its observation (untrained tokens), repeat until every episode is done or stopped.

    reset ─► [ sample turn k (batched) ─► env.step(text) ─► observation tokens ] × turns ─► Episode

Turn 0 of every episode is one batched ``sampler.sample`` call over all prompts with the call's
seed, so a single-turn rollout samples exactly the tokens the engine sampled before environments.
An episode ends when its environment says ``done``, when the model emits EOS, or on a limit
(``max_turns``, ``max_total_tokens`` response tokens, or a turn that ran out of
``max_new_tokens`` without a stop), which marks it truncated.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

from finegrain.envs.base import Environment, Episode, Segment, example_fields
from finegrain.sampling.base import FINISH_LENGTH, Sampler, SamplingParams, sample_seed


def render_prompt(tokenizer, text: str, use_chat_template: bool = True) -> str:
    """The prompt string fed to the model: the chat template when the tokenizer has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


class TextRenderer:
    """Prompts through the chat template (when the tokenizer has one and it is wanted);
    observations as their plain text's tokens."""

    def __init__(self, tokenizer, use_chat_template: bool = True):
        self.tokenizer, self.use_chat_template = tokenizer, use_chat_template

    def prompt(self, text: str) -> tuple[str, list[int]]:
        rendered = render_prompt(self.tokenizer, text, self.use_chat_template)
        return rendered, self.tokenizer(rendered, add_special_tokens=True)["input_ids"]

    def observation(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def run_episodes(sampler: Sampler, make_env: Callable[[], Environment], examples: Sequence, n: int,
                 params: SamplingParams, seed: int, *, renderer=None, group_offset: int = 0, max_turns: int = 1,
                 max_total_tokens: int | None = None, stop_strings: Sequence[str] = ()) -> list[Episode]:
    """``n`` episodes for each example, episodes of example i in group ``group_offset + i``.

    Returns the episodes example-major (episode r belongs to example r // n), as the sampler
    orders rows. ``stop_strings`` end a turn (e.g. the end of a tool call) in addition to EOS.
    """
    tok = sampler.tokenizer
    renderer = renderer or TextRenderer(tok)
    envs, episodes = [], []
    for i, ex in enumerate(examples):
        for j in range(n):
            env = make_env()
            obs = env.reset(seed=sample_seed(seed, i, j), **example_fields(ex))
            tools = getattr(env, "tool_schemas", None)  # this episode's tools, for a chat template (envs/chat.py)
            text, ids = renderer.prompt(obs.text, tools=tools) if tools else renderer.prompt(obs.text)
            envs.append(env)
            episodes.append(Episode(example=ex, group=group_offset + i, prompt_text=text, prompt_ids=ids))
    budget = max_total_tokens if max_total_tokens is not None else max_turns * params.max_new_tokens
    turn_params = replace(params, stop_strings=tuple(params.stop_strings) + tuple(stop_strings))
    live = list(range(len(episodes)))
    for turn in range(max_turns):
        if not live:
            break
        prefixes = [episodes[r].prompt_ids + episodes[r].response_ids for r in live]
        turn_seed = seed if turn == 0 else sample_seed(seed, turn, stream=97)
        out = sampler.sample(prefixes, 1, turn_params, turn_seed)
        still = []
        for r, ids, lps, fin in zip(live, out.token_ids, out.logprobs, out.finish):
            ep, room = episodes[r], budget - len(episodes[r].response_ids)
            over = len(ids) > room
            ids, lps = ids[:room], lps[:room]
            ep.segments.append(Segment(ids, turn, sampled=True, logprobs=lps))
            obs = envs[r].step(tok.decode(ids, skip_special_tokens=True))
            ep.turn_rewards.append(obs.reward)
            ep.turn_metadata.append(dict(obs.metadata))
            eos = bool(ids) and ids[-1] == tok.eos_token_id
            ep.done = obs.done or eos
            cut = (fin == FINISH_LENGTH and not eos) or over  # the model's turn did not end by itself
            last_turn = turn == max_turns - 1
            if not ep.done and not cut and not last_turn:  # an observation only when a turn follows it
                obs_ids = renderer.observation(obs.text)[:max(budget - len(ep.response_ids), 0)]
                if obs_ids:
                    ep.segments.append(Segment(obs_ids, turn, sampled=False))
            ep.truncated = cut or (not ep.done and (last_turn or len(ep.response_ids) >= budget))
            if not ep.done and not ep.truncated:
                still.append(r)
        live = still
    for env in envs:  # every episode has ended (done, a limit, or out of turns)
        close = getattr(env, "close", None)
        if callable(close):
            close()
    return episodes
