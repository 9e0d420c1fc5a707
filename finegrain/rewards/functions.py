"""TRL-style reward functions as outcome-level reward signals.

A reward function in TRL's protocol is a plain Python function

    reward_func(prompts, completions, completion_ids, **kwargs) -> list[float | None]

called once per batch: ``prompts`` and ``completions`` are B strings (standard format) or B
message lists (conversational format), ``completion_ids`` B token-id lists, and every dataset
column arrives as a keyword argument holding B values, one per completion. ``None`` means "not
applicable to this completion". ``register_reward_function(fn)`` puts such a function into
``REWARDS`` unchanged, as a level-'outcome' signal: a config entry ``{name: <name>, weight: w}``
then uses it like any built-in signal. What finegrain passes (see docs/reward_functions.md):

    prompts         B raw question texts (``Example.prompt``; the chat template is not applied), or
                    in conversational format ``[{"role": "user", "content": prompt}]`` each
    completions     B decoded responses (``Trajectory.response_texts``), or
                    ``[{"role": "assistant", "content": response}]`` each
    completion_ids  B lists of the response's real token ids (EOS included when generated)
    trainer_state   None (finegrain has no HF ``TrainerState``)
    answer, solution, id   the ``Example`` fields, one per row
    <meta key>      every key of ``Example.meta`` (union over the batch; None for a row without it)

Registration is a Python call in the user's own script: nothing is ever imported from a name
written in a config file.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable

import torch

from finegrain.rewards.base import REWARDS, RewardOutput

# Names finegrain passes itself; an ``Example.meta`` key may not reuse one.
ARGUMENTS: tuple[str, ...] = ("prompts", "completions", "completion_ids", "trainer_state")
EXAMPLE_COLUMNS: tuple[str, ...] = ("answer", "solution", "id")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


class RewardFunction:
    """One TRL-style reward function as a reward signal (level 'outcome').

    Calling it on a Trajectory of B rows calls ``fn`` once with the whole batch and returns
    values (B,) float32 and mask (B,) bool (False where ``fn`` gave None), plus the component
    ``applicable`` (B,) = mask as 0/1, logged as ``reward/<name>/applicable``.
    It holds no state, so the registry entry is the signal itself (``from_context`` returns it).
    """

    level = "outcome"

    def __init__(self, fn: Callable[..., Any], *, name: str, conversational: bool = False):
        if not callable(fn):
            raise TypeError(f"reward function '{name}': expected a callable, got {type(fn).__name__}")
        if inspect.iscoroutinefunction(fn):
            raise ValueError(f"reward function '{name}': async functions are not supported; pass a plain function")
        self.fn, self.name, self.conversational = fn, name, conversational

    def from_context(self, ctx) -> "RewardFunction":
        return self

    def __call__(self, traj) -> RewardOutput:
        kwargs = reward_function_inputs(traj, conversational=self.conversational)
        self._check_signature(kwargs)
        raw = self.fn(**kwargs)
        values, mask = rewards_to_tensor(raw, traj.batch_size, self.name)
        values, mask = values.to(traj.response_ids.device), mask.to(traj.response_ids.device)
        return RewardOutput(values=values, mask=mask, level="outcome", components={"applicable": mask.float()})

    def _check_signature(self, kwargs: dict[str, Any]) -> None:
        """One clear line instead of Python's TypeError when ``fn`` cannot take these arguments."""
        try:
            sig = inspect.signature(self.fn)
        except (TypeError, ValueError):  # some builtins and C callables have no signature
            return
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            raise ValueError(f"reward function '{self.name}': cannot be called with this batch ({e}); "
                             f"it receives: {', '.join(kwargs)}") from None


def register_reward_function(fn: Callable[..., Any], name: str | None = None, *,
                             conversational: bool = False) -> RewardFunction:
    """Register ``fn`` (TRL's reward-function protocol) in ``REWARDS`` as an outcome signal.

    Args:
        fn: ``fn(prompts, completions, completion_ids, **kwargs) -> list[float | None]`` of length B
            (a 1-D numpy array or tensor of length B is accepted too).
        name: registry name, used in configs (``rewards: [{name: ..., weight: ...}]``) and in metric
            keys (``reward/<name>/mean``); defaults to ``fn.__name__``.
        conversational: pass prompts and completions as message lists instead of strings.

    Returns the registered signal. Registering the same function under the same name again (with
    the same ``conversational``) returns the existing signal; anything else under a taken name
    raises.
    """
    name = name if name is not None else getattr(fn, "__name__", None)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"register_reward_function: pass name= (letters, digits, '_', '.', '-'), got {name!r}")
    if name in REWARDS:
        old = REWARDS.get(name)
        if isinstance(old, RewardFunction) and old.fn is fn and old.conversational == conversational:
            return old
        what = "another function" if isinstance(old, RewardFunction) else "another reward signal"
        raise ValueError(f"register_reward_function: '{name}' is already registered to {what}; pass another name=")
    signal = RewardFunction(fn, name=name, conversational=conversational)
    REWARDS.register(name, level="outcome", reward_function=True)(signal)
    return signal


def reward_function_inputs(traj, *, conversational: bool = False) -> dict[str, Any]:
    """The keyword arguments a reward function is called with, for a Trajectory of B rows.

    Returns {'prompts': B, 'completions': B, 'completion_ids': B lists of ints, 'trainer_state': None,
    'answer': B, 'solution': B, 'id': B, <each Example.meta key>: B} (module docstring: exact contents).
    """
    B = traj.batch_size
    if len(traj.examples) != B or len(traj.response_texts) != B:
        raise ValueError(f"reward function: the trajectory needs {B} examples and response texts, "
                         f"got {len(traj.examples)} and {len(traj.response_texts)}")
    examples = traj.examples
    prompts: list[Any] = [ex.prompt for ex in examples]
    completions: list[Any] = list(traj.response_texts)
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    ids, mask = traj.response_ids.cpu(), traj.response_mask.cpu()
    completion_ids = [row[m].tolist() for row, m in zip(ids, mask)]
    columns: dict[str, list[Any]] = {c: [getattr(ex, c) for ex in examples] for c in EXAMPLE_COLUMNS}
    meta_keys = list(dict.fromkeys(k for ex in examples for k in ex.meta))  # first-seen order
    for k in meta_keys:
        if k in ARGUMENTS or k in EXAMPLE_COLUMNS:
            raise ValueError(f"reward function: Example.meta key '{k}' clashes with an argument of the same name")
        columns[k] = [ex.meta.get(k) for ex in examples]
    return {"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
            "trainer_state": None, **columns}


def rewards_to_tensor(raw: Any, n: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A reward function's return value as values (n,) float32 and mask (n,) bool.

    None -> mask False (value 0.0, not applicable). Ints, floats, bools and 0-d numpy/torch
    scalars are values. Wrong types, a wrong length, NaN and ±inf raise one line naming the
    function (and the row).

    >>> v, m = rewards_to_tensor([0.5, None, True], 3, "f")
    >>> v.tolist(), m.tolist()
    ([0.5, 0.0, 1.0], [True, False, True])
    >>> rewards_to_tensor([1.0, float("nan")], 2, "f")
    Traceback (most recent call last):
    ...
    ValueError: reward function 'f': row 1 is nan; rewards must be finite in float32 (return None for 'not applicable')
    """
    if hasattr(raw, "ndim") and hasattr(raw, "tolist"):  # numpy array or torch tensor
        if raw.ndim != 1:
            raise ValueError(f"reward function '{name}': returned an array of shape {tuple(raw.shape)}, expected ({n},)")
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"reward function '{name}': expected a list of {n} floats or None, got {type(raw).__name__}")
    if len(raw) != n:
        raise ValueError(f"reward function '{name}': returned {len(raw)} values for {n} completions")
    values, mask = [0.0] * n, [True] * n
    for i, v in enumerate(raw):
        if v is None:
            mask[i] = False
            continue
        if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):  # numpy scalar, 0-d tensor
            v = v.item()
        if not isinstance(v, (bool, int, float)):
            raise ValueError(f"reward function '{name}': row {i} is a {type(v).__name__} ({v!r:.40}); "
                             "expected a float, int, bool or None")
        values[i] = float(v)
    out = torch.tensor(values, dtype=torch.float32)
    bad = (~torch.isfinite(out)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"reward function '{name}': row {i} is {values[i]}; rewards must be finite in float32 "
                         "(return None for 'not applicable')")
    return out, torch.tensor(mask, dtype=torch.bool)
