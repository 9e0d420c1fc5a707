"""The text format of tool calls for tiny models (and any model without a tool-calling template).

A model turn that calls a tool ends with one call; the environment answers with one result::

    I need the capital first.
    <call>lookup(France, capital)</call>
    <result>Paris</result>
    <call>lookup(Paris, population)</call>
    <result>2100000</result>
    A: 2100000

- A call is ``<call>NAME(ARG, ARG, ...)</call>``: NAME is ``[A-Za-z_][A-Za-z0-9_]*``; arguments are
  separated by commas and stripped of surrounding spaces; an argument may not contain ``,``,
  ``(``, ``)`` or ``<``. ``NAME()`` is a call without arguments. The JSON form
  ``<call>{"name": "lookup", "arguments": {"entity": "France", "relation": "capital"}}</call>``
  is accepted too (arguments in the order given).
- The model's turn ends at ``</call>`` (the environment passes it as a stop string), so a turn
  holds at most one call, at its end. A turn without ``<call>`` is the final answer.
- The environment's observation is ``\\n<result>TEXT</result>\\n``; the tokens of it are never
  trained on. Errors come back the same way, as ``<result>error: ...</result>``.

>>> c = parse_call("So: <call>lookup(France, capital)</call>")
>>> c.name, c.args
('lookup', ['France', 'capital'])
>>> parse_call("A: 7") is None
True
>>> parse_call("<call>lookup(France</call>").error
'malformed call: expected NAME(ARG, ...) or JSON'
>>> format_call("add", [3, 4]) + format_result("7")
'<call>add(3, 4)</call>\\n<result>7</result>\\n'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

CALL_OPEN, CALL_CLOSE = "<call>", "</call>"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
STOP_STRINGS = (CALL_CLOSE,)

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_PLAIN = re.compile(rf"\s*({_NAME})\s*\(([^(),<]*(?:,[^(),<]*)*)\)\s*")
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)


@dataclass
class ToolCall:
    """One parsed call. ``error`` is set (and name/args may be empty) when the call is malformed."""

    name: str = ""
    args: list[str] = field(default_factory=list)
    raw: str = ""
    error: str | None = None


def format_call(name: str, args) -> str:
    """The text of a call, as a model should write it."""
    return f"{CALL_OPEN}{name}({', '.join(str(a) for a in args)}){CALL_CLOSE}"


def format_result(text: str) -> str:
    """The observation text answering a call (or reporting an error)."""
    return f"\n{RESULT_OPEN}{text}{RESULT_CLOSE}\n"


def parse_call(turn_text: str) -> ToolCall | None:
    """The call at the end of a model turn; None when the turn has no ``<call>`` (a final answer).

    A ``<call>`` without its ``</call>`` (the turn ran out of tokens) or with a body that is not
    ``NAME(ARG, ...)`` or JSON is returned with ``error`` set.
    """
    start = turn_text.rfind(CALL_OPEN)
    if start < 0:
        return None
    m = _CALL.search(turn_text, start)
    if m is None:
        return ToolCall(raw=turn_text[start:], error="malformed call: no closing </call>")
    body = m.group(1)
    plain = _PLAIN.fullmatch(body)
    if plain:
        inner = plain.group(2)
        args = [a.strip() for a in inner.split(",")] if inner.strip() else []
        return ToolCall(plain.group(1), args, raw=m.group(0))
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("name"), str) and re.fullmatch(_NAME, obj["name"]):
        arguments = obj.get("arguments", {})
        if isinstance(arguments, dict):
            return ToolCall(obj["name"], [str(v) for v in arguments.values()], raw=m.group(0))
        if isinstance(arguments, list):
            return ToolCall(obj["name"], [str(v) for v in arguments], raw=m.group(0))
    return ToolCall(raw=m.group(0), error="malformed call: expected NAME(ARG, ...) or JSON")
