"""PEAR: Phase Entropy Aware Reward (outcome level).

"PEAR: Phase Entropy Aware Reward for Efficient Reasoning" (ICLR 2026), arXiv:2510.08026.
The authors' code (iNLP-Lab/PEAR, ``entropy.py::compute_score``) was not available to check:
the formula below follows the paper's equations as reproduced in a paper note and the
OpenReview reviews (docs: /work/shared/docs/methods.md §22, SECONDARY), and the README's
interface (``compute_score(solution_str, ground_truth, old_log_prob={"old_log_probs", "entropys"},
valid_response_ids, tokenizer, method, score=1.0, format_score=0.0)``).

A response y = (y_1 … y_T) (its real tokens) is split at the phase marker (``</think>`` for
reasoning models); tokens overlapping the marker belong to neither phase:

    H_t      = −Σ_v π(v | x, y_<t) log π(v | x, y_<t),   π = softmax(logits / τ) of the policy that sampled
    H_think  = mean of H_t over the tokens before the marker
    H_answer = mean of H_t over the tokens after the marker     (no marker: every token is "think", H_answer = 0)
    P(y)     = max(0, H_think − α · H_answer)
    r(y)     = min(1, s − P(y))   if verify(y) = 1
             = r_fmt              otherwise

Defaults α = 1, s = 1, r_fmt = 0 (the paper's). An empty phase has mean 0.

Where the marker is (``marker_boundaries``): the response's own token ids are decoded (special
tokens kept, so a special ``</think>`` is still found), the first occurrence of the marker
string is found in that text at character c, and the token boundaries around it are located by
binary search over the character length e(t) of the decoded first t tokens: think tokens are
t < k_think = max{t : e(t) ≤ c}, answer tokens t ≥ k_answer = min{t : e(t) ≥ c + |marker|}.
This reads character offsets of the *sampled* tokens; re-encoding the response text with the
tokenizer's offset mapping would not always give back the sampled tokens (sampling can produce
a tokenization the tokenizer would not). Cost: O(log T) decodes of ≤ T tokens per response.

Entropies (``response_entropies``): one extra no-grad forward of ``ctx.policy`` over the batch,
in micro-batches of ``micro_batch`` rows (default ``rollout.max_batch``), at the rollout
temperature; the same forward cost as computing old log-probs (``train.update.batch_logprobs``)
plus a softmax over V per response token, with (micro_batch, P + L, V) logits alive at a time.
It runs when the signal scores (before the policy update), so the weights are the ones that
sampled the batch. The model's train/eval mode is left as the caller set it.

Departures (numbered; docs/algorithms/pear.md repeats them):
 1. The phase marker is a kwarg (default "A: ", finegrain's answer line in the ``arith`` task,
    whose responses have no ``</think>``); use ``marker: "</think>"`` for reasoning models.
    The reference is said to find ``</think>`` as a token (a third-party fork uses
    ``convert_ids_to_tokens(ids).index("</think>")``, first occurrence); here it is a string
    in the decoded text, first occurrence, and every token overlapping it is excluded.
 2. Correct means ``task.verify`` = 1; the reference's answer extraction ('strict' / 'flexible'
    GSM8K matching) is the task's business here.
 3. Entropies are computed by this signal at the rollout temperature; the reference reads them
    from verl's old-log-prob pass (which divides logits by the rollout temperature too; whether
    PEAR recomputes them per PPO epoch is UNVERIFIED: here once per batch).
 4. The phases average over every real response token (``response_mask``); in multi-turn
    batches observation tokens count as well (PEAR is single-turn).
 5. ``min(1, s − P)`` is kept literally (the 1 is not ``s``), as in the paper's equation.
UNVERIFIED against code: the entropy normalisation (nats, no length normalisation beyond the
phase means is assumed), and the treatment of the EOS token (here: an answer token when it
follows the marker).
"""

from __future__ import annotations

import torch

from finegrain.losses.entropy import entropy_from_logits
from finegrain.masked import masked_mean
from finegrain.models.logprobs import response_logits
from finegrain.rewards.base import REWARDS, RewardOutput
from finegrain.shapes import check_mask, check_shapes


# ----------------------------------------------------------------------------- pure functions


def phase_masks(k_think: torch.Tensor, k_answer: torch.Tensor, response_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Think and answer token masks from the boundaries, counted in real tokens.

    think[b, t] = real and r_t < k_think[b];  answer[b, t] = real and r_t ≥ k_answer[b], where r_t
    is the index of token t among the row's real tokens.

    Args: k_think (B,) long; k_answer (B,) long; response_mask (B, L) bool.
    Returns: think_mask (B, L) bool, answer_mask (B, L) bool.

    >>> think, answer = phase_masks(torch.tensor([2]), torch.tensor([3]), torch.tensor([[True] * 5 + [False]]))
    >>> think.int().tolist(), answer.int().tolist()
    ([[1, 1, 0, 0, 0, 0]], [[0, 0, 0, 1, 1, 0]])
    """
    check_shapes(k_think=(k_think, ("B",)), k_answer=(k_answer, ("B",)), response_mask=(response_mask, ("B", "L")))
    check_mask("phase_masks.response_mask", response_mask)
    r = response_mask.long().cumsum(1) - 1                                   # (B, L) index among real tokens
    think = response_mask & (r < k_think[:, None])
    answer = response_mask & (r >= k_answer[:, None])
    return think, answer


def pear_reward(token_entropy: torch.Tensor, think_mask: torch.Tensor, answer_mask: torch.Tensor,
                correct: torch.Tensor, *, alpha: float = 1.0, score: float = 1.0, format_score: float = 0.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """r = min(1, s − max(0, H_think − α·H_answer)) if correct else r_fmt (module docstring).

    Args: token_entropy (B, L) float (anything under both masks False is ignored, even NaN);
          think_mask, answer_mask (B, L) bool; correct (B,) bool.
    Returns: values (B,) float32 and {"h_think", "h_answer", "penalty"} (B,) each.

    >>> H = torch.tensor([[1.0, 2.0, 9.0, 0.5, 0.5]])
    >>> think, answer = torch.tensor([[1, 1, 0, 0, 0]]).bool(), torch.tensor([[0, 0, 0, 1, 1]]).bool()
    >>> v, m = pear_reward(H, think, answer, torch.tensor([True]))
    >>> v.tolist(), m["penalty"].tolist()       # P = max(0, 1.5 − 0.5) = 1, r = min(1, 1 − 1) = 0
    ([0.0], [1.0])
    """
    check_shapes(token_entropy=(token_entropy, ("B", "L")), think_mask=(think_mask, ("B", "L")),
                 answer_mask=(answer_mask, ("B", "L")), correct=(correct, ("B",)))
    for name, m in (("think_mask", think_mask), ("answer_mask", answer_mask), ("correct", correct)):
        check_mask(f"pear_reward.{name}", m)
    h = token_entropy.float()
    h_think = masked_mean(h, think_mask, dim=1)                               # (B,)
    h_answer = masked_mean(h, answer_mask, dim=1)                             # (B,)
    penalty = (h_think - alpha * h_answer).clamp(min=0.0)                     # (B,)
    shaped = (score - penalty).clamp(max=1.0)
    values = torch.where(correct, shaped, torch.full_like(shaped, format_score))
    return values, {"h_think": h_think, "h_answer": h_answer, "penalty": penalty}


def _decoded_len(tokenizer, ids: list[int]) -> int:
    return len(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))


def marker_boundary(tokenizer, ids: list[int], marker: str) -> tuple[int, int, bool]:
    """(k_think, k_answer, found) for one response's real token ids (module docstring).

    No marker: (T, T, False), so every token is a think token and there is no answer token.
    """
    T = len(ids)
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    c = text.find(marker)
    if c < 0:
        return T, T, False

    def first(pred) -> int:  # smallest t in [0, T] with pred(e(t)), e non-decreasing; T + 1 if none
        lo, hi = 0, T + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if pred(_decoded_len(tokenizer, ids[:mid])):
                hi = mid
            else:
                lo = mid + 1
        return lo

    k_think = first(lambda e: e > c) - 1                                      # max t with e(t) ≤ c
    k_answer = min(first(lambda e: e >= c + len(marker)), T)
    return max(k_think, 0), max(k_answer, max(k_think, 0)), True


def marker_boundaries(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor, marker: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``marker_boundary`` for every row. Args: response_ids (B, L) long; response_mask (B, L) bool.
    Returns: k_think (B,) long, k_answer (B,) long, found (B,) bool."""
    check_shapes(response_ids=(response_ids, ("B", "L")), response_mask=(response_mask, ("B", "L")))
    rows = [marker_boundary(tokenizer, ids[m].tolist(), marker) for ids, m in zip(response_ids.cpu(), response_mask.cpu())]
    dev = response_ids.device
    k_think = torch.tensor([r[0] for r in rows], dtype=torch.long, device=dev)
    k_answer = torch.tensor([r[1] for r in rows], dtype=torch.long, device=dev)
    found = torch.tensor([r[2] for r in rows], dtype=torch.bool, device=dev)
    return k_think, k_answer, found


@torch.no_grad()
def response_entropies(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, *,
                       temperature: float, micro_batch: int) -> torch.Tensor:
    """H_t of softmax(logits / τ) at every response position, in no-grad micro-batches.

    Args: input_ids (B, P + L) long (left-padded prompt, right-padded response);
          attention_mask (B, P + L) bool; response_len L; temperature τ > 0; micro_batch ≥ 1 rows.
    Returns: (B, L) float32; padding positions hold values to be masked.
    """
    check_shapes(input_ids=(input_ids, ("B", "T")), attention_mask=(attention_mask, ("B", "T")))
    out = []
    for s in range(0, input_ids.shape[0], micro_batch):
        logits = response_logits(model, input_ids[s:s + micro_batch], attention_mask[s:s + micro_batch], response_len)
        out.append(entropy_from_logits(logits.float() / temperature, chunk_size=max(response_len, 1)))  # (mb, L)
    return torch.cat(out) if out else torch.zeros(0, response_len)


# ----------------------------------------------------------------------------- the signal


@REWARDS.register("pear", level="outcome", needs="verify",
                  bounds={"alpha": "(-inf, inf)", "temperature": "(0, inf)", "micro_batch": "[1, inf)"})
class PhaseEntropyReward:
    """PEAR on a batch (module docstring). Components: accuracy, h_think, h_answer, penalty,
    marker_found (fraction of rows with the marker), think_tokens, answer_tokens."""

    name = "pear"
    level = "outcome"

    def __init__(self, task, tokenizer, policy, *, alpha: float = 1.0, score: float = 1.0, format_score: float = 0.0,
                 marker: str = "A: ", temperature: float = 1.0, micro_batch: int = 256):
        if not isinstance(marker, str) or not marker:
            raise ValueError(f"pear.marker: expected a non-empty string, got {marker!r}")
        if not temperature > 0:
            raise ValueError(f"pear.temperature: expected a number > 0, got {temperature}")
        if not (isinstance(micro_batch, int) and micro_batch >= 1):
            raise ValueError(f"pear.micro_batch: expected an integer ≥ 1, got {micro_batch!r}")
        if policy is None or tokenizer is None:
            raise ValueError("pear: needs the sampling policy and its tokenizer (the context gave none)")
        self.task, self.tokenizer, self.policy = task, tokenizer, policy
        self.alpha, self.score, self.format_score, self.marker = alpha, score, format_score, marker
        self.temperature, self.micro_batch = temperature, micro_batch

    @classmethod
    def from_context(cls, ctx, *, alpha: float = 1.0, score: float = 1.0, format_score: float = 0.0,
                     marker: str = "A: ", temperature: float | None = None, micro_batch: int | None = None):
        return cls(ctx.task, ctx.tokenizer, ctx.policy, alpha=alpha, score=score, format_score=format_score,
                   marker=marker, temperature=temperature if temperature is not None else ctx.cfg.rollout.temperature,
                   micro_batch=micro_batch if micro_batch is not None else ctx.cfg.rollout.max_batch)

    def __call__(self, traj) -> RewardOutput:
        acc = torch.tensor([self.task.verify(ex, t) for ex, t in zip(traj.examples, traj.response_texts)],
                           dtype=torch.float32, device=traj.response_ids.device)   # (B,)
        L = traj.response_ids.shape[1]
        H = response_entropies(self.policy, traj.input_ids, traj.attention_mask, L, temperature=self.temperature,
                               micro_batch=self.micro_batch).to(acc.device)         # (B, L)
        k_think, k_answer, found = marker_boundaries(self.tokenizer, traj.response_ids, traj.response_mask, self.marker)
        think, answer = phase_masks(k_think, k_answer, traj.response_mask)          # (B, L) each
        values, parts = pear_reward(H, think, answer, acc >= 1.0, alpha=self.alpha, score=self.score,
                                    format_score=self.format_score)
        comps = {"accuracy": acc, **parts, "marker_found": found.float(), "think_tokens": think.sum(1).float(),
                 "answer_tokens": answer.sum(1).float()}
        return RewardOutput(values=values, mask=torch.ones_like(values, dtype=torch.bool), level="outcome",
                            components=comps)
