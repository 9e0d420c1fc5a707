"""Rollouts with Hugging Face ``generate``.

Departures worth knowing:
1. ``behavior_logprobs`` are log softmax(logits / T) of the sampled token. With top-p / top-k <
   full vocabulary the sampler draws from a truncated distribution; like verl we record the
   untruncated one (the PPO ratio is taken against it). They come from the logits ``generate``
   returns when those fit in ``logits_budget_bytes`` (tiny vocabularies), else from one extra
   micro-batched forward pass after generation: keeping (B, L, V) fp32 logits of a 150k-token
   vocabulary would take tens of GB.
2. Sampling uses the torch global RNG inside ``torch.random.fork_rng`` seeded with the given seed,
   so the caller's RNG state is untouched and the same seed gives the same tokens.
"""

from __future__ import annotations

import torch

from finegrain.models.logprobs import logprobs_from_logits, response_logprobs
from finegrain.rollout.base import ROLLOUT_ENGINES, SamplingParams
from finegrain.segment import token_step_ids
from finegrain.tasks.base import Example
from finegrain.trajectory import Trajectory, concat


def render_prompt(tokenizer, text: str, use_chat_template: bool = True) -> str:
    """The prompt string fed to the model: the chat template when the tokenizer has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


@ROLLOUT_ENGINES.register("hf")
class HFEngine:
    """Generate with a transformers causal LM.

    Args:
        model, tokenizer: any AutoModelForCausalLM and its tokenizer.
        segmenter: name of the step segmenter used to fill ``step_ids``.
        max_batch: rows per ``generate`` call (memory bound on large models).
        use_chat_template: wrap prompts with the tokenizer's chat template when it has one.
    """

    def __init__(self, model, tokenizer, *, segmenter: str = "newline", max_batch: int = 256,
                 use_chat_template: bool = True, logits_budget_bytes: int = 512 * 2**20, forward_micro_batch: int = 16):
        self.model, self.tokenizer = model, tokenizer
        self.logits_budget_bytes, self.forward_micro_batch = logits_budget_bytes, forward_micro_batch
        self.segmenter, self.max_batch, self.use_chat_template = segmenter, max_batch, use_chat_template
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer: needs a pad token (set tokenizer.pad_token, e.g. to the EOS token)")

    @property
    def context_length(self) -> int | None:
        """The model's maximum sequence length (prompt + response), None if it does not say."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def prompt_fits(self, examples: list[Example], max_new_tokens: int) -> list[bool]:
        """Whether each example's rendered prompt plus ``max_new_tokens`` fits the context."""
        ctx = self.context_length
        if ctx is None or not examples:
            return [True] * len(examples)
        texts = [render_prompt(self.tokenizer, e.prompt, self.use_chat_template) for e in examples]
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        return [n + max_new_tokens <= ctx for n in lengths]

    @torch.no_grad()
    def generate(self, examples: list[Example], n: int, sampling: SamplingParams, seed: int,
                 group_offset: int = 0) -> Trajectory:
        """n samples for each example; rows of example i get group id ``group_offset + i``."""
        texts = [render_prompt(self.tokenizer, e.prompt, self.use_chat_template) for e in examples]
        rows = [(i, t) for i, t in enumerate(texts) for _ in range(n)]
        was_training = self.model.training
        self.model.eval()
        parts = []
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for s in range(0, len(rows), self.max_batch):
                chunk = rows[s:s + self.max_batch]
                parts.append(self._generate_chunk([t for _, t in chunk], sampling,
                                                  torch.tensor([group_offset + i for i, _ in chunk]),
                                                  [examples[i] for i, _ in chunk]))
        self.model.train(was_training)
        return parts[0] if len(parts) == 1 else concat(parts, self.tokenizer.pad_token_id)

    def _generate_chunk(self, prompts: list[str], sp: SamplingParams, group_ids: torch.Tensor,
                        examples: list[Example]) -> Trajectory:
        tok, device = self.tokenizer, self.model.device
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
        prompt_ids = enc["input_ids"].to(device)  # (B, P)
        prompt_mask = enc["attention_mask"].bool().to(device)
        ctx = self.context_length
        if ctx is not None and prompt_mask.sum(1).max() + sp.max_new_tokens > ctx:
            worst = int(prompt_mask.sum(1).argmax())
            raise ValueError(f"example '{examples[worst].id}': prompt of {int(prompt_mask[worst].sum())} tokens plus "
                             f"max_new_tokens={sp.max_new_tokens} exceeds the model's context of {ctx} tokens")
        greedy = sp.temperature == 0
        vocab = self.model.get_output_embeddings().weight.shape[0]
        keep_logits = len(prompts) * sp.max_new_tokens * vocab * 4 <= self.logits_budget_bytes
        out = self.model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask.long(), do_sample=not greedy,
            temperature=None if greedy else sp.temperature, top_p=None if greedy else sp.top_p,
            top_k=None if greedy else sp.top_k, max_new_tokens=sp.max_new_tokens,
            output_logits=keep_logits, return_dict_in_generate=True,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        P = prompt_ids.shape[1]
        response_ids = out.sequences[:, P:]  # (B, L)
        is_eos = response_ids == tok.eos_token_id
        # a token is real up to and including the first EOS
        response_mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # (B, L)
        truncated = ~is_eos.any(1)
        response_ids = torch.where(response_mask, response_ids, torch.full_like(response_ids, tok.pad_token_id))
        T = 1.0 if greedy else sp.temperature
        if keep_logits:
            logits = torch.stack(out.logits, dim=1)[:, :response_ids.shape[1]]  # (B, L, V)
            behavior_logprobs = logprobs_from_logits(logits, response_ids, T)  # (B, L)
        else:
            behavior_logprobs = response_logprobs(
                self.model, torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1),
                response_ids.shape[1], T, self.forward_micro_batch)  # (B, L)
        behavior_logprobs = torch.where(response_mask, behavior_logprobs, torch.zeros_like(behavior_logprobs))
        step_ids = token_step_ids(tok, response_ids.cpu(), response_mask.cpu(), self.segmenter).to(device)
        response_texts = tok.batch_decode(response_ids, skip_special_tokens=True)
        return Trajectory(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
            response_mask=response_mask, loss_mask=response_mask.clone(), group_ids=group_ids.to(device),
            step_ids=step_ids, behavior_logprobs=behavior_logprobs, truncated=truncated,
            prompt_texts=prompts, response_texts=response_texts, examples=list(examples))
