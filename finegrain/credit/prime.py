"""PRIME credit assignment: leave-one-out returns computed per reward source.

PRIME (Cui et al. 2025, Process Reinforcement through Implicit Rewards, arXiv:2502.01456) keeps
the implicit-PRM token rewards and the outcome verifier apart: each source gets its own
leave-one-out baseline and discounted return, and the advantages are summed afterwards
(``finegrain.credit.combine.combine_source_advantages``, which also applies the per-source
coefficients and the optional batch whitening). The trainer calls one estimator of this module
per source, telling it where that source's reward lives with ``reward_at``:

    reward_at="token"     every trained token      (implicit PRM, granularity 'token')
    reward_at="step_end"  last token of each step  (step rewards placed by rewards.combine)
    reward_at="last"      last trained token       (outcome verifier; implicit PRM 'whole')

Two estimators, both ``consumes="token"``:

    prime_rloo       the reference code's form (n/(n−1) rescaling of every reward position)
    prime_loo_exact  the paper's form (subtract the leave-one-out mean at every reward position)

For a source with one reward position per response (the outcome verifier), both equal RLOO:
A_{i,t} = γ^{k(T)−k(t)} (R_i − mean_{j≠i} R_j). For dense sources they differ token by token by
(r_{i,t} − m_i)/(n − 1), a term whose sum over a response is 0, so with γ = 1 they agree at the
first reward position and not after it.

Reference code read for this module:
    PRIME-RL/PRIME training/verl/trainer/ppo/core_algos.py::compute_rloo_returns (read from the fork
    zkcpku/PRIME @ 8d6a5e6ca1b566b647c0b12832c96b83802a7aea, the copy the index holds), and
    training/verl/workers/actor/dp_prime.py::update_policy (prime_norm == 'batch_norm');
    volcengine/verl recipe/prime/prime_core_algos.py::compute_rloo_advantage_return
    (@ 15510e8daba084b41026b851d4406dccf54ff561).

Where this module departs from the paper and the reference code:

1. Groups come from ``group_ids``; rows of a group may sit anywhere in the batch and groups may
   have different sizes. The reference walks ``range(0, B, n_samples)`` and assumes every group
   is n_samples contiguous rows, so a filtered or shuffled batch silently mixes prompts.
2. A group of one (after dropping rows with no reward position, see 3) has no leave-one-out
   baseline: we use baseline 0 and no n/(n−1) rescaling, so its advantage is its own
   discounted return. The reference divides by n − 1 = 0 (inf/NaN).
3. A row with no reward position (no trained token; for ``step_end`` no step end on a trained
   token) is left out of its group's n and baseline and gets advantage 0. The reference takes the
   mean of an empty selection (NaN) and that NaN spreads through the whole group.
4. No coefficient is applied here. The reference ``compute_rloo_returns`` reads only the two
   gammas: PRIME's per-source coefficients never reach the RLOO path (verl's recipe does multiply
   by ``dpo_coef``/``gt_coef``). We apply them, really, in ``combine_source_advantages``.
5. Where the reward lives is an explicit argument (``reward_at``), not guessed from dict keys
   (the reference matches ``'rm_scores'`` → every valid token and ``'gt_scores'`` → the last
   valid token).
6. Returns skip positions outside ``loss_mask`` (they add no reward and do not count as a time
   step for γ; ``finegrain.masked.masked_reverse_cumsum``). The reference discounts over every
   column. Identical when the loss mask has no holes, and for γ = 1.
7. Whitening is not done here (the reference whitens the summed return over the response mask):
   ``combine_source_advantages(..., whiten=True)`` whitens over ``loss_mask``.
8. ``prime_loo_exact`` with ``reward_at="last"`` discounts the outcome term by γ^{k(T)−k(t)};
   the paper's outcome term is undiscounted. PRIME's code also discounts it (verifier_gamma,
   default 1.0), and the two agree for γ = 1.

>>> import torch
>>> m = torch.ones(3, 2, dtype=torch.bool)
>>> r = torch.tensor([[0., 1.], [0., 0.], [0., 1.]])      # outcome on the last token
>>> g = torch.tensor([4, 4, 4]); s = torch.zeros(3, 2, dtype=torch.long)
>>> prime_rloo(r, m, g, s, reward_at="last")               # R_i − mean_{j≠i} R_j on every token
tensor([[ 0.5000,  0.5000],
        [-1.0000, -1.0000],
        [ 0.5000,  0.5000]])
"""

from __future__ import annotations

import torch

from finegrain.credit import ADVANTAGES
from finegrain.masked import group_loo_mean, last_true_index, masked_max, masked_mean, masked_reverse_cumsum
from finegrain.shapes import check_mask, check_shapes
from finegrain.trajectory import step_end_mask


def _last_position(loss_mask: torch.Tensor, step_ids: torch.Tensor) -> torch.Tensor:
    last = last_true_index(loss_mask)                                        # (B,)
    pos = torch.arange(loss_mask.shape[1], device=loss_mask.device)          # (L,)
    return (pos[None, :] == last[:, None]) & loss_mask                       # (B, L)


_REWARD_POSITIONS = {
    "token": lambda loss_mask, step_ids: loss_mask,
    "step_end": lambda loss_mask, step_ids: step_end_mask(step_ids) & loss_mask,
    "last": _last_position,
}


def reward_positions(loss_mask: torch.Tensor, step_ids: torch.Tensor, reward_at: str) -> torch.Tensor:
    """Where a reward source lives: (B, L) bool, always a subset of ``loss_mask``.

    'token' = every trained token; 'step_end' = trained tokens that end a step (the step id
    changes after them, read from ``step_ids``); 'last' = the last trained token of each row.
    """
    if reward_at not in _REWARD_POSITIONS:
        raise ValueError(f"reward_at: expected one of {sorted(_REWARD_POSITIONS)}, got '{reward_at}'")
    return _REWARD_POSITIONS[reward_at](loss_mask, step_ids)


def _check(token_rewards, loss_mask, group_ids, step_ids, gamma) -> None:
    check_shapes(token_rewards=(token_rewards, ("B", "L")), loss_mask=(loss_mask, ("B", "L")),
                 group_ids=(group_ids, ("B",)), step_ids=(step_ids, ("B", "L")))
    check_mask("loss_mask", loss_mask)
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma: expected 0 < gamma <= 1, got {gamma}")


def _loo_stats(token_rewards, loss_mask, group_ids, step_ids, reward_at):
    """Reward positions (B, L), per-row mean m_i (B,), leave-one-out mean of the others' m (B,),
    and the number of other rows with a reward position in the group (B,)."""
    pos = reward_positions(loss_mask, step_ids, reward_at)                   # (B, L)
    has = pos.any(dim=1)                                                     # (B,)
    m = masked_mean(token_rewards, pos, dim=1)                               # (B,)
    loo, n_others = group_loo_mean(m, group_ids, has)                        # (B,), (B,)
    return pos, m, loo, n_others


@ADVANTAGES.register("prime_rloo", consumes="token", needs_groups=True, bounds={"gamma": "[0, 1]"})
@torch.no_grad()
def prime_rloo(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor,
               step_ids: torch.Tensor, *, gamma: float = 1.0, reward_at: str = "token") -> torch.Tensor:
    """PRIME's "RLOO" for one reward source, as the reference code computes it.

    m_j = mean_{s∈P_j} r_{j,s}                       (P_j = reward positions of row j, see reward_at)
    r'_{i,s} = r_{i,s} · n/(n−1) − (Σ_{j∈g(i)} m_j)/(n−1)      for s ∈ P_i, 0 elsewhere
             = r_{i,s} − mean_{j∈g(i), j≠i} m_j + (r_{i,s} − m_i)/(n−1)
    A_{i,t} = Σ_{s≥t, m_{i,s}} γ^{k(s)−k(t)} r'_{i,s}       (k counts trained tokens)

    n = number of rows of the group with at least one reward position. For n = 1: r' = r.
    For one reward position per row (outcome, reward_at="last") this is exactly RLOO,
    r' = R_i − mean_{j≠i} R_j. For dense rewards it is not leave-one-out token by token: the extra
    (r_{i,s} − m_i)/(n−1) rewards a token for being above its own response's mean.

    Source: arXiv:2502.01456 §3 (advantage estimation); PRIME-RL/PRIME
    training/verl/trainer/ppo/core_algos.py::compute_rloo_returns (fork zkcpku/PRIME @ 8d6a5e6c),
    where the transform is applied on ``eos_mask`` (every valid response token) for 'rm_scores'
    and on the last valid token only for 'gt_scores'; verl recipe/prime/prime_core_algos.py::
    masked_rloo (same arithmetic). See the module docstring for departures.

    Args:
        token_rewards: (B, L) float, one source only. Values outside reward positions are ignored.
        loss_mask: (B, L) bool, True = trained-on token.
        group_ids: (B,) long; rows with equal id are samples of one prompt, in any order.
        step_ids: (B, L) long, −1 outside steps; used by reward_at="step_end".
        gamma: discount per trained token (PRIME: reward_model_gamma = verifier_gamma = 1.0).
        reward_at: 'token' | 'step_end' | 'last'.
    Returns:
        advantages (B, L); 0 where loss_mask is False and for rows with no reward position.
    """
    _check(token_rewards, loss_mask, group_ids, step_ids, gamma)
    pos, m, loo, n_others = _loo_stats(token_rewards, loss_mask, group_ids, step_ids, reward_at)
    # r·n/(n−1) − Σ_j m_j/(n−1) written as r − loo + (r − m_i)/(n−1), so n = 1 needs no special value
    extra = (token_rewards - m[:, None]) / n_others.clamp(min=1)[:, None]   # (B, L)
    shaped = torch.where(n_others[:, None] > 0, token_rewards - loo[:, None] + extra, token_rewards)
    shaped = torch.where(pos, shaped, torch.zeros((), dtype=shaped.dtype, device=shaped.device))
    return masked_reverse_cumsum(shaped, loss_mask, gamma)                   # (B, L)


@ADVANTAGES.register("prime_loo_exact", consumes="token", needs_groups=True, bounds={"gamma": "[0, 1]"})
@torch.no_grad()
def prime_loo_exact(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor,
                    step_ids: torch.Tensor, *, gamma: float = 1.0, reward_at: str = "token") -> torch.Tensor:
    """PRIME's advantage as the paper writes it: leave-one-out mean baseline at each reward position.

    m_j = mean_{s∈P_j} r_{j,s}                        (the paper's r_φ(y^j): averaged process reward)
    b_i = (1/(n−1)) Σ_{j∈g(i), j≠i} m_j               (b_i = 0 when n = 1)
    A_{i,t} = Σ_{s≥t, s∈P_i} γ^{k(s)−k(t)} (r_{i,s} − b_i)     (k counts trained tokens)

    The paper (arXiv:2502.01456, Eq. for A_t^i in §3) writes
    A_t^i = Σ_{s=t}^{|y^i|} γ^{s−t}[r_φ(y_s^i) − (1/(K−1)) Σ_{j≠i} r_φ(y^j)]
            + r_o(y^i) − (1/(K−1)) Σ_{j≠i} r_o(y^j).
    Choice made here: the baseline is subtracted at every position *where the source's reward
    lives* (P_i), not at every token. For the implicit PRM (reward_at="token") P_i is every
    trained token, which is the paper's first term. For the outcome reward (reward_at="last") P_i
    is the one last token, m_j = R_j, and the sum has one term: R_i − mean_{j≠i} R_j, which is the
    paper's second term (RLOO). Subtracting the outcome baseline at every token instead would
    shift the return by a length-dependent (|y^i| − t)·b_i, which is neither RLOO nor the paper.

    With γ = 1 this equals ``prime_rloo`` at the first reward position of each row (the extra term
    of the reference form sums to 0 over a row) and differs after it.

    Args and Returns: as ``prime_rloo``.
    """
    _check(token_rewards, loss_mask, group_ids, step_ids, gamma)
    pos, _, loo, _ = _loo_stats(token_rewards, loss_mask, group_ids, step_ids, reward_at)
    shaped = torch.where(pos, token_rewards - loo[:, None],
                         torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device))  # (B, L)
    return masked_reverse_cumsum(shaped, loss_mask, gamma)                   # (B, L)


@torch.no_grad()
def prime_batch_norm(token_rewards: torch.Tensor, loss_mask: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Scale token rewards so the largest absolute return-to-go in the batch is (about) 1.

    G_{i,t} = Σ_{s≥t, m_{i,s}} r_{i,s}
    r̃_{i,t} = r_{i,t} / (max_{i,t: m_{i,t}} |G_{i,t}| + ε)

    PRIME's ``prime_norm=batch_norm`` (the default), applied to the implicit-PRM token rewards
    before credit assignment: PRIME-RL/PRIME training/verl/workers/actor/dp_prime.py::update_policy
    (fork zkcpku/PRIME @ c1ae6d3f), ``token_level_scores / (reverse_cumsum.abs().max() + 1e-6)``.
    One scalar for the whole batch, so relative values between rows are kept; it makes β irrelevant.

    Args:
        token_rewards: (B, L) float.
        loss_mask: (B, L) bool, True = included; rewards elsewhere are ignored (and output 0).
        eps: added to the max (1e-6 as in the reference).
    Returns:
        (B, L) float; 0 where loss_mask is False. All-zero rewards stay 0.
    """
    check_shapes(token_rewards=(token_rewards, ("B", "L")), loss_mask=(loss_mask, ("B", "L")))
    check_mask("loss_mask", loss_mask)
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    r = torch.where(loss_mask, token_rewards, zero)                          # (B, L)
    returns = masked_reverse_cumsum(r, loss_mask, 1.0)                       # (B, L)
    return r / (masked_max(returns.abs(), loss_mask) + eps)
