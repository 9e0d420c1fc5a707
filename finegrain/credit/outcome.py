"""Critic-free advantage estimators: GRPO, Dr.GRPO, RLOO, REINFORCE++ and REINFORCE++-baseline.

Every estimator has the ``ADVANTAGES`` signature::

    fn(token_rewards (B, L), loss_mask (B, L) bool, group_ids (B,) long, step_ids (B, L) long,
       *, **hyperparameters) -> advantages (B, L)

and returns 0 wherever ``loss_mask`` is False. ``step_ids`` is accepted for the shared signature
and unused here.

Where this module departs from the papers and from verl's ``core_algos.py``
(volcengine/verl @ 012be9d9dcb7c38499f23616142870d2682757fc):

1. Rewards are read only where ``loss_mask`` is True: R_i = Σ_t m_{i,t}·r_{i,t}. verl sums the
   whole row. Outcome rewards sit on the last trained token, so the two agree on well-formed
   input, and ours ignores garbage at padding or tool-output positions.
2. A group of one gets advantage 0 in ``grpo``, ``dr_grpo`` and ``rloo``. verl uses mean 0 and
   std 1 for such a group (GRPO gives R/(1+ε)) and leaves R unchanged in RLOO, so a lone sample
   is pushed by its raw reward.
3. A group whose rewards are all equal gets exactly 0 (checked with min == max), not
   (R − mean)/(std + ε) with float rounding in the mean: 7 × 0.3 / 7 ≠ 0.3 in float32, and
   dividing that rounding error by std + ε gives a visible advantage.
4. Rows with no trained token (all-False ``loss_mask``) carry no reward: they are left out of
   their group's statistics and get advantage 0.
5. REINFORCE++ returns skip positions outside ``loss_mask`` (they add no reward and do not count as
   a time step for γ), so the return flows across a masked tool-output span. verl resets the
   running return at every masked position, which cuts that flow.
6. REINFORCE++ takes ``token_rewards`` as given: the paper's per-token KL penalty
   r_t ← r_t − β·KL_t is the caller's job (``finegrain.losses.kl``), not folded in here.

>>> import torch
>>> m = torch.ones(4, 2, dtype=torch.bool)
>>> r = torch.tensor([[0., 1.], [0., 0.], [0., 1.], [0., 1.]])   # outcome on the last token
>>> g = torch.tensor([5, 5, 9, 9])                               # groups {0, 1} and {2, 3}
>>> s = torch.zeros(4, 2, dtype=torch.long)
>>> rloo(r, m, g, s)[:, 0]
tensor([ 1., -1.,  0.,  0.])
>>> dr_grpo(r, m, g, s)[:, 0]
tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
"""

from __future__ import annotations

import torch

from finegrain.credit import ADVANTAGES
from finegrain.masked import group_mean_std, group_min_max, masked_reverse_cumsum, masked_sum, masked_whiten
from finegrain.shapes import check_mask, check_shapes


def _check(token_rewards, loss_mask, group_ids, step_ids) -> None:
    check_shapes(token_rewards=(token_rewards, ("B", "L")), loss_mask=(loss_mask, ("B", "L")),
                 group_ids=(group_ids, ("B",)), step_ids=(step_ids, ("B", "L")))
    check_mask("loss_mask", loss_mask)


def _group_centered(seq_rewards: torch.Tensor, group_ids: torch.Tensor, has_tokens: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R − mean_g R, std_g R (unbiased) and n_g, over the rows with ``has_tokens`` only.

    All three are (B,); rows without tokens get 0, 0, 0. A constant group gets exactly 0.
    """
    centered = torch.zeros_like(seq_rewards)
    std = torch.zeros_like(seq_rewards)
    count = torch.zeros_like(seq_rewards)
    if not bool(has_tokens.any()):
        return centered, std, count
    R, g = seq_rewards[has_tokens], group_ids[has_tokens]         # (B',)
    mean, sd, n = group_mean_std(R, g, unbiased=True)             # (B',) each
    lo, hi = group_min_max(R, g)
    centered[has_tokens] = torch.where(lo == hi, torch.zeros_like(R), R - mean)
    std[has_tokens] = sd
    count[has_tokens] = n
    return centered, std, count


def _broadcast(seq_adv: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, L), 0 where loss_mask is False."""
    return torch.where(loss_mask, seq_adv[:, None], torch.zeros((), dtype=seq_adv.dtype, device=seq_adv.device))


@ADVANTAGES.register("grpo", consumes="outcome", needs_groups=True, bounds={"eps": "(0, inf)"})
@torch.no_grad()
def grpo(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor,
         step_ids: torch.Tensor, *, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised outcome advantage, broadcast to every trained token.

    R_i = Σ_t m_{i,t} r_{i,t}
    A_i = (R_i − mean_{j∈g(i)} R_j) / (std_{j∈g(i)} R_j + ε)     (std unbiased, ÷ (n_g − 1))
    A_{i,t} = A_i · m_{i,t}

    Shao et al. 2024, DeepSeekMath (arXiv:2402.03300), outcome supervision. Checked against verl
    ``core_algos.py::compute_grpo_outcome_advantage`` (torch.std, ε added to std, not inside a
    sqrt). ``scale_by_std=False`` is Dr.GRPO (``dr_grpo``).

    Args:
        token_rewards: (B, L) float; the outcome reward sits on a trained token, normally the last.
        loss_mask: (B, L) bool, True = trained-on token. Rewards outside it are ignored.
        group_ids: (B,) long; rows with equal id are samples of one prompt, in any order.
        step_ids: (B, L) long; unused.
        scale_by_std: divide by the group std (False gives Dr.GRPO).
        eps: added to the std.
    Returns:
        advantages (B, L); 0 where loss_mask is False, for a group of one, for a group whose
        rewards are all equal, and for rows with no trained token.
    """
    _check(token_rewards, loss_mask, group_ids, step_ids)
    has_tokens = loss_mask.any(dim=1)                              # (B,)
    R = masked_sum(token_rewards, loss_mask, dim=1)                # (B,)
    centered, std, _ = _group_centered(R, group_ids, has_tokens)   # (B,) each
    adv = centered / (std + eps) if scale_by_std else centered
    return _broadcast(adv, loss_mask)                              # (B, L)


@ADVANTAGES.register("dr_grpo", consumes="outcome", needs_groups=True)
@torch.no_grad()
def dr_grpo(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor,
            step_ids: torch.Tensor) -> torch.Tensor:
    """GRPO without the std division ("GRPO done right").

    A_i = R_i − mean_{j∈g(i)} R_j,   R_i = Σ_t m_{i,t} r_{i,t};   A_{i,t} = A_i · m_{i,t}

    Liu et al. 2025, Understanding R1-Zero-Like Training (arXiv:2503.20783). The other half of
    Dr.GRPO, a constant loss normaliser, is ``seq-mean-token-sum-norm`` in
    ``finegrain.losses.aggregate``. Checked against verl ``compute_grpo_outcome_advantage`` with
    ``norm_adv_by_std_in_grpo=False``.

    Args and Returns: as ``grpo``.
    """
    return grpo(token_rewards, loss_mask, group_ids, step_ids, scale_by_std=False)


@ADVANTAGES.register("rloo", consumes="outcome", needs_groups=True)
@torch.no_grad()
def rloo(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor,
         step_ids: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out: the baseline is the mean of the *other* samples of the group.

    A_i = R_i − (1/(n_g − 1)) Σ_{j∈g(i), j≠i} R_j  =  n_g/(n_g − 1) · (R_i − mean_{j∈g(i)} R_j)

    Ahmadian et al. 2024, Back to Basics (arXiv:2402.14740); Kool et al. 2019. Checked against
    verl ``core_algos.py::compute_rloo_outcome_advantage`` (same n/(n−1) form).

    Args and Returns: as ``grpo``. A group of one has no other sample and gets 0.
    """
    _check(token_rewards, loss_mask, group_ids, step_ids)
    has_tokens = loss_mask.any(dim=1)                              # (B,)
    R = masked_sum(token_rewards, loss_mask, dim=1)                # (B,)
    centered, _, n = _group_centered(R, group_ids, has_tokens)     # (B,) each
    scale = torch.where(n > 1, n / (n - 1).clamp(min=1), torch.zeros_like(n))
    return _broadcast(centered * scale, loss_mask)                 # (B, L)


@ADVANTAGES.register("reinforce_pp", consumes="token", bounds={"gamma": "[0, 1]"})
@torch.no_grad()
def reinforce_pp(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor,
                 step_ids: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++: discounted return-to-go per token, whitened over the whole batch.

    G_{i,t} = Σ_{s≥t, m_{i,s}} γ^{k(s)−k(t)} r_{i,s}     (k counts trained tokens; see note 5)
    A_{i,t} = (G_{i,t} − μ) / sqrt(σ² + 1e-8),   μ, σ² = mean and unbiased variance of G over
              all trained tokens of the batch

    Hu et al. 2025, REINFORCE++ (arXiv:2501.03262), Eqs. for A_t and global normalisation.
    Checked against verl ``core_algos.py::compute_reinforce_plus_plus_outcome_advantage`` and
    ``verl.utils.torch_functional.masked_whiten`` (same whitening; verl resets the return at
    masked positions, we skip them).

    Args:
        token_rewards: (B, L) float; any dense rewards (outcome on the last token, step rewards on
            step ends, per-token KL penalty already subtracted if wanted).
        loss_mask: (B, L) bool, True = trained-on token; rewards elsewhere are ignored.
        group_ids: (B,) long; unused (the baseline is the batch, not the group).
        step_ids: (B, L) long; unused.
        gamma: discount per trained token.
    Returns:
        advantages (B, L); 0 where loss_mask is False.
    """
    _check(token_rewards, loss_mask, group_ids, step_ids)
    returns = masked_reverse_cumsum(token_rewards, loss_mask, gamma)   # (B, L)
    return masked_whiten(returns, loss_mask)                           # (B, L)


@ADVANTAGES.register("reinforce_pp_baseline", consumes="outcome", needs_groups=True)
@torch.no_grad()
def reinforce_pp_baseline(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor,
                          step_ids: torch.Tensor) -> torch.Tensor:
    """REINFORCE++ with a group-mean baseline, then whitened over the batch's trained tokens.

    Ã_i = R_i − mean_{j∈g(i)} R_j,   R_i = Σ_t m_{i,t} r_{i,t}
    A_{i,t} = (Ã_i − μ) / sqrt(σ² + 1e-8),   μ, σ² = mean and unbiased variance of Ã_i over all
              trained tokens (a sequence weighs by its number of trained tokens)

    Hu et al. 2025, REINFORCE++ w/ baseline (arXiv:2501.03262). Checked against verl
    ``core_algos.py::compute_reinforce_plus_plus_baseline_outcome_advantage`` (token-level
    ``masked_whiten``; verl keeps R unchanged for a group of one, we centre it to 0).

    Args and Returns: as ``grpo``. Values are not 0 for a group of one or a constant group once
    the batch whitening shifts them; they are 0 when every group is constant.
    """
    _check(token_rewards, loss_mask, group_ids, step_ids)
    has_tokens = loss_mask.any(dim=1)                              # (B,)
    R = masked_sum(token_rewards, loss_mask, dim=1)                # (B,)
    centered, _, _ = _group_centered(R, group_ids, has_tokens)     # (B,)
    return masked_whiten(_broadcast(centered, loss_mask), loss_mask)   # (B, L)
