"""``tool_use``: the model calls the task's tools, one call per turn, until it answers.

    reset(example) -> the prompt
    step(turn)     -> a call at the end of the turn: run the tool, answer with its output
                      no call: the final answer, done

Tools come from the task: ``task.tools(example) -> {name: function}``; a tool takes string
arguments and returns a string. Calls are written in the text format of ``finegrain.toolcalls``
(``<call>NAME(ARG, ...)</call>``, answered by ``\\n<result>TEXT</result>\\n``; ``format="text"``,
for tiny models) or in a chat template's own format (``<tool_call>{json}</tool_call>``, answered by
a ``tool`` message; ``format="chat"``, see ``finegrain.envs.chat``).

Nothing the model writes stops the run. A malformed call, an unknown tool, the wrong arguments, a
tool that raises and one that runs past ``tool_timeout`` all come back to the model as an
observation ``error: ...``; the turn's metadata records which (``"error"``) and
``ToolEnvironment.error_counts`` counts them per episode.

Every turn's metadata has exactly these keys (reward code relies on them):
    "call":   {"name": str, "args": [str, ...]} for a well-formed call, else None (chat calls'
              arguments in the order of the tool's parameters once they bind)
    "error":  None | "malformed" | "unknown_tool" | "bad_arguments" | "raised" | "timeout"
    "result": the tool's output (str) when it ran and returned, else None

The turn reward is None (the outcome comes from reward signals such as the task verifier) unless
the task has ``turn_reward(example, turn_index, call, result) -> float | None``: ``call`` is the
parsed ``ToolCall`` (None for the final answer; ``call.error`` set when malformed) and ``result``
the metadata's ``"result"``.

A tool runs in a worker thread that the environment waits on for at most ``tool_timeout``
seconds. Python cannot kill a thread: a tool that timed out keeps running in the background
(a daemon thread, so it does not keep the process alive) and whatever it does later is ignored.
Tools that can hang on I/O should carry their own timeouts as well.
"""

from __future__ import annotations

import inspect
import json
import threading
import types
import typing
from collections import Counter
from typing import Any, Callable

from finegrain.envs.base import ENVIRONMENTS, Observation
from finegrain.envs.chat import CHAT_STOP_STRINGS, ChatRenderer, ChatToolCall, parse_tool_call, tool_schemas
from finegrain.toolcalls import STOP_STRINGS, ToolCall, format_result, parse_call
from finegrain.tasks.base import Example

ERROR_KINDS = ("malformed", "unknown_tool", "bad_arguments", "raised", "timeout")
FORMATS = ("text", "chat")


def error_counts(turn_info: list[dict]) -> dict[str, int]:
    """How many turns of one episode (one row of ``Trajectory.turn_info``) ended in each error kind.

    >>> error_counts([{"call": None, "error": "malformed", "result": None},
    ...               {"call": {"name": "f", "args": []}, "error": None, "result": "1"}])
    {'malformed': 1, 'unknown_tool': 0, 'bad_arguments': 0, 'raised': 0, 'timeout': 0}
    """
    seen = Counter(t.get("error") for t in turn_info)
    return {k: seen[k] for k in ERROR_KINDS}


def run_tool(fn: Callable[..., Any], args: list, kwargs: dict, *,
             timeout: float | None) -> tuple[str | None, str | None, str | None]:
    """Call ``fn(*args, **kwargs)`` in a worker thread, waiting at most ``timeout`` seconds
    (None: call it in this thread, no limit).

    Returns (output, error kind, error message): (str(output), None, None) when it returned;
    (None, "raised", message) when it raised; (None, "timeout", message) when it was still running.
    """
    box: dict[str, Any] = {}

    def work():
        try:
            box["out"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 -- anything a tool raises goes back to the model
            box["exc"] = e

    if timeout is None:
        work()
    else:
        worker = threading.Thread(target=work, name="finegrain-tool", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            return None, "timeout", f"timed out after {timeout:g} s"
    if "exc" in box:
        e = box["exc"]
        return None, "raised", f"{type(e).__name__}: {e}"
    return str(box["out"]), None, None


def bind_arguments(fn: Callable[..., Any], args: list[str], kwargs: dict[str, str]) -> tuple[list, dict]:
    """Check the call's arguments against ``fn``'s signature and convert each string to the
    parameter's annotated type (int, float, bool, or JSON for list/dict; unannotated and ``str``
    parameters stay strings).

    Raises TypeError (wrong count or names) or ValueError (a value that does not convert).

    >>> def add(a: int, b: int = 1) -> str: return str(a + b)
    >>> bind_arguments(add, ["3"], {})
    ([3], {})
    >>> bind_arguments(add, ["3", "4", "5"], {})
    Traceback (most recent call last):
    ...
    TypeError: too many positional arguments
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to check against (some builtins)
        return list(args), dict(kwargs)
    bound = sig.bind(*args, **kwargs)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: pass the strings through
        hints = {}
    for name, value in list(bound.arguments.items()):
        kind = sig.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) or name not in hints:
            continue
        bound.arguments[name] = _convert(name, value, hints[name])
    return list(bound.args), dict(bound.kwargs)


def _convert(name: str, value: str, hint) -> Any:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]  # Optional[X] -> X
    target = options[0] if len(options) == 1 else None
    target = typing.get_origin(target) or target
    if target is None or target is str or target is Any or not isinstance(value, str):
        return value
    if target is bool:
        if value.strip().lower() in ("true", "1", "yes"):
            return True
        if value.strip().lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"argument '{name}': expected a boolean, got {value!r}")
    if target in (int, float):
        try:
            return target(value.strip())
        except ValueError:
            raise ValueError(f"argument '{name}': expected {'an integer' if target is int else 'a number'}, "
                             f"got {value!r}") from None
    if target in (list, dict, tuple):
        try:
            return target(json.loads(value))
        except (ValueError, TypeError):
            raise ValueError(f"argument '{name}': expected a JSON {target.__name__}, got {value!r}") from None
    return value



class ToolEnvironment:
    """The turn logic shared by ``tool_use`` and the TRL adapter: parse the call at the end of a
    turn, run the tool under a time limit, answer with its output or an error.

    A subclass gives each episode its tools with ``_begin(tools)`` in ``reset`` and may give turn
    rewards by overriding ``_reward``.

    Attributes read by ``Rollout``: ``max_turns``, ``stop_strings`` (end of a call), ``renderer``
    (chat format only); by the runner: ``tool_schemas`` (chat format: this episode's tools).
    """

    def __init__(self, *, max_turns: int = 6, tool_timeout: float | None = 1.0, format: str = "text",
                 tokenizer=None, system: str | None = None):
        if format not in FORMATS:
            raise ValueError(f"env_kwargs.format: expected one of {FORMATS}, got {format!r}")
        if not isinstance(max_turns, int) or isinstance(max_turns, bool) or max_turns < 1:
            raise ValueError(f"env_kwargs.max_turns: expected an integer >= 1, got {max_turns!r}")
        if tool_timeout is not None and not (isinstance(tool_timeout, (int, float)) and tool_timeout > 0):
            raise ValueError(f"env_kwargs.tool_timeout: expected a number of seconds > 0 or None, got {tool_timeout!r}")
        self.format, self.max_turns, self.tool_timeout = format, max_turns, tool_timeout
        if format == "chat":
            if tokenizer is None:
                raise ValueError("env_kwargs.tokenizer: format='chat' renders through the tokenizer's chat template; "
                                 "pass the tokenizer")
            self.renderer = ChatRenderer(tokenizer, system=system)
            self.stop_strings = CHAT_STOP_STRINGS
        else:
            self.stop_strings = STOP_STRINGS
        self._begin({})

    def _begin(self, tools: dict[str, Callable[..., Any]]) -> None:
        """Start an episode with these tools."""
        for name, fn in tools.items():
            if not isinstance(name, str) or not callable(fn):
                raise TypeError(f"tools: expected {{name: function}}, got {name!r}: {fn!r}")
        self.tools = dict(tools)
        self.turn = 0
        self.error_counts: Counter[str] = Counter()

    @property
    def tool_schemas(self) -> list[dict] | None:
        """The JSON schemas of this episode's tools for the chat template; None in text format
        (the task's prompt describes its tools)."""
        return tool_schemas(self.tools) if self.format == "chat" and self.tools else None

    def step(self, action: str) -> Observation:
        index = self.turn
        self.turn += 1
        call = parse_tool_call(action) if self.format == "chat" else parse_call(action)
        meta: dict[str, Any] = {"call": None, "error": None, "result": None}
        if call is None:  # no call: the final answer
            return Observation(done=True, reward=self._reward(index, None, None, done=True), metadata=meta)
        if call.error:
            message = call.error
            meta["error"] = "malformed"
        else:
            meta["error"], message, meta["result"], args = self._call(call)
            meta["call"] = {"name": call.name, "args": args}
        if meta["error"]:
            self.error_counts[meta["error"]] += 1
            text = f"error: {message}"
        else:
            text = meta["result"]
        reward = self._reward(index, call, meta["result"], done=False)
        return Observation(text=format_result(text) if self.format == "text" else text, reward=reward, metadata=meta)

    def _call(self, call: ToolCall) -> tuple[str | None, str | None, str | None, list[str]]:
        """(error kind, error message, output, arguments) of running one well-formed call.

        The arguments are the call's strings, for a chat call in the order of the tool's
        parameters once they bind (the order the model wrote them in otherwise).
        """
        fn = self.tools.get(call.name)
        if fn is None:
            names = ", ".join(sorted(self.tools)) or "(none)"
            return "unknown_tool", f"unknown tool '{call.name}'; available: {names}", None, list(call.args)
        kwargs = call.kwargs if isinstance(call, ChatToolCall) else {}
        try:
            args, kwargs = bind_arguments(fn, [] if kwargs else list(call.args), kwargs)
        except (TypeError, ValueError) as e:
            return "bad_arguments", f"{call.name}: {e}", None, list(call.args)
        recorded = _in_parameter_order(fn, call.kwargs) if isinstance(call, ChatToolCall) else list(call.args)
        output, kind, message = run_tool(fn, args, kwargs, timeout=self.tool_timeout)
        if kind:
            return kind, f"{call.name}: {message}", None, recorded
        return None, None, output, recorded

    def _reward(self, turn: int, call: ToolCall | None, result: str | None, *, done: bool) -> float | None:
        """The reward of turn ``turn`` (None = not applicable)."""
        return None


def _in_parameter_order(fn: Callable[..., Any], kwargs: dict[str, str]) -> list[str]:
    """The values of ``kwargs`` in the order of ``fn``'s parameters (the given order when ``fn``
    has no signature)."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return list(kwargs.values())
    return [kwargs[n] for n in names if n in kwargs] + [v for n, v in kwargs.items() if n not in names]


def _example(fields: dict[str, Any]) -> Example:
    """The task ``Example`` back from the fields ``reset`` receives (``envs.base.example_fields``)."""
    return Example(id=fields.get("id", ""), prompt=fields.get("prompt", ""), answer=fields.get("answer", ""),
                   solution=fields.get("solution", ""), meta=dict(fields.get("meta") or {}))


@ENVIRONMENTS.register("tool_use", multi_turn=True)
class ToolUse(ToolEnvironment):
    """The task's tools, called in turns (see the module doc).

    Args:
        task: has ``tools(example) -> {name: function}``; optionally ``turn_reward(example,
            turn_index, call, result) -> float | None``.
        max_turns: model turns per episode (the runner stops and marks the episode truncated after
            that many).
        tool_timeout: seconds a tool may run (None = no limit, run in the caller's thread).
        format: "text" (``<call>NAME(ARG, ...)</call>``) or "chat" (the chat template's
            ``<tool_call>`` JSON; needs ``tokenizer``).
        tokenizer, system: the chat format's tokenizer and optional system message.
    """

    def __init__(self, *, task=None, max_turns: int = 6, tool_timeout: float | None = 1.0, format: str = "text",
                 tokenizer=None, system: str | None = None):
        if task is not None and not callable(getattr(task, "tools", None)):
            raise TypeError(f"tool_use: task {getattr(task, 'name', task)!r} has no tools(example) method")
        super().__init__(max_turns=max_turns, tool_timeout=tool_timeout, format=format, tokenizer=tokenizer,
                         system=system)
        self.task = task
        self.example: Example | None = None

    def reset(self, seed: int | None = None, **example) -> Observation:
        self.example = _example(example)
        self._begin(dict(self.task.tools(self.example)) if self.task is not None else {})
        return Observation(text=self.example.prompt)

    def _reward(self, turn: int, call: ToolCall | None, result: str | None, *, done: bool) -> float | None:
        fn = getattr(self.task, "turn_reward", None)
        if fn is None:
            return None
        r = fn(self.example, turn, call, result)
        return None if r is None else float(r)
