"""A discriminative step classifier: a causal LM backbone with a scalar head read at each step's end.

    s_k = w · h_{e(k)} + b,     p_k = σ(s_k) = P(step k is correct | x, y_1..y_k)

h_t is the backbone's last hidden state at position t; e(k) is the position of the *last token
of step k* in the PRM input. The input is built from text, never from another model's token ids:

    ids = tok(prompt, special tokens)  ++  tok(step_1)  ++  tok(step_2)  ++ ...  ++ tok(step_K)

with every step tokenized on its own, so a BPE merge never crosses a step boundary and e(k) is
the last id of tok(step_k). With the ``newline`` segmenter a step's text ends with its "\\n", so
e(k) is that newline token, which plays the part of Math-Shepherd's step tag ("ки", arXiv:2312.08935)
and of TRL's PRMTrainer separator (the label sits on the last token of each step). Because the
causal LM only sees the left context, p_k depends on the prompt and steps 1..k only.

Departures from Math-Shepherd and PRM800K-style classifiers:

1. A separate ``Linear(hidden, 1)`` head on the last hidden state, not the LM's logits of two
   label words ("+"/"−") at a step tag; the LM head of the backbone is kept (so the directory
   loads as an ordinary causal LM) but unused.
2. No extra tag token is inserted: the step's own last token is read. A tokenizer without a
   newline token still works (the last token of the step's text is read wherever it is).
3. The head starts at zero (p = ½ everywhere at initialisation).

Saved as a directory: the backbone LM (``config.json``, ``model.safetensors``), ``head.safetensors``
(weight (1, H), bias (1,)), the tokenizer, and ``finegrain_prm.json`` with ``kind: discriminative``.
Loading never runs code from the directory (``load_causal_lm``: no remote code) and reads only
safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from finegrain.shapes import check_shapes

HEAD_FILE = "head.safetensors"
INFO_FILE = "finegrain_prm.json"
KIND = "discriminative"


class StepClassifier(torch.nn.Module):
    """A causal LM ``lm`` (its ``base_model`` gives the hidden states) and a zero-initialised scalar head."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        p = next(lm.parameters())
        self.head = torch.nn.utils.skip_init(torch.nn.Linear, lm.config.hidden_size, 1, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def max_positions(self) -> int | None:
        return getattr(self.lm.config, "max_position_embeddings", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, read_pos: torch.Tensor) -> torch.Tensor:
        """Step logits s_k at the positions ``read_pos``.

        Args:
            input_ids: (B, T) long, right-padded PRM inputs; attention_mask: (B, T) bool.
            read_pos: (B, S) long, position of each step's last token (any value where unused).
        Returns:
            (B, S) float32 logits (garbage where the caller's step mask is False).
        """
        check_shapes(input_ids=(input_ids, ("B", "T")), attention_mask=(attention_mask, ("B", "T")),
                     read_pos=(read_pos, ("B", "S")))
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False)
        h = out.last_hidden_state                                                    # (B, T, H)
        idx = read_pos.clamp(0, h.shape[1] - 1)                                      # (B, S)
        picked = torch.gather(h, 1, idx[:, :, None].expand(-1, -1, h.shape[2]))      # (B, S, H)
        return self.head(picked).squeeze(-1).float()                                 # (B, S)

    def save(self, directory: str | Path, tokenizer, info: dict) -> None:
        """Write the backbone, head, tokenizer and ``finegrain_prm.json`` (``info`` plus kind) into ``directory``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(d)
        save_file({"weight": self.head.weight.detach().cpu().contiguous(),
                   "bias": self.head.bias.detach().cpu().contiguous()}, str(d / HEAD_FILE))
        tokenizer.save_pretrained(d)
        (d / INFO_FILE).write_text(json.dumps({**info, "kind": KIND}, indent=2) + "\n")


def is_disc_prm_dir(path: str | Path) -> bool:
    """True if ``path`` holds a saved discriminative PRM (its info file says so)."""
    f = Path(path) / INFO_FILE
    try:
        return f.is_file() and json.loads(f.read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def load_step_classifier(path: str | Path, device: str = "cpu", *, where: str = "path"):
    """(StepClassifier in eval mode, tokenizer, info dict) from a directory written by ``save``.

    One-line ValueError naming ``where`` if the directory is missing or not a discriminative PRM.
    """
    from safetensors.torch import load_file

    from finegrain.models.load import load_pretrained

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"{where}: '{path}': no such directory (a discriminative PRM from "
                         "`finegrain prm train --kind discriminative`)")
    if not is_disc_prm_dir(p) or not (p / HEAD_FILE).is_file():
        raise ValueError(f"{where}: '{path}' is not a discriminative PRM directory (needs {INFO_FILE} with "
                         f"kind '{KIND}' and {HEAD_FILE})")
    lm, tok = load_pretrained(str(p), "float32", device, where=where)
    model = StepClassifier(lm)
    sd = load_file(str(p / HEAD_FILE))
    if set(sd) != {"weight", "bias"} or tuple(sd["weight"].shape) != tuple(model.head.weight.shape):
        raise ValueError(f"{where}: '{p / HEAD_FILE}' does not match the backbone (expected weight "
                         f"{tuple(model.head.weight.shape)} and bias)")
    with torch.no_grad():
        model.head.weight.copy_(sd["weight"])
        model.head.bias.copy_(sd["bias"])
    return model.eval(), tok, json.loads((p / INFO_FILE).read_text())


def encode_steps(tokenizer, prompt: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
    """(input ids, position of each step's last token) of one PRM input (module docstring).

    A step whose text gives no token (cannot happen for non-empty text with the tokenizers here)
    shares the read position of the step before it. Raises ValueError if the prompt has no token.

    >>> from finegrain.models.tokenizer import char_tokenizer
    >>> tok = char_tokenizer("Q: 12+=\\n")
    >>> ids, pos = encode_steps(tok, "Q: 1+1\\n", ["1+1=2\\n", "A: 2"])
    >>> pos, tok.decode([ids[p] for p in pos])
    ([13, 17], '\\n2')
    """
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not ids:
        raise ValueError("encode_steps: the prompt has no token (empty prompt and a tokenizer without BOS)")
    pos = []
    for s in steps:
        ids += tokenizer(s, add_special_tokens=False)["input_ids"]
        pos.append(len(ids) - 1)
    return ids, pos


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_token_id: int, max_len: int | None = None):
    """Right-pad encoded inputs into tensors.

    Inputs longer than ``max_len`` are cut there; steps whose last token falls beyond the cut are
    masked out. Returns (input_ids (B, T) long, attention_mask (B, T) bool, read_pos (B, S) long,
    step_mask (B, S) bool), S = the most steps of any row (≥ 1 so the tensors are never empty).
    """
    cut = [(ids[:max_len] if max_len else ids, pos) for ids, pos in encoded]
    B = len(cut)
    T = max(1, max(len(ids) for ids, _ in cut))
    S = max(1, max(len(pos) for _, pos in cut))
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.bool)
    read_pos = torch.zeros(B, S, dtype=torch.long)
    step_mask = torch.zeros(B, S, dtype=torch.bool)
    for b, (ids, pos) in enumerate(cut):
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, :len(ids)] = True
        for k, p in enumerate(pos):
            read_pos[b, k] = p
            step_mask[b, k] = p < len(ids)
    return input_ids, attention_mask, read_pos, step_mask


@torch.no_grad()
def step_logits(model: StepClassifier, tokenizer, prompts: Sequence[str], steps: Sequence[Sequence[str]], *,
                micro_batch: int = 16) -> list[list[float | None]]:
    """s_k for every step of every (prompt, steps) pair; None for a step cut by the position limit.

    The model's train/eval mode is left as the caller set it. Returns B lists of K_b values.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[float | None]] = []
    for s in range(0, len(prompts), micro_batch):
        enc = [encode_steps(tokenizer, p, st) for p, st in zip(prompts[s:s + micro_batch], steps[s:s + micro_batch])]
        ids, am, pos, mask = collate(enc, pad, model.max_positions)
        logits = model(ids.to(model.device), am.to(model.device), pos.to(model.device)).cpu()  # (b, S)
        for b, (_, p) in enumerate(enc):
            out.append([float(logits[b, k]) if mask[b, k] else None for k in range(len(p))])
    return out
