"""Tool calling through a Hugging Face chat template (Qwen2.5-style ``<tool_call>`` JSON).

Models trained for tool use expect the tools in the prompt, their calls in the template's own
format, and the tool's answer as a ``tool`` message. For Qwen2.5 a turn that calls a tool and
the answer to it read::

    <|im_start|>assistant
    <tool_call>
    {"name": "add", "arguments": {"a": "3", "b": "4"}}
    </tool_call><|im_end|>
    <|im_start|>user
    <tool_response>
    7
    </tool_response><|im_end|>
    <|im_start|>assistant

The model's turn ends at ``</tool_call>`` (a stop string); everything after it up to the next
assistant turn is the observation, never trained on.

- ``ChatRenderer(tokenizer, system=None)`` is a renderer for the episode runner:
  ``prompt(text, tools=None)`` renders ``[system?, user]`` with the tools' JSON schemas and the
  generation prompt; ``observation(text)`` gives the tokens the template puts between the end of
  the assistant's call and the start of the next assistant turn when the tool answers ``text``.
- ``parse_tool_call(turn_text)`` reads the call at the end of a turn (None = a final answer).
- ``tool_schemas(tools)`` builds the JSON schemas of a ``{name: function}`` dict.

How ``observation`` finds the tokens: it renders a small conversation ``[user, assistant(call)]``
without, and ``[user, assistant(call), tool(text)]`` with the generation prompt, and takes what the
second adds after the first's ``</tool_call>``; the tokens are the difference between the
tokenizations of the two (or, when the shorter one's tokens are not a prefix of the longer one's,
the tokens of that text alone). Caveats:

1. It assumes the tool message renders the same whatever came before it. Templates that print a
   date or a turn counter, or merge consecutive tool messages, can render it differently in the
   real conversation.
2. A template that rewrites earlier turns once a later one exists (Qwen3 drops the reasoning of
   earlier assistant turns) has no stable prefix; ``observation`` then raises rather than guess.
3. Only the observation follows the template: the model's own call stays as sampled, even if
   the template would have spaced its JSON differently.
4. Token boundaries: with BPE, the tokens at the join between the sampled call and the
   observation may differ from those of tokenizing the whole conversation at once; templates
   whose turns start with special tokens (``<|im_end|>``, ``<|im_start|>``) join cleanly.

>>> c = parse_tool_call('Let me add.<tool_call>\\n{"name": "add", "arguments": {"a": 3, "b": "4"}}\\n</tool_call>')
>>> c.name, c.args, c.kwargs
('add', ['3', '4'], {'a': '3', 'b': '4'})
>>> parse_tool_call("The answer is 7.") is None
True
>>> parse_tool_call("<tool_call>{add}</tool_call>").error
'malformed call: expected {"name": ..., "arguments": {...}}'
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from finegrain.toolcalls import ToolCall

CHAT_CALL_OPEN, CHAT_CALL_CLOSE = "<tool_call>", "</tool_call>"
CHAT_STOP_STRINGS = (CHAT_CALL_CLOSE,)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CALL = re.compile(re.escape(CHAT_CALL_OPEN) + r"(.*?)" + re.escape(CHAT_CALL_CLOSE), re.S)
_DUMMY_CALL = {"type": "function", "function": {"name": "f", "arguments": {}}}


@dataclass
class ChatToolCall(ToolCall):
    """A call in the template format: arguments by name (``kwargs``); ``args`` are their values
    in the order the model wrote them. Every value is a string (JSON numbers, booleans, lists and
    objects are kept as their JSON text)."""

    kwargs: dict[str, str] = field(default_factory=dict)


def parse_tool_call(turn_text: str) -> ChatToolCall | None:
    """The ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` at the end of a turn.

    None when the turn has no ``<tool_call>`` (a final answer). A call without its closing tag, a
    body that is not a JSON object with a string ``name``, or ``arguments`` that are not an object
    (or a JSON string holding one, as OpenAI-style clients send) comes back with ``error`` set.
    """
    start = turn_text.rfind(CHAT_CALL_OPEN)
    if start < 0:
        return None
    m = _CALL.search(turn_text, start)
    if m is None:
        return ChatToolCall(raw=turn_text[start:], error=f"malformed call: no closing {CHAT_CALL_CLOSE}")
    bad = ChatToolCall(raw=m.group(0), error='malformed call: expected {"name": ..., "arguments": {...}}')
    try:
        obj = json.loads(m.group(1))
    except ValueError:
        return bad
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not _NAME.fullmatch(obj["name"]):
        return bad
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return bad
    if not isinstance(arguments, dict):
        return bad
    kwargs = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in arguments.items()}
    return ChatToolCall(obj["name"], list(kwargs.values()), raw=m.group(0), kwargs=kwargs)


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def tool_schema(name: str, fn: Callable[..., Any]) -> dict:
    """The JSON schema of one tool, as chat templates take it (``{"type": "function", ...}``).

    A function with type hints and a Google-style docstring (``Args:``) gets transformers' own
    schema (``get_json_schema``); any other gets one from its signature: unannotated parameters
    are strings, parameters without a default are required, the description is the docstring's
    first line. ``name`` (the name the model calls) replaces the function's own name.
    """
    from transformers.utils import get_json_schema
    from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

    try:
        schema = get_json_schema(fn)
    except (DocstringParsingException, TypeHintParsingException, TypeError, ValueError):
        schema = _signature_schema(fn)
    schema = json.loads(json.dumps(schema))  # a copy the caller may change
    schema["function"]["name"] = name
    return schema


def _signature_schema(fn: Callable[..., Any]) -> dict:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        params = {}
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: treat every parameter as a string
        hints = {}
    properties, required = {}, []
    for p in params.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        properties[p.name] = {"type": _JSON_TYPES.get(hints.get(p.name), "string")}
        if p.default is p.empty:
            required.append(p.name)
    doc = inspect.getdoc(fn) or ""
    return {"type": "function", "function": {
        "name": getattr(fn, "__name__", "tool"), "description": doc.strip().split("\n")[0] if doc else "",
        "parameters": {"type": "object", "properties": properties, "required": required}}}


def tool_schemas(tools: dict[str, Callable[..., Any]]) -> list[dict]:
    """Schemas of ``{name: function}``, in the dict's order."""
    return [tool_schema(name, fn) for name, fn in tools.items()]


class ChatRenderer:
    """Prompts and tool observations through the tokenizer's chat template (see the module doc).

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template that supports tools.
        system: an optional system message before the user's prompt.
        tools: schemas (or ``{name: function}``) rendered in every prompt unless ``prompt`` gets
            its own (the runner passes each episode's tools, see ``ToolUse.tool_schemas``).
        tool_role: the role of tool messages ("tool" for Qwen2.5 and most templates).

    Token ids are the template's text tokenized without adding special tokens, as
    ``apply_chat_template(tokenize=True)`` does (the template writes BOS itself when it needs one).
    """

    def __init__(self, tokenizer, *, system: str | None = None, tools=None, tool_role: str = "tool"):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("ChatRenderer: the tokenizer has no chat template (use format='text' for <call> tools)")
        self.tokenizer, self.system, self.tool_role = tokenizer, system, tool_role
        self.tools = tool_schemas(tools) if isinstance(tools, dict) else tools

    def prompt(self, text: str, tools: list[dict] | None = None) -> tuple[str, list[int]]:
        """The rendered ``[system?, user(text)]`` with the tools and the generation prompt, and its tokens."""
        schemas = tools if tools is not None else self.tools
        rendered = self._render(self._head(text), tools=schemas or None, add_generation_prompt=True)
        return rendered, self._encode(rendered)

    def observation(self, text: str) -> list[int]:
        """Tokens from the end of the assistant's ``</tool_call>`` to the next assistant turn, for
        a tool that answered ``text``."""
        convo = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "", "tool_calls": [_DUMMY_CALL]}]
        before = self._render(convo, add_generation_prompt=False)
        after = self._render(convo + [{"role": self.tool_role, "content": text}], add_generation_prompt=True)
        end = before.rfind(CHAT_CALL_CLOSE)
        if end < 0:
            raise ValueError("ChatRenderer: the chat template does not render tool calls as "
                             f"{CHAT_CALL_OPEN}...{CHAT_CALL_CLOSE}")
        prefix = before[:end + len(CHAT_CALL_CLOSE)]
        if not after.startswith(prefix):
            raise ValueError("ChatRenderer: the chat template renders earlier turns differently once a tool message "
                             "follows, so the observation tokens cannot be isolated")
        prefix_ids, full_ids = self._encode(prefix), self._encode(after)
        if full_ids[:len(prefix_ids)] == prefix_ids:
            return full_ids[len(prefix_ids):]
        return self._encode(after[len(prefix):])

    def _head(self, text: str) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": text}]

    def _render(self, messages: list[dict], **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
