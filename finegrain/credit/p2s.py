"""P2S's advantage: GRPO with process supervision over the step rewards of ``rewards.p2s``.

P2S (arXiv:2601.20649; methods.md §4, SECONDARY) trains its step rewards "inside GRPO"; how the
paper turns them into advantages is UNVERIFIED. This is GRPO's own process-supervision form
(Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, §4.1.3): normalise every reward of a prompt
group by the group's statistics, then give each token the sum of the normalised rewards from its
step on. Shapes: B rows, L tokens, S steps.

    e(t)        = max(max_{s≤t} step_ids[s], 0)       the step a token counts in: tokens outside steps
                                                      (EOS, separators) join the step before them,
                                                      tokens before the first step join step 0
    r_{i,k}     = Σ_{t: e(t)=k, m_{i,t}} token_rewards[i, t]
    P_i         = {k : step k of row i has a trained token, and k = last_i or r_{i,k} ≠ 0}
                  (last_i = the row's last such step: it always holds the row's outcome)
    r̃_{i,k}     = (r_{i,k} − μ_g) / (σ_g + ε)          μ_g, σ_g = mean, unbiased std of r over every
                                                      (j, k) with j ∈ g(i), k ∈ P_j
    A_{i,k}     = Σ_{k'≥k, k'∈P_i} r̃_{i,k'},           A_{i,t} = A_{i,e(t)} · m_{i,t}

With one reward per row (an outcome on the last trained token, or ``p2s``'s outcome branch)
every row has one position, so A_{i,t} = (R_i − mean_g R)/(std_g R + ε) on every trained token:
exactly ``grpo`` (tests/credit/test_p2s.py checks it). With the dense PFR of an all-wrong group
every step is a position and a step's tokens are credited with the normalised rewards from that
step to the end. The two branches of ``rewards.p2s`` never share a group, so their statistics
never mix (a malformed row's −1 joins its group's set in either branch).

Why not an existing estimator: ``grpo`` consumes outcomes only (config validation refuses step
rewards), ``reinforce_pp`` has no group baseline, ``spae`` and ``prl`` have their own shaping.
Why the hierarchical integration is not here but in ``rewards.p2s``: see that module (an
estimator sees one summed tensor, where the outcome and the last step's PFR can share a token
and "malformed" is invisible).

Departures and choices (numbered; docs/algorithms/p2s.md repeats them):
 1. The estimator itself is UNVERIFIED for P2S (methods.md: "step-level reward inside GRPO");
    GRPO's process-supervision variant is the one GRPO's paper defines.
 2. Reward positions are read from the summed rewards: a step is a position when it is the row's
    last step or its reward is nonzero (the rule ``igpo`` uses for its information-gain
    positions). A step reward that is exactly 0.0 is therefore not a position; ``rewards.p2s``
    gives its zeros (the outcome branch's wrong answers) on the last step, which always counts.
 3. Tokens outside steps take the advantage of the step before them (the EOS after the answer line
    gets the answer step's), and their rewards count in that step; DeepSeekMath leaves tokens
    after the last step without reward-to-go, which would never credit the EOS.
 4. Statistics as ``grpo``: unbiased std, a constant set gets exactly 0, a set of one position
    gets 0. A group of one row with several positions is not constant: its steps are normalised
    among themselves (finite).
 5. Known property (kept, it is GRPO-PS's): summing normalised rewards to go subtracts μ_g once
    per remaining position, so when a group's step rewards are mostly negative (log-probability
    rewards) a row with more steps gains +|μ_g|/σ_g per extra step on its early tokens. ``turn_rloo``
    (finegrain/credit/turns.py) explains the same effect for turns.

>>> import torch
>>> m = torch.ones(2, 4, dtype=torch.bool)
>>> s = torch.tensor([[0, 0, 1, -1], [0, 0, 1, -1]])            # two steps, then EOS
>>> r = torch.tensor([[0., 2., 0., 0.], [0., 0., 0., 0.]])      # row 0: step 0 rewarded 2; last steps 0
>>> p2s(r, m, torch.tensor([3, 3]), s).round(decimals=3)        # positions 2, 0, 0: μ = 2/3, σ = 1.155
tensor([[ 0.5770,  0.5770, -0.5770, -0.5770],
        [-0.5770, -0.5770, -0.5770, -0.5770]])
"""

from __future__ import annotations

import torch

from finegrain.credit import ADVANTAGES
from finegrain.credit.outcome import _group_centered
from finegrain.masked import group_index
from finegrain.shapes import check_mask, check_shapes
from finegrain.trajectory import broadcast_steps_to_tokens, token_to_step_sum


def counting_steps(step_ids: torch.Tensor) -> torch.Tensor:
    """e(t) = max(max_{s≤t} step_ids[s], 0): (B, L) long -> (B, L) long.

    >>> counting_steps(torch.tensor([[-1, 0, 0, -1, 1, -1, -1]])).tolist()
    [[0, 0, 0, 0, 1, 1, 1]]
    """
    if step_ids.shape[1] == 0:
        return step_ids.clone()
    return step_ids.cummax(dim=1).values.clamp(min=0)


def reward_positions(token_rewards: torch.Tensor, loss_mask: torch.Tensor, step_ids: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step rewards and reward positions from summed, placed token rewards (module docstring).

    Returns: r (B, S) float, positions (B, S) bool, e (B, L) long; S = max e + 1 (at least 1).
    Values under a False loss_mask are ignored (NaN ok).
    """
    e = counting_steps(step_ids)                                                      # (B, L)
    S = max(int(e.max()) + 1, 1) if e.numel() else 1
    r, exists = token_to_step_sum(token_rewards, loss_mask, e, S)                     # (B, S) each
    k = torch.arange(S, device=e.device)
    last = torch.where(exists, k, torch.full_like(k, -1)).max(dim=1).values           # (B,)
    positions = exists & ((k[None, :] == last[:, None]) | (r != 0))                   # (B, S)
    return r, positions, e


@ADVANTAGES.register("p2s", consumes="step", needs_groups=True, bounds={"eps": "(0, inf)"})
@torch.no_grad()
def p2s(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor, step_ids: torch.Tensor,
        *, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO with process supervision on step rewards (module docstring).

    Args:
        token_rewards: (B, L) float; ``rewards.p2s``'s step rewards on the last trained token of
            each step (as ``finegrain.rewards.combine`` places them), plus any other source
            (an outcome on the last trained token counts in the last step).
        loss_mask: (B, L) bool, True = trained-on token; rewards elsewhere are ignored.
        group_ids: (B,) long; samples of one prompt share an id, rows in any order.
        step_ids: (B, L) long, −1 outside steps (``Trajectory.step_ids``).
        scale_by_std: divide by σ_g + ε (False: the Dr.GRPO-style centring only).
        eps: added to σ_g.
    Returns:
        advantages (B, L); 0 where loss_mask is False.
    """
    check_shapes(token_rewards=(token_rewards, ("B", "L")), loss_mask=(loss_mask, ("B", "L")),
                 group_ids=(group_ids, ("B",)), step_ids=(step_ids, ("B", "L")))
    check_mask("loss_mask", loss_mask)
    r, positions, e = reward_positions(token_rewards, loss_mask, step_ids)            # (B, S), (B, S), (B, L)
    B, S = r.shape
    g, _ = group_index(group_ids)
    keys = g[:, None].expand(B, S)                                                    # (B, S) group of each position
    normed = torch.zeros_like(r)
    if bool(positions.any()):
        centered, std, _ = _group_centered(r[positions], keys[positions],
                                           torch.ones(int(positions.sum()), dtype=torch.bool, device=r.device))
        normed[positions] = centered / (std + eps) if scale_by_std else centered
    # Σ_{k'≥k, k'∈P} r̃_{i,k'}: r̃ is 0 off the positions, so a plain reverse cumsum; a step that
    # is not a position gets the sum from the next position on
    to_go = normed.flip(1).cumsum(1).flip(1)                                          # (B, S)
    adv = broadcast_steps_to_tokens(to_go, e, fill=0.0)                               # (B, L)
    return torch.where(loss_mask, adv, torch.zeros_like(adv))
