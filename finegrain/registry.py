"""One small registry class backs every open family (advantages, losses, rewards, ...).

A registry maps a name to a callable plus metadata the trainer checks before running
(for example ``consumes="outcome"`` on an advantage estimator). Registering a name twice
raises; an unknown name raises with the list of valid ones.

>>> R = Registry("colour")
>>> @R.register("red", warm=True)
... def red(): return "r"
>>> R.get("red")()
'r'
>>> R.meta("red")["warm"]
True
>>> R.get("blue")
Traceback (most recent call last):
...
KeyError: "unknown colour 'blue'; available: red"
"""

from __future__ import annotations

import inspect
from typing import Any, Callable


class Registry:
    """Name -> callable, with per-entry metadata. One instance per family."""

    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, Callable[..., Any]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@REG.register("name", consumes="outcome")``. A duplicate name raises."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.family} '{name}' is registered twice")
            self._entries[name] = fn
            self._meta[name] = dict(meta)
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.family} '{name}'; available: {', '.join(self.names())}")
        return self._entries[name]

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def check_kwargs(self, name: str, kwargs: dict[str, Any], where: str) -> None:
        """Raise one clear line if ``kwargs`` holds a key the entry's keyword-only params lack, a
        value of the wrong scalar type, a non-finite number, or a number outside the entry's
        declared ``bounds`` (registry metadata ``bounds={"clip_low": "[0, 1)"}``), or a value not in
        the entry's declared ``choices`` (``choices={"mode": ("mask", "drop")}``).

        ``where`` names the config field, e.g. ``advantage.kwargs``.
        """
        from finegrain.ranges import check_range

        bounds = self._meta.get(name, {}).get("bounds", {})
        choices = self._meta.get(name, {}).get("choices", {})
        fn = self.get(name)
        # classes built through ``from_context(ctx, **kwargs)`` are checked against that signature
        target = getattr(fn, "from_context", None) or (fn.__init__ if inspect.isclass(fn) else fn)
        params = inspect.signature(target).parameters
        allowed = [p for p, v in params.items() if v.kind == inspect.Parameter.KEYWORD_ONLY]
        for key, value in kwargs.items():
            if key not in allowed:
                raise ValueError(
                    f"{where}: unknown key '{key}' for {self.family} '{name}'; "
                    f"allowed: {', '.join(allowed) or '(none)'}"
                )
            want = _annotation_types(params[key].annotation)
            if want is not None and not any(_is(value, t) for t in want):
                names = " | ".join("None" if t is type(None) else t.__name__ for t in want)
                raise ValueError(f"{where}.{key}: expected {names}, got {value!r}")
            check_range(f"{where}.{key}", value, bounds.get(key))
            if key in choices and value not in choices[key]:
                raise ValueError(f"{where}.{key}: expected one of {' | '.join(map(str, choices[key]))}, got {value!r}")


_SIMPLE = {"bool": bool, "int": int, "float": float, "str": str, "None": type(None)}


def _annotation_types(annotation) -> tuple | None:
    """Simple scalar annotations ('float', 'int | None', bool, ...) as a tuple of types; None when
    the annotation is missing or not a union of simple scalars (then the value is not checked)."""
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in str(text).split("|")]
    if not all(p in _SIMPLE for p in parts):
        return None
    return tuple(_SIMPLE[p] for p in parts)


def _is(value, t: type) -> bool:
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)
