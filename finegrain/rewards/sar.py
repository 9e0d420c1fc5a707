"""SAR: the self-aligned reward, how much the question makes the policy's own response more likely.

The policy scores its response a twice, after its own prompt q and after an "empty question"
prompt, and rewards the relative drop in perplexity:

    lp_j  = log π_θ(a_j | q, a_<j)          lp0_j = log π_θ(a_j | ∅, a_<j)        j = 0..|a|−1
    ppl(a|q) = exp(−(1/|a|) Σ_j lp_j)       ppl(a) = exp(−(1/|a|) Σ_j lp0_j)
    R_SA = max((ppl(a) − ppl(a|q)) / ppl(a), −1)                        use_log=False (default)
         = max((log ppl(a) − log ppl(a|q)) / (log ppl(a) + 1e-9), −1)   use_log=True

R_SA < 1 always. It is high for a response that follows from its question (concise and specific)
and negative for one that is as likely, or likelier, without it. SAR adds it to the verifiable
reward, R = R_VR + α·R_SA with α = 0.2: in finegrain α is this signal's ``weight`` in the config
(``rewards: [{name: verifier}, {name: sar, weight: 0.2}]``, configs/arith_sar.yaml), not a kwarg.

The empty question (``empty_prompt``, default "") is rendered exactly as the rollout renders a
prompt: through the tokenizer's chat template as the content of one user turn when the model uses
one (``model.use_chat_template`` and a tokenizer with a template; the reference: the system prompt
and an empty user turn), else as plain text after BOS. The default "" is then BOS only, the
paper's ppl(a) = exp(−(1/|a|) Σ_j log P(a_j | a_<j)). For finegrain's "Q: <problem>\\n" tasks the
task's prompt format with an empty question is ``empty_prompt: "Q: \\n"`` (the shipped config).

Source: SAR (arXiv:2509.05489; methods.md §6);
amazon-science/Self-Aligned-Reward-Towards_Effective_and_Efficient_Reasoners
@ 68687edd917dad98993f7a7f8efbdcb74590a5b0: verl/utils/reward_score/efficiency_reward.py
(compute_ppl_qa_log: use_log, use_denominator, use_comparison, clip_value, the 1e-9 and the −1
clip), verl/trainer/ppo/ray_trainer.py (create_ans_only_batch: the empty question;
compute_perplexity: mean over response_mask of old_log_probs).

Shapes: B rows, P prompt, L response tokens. Reads prompt_ids, prompt_mask (B, P), response_ids,
response_mask (B, L); gives values (B,), mask (B,) (False for a response with no token).

Departures from the reference:
1. Both perplexities come from one probe call (``finegrain.models.probe.probe_logprobs``, 2B
   probes) on the policy as it is when the batch is scored, at temperature 1. The reference
   reads ppl(a|q) from old_log_probs and ppl(a) from a second log-prob pass, both at the rollout
   temperature; the two agree at temperature 1 (the shipped configs).
2. Without log, R_SA is computed as max(1 − exp(log ppl(a|q) − log ppl(a)), −1), which is the
   reference's formula without its 1e-9 (ppl(a) ≥ 1, so that term changes R by < 1e-9) and
   cannot overflow for long, unlikely responses.
3. ``clip_value`` (cap both terms) and the variants without a denominator or a comparison are
   not offered: the reference's scripts use neither. α schedulers are not offered (constant α is
   the default there).
4. In a multi-turn episode a is the whole response, observations included (SAR is single-turn).
"""

from __future__ import annotations

import torch

from finegrain.models.probe import probe_logprobs
from finegrain.rewards.base import REWARDS, RewardOutput

LOG_EPS = 1e-9  # the reference's denominator guard (needed with use_log, where log ppl(a) can be ~0)


def self_aligned_reward(logprobs_q: torch.Tensor, logprobs_empty: torch.Tensor, response_mask: torch.Tensor, *,
                        use_log: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """R_SA from the response's per-token log-probs after its question and after the empty one.

    nll_q = −(1/|a|) Σ_j lp_j = log ppl(a|q);  nll_0 = −(1/|a|) Σ_j lp0_j = log ppl(a)
    R_SA = max(1 − exp(nll_q − nll_0), −1)                    use_log=False
         = max((nll_0 − nll_q) / (nll_0 + 1e-9), −1)          use_log=True

    Args: logprobs_q, logprobs_empty (B, L) float; response_mask (B, L) bool, True = a token of a.
    Values under response_mask False are never read. Returns: R_SA (B,), applicable (B,) bool
    (False for a row without tokens, whose R_SA is 0), nll_q (B,), nll_0 (B,).

    >>> lp = torch.log(torch.tensor([[0.5, 0.5]])); lp0 = torch.log(torch.tensor([[0.25, 0.25]]))
    >>> r, ok, _, _ = self_aligned_reward(lp, lp0, torch.tensor([[True, True]]))  # ppl 2 vs 4: (4 − 2)/4
    >>> round(r.item(), 6), ok.tolist()
    (0.5, [True])
    """
    n = response_mask.sum(1)                                                                # (B,)
    zero = torch.zeros_like(logprobs_q, dtype=torch.float32)
    nll_q = -torch.where(response_mask, logprobs_q.float(), zero).sum(1) / n.clamp(min=1)   # (B,)
    nll_0 = -torch.where(response_mask, logprobs_empty.float(), zero).sum(1) / n.clamp(min=1)
    if use_log:
        r = (nll_0 - nll_q) / (nll_0 + LOG_EPS)
    else:
        r = 1.0 - torch.exp(nll_q - nll_0)                    # (ppl(a) − ppl(a|q)) / ppl(a)
    applicable = n > 0
    r = torch.where(applicable, r.clamp(min=-1.0), torch.zeros_like(r))
    return r, applicable, nll_q, nll_0


def empty_prompt_ids(tokenizer, text: str, use_chat_template: bool) -> list[int]:
    """Token ids of the empty-question prompt, rendered as the rollout renders a prompt
    (``finegrain.envs.runner.TextRenderer.prompt``, which rewards may not import): the chat
    template with one user turn holding ``text`` when wanted and available, then tokenized
    with special tokens."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


@REWARDS.register("sar", level="outcome", bounds={"micro_batch": "[1, inf)"})
class SelfAlignedReward:
    """SAR's self-aligned reward (level 'outcome'); see the module docstring.

    Cost per batch: 2B probes of the policy under no_grad (each response after its prompt and
    after the empty question), in one ``probe_logprobs`` call: about two forwards over the batch.
    """

    name = "sar"
    level = "outcome"

    def __init__(self, policy, tokenizer, *, empty_ids: list[int], use_log: bool = False, micro_batch: int = 16):
        if not empty_ids:
            raise ValueError("sar.empty_prompt: the empty-question prompt has no token with this tokenizer (it adds "
                             "no BOS); set empty_prompt to some text, e.g. 'Q: \\n'")
        self.policy, self.tokenizer, self.empty_ids = policy, tokenizer, list(empty_ids)
        self.use_log, self.micro_batch = use_log, micro_batch

    @classmethod
    def from_context(cls, ctx, *, empty_prompt: str = "", use_log: bool = False, micro_batch: int = 16):
        ids = empty_prompt_ids(ctx.tokenizer, empty_prompt, ctx.cfg.model.use_chat_template)
        return cls(ctx.policy, ctx.tokenizer, empty_ids=ids, use_log=use_log, micro_batch=micro_batch)

    def token_logprobs(self, traj) -> tuple[torch.Tensor, torch.Tensor]:
        """(lp, lp0), each (B, L): the response's log-probs after its prompt and after the empty
        question; 0 where response_mask is False."""
        B, L = traj.response_ids.shape
        responses = [traj.response_ids[b][traj.response_mask[b]].tolist() for b in range(B)]
        contexts = [traj.prompt_ids[b][traj.prompt_mask[b]].tolist() for b in range(B)] + [self.empty_ids] * B
        lps = probe_logprobs(self.policy, contexts, responses + responses, pad_token_id=self.tokenizer.pad_token_id,
                             micro_batch=self.micro_batch)
        out = torch.zeros(2, B, L)
        for i, t in enumerate(lps):
            out[i // B, i % B, traj.response_mask[i % B].cpu()] = t.float().cpu()
        return out[0], out[1]

    def __call__(self, traj) -> RewardOutput:
        lp, lp0 = self.token_logprobs(traj)
        r, applicable, nll_q, nll_0 = self_aligned_reward(lp, lp0, traj.response_mask.cpu(), use_log=self.use_log)
        dev = traj.response_ids.device
        return RewardOutput(r.to(dev), applicable.to(dev), "outcome",
                            components={"log_ppl_q": nll_q.to(dev), "log_ppl_empty": nll_0.to(dev)})
