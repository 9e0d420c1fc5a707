"""PRL (Process Reward Learning): KL-regularised process rewards kept at step ends.

PRL (arXiv:2601.10201) splits the entropy-regularised objective max E[r] − η·KL(π‖π_ref) into per-step
rewards. The authors' code path (``algorithm.adv_estimator=prm``, ``prm.adv=orm``) computes, for
response i with trained tokens t:

    A_i = (R_i − mean_{j∈g(i)} R_j) / (std_{j∈g(i)} R_j + ε)       GRPO on the outcome R
    d_{i,t} = log π_old(o_t) − log π_ref(o_t)                        per-token log ratio
    D_{i,t} = Σ_{s≥t} d_{i,s}                                        reverse cumulative sum (s = t included)
    u_{i,t} = A_i − D_{i,t} / η
    K_i = step ends of row i (last token of each step, or every step_len-th token) ∪ {last token}
    A^PRL_{i,t} = u_{i,n(t)},   n(t) = min{s ∈ K_i : s ≥ t}          ("left fill" from the next kept position)

used directly as the advantages (no further normalisation). ``prl_advantages`` computes exactly
this from explicit tensors.

How the trainer feeds it. An estimator sees one (B, L) reward tensor per source, and log-probs are
not among its arguments. The trainer does provide the PRL log ratio already: with
``loss.kl_mode: reward``, ``loss.kl_estimator: k1`` and ``loss.kl_coef: 1/η`` (which also makes
``build_run`` keep a frozen reference, ``Run.ref``), ``train.stages.score_batch`` adds the source

    kl_penalty_{i,t} = −(1/η)·(log π_old(o_t) − log π_ref(o_t)) = −d_{i,t}/η   on trained tokens

(π_old = the behaviour log-probs, or the recomputed old log-probs when the batch is reused). Every
step of the computation above is linear in (A_i, d) and the left fill of a per-row constant is
that constant (the last trained token is always kept), so

    A^PRL = grpo(verifier) + prl(kl_penalty)

exactly, with ``advantage.per_source: {verifier: {name: grpo}, kl_penalty: {name: prl}}`` and
``advantage.whiten: false`` (``configs/arith_prl.yaml``). The registered ``prl`` is therefore the
process half: the return-to-go of its source, kept at step ends plus the last token, left-filled.
``tests/credit/test_prl.py`` checks the identity against ``prl_advantages`` and a plain loop of
the reference code.

Reference code read: MaxwellJryao/Process-Reward-Learning
    verl/trainer/ppo/ray_trainer.py @ 15e42764bd4b784ddd27867229f1d97e3fde9bfc (and @ d9ab7c6d,
    which adds ``prm.step_split`` 'n' / 'nn': keep the "\\n" / "\\n\\n" tokens), the block under
    ``adv_estimator == PRM and prm.eta > 0``;
    verl/trainer/ppo/core_algos.py @ d4e365b70e32ce391f6adc210ce527938f9a858b
    (``left_fill_by_next_nonzero``, ``compute_prm_outcome_advantage``).

Where this module departs from the reference code:

1. The left fill takes the value at the next *kept position*; the reference takes the next
   *nonzero* value (``left_fill_by_next_nonzero``), so a kept u that is exactly 0 is skipped there
   and its step borrows the value of a later step.
2. A group of one gets A_i = 0 (``grpo``); the reference uses mean 0 and std 1 there, i.e.
   A_i = R_i / (1 + ε). A constant group gets exactly 0 (see ``finegrain.credit.outcome``, note 3).
3. Steps: ``step_len = 0`` keeps the last trained token of each of finegrain's steps
   (``Trajectory.step_ids``; for the newline segmenter that is the "\\n" ending each line, the
   reference's ``step_split='n'``); ``step_len > 0`` keeps every position t with (t + 1) mod
   step_len = 0, as the reference's ``step_split='length'`` (``step_len = 1`` is its token-level
   case, step_len ≤ 0 there). The reference masks with ``response_mask``; we use ``loss_mask``
   (tool-output tokens are neither kept nor filled, and get 0).
4. d and D skip positions outside ``loss_mask`` (``masked_reverse_cumsum``); the reference sums
   over ``response_mask``. Identical for single-turn batches.
5. Through the trainer, π_old is ``traj.behavior_logprobs`` (the sampler's log-probs at the
   rollout temperature) unless the batch is reused for several optimizer steps; the reference
   recomputes old log-probs with the actor. The two agree up to the sampler's numerics.
6. η enters as ``loss.kl_coef = 1/η`` (no separate PRL η). The reference's KL loss coefficient
   is 0 in its scripts, as here: in ``kl_mode: reward`` no KL term is added to the loss.

>>> import torch
>>> m = torch.ones(1, 4, dtype=torch.bool)
>>> s = torch.tensor([[0, 0, 1, 1]])                      # two steps of two tokens
>>> prl(torch.tensor([[-1., -2., -3., -4.]]), m, torch.tensor([0]), s)   # G = [-10, -9, -7, -4]
tensor([[-9., -9., -4., -4.]])
"""

from __future__ import annotations

import torch

from finegrain.credit import ADVANTAGES
from finegrain.credit.outcome import _group_centered
from finegrain.masked import last_true_index, masked_reverse_cumsum
from finegrain.shapes import check_mask, check_shapes
from finegrain.trajectory import last_trained_positions


def kept_positions(loss_mask: torch.Tensor, step_ids: torch.Tensor, step_len: int = 0) -> torch.Tensor:
    """Where PRL keeps its signal: step ends plus the last trained token. (B, L) bool ⊆ loss_mask.

    step_len = 0: the last trained token of each step (``step_ids``, −1 outside steps);
    step_len > 0: the trained tokens at columns t with (t + 1) mod step_len = 0.

    >>> kept_positions(torch.ones(1, 5, dtype=torch.bool), torch.tensor([[0, 0, 1, 1, -1]])).int().tolist()
    [[0, 1, 0, 1, 1]]
    >>> kept_positions(torch.ones(1, 5, dtype=torch.bool), torch.zeros(1, 5, dtype=torch.long), 2).int().tolist()
    [[0, 1, 0, 1, 1]]
    """
    check_shapes(loss_mask=(loss_mask, ("B", "L")), step_ids=(step_ids, ("B", "L")))
    check_mask("loss_mask", loss_mask)
    if step_len < 0:
        raise ValueError(f"prl: step_len must be >= 0, got {step_len}")
    B, L = loss_mask.shape
    pos = torch.arange(L, device=loss_mask.device).expand(B, L)                   # (B, L)
    if step_len > 0:
        kept = loss_mask & ((pos + 1) % step_len == 0)
    else:
        S = max(int(step_ids.max()) + 1, 0) if step_ids.numel() else 0
        ends = last_trained_positions(step_ids, loss_mask, S)                      # (B, S), −1 = none
        kept = torch.zeros(B, L + 1, dtype=torch.bool, device=loss_mask.device)
        kept.scatter_(1, torch.where(ends >= 0, ends, torch.full_like(ends, L)), True)
        kept = kept[:, :L] & loss_mask
    last = last_true_index(loss_mask)                                             # (B,)
    return kept | ((pos == last[:, None]) & loss_mask)


def fill_from_next_kept(values: torch.Tensor, kept: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """out[b, t] = values[b, n(t)], n(t) = min{s ≥ t : kept[b, s]}; 0 where loss_mask is False or
    no kept position follows. values, kept, loss_mask (B, L) -> (B, L).

    >>> fill_from_next_kept(torch.tensor([[1., 2., 3., 4.]]), torch.tensor([[False, True, False, True]]),
    ...                     torch.ones(1, 4, dtype=torch.bool))
    tensor([[2., 2., 4., 4.]])
    """
    B, L = values.shape
    pos = torch.arange(L, device=values.device).expand(B, L)
    idx = torch.where(kept, pos, torch.full_like(pos, L))                         # (B, L), L = none
    nxt = idx.flip(1).cummin(1).values.flip(1)                                    # (B, L)
    out = torch.gather(values, 1, nxt.clamp(max=L - 1))
    ok = loss_mask & (nxt < L)
    return torch.where(ok, out, torch.zeros((), dtype=values.dtype, device=values.device))


def _check(token_rewards, loss_mask, group_ids, step_ids) -> None:
    check_shapes(token_rewards=(token_rewards, ("B", "L")), loss_mask=(loss_mask, ("B", "L")),
                 group_ids=(group_ids, ("B",)), step_ids=(step_ids, ("B", "L")))
    check_mask("loss_mask", loss_mask)


@ADVANTAGES.register("prl", consumes="token", bounds={"step_len": "[0, inf)"})
@torch.no_grad()
def prl(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor, step_ids: torch.Tensor,
        *, step_len: int = 0) -> torch.Tensor:
    """PRL's process term: the return-to-go of one source, kept at step ends, left-filled.

    G_{i,t} = Σ_{s≥t, m_{i,s}} r_{i,s}
    A_{i,t} = G_{i,n(t)},   n(t) = next kept position at or after t (``kept_positions``)

    On the trainer's ``kl_penalty`` source (``loss.kl_mode: reward``, ``kl_estimator: k1``,
    ``kl_coef: 1/η``) r = −d/η and A = −D_{n(t)}/η, PRL's process term; add ``grpo`` on the outcome
    source for the whole estimator (module docstring). Source: arXiv:2601.10201;
    MaxwellJryao/Process-Reward-Learning ray_trainer.py @ 15e42764 and core_algos.py @ d4e365b7.

    Args:
        token_rewards: (B, L) float; one source (normally kl_penalty). Values outside loss_mask
            are ignored.
        loss_mask: (B, L) bool, True = trained-on token.
        group_ids: (B,) long; unused (the process term has no baseline).
        step_ids: (B, L) long, −1 outside steps; read when step_len = 0.
        step_len: 0 = keep finegrain's step ends; k > 0 = keep every k-th column (fixed-length chunks).
    Returns:
        advantages (B, L); 0 where loss_mask is False.
    """
    _check(token_rewards, loss_mask, group_ids, step_ids)
    G = masked_reverse_cumsum(token_rewards, loss_mask)                           # (B, L)
    return fill_from_next_kept(G, kept_positions(loss_mask, step_ids, step_len), loss_mask)


@torch.no_grad()
def prl_advantages(outcome_rewards: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   loss_mask: torch.Tensor, group_ids: torch.Tensor, step_ids: torch.Tensor, *, eta: float,
                   step_len: int = 0, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """The whole PRL advantage from explicit log-probs (the module docstring's code path).

    A_i = GRPO(R)_i;  d = log π_old − log π_ref;  D_t = Σ_{s≥t} d_s;  u_t = A_i − D_t/η;
    A^PRL_{i,t} = u_{i,n(t)}

    Args:
        outcome_rewards: (B,) float R_i.
        old_logprobs, ref_logprobs: (B, L) float log-probs of the sampled tokens under π_old and
            π_ref; values outside loss_mask are ignored (NaN there is fine).
        loss_mask: (B, L) bool; group_ids (B,) long; step_ids (B, L) long.
        eta: the KL coefficient η > 0 (the reference's ``prm.eta``).
        step_len, as ``prl``; scale_by_std, eps as ``grpo``.
    Returns:
        advantages (B, L); 0 where loss_mask is False.
    """
    check_shapes(outcome_rewards=(outcome_rewards, ("B",)), old_logprobs=(old_logprobs, ("B", "L")),
                 ref_logprobs=(ref_logprobs, ("B", "L")))
    _check(old_logprobs, loss_mask, group_ids, step_ids)
    if not eta > 0:
        raise ValueError(f"prl_advantages: eta must be > 0, got {eta}")
    has_tokens = loss_mask.any(dim=1)                                             # (B,)
    centered, std, _ = _group_centered(outcome_rewards, group_ids, has_tokens)    # (B,) each
    A = centered / (std + eps) if scale_by_std else centered                      # (B,)
    d = torch.where(loss_mask, old_logprobs - ref_logprobs, torch.zeros_like(old_logprobs))
    D = masked_reverse_cumsum(d, loss_mask)                                       # (B, L)
    u = A[:, None] - D / eta                                                      # (B, L)
    return fill_from_next_kept(u, kept_positions(loss_mask, step_ids, step_len), loss_mask)
