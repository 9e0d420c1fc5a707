"""Teacher-forced probes: the log-probs of given continuations after given contexts, sharing prefixes.

One primitive for every signal that scores a reference continuation after a prefix of a response
(IGPO's answer after each turn, SAR's response after an empty question, SPAE's answer after each
step, DRO's reference outcome after each CoT, RLPR's reference answer, P2S's gold-CoT suffix):

    lp_{n,j} = log π(c_{n,j} | x_n, c_{n,<j}),   j = 0..|c_n|−1

for probes n = 0..N−1 with context x_n and continuation c_n (token-id lists). The model is an
argument (current policy, frozen reference, lagged copy); nothing is kept between calls.

Sharing (``share_prefix=True``, the default where the model supports it). The probes are
grouped into *packed rows*: the token sequences s_n = x_n + c_n of a row are merged into a prefix
tree (a token shared by several probes is one node), laid out as one flat row, and run in one
forward pass with

* position id of a node = its depth in the tree (its index in every s_n that passes through it);
* a 4D additive attention mask (0 / the dtype's minimum) in which a node attends to exactly its
  ancestors and itself.

A node therefore sees the same keys at the same positions as the same token does in a plain
forward over any one s_n through it, so its hidden states, and the log-probs read from them,
are those of the plain forward (up to float summation order). The usual case is K probes of one
response y: x_k = prompt + y[:n_k] + probe prefix, c_k the same reference continuation; their
tree is the spine prompt + y[:max n_k] with K short branches.

Cost for K probes of one response, context lengths P + n_k, probe length m = |probe prefix| + |c|:

    naive (share_prefix=False): Σ_k (P + n_k + m) tokens, K left-padded rows,
                                ceil(K / micro_batch) forward passes
    shared:                     P + max_k n_k + K·m tokens (fewer when branches coincide) in one row;
                                ceil(rows / micro_batch) passes over all rows of the call

so a K-turn rollout costs about one forward over itself plus K·m tokens, instead of about K/2
forwards over itself. Attention inside a row is dense (masked, not sparse), so its cost is
quadratic in the row length; a row is capped at twice the longest probe sequence.

Grouping is automatic: probes are sorted lexicographically by s_n, and a probe joins the row of
the probe before it when their common prefix is at least half of the shorter of the two, and
the row stays under the cap (sorted order makes the common prefix with the previous probe the
longest common prefix with any probe already in the row). So the probes of one response share a
row (each shares the response prefix with its neighbour), probes that share only a BOS token do
not, and responses whose common prompt is longer than their own tokens do. Identical probes
cost nothing extra.

Departures and limits:
1. Packing needs a model whose attention honours a custom additive 4D mask and whose positions
   come from ``position_ids``: Hugging Face ``PACKED_FAMILIES`` with ``PACKED_ATTENTION`` and no
   sliding window shorter than the longest probe. Any other model (flash attention, a stub, a
   wrapped module without ``config``) takes the naive path, with the same numbers.
2. Only the positions that predict continuation tokens are projected to the vocabulary
   (``logits_to_keep``): a row puts them last, which the explicit mask allows.
3. Under ``torch.no_grad``: probes are rewards, not trained through.

Entropies (``return_entropy=True``, optional; SPAE's confidence): also the entropy of the whole
next-token distribution at every position that predicts a continuation token,

    H_{n,j} = −Σ_v π(v | x_n, c_{n,<j}) log π(v | x_n, c_{n,<j})

read from the same logits (``finegrain.losses.entropy.entropy_from_logits``), so it costs a
softmax over V per continuation token and no extra forward pass. The log-probs are the same
numbers with or without it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from finegrain.losses.entropy import entropy_from_logits
from finegrain.models.logprobs import logprobs_from_logits, response_logits

PACKED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")   # tested in tests/models/test_probe.py
PACKED_ATTENTION = ("eager", "sdpa")


def probe_token_ids(tokenizer, prefix: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the probe text ``prefix + answer``, split into (prefix ids, answer ids).

    The text is tokenized as one string (as the model would see it) and a token belongs to the
    answer when it covers any of the answer's characters (IGPO's offset-mapping rule). Tokenizers
    without offsets fall back to tokenizing the two parts separately.
    """
    text = prefix + answer
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    except (NotImplementedError, KeyError, TypeError, ValueError):
        return (list(tokenizer(prefix, add_special_tokens=False)["input_ids"]),
                list(tokenizer(answer, add_special_tokens=False)["input_ids"]))
    first = next((i for i, (_, end) in enumerate(offsets) if end > len(prefix)), len(ids))
    return ids[:first], ids[first:]


def answer_probes(traj, tokenizer, prefix: str, cuts: dict[int, list[tuple[int, int]]]
                  ) -> tuple[list[list[int]], list[list[int]], list[tuple[int, int]]]:
    """Probe inputs for "the reference answer after the first n response tokens" of several rows.

    For each row b of ``cuts`` and each (column, n) in ``cuts[b]``: context = the row's prompt
    (without padding) + response[:n] + ``prefix``; continuation = ``Example.answer``'s tokens
    (split from the prefix by ``probe_token_ids``, one tokenization per distinct answer).
    Returns (contexts, continuations, where) for ``probe_logprobs``; ``where[i]`` = (b, column).
    IGPO (turn boundaries) and SPAE (step ends) differ only in their ``cuts``.
    """
    split: dict[str, tuple[list[int], list[int]]] = {}
    contexts, answers, where = [], [], []
    for b, row_cuts in cuts.items():
        answer = str(traj.examples[b].answer)
        if answer not in split:
            split[answer] = probe_token_ids(tokenizer, prefix, answer)
        prefix_ids, answer_ids = split[answer]
        prompt = traj.prompt_ids[b][traj.prompt_mask[b]].tolist()
        response = traj.response_ids[b].tolist()
        for col, n in row_cuts:
            contexts.append(prompt + response[:n] + prefix_ids)
            answers.append(answer_ids)
            where.append((b, col))
    return contexts, answers, where


@dataclasses.dataclass
class PackedRow:
    """One packed row: a prefix tree of probe sequences, its nodes in insertion order.

    tokens, depth, parent: (T,) per node (parent −1 at a root; a parent comes before its child).
    probes: indices of the probes packed here. predictors[i]: for probe probes[i], the node whose
    output predicts each continuation token (|c| nodes).
    """

    tokens: list[int]
    depth: list[int]
    parent: list[int]
    probes: list[int]
    predictors: list[list[int]]


def _as_ids(seq) -> list[int]:
    return seq.tolist() if isinstance(seq, torch.Tensor) else [int(t) for t in seq]


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _check(contexts, continuations, where: str) -> tuple[list[list[int]], list[list[int]]]:
    if len(contexts) != len(continuations):
        raise ValueError(f"{where}: {len(contexts)} contexts but {len(continuations)} continuations")
    ctx, cont = [_as_ids(c) for c in contexts], [_as_ids(c) for c in continuations]
    for n, c in enumerate(ctx):
        if not c:
            raise ValueError(f"{where}: contexts[{n}] is empty; a probe needs at least one context token "
                             "(e.g. BOS) to predict its first continuation token from")
    return ctx, cont


def pack_probes(contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[PackedRow]:
    """Group probes into packed rows (see the module docstring); probes with an empty continuation
    are left out. Σ len(row.tokens) is the tokens the shared path runs.
    """
    return _pack(*_check(contexts, continuations, "pack_probes"))


def _pack(ctx: list[list[int]], cont: list[list[int]]) -> list[PackedRow]:
    seqs = [c + a for c, a in zip(ctx, cont)]
    scored = sorted((n for n in range(len(seqs)) if cont[n]), key=lambda n: seqs[n])
    if not scored:
        return []
    cap = 2 * max(len(seqs[n]) for n in scored)
    rows: list[PackedRow] = []
    prev_seq: list[int] = []
    prev_path: list[int] = []
    for n in scored:
        s = seqs[n]
        shared = _common_prefix_len(s, prev_seq) if rows else 0
        new = len(s) - shared
        joins = rows and 2 * shared >= min(len(s), len(prev_seq)) and len(rows[-1].tokens) + new <= cap
        if not joins:
            rows.append(PackedRow([], [], [], [], []))
            shared, new, prev_path = 0, len(s), []
        row = rows[-1]
        first = len(row.tokens)
        path = prev_path[:shared] + list(range(first, first + new))              # node of each token of s
        row.tokens.extend(s[shared:])
        row.depth.extend(range(shared, len(s)))
        row.parent.extend(path[i - 1] if i else -1 for i in range(shared, len(s)))
        row.probes.append(n)
        row.predictors.append(path[len(ctx[n]) - 1: len(s) - 1])                 # logits at t predict t+1
        prev_seq, prev_path = s, path
    return rows


def _ancestors(parent: list[int]) -> torch.Tensor:
    """(T, T) bool: [q, p] = node p is node q or one of its ancestors (parents precede children).

    Nodes form runs a..b−1 in which each node's parent is the one before it; a run's nodes share
    the ancestors of the run's first parent, so each run costs two slice writes.
    """
    T = len(parent)
    anc = torch.zeros(T, T, dtype=torch.bool)
    starts = [q for q in range(T) if q == 0 or parent[q] != q - 1]
    for a, b in zip(starts, starts[1:] + [T]):
        anc[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        if parent[a] >= 0:
            anc[a:b, :a] = anc[parent[a], :a]
    return anc


def _sliding_window(cfg) -> int | None:
    """The attention window some layer of the model applies, None if every layer attends fully."""
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return None if getattr(cfg, "use_sliding_window", True) is False else window


def packs(model, longest: int = 0) -> bool:
    """True if ``model`` computes packed rows exactly: a ``PACKED_FAMILIES`` model with
    ``PACKED_ATTENTION`` and no sliding window shorter than ``longest`` tokens."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in PACKED_FAMILIES:
        return False
    if getattr(cfg, "_attn_implementation", None) not in PACKED_ATTENTION:
        return False
    window = _sliding_window(cfg)
    return window is None or longest <= window


def _packed_forward(model, rows: list[PackedRow], continuations: list[list[int]], *, pad_token_id: int,
                    device, dtype, entropy: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """One forward over ``rows``: {probe index: ((|c|,) float32 log-probs, (|c|,) entropies or None)}."""
    R, W = len(rows), max(len(row.tokens) for row in rows)
    ids = torch.full((R, W), pad_token_id, dtype=torch.long)
    pos = torch.zeros(R, W, dtype=torch.long)
    allowed = torch.zeros(R, W, W, dtype=torch.bool)
    allowed[:, torch.arange(W), torch.arange(W)] = True               # padding attends to itself (never read)
    slot_of = []                                                      # per row: node -> column in the batch
    keep = 0
    for r, row in enumerate(rows):
        T = len(row.tokens)
        needed = sorted({q for pred in row.predictors for q in pred})
        is_needed = torch.zeros(T, dtype=torch.bool)
        is_needed[needed] = True
        # nodes that predict continuation tokens go last, so logits_to_keep can cut the rest
        order = torch.cat([torch.nonzero(~is_needed).flatten(), torch.tensor(needed, dtype=torch.long)])
        slot = torch.empty(T, dtype=torch.long)
        slot[order] = torch.arange(W - T, W)
        slot_of.append(slot)
        allowed[r, W - T:, W - T:] = _ancestors(row.parent)[order][:, order]
        ids[r, W - T:] = torch.tensor(row.tokens)[order]
        pos[r, W - T:] = torch.tensor(row.depth)[order]
        keep = max(keep, len(needed))
    # additive (0 / dtype minimum): what eager attention adds to its scores, and what sdpa and the
    # transformers versions before masking_utils take as a prepared 4D mask
    mask = torch.zeros(R, 1, W, W, dtype=dtype).masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                use_cache=False, logits_to_keep=keep)
    logits = out.logits.float()                                      # (R, keep, V)
    first = W - logits.shape[1]
    r_idx, k_idx, tgt, where = [], [], [], []
    for r, row in enumerate(rows):
        for n, pred in zip(row.probes, row.predictors):
            r_idx += [r] * len(pred)
            k_idx += (slot_of[r][pred] - first).tolist()
            tgt += continuations[n]
            where.append((n, len(pred)))
    r_idx, k_idx, tgt = (torch.tensor(x, device=logits.device) for x in (r_idx, k_idx, tgt))
    lp = logits[r_idx, k_idx, tgt] - torch.logsumexp(logits, dim=-1)[r_idx, k_idx]   # (Σ |c_n|,)
    sizes = [k for _, k in where]
    ent = entropy_from_logits(logits[r_idx, k_idx][None])[0].split(sizes) if entropy else [None] * len(where)
    return {n: (chunk, h) for (n, _), chunk, h in zip(where, lp.split(sizes), ent)}


def _naive_forward(model, seqs: list[list[int]], lengths: list[int], chunk: list[int], *, pad_token_id: int,
                   device, entropy: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """One forward over ``chunk``: each probe its own left-padded row (``response_logits``)."""
    width = max(len(seqs[n]) for n in chunk)
    A = max(lengths[n] for n in chunk)
    ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(chunk), width, dtype=torch.bool)
    for r, n in enumerate(chunk):
        ids[r, width - len(seqs[n]):] = torch.tensor(seqs[n], dtype=torch.long)
        mask[r, width - len(seqs[n]):] = True
    ids, mask = ids.to(device), mask.to(device)
    logits = response_logits(model, ids, mask, A)                                  # (n, A, V)
    lp = logprobs_from_logits(logits, ids[:, -A:])                                  # (n, A)
    ent = entropy_from_logits(logits.float()) if entropy else None                  # (n, A)
    return {n: (lp[r, A - lengths[n]:], ent[r, A - lengths[n]:] if entropy else None) for r, n in enumerate(chunk)}


@torch.no_grad()
def probe_logprobs(model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
                   pad_token_id: int, micro_batch: int = 16, share_prefix: bool = True, return_entropy: bool = False
                   ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-token teacher-forced log-probs of each continuation after its context.

    lp_{n,j} = log π(c_{n,j} | x_n, c_{n,<j})
    H_{n,j}  = −Σ_v π(v | x_n, c_{n,<j}) log π(v | x_n, c_{n,<j})      (only with return_entropy)

    Args:
        model: causal LM called under no_grad (its train/eval mode is left as it is).
        contexts: N token-id lists x_n (lists or 1-D tensors), each non-empty.
        continuations: N token-id lists c_n; an empty one gives an empty tensor.
        pad_token_id: id written on padding positions (never attended to).
        micro_batch: rows per forward pass (a packed row holds every probe that shares its prefix).
        share_prefix: pack probes that share a prefix into one row (module docstring); models that
            cannot take packed rows (``packs``) use the naive path whatever this says.
        return_entropy: also return the entropies H_{n,j} (nats, softmax of the raw logits).
    Returns:
        N tensors, the n-th (|c_n|,) float32 on the model's device. Each row is left-padded with
        position ids from its mask (naive) or carries its own positions and mask (packed), so a
        probe's values do not depend on what it is batched with. With ``return_entropy`` a pair
        (log-probs, entropies) of two such lists.
    """
    if micro_batch < 1:
        raise ValueError(f"probe_logprobs: micro_batch must be >= 1, got {micro_batch}")
    ctx, cont = _check(contexts, continuations, "probe_logprobs")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    seqs = [c + a for c, a in zip(ctx, cont)]
    scored = [n for n in range(len(seqs)) if cont[n]]
    out: dict[int, torch.Tensor] = {}
    if scored and share_prefix and packs(model, max(len(seqs[n]) for n in scored)):
        rows = sorted(_pack(ctx, cont), key=lambda row: len(row.tokens), reverse=True)
        for start in range(0, len(rows), micro_batch):
            out.update(_packed_forward(model, rows[start:start + micro_batch], cont, pad_token_id=pad_token_id,
                                       device=device, dtype=dtype, entropy=return_entropy))
    else:
        scored.sort(key=lambda n: len(seqs[n]), reverse=True)       # little padding per micro-batch
        lengths = [len(a) for a in cont]
        for start in range(0, len(scored), micro_batch):
            out.update(_naive_forward(model, seqs, lengths, scored[start:start + micro_batch],
                                      pad_token_id=pad_token_id, device=device, entropy=return_entropy))
    empty = (torch.zeros(0, device=device), torch.zeros(0, device=device))
    lps = [out.get(n, empty)[0] for n in range(len(seqs))]
    if not return_entropy:
        return lps
    return lps, [out.get(n, empty)[1] for n in range(len(seqs))]


def mean_logprob(token_logprobs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N,) mean of each probe's per-token log-probs, (1/|c_n|) Σ_j lp_{n,j}; NaN for an empty one.

    >>> mean_logprob([torch.tensor([-1.0, -2.0]), torch.zeros(0)]).tolist()
    [-1.5, nan]
    """
    return torch.stack([t.float().mean() if t.numel() else torch.full((), float("nan"), device=t.device)
                        for t in token_logprobs]) if token_logprobs else torch.zeros(0)
