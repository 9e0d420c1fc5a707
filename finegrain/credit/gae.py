"""Generalized Advantage Estimation (GAE) with a critic's values, skipping untrained tokens.

GAE (Schulman et al. 2016, arXiv:1506.02438, §3) with the per-token TD error

    δ_t = r_t + γ V_{t+1} − V_t
    A_t = Σ_{l≥0} (γλ)^l δ_{t+l}          (computed backwards: A_t = δ_t + γλ A_{t+1})
    R_t = A_t + V_t                        (the λ-return: the critic's regression target)

used by PPO (Schulman et al. 2017, arXiv:1707.06347, truncated GAE in §5) and by Fine-Grained RLHF (Wu et al.
2023) on the KL-penalised token reward r_t = (segment rewards on segment ends) − β KL_t, with
γ = 1, λ = 0.95. Checked against verl ``verl/trainer/ppo/core_algos.py::compute_gae_advantage_return``
(volcengine/verl @ 26b5d6b2bbf0202683e49d9999f9174179ab5af3) and allenai/FineGrainedRLHF
``fgrlhf/ppo.py::PPOTrainer.compute_advantages`` (@ b1c4bc2d1a4d04246d993c3edae9b33a9cda17a1).

Time runs over *trained* tokens only (``loss_mask`` True), the convention of
``finegrain.masked.masked_reverse_cumsum``. Write t⁺ for the next trained position after t:

    δ_t = r_t + γ V_{t⁺} − V_t,   A_t = δ_t + γλ A_{t⁺}     (for t with m_t True)
    V_{t⁺} = 0 and A_{t⁺} = 0 when t is the last trained token of its row.

So V after the final trained token (EOS, or the last token of a truncated response) is 0: the
episode ends there. A masked position (tool output, forced tokens, padding) adds no reward,
its value is never read, and it is not a time step for γ or λ: a tool-output span in the middle of
a response is skipped and credit flows across it, as in ``reinforce_pp``.

Where this module departs from the papers and from the reference code:

1. Masked positions are skipped, as above. verl @ 26b5d6b2 and FineGrainedRLHF take V_{t+1} from
   the next *column* and rely on the critic's values being multiplied by the mask, so a masked
   span inside a response resets the bootstrap to 0 and a masked reward still enters δ. Later verl
   versions skip observation tokens the way we do (their multi-turn "skip values and TD-error on
   observation tokens" branch).
2. A truncated response (no EOS within ``rollout.max_new_tokens``) is treated as terminal too:
   V after its last token is 0, not a bootstrap from the state it stopped in. verl and
   FineGrainedRLHF do the same; the paper's infinite-horizon GAE would bootstrap.
3. No whitening here: the estimator returns raw GAE advantages. verl whitens inside
   ``compute_gae_advantage_return``; here whitening is the trainer's ``advantage.whiten``
   (``finegrain.credit.combine``), so returns are never computed from whitened advantages.
   FineGrainedRLHF also whitens the *rewards* (``whiten_rewards``, shift_mean=False); we do not.
4. ``values`` is the critic's V_old, computed once before the update, detached; NaN or inf under a
   False mask is ignored (``torch.where``, never multiplication by the mask).

>>> import torch
>>> r = torch.tensor([[0.0, 0.0, 1.0]])
>>> v = torch.tensor([[0.5, 0.2, 0.8]])
>>> m = torch.ones(1, 3, dtype=torch.bool)
>>> adv, ret = gae_advantages_returns(r, m, v, gamma=0.9, lam=0.5)
>>> adv        # δ = [-0.32, 0.52, 0.2]; A_2 = 0.2, A_1 = 0.52 + 0.45·0.2, A_0 = -0.32 + 0.45·0.61
tensor([[-0.0455,  0.6100,  0.2000]])
>>> ret        # A + V; the last token's target is its reward (V after EOS = 0)
tensor([[0.4545, 0.8100, 1.0000]])
"""

from __future__ import annotations

import torch

from finegrain.credit import ADVANTAGES
from finegrain.shapes import check_mask, check_shapes


def _check(token_rewards, loss_mask, values, gamma, lam) -> None:
    check_shapes(token_rewards=(token_rewards, ("B", "L")), loss_mask=(loss_mask, ("B", "L")),
                 values=(values, ("B", "L")))
    check_mask("loss_mask", loss_mask)
    if values is None:
        raise ValueError("values: GAE needs the critic's values (B, L), got None")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma: expected 0 <= gamma <= 1, got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: expected 0 <= lam <= 1, got {lam}")


@torch.no_grad()
def gae_advantages_returns(token_rewards: torch.Tensor, loss_mask: torch.Tensor, values: torch.Tensor, *,
                           gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and λ-returns over the trained tokens of each row.

    δ_t = r_t + γ V_{t⁺} − V_t;  A_t = δ_t + γλ A_{t⁺};  R_t = A_t + V_t
    (t⁺ = next trained position; V_{t⁺} = A_{t⁺} = 0 after the last one. See the module docstring.)

    Args:
        token_rewards: (B, L) float; any dense rewards (outcome on the last trained token, step
            rewards on step ends, a per-token KL penalty already subtracted if wanted).
        loss_mask: (B, L) bool, True = trained-on token; everything else is skipped.
        values: (B, L) float; V_t, the critic's value of the state *before* response token t
            (``finegrain.models.value.ValueModel``), detached.
        gamma: discount per trained token, in [0, 1].
        lam: GAE λ in [0, 1]; λ = 0 gives the one-step TD error, λ = 1 the Monte-Carlo return − V.
    Returns:
        advantages (B, L) and returns (B, L), both 0 where loss_mask is False.
    """
    _check(token_rewards, loss_mask, values, gamma, lam)
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    r = torch.where(loss_mask, token_rewards, zero)                       # (B, L)
    v = torch.where(loss_mask, values.to(token_rewards.dtype), zero)      # (B, L)
    adv = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])                                # (B,) V_{t⁺}
    next_adv = torch.zeros_like(r[:, 0])                                  # (B,) A_{t⁺}
    for t in range(r.shape[1] - 1, -1, -1):                               # one (B,) op per position
        m = loss_mask[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]                    # δ_t = r_t + γV_{t⁺} − V_t
        a = delta + gamma * lam * next_adv                                # A_t = δ_t + γλA_{t⁺}
        adv[:, t] = torch.where(m, a, zero)
        next_adv = torch.where(m, a, next_adv)                            # a masked position passes both on
        next_value = torch.where(m, v[:, t], next_value)
    returns = torch.where(loss_mask, adv + v, zero)                       # (B, L)
    return adv, returns


@ADVANTAGES.register("gae", consumes="token", needs_values=True, bounds={"gamma": "[0, 1]", "lam": "[0, 1]"})
@torch.no_grad()
def gae(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor, step_ids: torch.Tensor,
        values: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95) -> torch.Tensor:
    """GAE advantages for PPO with a critic: the ``ADVANTAGES`` entry (see ``gae_advantages_returns``).

    A_t = Σ_{l≥0} (γλ)^l δ_{t+l},  δ_t = r_t + γ V_{t+1} − V_t, over trained tokens only.

    Registered with ``needs_values=True``: the trainer passes the critic's values as ``values``
    (a fifth input, not a hyperparameter, so ``advantage.kwargs`` cannot set it) and trains the
    critic towards R = A + V computed with ``critic.gamma`` / ``critic.lam``.

    Args:
        token_rewards: (B, L) float, the summed token rewards of every source.
        loss_mask: (B, L) bool, True = trained-on token.
        group_ids: (B,) long; unused (the baseline is the critic, not the group).
        step_ids: (B, L) long; unused.
        values: (B, L) float, the critic's V_old.
        gamma, lam: γ and λ, each in [0, 1]. Fine-Grained RLHF uses γ = 1, λ = 0.95.
    Returns:
        advantages (B, L); 0 where loss_mask is False. Not whitened (``advantage.whiten``).
    """
    check_shapes(token_rewards=(token_rewards, ("B", "L")), group_ids=(group_ids, ("B",)),
                 step_ids=(step_ids, ("B", "L")))
    adv, _ = gae_advantages_returns(token_rewards, loss_mask, values, gamma=gamma, lam=lam)
    return adv
