"""The Hugging Face sampler: ``model.generate`` on left-padded token prefixes.

Departures worth knowing:
1. Log-probs are log softmax(logits / T) of the sampled token. With top-p / top-k < full
   vocabulary the sampler draws from a truncated distribution; like verl we record the
   untruncated one (the PPO ratio is taken against it). They come from the logits ``generate``
   returns when those fit in ``logits_budget_bytes`` (tiny vocabularies), else from one extra
   micro-batched forward pass after generation: keeping (B, L, V) fp32 logits of a 150k-token
   vocabulary would take tens of GB.
2. Sampling uses the torch global RNG inside ``torch.random.fork_rng`` seeded with the given seed,
   so the caller's RNG state is untouched and the same seed gives the same tokens.
3. Stop strings are checked by decoding each row's newest tokens (``_StopStrings``), not by
   ``generate``'s own criterion, which needs every tokenizer to spell a fixed probe text (a
   character tokenizer over a small alphabet cannot). The continuation is then cut after the
   first token at which its decoded text contains a stop string.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from finegrain.models.logprobs import logprobs_from_logits, response_logprobs
from finegrain.sampling.base import FINISH_LENGTH, FINISH_STOP, SAMPLERS, Completions, SamplingParams


@SAMPLERS.register("hf")
class HFSampler:
    """Sample from a transformers causal LM (the trained model itself: no weight sync needed).

    Args:
        model, tokenizer: any AutoModelForCausalLM and its tokenizer (needs a pad token).
        max_batch: rows per ``generate`` call (memory bound on large models).
        logits_budget_bytes: keep generate's logits for the log-probs when B·L·V·4 bytes fit.
        forward_micro_batch: rows per forward when log-probs are recomputed instead.
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 256, logits_budget_bytes: int = 512 * 2**20,
                 forward_micro_batch: int = 16):
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer: needs a pad token (set tokenizer.pad_token, e.g. to the EOS token)")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.logits_budget_bytes, self.forward_micro_batch = max_batch, logits_budget_bytes, forward_micro_batch

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def sync_weights(self) -> None:
        """Nothing to do: ``generate`` runs on the trained model."""

    @torch.no_grad()
    def sample(self, prefixes: Sequence[Sequence[int]], n: int, params: SamplingParams, seed: int) -> Completions:
        rows = [list(p) for p in prefixes for _ in range(n)]
        longest = max((len(r) for r in rows), default=0)
        ctx = self.context_length
        if ctx is not None and longest + params.max_new_tokens > ctx:
            worst = max(range(len(rows)), key=lambda i: len(rows[i])) // max(n, 1)
            raise ValueError(f"prefix {worst}: {longest} tokens plus max_new_tokens={params.max_new_tokens} exceeds "
                             f"the model's context of {ctx} tokens")
        out = Completions()
        was_training = self.model.training
        self.model.eval()
        with torch.random.fork_rng(devices=[self.model.device] if self.model.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for s in range(0, len(rows), self.max_batch):
                ids, lps, fin = self._chunk(rows[s:s + self.max_batch], params)
                out.token_ids += ids
                out.logprobs += lps
                out.finish += fin
        self.model.train(was_training)
        return out

    def _chunk(self, rows: list[list[int]], sp: SamplingParams):
        tok, device = self.tokenizer, self.model.device
        pad = tok.pad_token_id
        P = max(len(r) for r in rows)
        prompt_ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows], device=device)  # (b, P)
        prompt_mask = torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in rows], device=device)  # (b, P)
        greedy = sp.temperature == 0
        vocab = self.model.get_output_embeddings().weight.shape[0]
        keep_logits = sp.logprobs and len(rows) * sp.max_new_tokens * vocab * 4 <= self.logits_budget_bytes
        stops = [tok.eos_token_id, *sp.stop_token_ids] if sp.stop_token_ids else tok.eos_token_id
        extra = {"stopping_criteria": StoppingCriteriaList([_StopStrings(tok, sp.stop_strings, P)])} if sp.stop_strings else {}
        gen = self.model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask.long(), do_sample=not greedy,
            temperature=None if greedy else sp.temperature, top_p=None if greedy else sp.top_p,
            top_k=None if greedy else sp.top_k, max_new_tokens=sp.max_new_tokens,
            output_logits=keep_logits, return_dict_in_generate=True, pad_token_id=pad, eos_token_id=stops,
            # each process generates alone: a sharded policy (train.fsdp) is whole for the rollout, so
            # transformers' lock-step "synced_gpus" loop (its default for FSDP modules) must stay off
            synced_gpus=False, **extra)
        new = gen.sequences[:, P:]  # (b, L)
        lengths, finish = self._cut(new, sp)
        L = new.shape[1]
        mask = torch.arange(L, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]  # (b, L)
        new = torch.where(mask, new, torch.full_like(new, pad))
        T = 1.0 if greedy else sp.temperature
        if not sp.logprobs:
            return [r[:k] for r, k in zip(new.tolist(), lengths)], [None] * len(rows), finish
        if keep_logits:
            logits = torch.stack(gen.logits, dim=1)[:, :L]  # (b, L, V)
            lp = logprobs_from_logits(logits, new, T)  # (b, L)
        else:
            lp = response_logprobs(self.model, torch.cat([prompt_ids, new], 1), torch.cat([prompt_mask, mask], 1),
                                   L, T, self.forward_micro_batch)  # (b, L)
        ids, lps = new.tolist(), lp.float().tolist()
        return [r[:k] for r, k in zip(ids, lengths)], [r[:k] for r, k in zip(lps, lengths)], finish

    def _cut(self, new: torch.Tensor, sp: SamplingParams) -> tuple[list[int], list[str]]:
        """Length of each continuation (through its first stop) and why it ended."""
        stop_ids = torch.tensor([self.tokenizer.eos_token_id, *sp.stop_token_ids], device=new.device)
        is_stop = torch.isin(new, stop_ids)  # (b, L)
        first = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, 0).tolist()  # 0 = no stop token
        lengths, finish = [], []
        for row, f in zip(new.tolist(), first):
            k = f or None
            if sp.stop_strings:
                s = self._stop_string_end(row[:k] if k else row, sp.stop_strings)
                k = s if s is not None and (k is None or s < k) else k
            lengths.append(k if k is not None else len(row))
            finish.append(FINISH_STOP if k is not None else FINISH_LENGTH)
        return lengths, finish

    def _stop_string_end(self, row: list[int], stop_strings: tuple[str, ...]) -> int | None:
        """Tokens up to the first one at which the decoded text contains a stop string, or None.

        Binary search over the prefix length: "the decoded prefix contains a stop string" only
        turns from False to True as the prefix grows (decoding a longer prefix extends the text).
        """
        def hit(k: int) -> bool:
            text = self.tokenizer.decode(row[:k], skip_special_tokens=True)
            return any(s in text for s in stop_strings)

        if not hit(len(row)):
            return None
        lo, hi = 1, len(row)  # hit(hi) holds; find the smallest such k
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
        return lo

class _StopStrings(StoppingCriteria):
    """Per-row stop once the decoded new tokens (after the first ``prompt_len`` columns) contain a
    stop string. Only the last ``window`` tokens are decoded each step: a stop string of c
    characters is spelled by at most c + 2 tokens unless tokens are zero-width."""

    def __init__(self, tokenizer, stop_strings, prompt_len: int):
        self.tokenizer, self.stop_strings, self.prompt_len = tokenizer, tuple(stop_strings), prompt_len
        self.window = max(len(s) for s in self.stop_strings) + 2

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tails = input_ids[:, self.prompt_len:][:, -self.window:].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop_strings) for t in texts], device=input_ids.device)
