"""Step segmentation: text -> character spans of steps -> per-token step ids.

A *segmenter* maps a response text to a list of ``(start, end)`` character spans, one per step,
in order. ``token_step_ids`` then maps spans onto tokens through each token's character
offsets, so the same segmenter works for a character-level tokenizer or a BPE one.

Convention: a step's span includes the separator that ends it (the newline after a line), so
the step's last token is the separator when there is one. A token belongs to the step that
contains its last character; zero-width tokens (EOS) and tokens outside every span get −1.

>>> newline("a=1\\nb=2\\n")
[(0, 4), (4, 8)]
>>> blank_line("x\\ny\\n\\nz")
[(0, 5), (5, 6)]
>>> step_k("Step 1: a. Step 2: b")
[(0, 11), (11, 20)]
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

from finegrain.registry import Registry

SEGMENTERS = Registry("segmenter")
Spans = list[tuple[int, int]]


def _split_keep(text: str, pattern: str) -> Spans:
    """Spans of pieces ending with each match of ``pattern`` (separator kept in the piece);
    pieces that are only whitespace are dropped."""
    spans, start = [], 0
    for m in re.finditer(pattern, text):
        spans.append((start, m.end()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


@SEGMENTERS.register("newline")
def newline(text: str) -> Spans:
    """One step per non-empty line."""
    return _split_keep(text, r"\n")


@SEGMENTERS.register("blank_line")
def blank_line(text: str) -> Spans:
    """One step per paragraph (split on a blank line, as Qwen's PRMs and ImplicitPRM's eval do)."""
    return _split_keep(text, r"\n\s*\n")


@SEGMENTERS.register("step_k")
def step_k(text: str) -> Spans:
    """Steps start at ``Step k:`` markers; any text before the first marker is its own step."""
    starts = [m.start() for m in re.finditer(r"Step\s*\d+\s*:", text)]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [len(text)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if text[a:b].strip()]


@SEGMENTERS.register("turn")
def turn(text: str, marker: str = "<|im_start|>assistant") -> Spans:
    """Steps are assistant turns, each starting at ``marker``."""
    starts = [m.start() for m in re.finditer(re.escape(marker), text)] or [0]
    if starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [len(text)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if text[a:b].strip()]


def token_char_offsets(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decode ``ids`` and give each token its (start, end) character range in the decoded text.

    Uses per-token decoding when the pieces concatenate to the full decode (character-level and
    most byte-level BPE text); otherwise falls back to prefix decoding, which is exact for any
    tokenizer but quadratic in length.
    """
    ids = list(ids)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    pieces = [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
    if "".join(pieces) == full:
        offs, pos = [], 0
        for p in pieces:
            offs.append((pos, pos + len(p)))
            pos += len(p)
        return full, offs
    offs, prev = [], 0
    for k in range(1, len(ids) + 1):
        cur = len(tokenizer.decode(ids[:k], skip_special_tokens=True))
        offs.append((prev, max(prev, cur)))
        prev = max(prev, cur)
    return full, offs


def spans_to_token_step_ids(spans: Spans, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Step id of each token: the span containing the token's last character, else −1."""
    out = []
    for a, b in offsets:
        sid = -1
        if b > a:
            last = b - 1
            for k, (s, e) in enumerate(spans):
                if s <= last < e:
                    sid = k
                    break
        out.append(sid)
    return out


def fixed_length_step_ids(response_mask: torch.Tensor, step_len: int) -> torch.Tensor:
    """Steps of ``step_len`` tokens (PRL's ``step_split=length``). (B, L) bool -> (B, L) long."""
    pos = torch.arange(response_mask.shape[1], device=response_mask.device).expand_as(response_mask)
    return torch.where(response_mask, pos // step_len, torch.full_like(pos, -1))


def token_step_ids(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor,
                   segmenter: str | Callable[[str], Spans]) -> torch.Tensor:
    """(B, L) step ids for a padded batch of responses, via the named (or given) segmenter."""
    seg = SEGMENTERS.get(segmenter) if isinstance(segmenter, str) else segmenter
    out = torch.full(response_ids.shape, -1, dtype=torch.long)
    for b in range(response_ids.shape[0]):
        n = int(response_mask[b].sum())
        text, offs = token_char_offsets(tokenizer, response_ids[b, :n].tolist())
        out[b, :n] = torch.tensor(spans_to_token_step_ids(seg(text), offs), dtype=torch.long)
    return out.to(response_ids.device)
