"""Outcome-labelled responses for offline implicit-PRM training and scoring: JSONL in, Trajectory out.

File format: one JSON object per line (blank lines are skipped)::

    {"prompt": "Q: 7 +5\\n", "response": "7+5=12\\nA: 12", "label": 1, "group": "p17"}

    prompt    str, required
    response  str, required
    label     0/1 (true/false accepted) or a float in [0, 1]; required for training, optional
              for scoring
    group     optional string/number/bool/null; responses with equal groups are paired by the
              DPO loss. Missing or null = the prompt text, so every response to one prompt is
              one group.
    any other key is kept in ``PRMRow.extra`` (``finegrain prm score`` copies it to its output)

Tokenization (``to_trajectory``): the prompt with ``add_special_tokens=True`` (a BOS where the
tokenizer adds one), the response without special tokens, then EOS. Prompt and response are
tokenized separately, so a BPE merge across their boundary never happens: the PRM scores
exactly the response tokens it would generate after that prompt.

>>> row = parse_row('{"prompt": "Q", "response": "A", "label": 1}', "f.jsonl:1")
>>> (row.label, row.group, row.extra)
(1.0, 'Q', {})
>>> parse_row('{"prompt": "Q", "response": "A", "label": 2}', "f.jsonl:3")
Traceback (most recent call last):
...
ValueError: f.jsonl:3: field 'label' expected 0/1 or a number in [0, 1], got 2
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import torch

from finegrain.jsonl import parse_json_object
from finegrain.segment import SEGMENTERS, Spans, token_step_ids
from finegrain.trajectory import Trajectory

_KNOWN = ("prompt", "response", "label", "group")


@dataclass(frozen=True)
class PRMRow:
    """One labelled (or unlabelled) response.

    prompt, response: texts. label: float in [0, 1], or None when the file has none.
    group: the DPO pairing key (the prompt text unless the file gives one).
    where: 'FILE:LINE' the row came from (for error messages). extra: other keys of the line.
    """

    prompt: str
    response: str
    label: float | None
    group: Hashable
    where: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON object: prompt, response, label (if any), group (if not the prompt), extras."""
        out: dict[str, Any] = {"prompt": self.prompt, "response": self.response}
        if self.label is not None:
            out["label"] = self.label
        if self.group != self.prompt:
            out["group"] = self.group
        return {**out, **self.extra}


def _label(value: Any, where: str) -> float:
    ok = isinstance(value, (bool, int, float)) and not (isinstance(value, float) and math.isnan(value))
    if not ok or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{where}: field 'label' expected 0/1 or a number in [0, 1], got {json.dumps(value)}")
    return float(value)


def parse_row(line: str, where: str, *, require_label: bool = True) -> PRMRow:
    """One JSONL line -> PRMRow; ``where`` ('FILE:LINE') prefixes every error.

    Raises ValueError for invalid JSON, a non-object, a missing or mistyped field, a label
    outside [0, 1], or an unhashable group (list/object).
    """
    obj = parse_json_object(line, where, ("prompt", "response", "label"))
    for key in ("prompt", "response"):
        if key not in obj:
            raise ValueError(f"{where}: missing field '{key}'")
        if not isinstance(obj[key], str):
            raise ValueError(f"{where}: field '{key}' expected a string, got {json.dumps(obj[key])[:60]}")
    if "label" in obj and obj["label"] is not None:
        label = _label(obj["label"], where)
    elif require_label:
        raise ValueError(f"{where}: missing field 'label' (0/1 or a number in [0, 1])")
    else:
        label = None
    group = obj.get("group")
    if isinstance(group, (list, dict)):
        raise ValueError(f"{where}: field 'group' expected a string or number, got {json.dumps(group)[:60]}")
    if group is None:
        group = obj["prompt"]
    extra = {k: v for k, v in obj.items() if k not in _KNOWN}
    return PRMRow(obj["prompt"], obj["response"], label, group, where, extra)


def read_prm_jsonl(path: str | Path, *, require_label: bool = True) -> list[PRMRow]:
    """All rows of a JSONL file, validated (see the module docstring for the format).

    Raises FileNotFoundError naming ``path`` if it does not exist; ValueError 'FILE:LINE: ...'
    for the first bad line, or 'FILE: no rows' for a file with no non-blank line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                rows.append(parse_row(line, f"{path}:{n}", require_label=require_label))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def group_index(groups: Sequence[Hashable]) -> list[int]:
    """Dense ids for group keys in order of first appearance: ['b', 'a', 'b'] -> [0, 1, 0]."""
    ids: dict[Hashable, int] = {}
    return [ids.setdefault(g, len(ids)) for g in groups]


def encode_row(tokenizer, row: PRMRow) -> tuple[list[int], list[int]]:
    """(prompt token ids, response token ids + EOS) of one row, unpadded.

    Raises ValueError if the prompt has no token (the first response token needs a context).
    """
    p = tokenizer(row.prompt, add_special_tokens=True)["input_ids"]
    r = tokenizer(row.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if not p:
        raise ValueError(f"{row.where or 'row'}: the prompt has no token (empty prompt and a tokenizer "
                         "that adds no BOS); the first response token needs a context")
    return p, r


def to_trajectory(tokenizer, rows: Sequence[PRMRow], segmenter: str | Callable[[str], Spans] = "newline"
                  ) -> Trajectory:
    """A Trajectory of B = len(rows) (prompt, response + EOS) pairs for teacher-forced scoring.

    Prompts are left-padded to P = the longest prompt, responses right-padded to L = the longest
    response (EOS included). ``step_ids`` come from ``segmenter`` on the decoded response (EOS is
    outside every step, −1). ``group_ids`` (B,) number the rows' groups by first appearance;
    ``behavior_logprobs`` are zeros (no sampling policy); ``loss_mask`` = ``response_mask``;
    ``truncated`` all False; ``examples`` = the rows.

    Raises ValueError if the tokenizer has no EOS token or a prompt has no token.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: needs an EOS token (appended to every response)")
    if isinstance(segmenter, str):
        SEGMENTERS.get(segmenter)  # unknown name -> KeyError listing the available ones
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = [encode_row(tokenizer, r) for r in rows]
    B = len(enc)
    P = max(len(p) for p, _ in enc)
    L = max(len(r) for _, r in enc)
    prompt_ids = torch.full((B, P), pad, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.bool)
    response_ids = torch.full((B, L), pad, dtype=torch.long)
    response_mask = torch.zeros(B, L, dtype=torch.bool)
    for i, (p, r) in enumerate(enc):
        prompt_ids[i, P - len(p):] = torch.tensor(p)
        prompt_mask[i, P - len(p):] = True
        response_ids[i, :len(r)] = torch.tensor(r)
        response_mask[i, :len(r)] = True
    step_ids = token_step_ids(tokenizer, response_ids, response_mask, segmenter)   # (B, L)
    return Trajectory(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
        response_mask=response_mask, loss_mask=response_mask.clone(),
        group_ids=torch.tensor(group_index([r.group for r in rows]), dtype=torch.long),
        step_ids=step_ids, behavior_logprobs=torch.zeros(B, L), truncated=torch.zeros(B, dtype=torch.bool),
        prompt_texts=[r.prompt for r in rows], response_texts=[r.response for r in rows],
        examples=list(rows))


def labels_tensor(rows: Sequence[PRMRow]) -> torch.Tensor:
    """(B,) float32 labels; ValueError naming the first row without one."""
    for r in rows:
        if r.label is None:
            raise ValueError(f"{r.where or 'row'}: missing field 'label' (needed for training)")
    return torch.tensor([r.label for r in rows], dtype=torch.float32)
