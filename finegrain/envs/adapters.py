"""Run environments written for other libraries as finegrain environments, unchanged, in-process.

    register_environment("wordle", WordleEnv, kind="trl")        # then Rollout(env="wordle")

- ``kind="openenv"``: a subclass of OpenEnv's ``Environment`` (``openenv.core.env_server``):
  ``reset(seed, episode_id, **kw) -> Observation``, ``step(Action) -> Observation`` with pydantic
  ``Action``/``Observation`` types. The model's turn text becomes the action (``OpenEnvAdapter``).
- ``kind="trl"``: a TRL ``environment_factory`` class: ``reset(**row) -> str | None``, its public
  methods are the tools, an optional ``get_reward()`` scores the episode (``TRLEnvironment``).
- ``kind="gym"``: a gymnasium-style env with text observations: ``reset(seed=...) -> (obs, info)``,
  ``step(action) -> (obs, reward, terminated, truncated, info)`` (``GymAdapter``).

The factory given to ``register_environment`` is called once per episode (the runner holds every
episode's environment at once, so one instance cannot serve two episodes): pass the class or a
zero-argument function. Adapter options given at registration can be overridden per run through
``env_kwargs``. Neither OpenEnv nor gymnasium is imported here: the adapters only call the
methods their contracts name.

Errors in the wrapped environment's step (an action that does not parse, a step that raises) come
back to the model as an observation ``error: ...`` and are recorded in the turn's metadata
(``"error"``); the episode goes on.
"""

from __future__ import annotations

import inspect
import json
import typing
from typing import Any, Callable

from finegrain.envs.base import ENVIRONMENTS, Observation
from finegrain.envs.tool_use import ToolEnvironment

PROMPTS = ("observation", "example", "both")


def _prompt(mode: str, example: dict[str, Any], observation: str) -> str:
    """The episode's prompt: the environment's first observation, the task example's prompt, or
    the example's prompt followed by the observation (concatenated as they are)."""
    if mode == "observation":
        return observation
    if mode == "example":
        return example.get("prompt", "")
    return example.get("prompt", "") + observation


def _check_prompt(mode: str) -> str:
    if mode not in PROMPTS:
        raise ValueError(f"env_kwargs.prompt: expected one of {PROMPTS}, got {mode!r}")
    return mode


def _error(message: str, **metadata) -> Observation:
    return Observation(text=f"error: {message}", metadata={**metadata, "error": message})


# ---- OpenEnv ---------------------------------------------------------------------------------

_OBS_BASE_FIELDS = ("done", "reward", "metadata")


def openenv_action_type(env_type: type) -> type | None:
    """The pydantic ``Action`` class an OpenEnv environment class steps with: the first type
    argument of its ``Environment[ActT, ObsT, StateT]`` base, else the annotation of ``step``'s
    ``action`` parameter; None when neither names a class."""
    for klass in env_type.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            args = typing.get_args(base)
            if args and isinstance(args[0], type) and hasattr(args[0], "model_fields"):
                return args[0]
    try:
        hint = typing.get_type_hints(env_type.step).get("action")
    except Exception:  # unresolvable annotations
        hint = None
    return hint if isinstance(hint, type) and hasattr(hint, "model_fields") else None


def text_action(action_type: type) -> Callable[[str], Any]:
    """text -> ``action_type``: an action with one field (besides ``metadata``) gets the text as
    that field (validated, so "3" becomes 3 for an int field); any other is parsed as a JSON
    object of its fields."""
    fields = [n for n in action_type.model_fields if n != "metadata"]
    if len(fields) == 1:
        name = fields[0]
        is_text = action_type.model_fields[name].annotation is str
        return lambda text: action_type.model_validate({name: text if is_text else text.strip()})
    return lambda text: action_type.model_validate_json(text)


def openenv_observation_text(obs) -> str:
    """An OpenEnv observation's text: its field when it has one field (besides done, reward and
    metadata) and that field is a string, else JSON of all those fields."""
    fields = obs.model_dump(exclude=set(_OBS_BASE_FIELDS))
    if len(fields) == 1 and isinstance(next(iter(fields.values())), str):
        return next(iter(fields.values()))
    return json.dumps(fields, default=str)


class OpenEnvAdapter:
    """One OpenEnv environment instance as a finegrain environment (one episode).

    Args:
        env: an instance of a subclass of OpenEnv's ``Environment``.
        action: text -> Action (default: ``text_action`` of the action type found by
            ``openenv_action_type``).
        observation_text: Observation -> text (default: ``openenv_observation_text``).
        prompt: "observation" (the reset observation, default), "example" (the task example's
            prompt) or "both".
        reset_kwargs: task example fields -> extra keyword arguments of ``env.reset`` (default none;
            ``reset`` always gets ``seed``).
        max_turns, stop_strings: per-episode turn limit; strings that end a model turn.

    Observation.reward is the OpenEnv observation's reward (None stays None); metadata of each
    turn: {"observation": the observation's own fields, "metadata": its metadata, "error": None or
    a message when the action did not parse or the step raised}.
    """

    def __init__(self, env, *, action: Callable[[str], Any] | None = None,
                 observation_text: Callable[[Any], str] | None = None, prompt: str = "observation",
                 reset_kwargs: Callable[[dict], dict] | None = None, max_turns: int = 6, stop_strings=()):
        if action is None:
            action_type = openenv_action_type(type(env))
            if action_type is None:
                raise TypeError(f"OpenEnvAdapter: cannot tell the Action type of {type(env).__name__}; subclass "
                                "Environment[MyAction, MyObservation, State] or pass action=<text -> Action>")
            action = text_action(action_type)
        self.env, self.action, self.prompt = env, action, _check_prompt(prompt)
        self.observation_text = observation_text or openenv_observation_text
        self.reset_kwargs, self.max_turns, self.stop_strings = reset_kwargs, max_turns, tuple(stop_strings)

    def reset(self, seed: int | None = None, **example) -> Observation:
        obs = self.env.reset(seed=seed, **(self.reset_kwargs(example) if self.reset_kwargs else {}))
        return Observation(text=_prompt(self.prompt, example, self.observation_text(obs)))

    def step(self, action: str) -> Observation:
        try:
            act = self.action(action)
        except Exception as e:  # the model's text is not a valid action: tell the model
            return _error(f"invalid action: {_one_line(e)}", observation=None, metadata={})
        try:
            obs = self.env.step(act)
        except Exception as e:  # noqa: BLE001 -- an action the environment refuses is the model's to see
            return _error(f"step raised {type(e).__name__}: {_one_line(e)}", observation=None, metadata={})
        if obs.done:
            self.close()
        return Observation(text=self.observation_text(obs), done=bool(obs.done),
                           reward=None if obs.reward is None else float(obs.reward),
                           metadata={"observation": obs.model_dump(exclude=set(_OBS_BASE_FIELDS)),
                                     "metadata": dict(obs.metadata), "error": None})

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if close is not None:
            close()


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ---- TRL environment_factory -----------------------------------------------------------------

TRL_RESERVED = ("reset", "get_reward")


def trl_tools(env) -> dict[str, Callable[..., Any]]:
    """The tools of a TRL environment: its public methods except ``reset`` and ``get_reward``."""
    tools = {}
    for name, member in inspect.getmembers(type(env)):
        if name.startswith("_") or name in TRL_RESERVED or not inspect.isfunction(member):
            continue
        tools[name] = getattr(env, name)
    return tools


class TRLEnvironment(ToolEnvironment):
    """A TRL ``environment_factory`` instance as a finegrain environment (one episode).

    TRL's contract: ``__init__()`` takes no arguments; ``reset(**row)`` gets the dataset row (here
    the task example's fields: id, prompt, answer, solution, meta) and may return a string that is
    appended to the prompt; every public method other than ``reset`` is a tool, called with the
    parsed arguments converted to its annotated types; a tool that raises answers the model with
    the error. finegrain reads ``get_reward()`` (when defined, and then not a tool) as the reward
    of the episode's last turn: the one that ends it, or turn ``max_turns - 1`` (a budget cut by
    ``max_total_tokens`` gets no reward).

    Turns, formats, errors and metadata are those of ``tool_use`` (``ToolEnvironment``). The
    default ``tool_timeout`` is 10 s since TRL tools often wrap a remote environment server; a
    tool that times out keeps running in the background and may still change the environment's
    state.
    """

    def __init__(self, env, *, max_turns: int = 6, tool_timeout: float | None = 10.0, format: str = "text",
                 tokenizer=None, system: str | None = None):
        super().__init__(max_turns=max_turns, tool_timeout=tool_timeout, format=format, tokenizer=tokenizer,
                         system=system)
        self.env = env

    def reset(self, seed: int | None = None, **example) -> Observation:
        text = self.env.reset(**example)
        self._begin(trl_tools(self.env))
        return Observation(text=example.get("prompt", "") + (text or ""))

    def _reward(self, turn: int, call, result, *, done: bool) -> float | None:
        get_reward = getattr(self.env, "get_reward", None)
        if get_reward is None or not (done or turn == self.max_turns - 1):
            return None
        r = get_reward()
        return None if r is None else float(r)


# ---- gymnasium ---------------------------------------------------------------------------------


class GymAdapter:
    """A gymnasium-style environment with text observations as a finegrain environment.

    Args:
        env: ``reset(seed=...) -> (obs, info)``; ``step(action) -> (obs, reward, terminated,
            truncated, info)``.
        action: text -> the env's action (default: the text itself).
        observation_text: obs -> text (default: ``str``).
        prompt: "observation" (the reset observation, default), "example" or "both".
        reset_options: task example fields -> ``options`` of ``env.reset`` (default: no options).
        max_turns: default ``env.spec.max_episode_steps`` when set, else 6.
        stop_strings: strings that end a model turn (besides EOS).

    The turn reward is the step's reward; ``terminated`` or ``truncated`` ends the episode (the
    env's own truncation is recorded in the metadata, not as ``Episode.truncated``, which means a
    finegrain limit cut the episode). Metadata of each turn: {"info": info, "terminated": bool,
    "truncated": bool, "error": None or a message when the action did not convert or the step
    raised}.
    """

    def __init__(self, env, *, action: Callable[[str], Any] | None = None,
                 observation_text: Callable[[Any], str] | None = None, prompt: str = "observation",
                 reset_options: Callable[[dict], dict] | None = None, max_turns: int | None = None, stop_strings=()):
        self.env, self.action, self.prompt = env, action or (lambda text: text), _check_prompt(prompt)
        self.observation_text = observation_text or str
        self.reset_options = reset_options
        spec_limit = getattr(getattr(env, "spec", None), "max_episode_steps", None)
        self.max_turns, self.stop_strings = max_turns or spec_limit or 6, tuple(stop_strings)

    def reset(self, seed: int | None = None, **example) -> Observation:
        kwargs = {"options": self.reset_options(example)} if self.reset_options else {}
        obs, _info = self.env.reset(seed=seed, **kwargs)
        return Observation(text=_prompt(self.prompt, example, self.observation_text(obs)))

    def step(self, action: str) -> Observation:
        none = {"info": {}, "terminated": False, "truncated": False}
        try:
            act = self.action(action)
        except Exception as e:  # the model's text is not a valid action: tell the model
            return _error(f"invalid action: {_one_line(e)}", **none)
        try:
            obs, reward, terminated, truncated, info = self.env.step(act)
        except Exception as e:  # noqa: BLE001 -- an action the environment refuses is the model's to see
            return _error(f"step raised {type(e).__name__}: {_one_line(e)}", **none)
        done = bool(terminated or truncated)
        if done:
            self.close()
        return Observation(text=self.observation_text(obs), done=done, reward=float(reward),
                           metadata={"info": dict(info), "terminated": bool(terminated), "truncated": bool(truncated),
                                     "error": None})

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if close is not None:
            close()


# ---- registration --------------------------------------------------------------------------------

ADAPTERS: dict[str, type] = {"openenv": OpenEnvAdapter, "trl": TRLEnvironment, "gym": GymAdapter}


def register_environment(name: str, factory: Callable[[], Any], *, kind: str, **options) -> Callable[..., Any]:
    """Register ``factory`` (a class or zero-argument function, called once per episode) in
    ``ENVIRONMENTS`` under ``name``, wrapped by the ``kind`` adapter ("openenv" | "trl" | "gym").

    ``options`` are the adapter's keyword arguments; a run's ``env_kwargs`` override them. Returns
    the registered finegrain factory, ``(task=None, **env_kwargs) -> Environment``.
    """
    if kind not in ADAPTERS:
        raise ValueError(f"register_environment: kind must be one of {sorted(ADAPTERS)}, got {kind!r}")
    if not callable(factory):
        raise TypeError(f"register_environment('{name}'): factory must be a class or a zero-argument function (one "
                        f"environment per episode), got an instance of {type(factory).__name__}")
    adapter = ADAPTERS[kind]

    def make(*, task=None, **env_kwargs):
        return adapter(factory(), **{**options, **env_kwargs})

    make.__name__ = make.__qualname__ = f"{kind}_{name}"
    make.__doc__ = f"{factory!r} through the {kind} adapter ({adapter.__name__})."
    return ENVIRONMENTS.register(name, multi_turn=True, adapter=kind)(make)
