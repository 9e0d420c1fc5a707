"""Reading JSONL data files with one-line errors that name the file and line."""

from __future__ import annotations

import json
from typing import Any, Sequence


def parse_json_object(line: str, where: str, fields: Sequence[str] = ()) -> dict[str, Any]:
    """One JSONL line -> dict. ``where`` ('FILE:LINE') starts every error; ``fields`` are named in
    the error for a line that is not an object.

    >>> parse_json_object('{"a": 1}', "f.jsonl:1")
    {'a': 1}
    >>> parse_json_object('[1]', "f.jsonl:2", ("a",))
    Traceback (most recent call last):
    ...
    ValueError: f.jsonl:2: expected a JSON object with 'a', got list
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        with_fields = f" with {', '.join(map(repr, fields))}" if fields else ""
        raise ValueError(f"{where}: expected a JSON object{with_fields}, got {type(obj).__name__}")
    return obj
