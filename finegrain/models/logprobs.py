"""Per-token log-probabilities of responses under a causal LM, in batched forward passes."""

from __future__ import annotations

import torch

from finegrain.shapes import check_shapes


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] per position.

    Args: logits (B, L, V); targets (B, L) long.  Returns (B, L) float32.
    Computed as logit[target] − logsumexp(logits) so the (B, L, V) log-softmax is never stored.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
    """Logits that predict each response token: (B, L, V) for the last L positions of input_ids.

    input_ids (B, P + L) = left-padded prompt then right-padded response; attention_mask (B, P + L) bool.
    Position ids are computed from the mask so left padding does not shift positions.
    """
    check_shapes(input_ids=(input_ids, ("B", "T")), attention_mask=(attention_mask, ("B", "T")))
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=pos, use_cache=False)
    T = input_ids.shape[1]
    return out.logits[:, T - response_len - 1: T - 1]  # logits at t predict token t+1


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                      temperature: float = 1.0, micro_batch: int | None = None) -> torch.Tensor:
    """log π(y_t | x, y_<t) for the last ``response_len`` tokens of each row: (B, L).

    Runs in micro-batches of ``micro_batch`` rows (all rows at once if None); gradients flow
    unless the caller wraps it in ``torch.no_grad()``. Padding positions hold garbage: mask them.
    """
    B = input_ids.shape[0]
    step = micro_batch or B
    outs = []
    for i in range(0, B, step):
        ids, am = input_ids[i:i + step], attention_mask[i:i + step]
        logits = response_logits(model, ids, am, response_len)
        outs.append(logprobs_from_logits(logits, ids[:, -response_len:], temperature))
    return torch.cat(outs, 0)
