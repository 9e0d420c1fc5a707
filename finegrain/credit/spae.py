"""SPAE advantage: outcome credit down-weighted after the step potential saturates, plus ΔΦ shaping.

SPAE (Wu et al. 2026, arXiv:2601.03823) writes the token advantage as

    A_{i,j} = A^group_i · f(Φ_{i,M(j)}) + ξ · g(ΔΦ_{i,M(j)}),    then batch normalisation

with M(j) the step of token j, Φ the step potential and ΔΦ its change (``finegrain.rewards.spae``),
f a "potential saturation penalty" (down-weight the outcome credit once the potential has
saturated, against checking after the problem is solved) and g a "potential difference shaping"
(amplify gains, penalise drops). This form is in a version of the README of cii030/SPAE-RL
(@ 04a0bc185a3f19f60b437112045bbfdb3cc0ce48); the exact f, g, ξ and normalisation are not
published (the repository's train/recipe/ is empty and the paper's method section could not be
read), so the forms below are finegrain's choices, marked UNVERIFIED. Shapes: B rows, L tokens,
S steps.

What the estimator reads. It has the ``ADVANTAGES`` signature and receives the *summed* token
rewards, as ``igpo`` does (finegrain/credit/turns.py): the outcome (``verifier``) sits on the
row's last trained token, the step rewards r_{i,k} = ΔΦ_{i,k} of ``spae_potential`` on the last
trained token of each probed step, and ``spae_potential`` never rewards the last step, so the two
never share a position:

    R_i        = token reward at the last trained token of row i
    ΔΦ_{i,k}   = Σ of token rewards of step k's other trained tokens            (0 for an unprobed step)
    Φ̃_{i,<t}   = Σ_{s<t} (step rewards at positions s) = Φ_{i,k−1} − Φ_{i,−1}   for t in step k
    P_{i,t}    = max_{s≤t} Φ̃_{i,<s}                   the highest potential reached before token t
                                                   (Φ̃_{i,<0} = 0 is the start; τ > 0, so it never saturates)

and computes

    A^group_i  = (R_i − mean_{g(i)} R) / (std_{g(i)} R + ε)                         (GRPO)
    f_{i,t}    = λ  if A^group_i > 0 and P_{i,t} ≥ τ,  else 1                       (saturation)
    g(x)       = x                                                                  (difference shaping)
    Â_{i,t}    = A^group_i · f_{i,t} + ξ · g(ΔΦ_{i,M(t)})                           (0 outside steps)
    A_{i,t}    = (Â_{i,t} − μ) / sqrt(σ² + 1e-8) over the batch's trained tokens   (whiten=True)

Defaults: τ = ``threshold`` = 0.9 (the reference code's "solving" threshold: its diagnostics count
solving tokens up to the first step with Φ > 0.9 on a correct trace and flag right-to-wrong when
Φ > 0.9 on a wrong one: cii030/SPAE-RL inference/probe_mechanism_example.py @ 1f8c839d);
λ = ``saturation_weight`` = 0.5, ξ = ``xi`` = 1.0 (UNVERIFIED: not published).

Departures and choices (numbered; docs/algorithms/spae.md repeats them):
 1. f, g, ξ, λ are UNVERIFIED choices (above). g is the identity, so a step that raises the
    potential gets +ξ·ΔΦ and one that lowers it −ξ·|ΔΦ|, whatever the outcome.
 2. "After saturation" is read as *strictly after* the step whose probe first reaches τ: f tests
    the potential before the token (P_{i,t}), not the step's own Φ_{i,M(t)}, so the step that
    solves the problem keeps its full credit and the checking steps after it are down-weighted.
 3. f only touches positive group advantages. On a trace whose outcome is below its group's mean
    the tokens after saturation are where a reached answer was lost ("right-to-wrong"), so their
    blame is kept in full rather than down-weighted.
 4. The saturation test reads Φ̃ = Φ − Φ_{−1}, the potential gained since the prompt probe: the
    estimator contract carries one number per token position and Φ_{−1} has none (it is no
    step's reward). With ``spae_potential(baseline="zero")`` Φ_{−1} := 0 and Φ̃ is the potential
    itself, the paper's test. (Giving an estimator several sources, or per-row extras from a
    signal, would remove this: see docs/algorithms/spae.md.)
 5. The step rewards are read as placed: give ``spae_potential`` weight 1 (ξ is the shaping
    coefficient), or Φ̃ and the τ test are scaled by the weight.
 6. Tokens outside any step (EOS, whitespace between steps) get the outcome term only (no step,
    no ΔΦ), with f from the potential reached before them. The last step, never probed, gets ΔΦ = 0.
 7. A group of one or a constant group gets A^group = 0 (as ``grpo``); the batch whitening then
    still spreads the shaping terms. ``whiten=False`` skips the normalisation.

>>> import torch
>>> m = torch.ones(2, 4, dtype=torch.bool)
>>> s = torch.tensor([[0, 0, 1, -1], [0, 0, 1, -1]])           # two steps, then EOS
>>> r = torch.tensor([[0., 0.5, 0., 1.], [0., -0.5, 0., 0.]])  # ΔΦ_0 on step 0's end, outcome on EOS
>>> spae(r, m, torch.tensor([7, 7]), s, whiten=False)         # A^group = ±0.7071; no saturation
tensor([[ 1.2071,  1.2071,  0.7071,  0.7071],
        [-1.2071, -1.2071, -0.7071, -0.7071]])
"""

from __future__ import annotations

import torch

from finegrain.credit import ADVANTAGES
from finegrain.credit.outcome import _group_centered
from finegrain.masked import last_true_index, masked_whiten
from finegrain.shapes import check_mask, check_shapes
from finegrain.trajectory import broadcast_steps_to_tokens, token_to_step_sum


def _check(token_rewards, loss_mask, group_ids, step_ids) -> None:
    check_shapes(token_rewards=(token_rewards, ("B", "L")), loss_mask=(loss_mask, ("B", "L")),
                 group_ids=(group_ids, ("B",)), step_ids=(step_ids, ("B", "L")))
    check_mask("loss_mask", loss_mask)


def split_outcome_and_steps(token_rewards: torch.Tensor, loss_mask: torch.Tensor, step_ids: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read the outcome and the step rewards back from summed, placed token rewards.

    Returns: R (B,) = the reward on the last trained token; step_rewards (B, S) = Σ of rewards on
    the other trained tokens of each step (S = max step id + 1, at least 1); at_steps (B, L) =
    those rewards where they sit (0 elsewhere). Values outside loss_mask are ignored.
    """
    B, L = loss_mask.shape
    pos = torch.arange(L, device=loss_mask.device).expand(B, L)
    outcome_pos = (pos == last_true_index(loss_mask)[:, None]) & loss_mask         # (B, L)
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    R = torch.where(outcome_pos, token_rewards, zero).sum(1)                        # (B,)
    in_steps = loss_mask & ~outcome_pos & (step_ids >= 0)                           # (B, L)
    at_steps = torch.where(in_steps, token_rewards, zero)                           # (B, L)
    S = max(int(step_ids.max()) + 1, 1) if step_ids.numel() else 1
    step_rewards, _ = token_to_step_sum(at_steps, in_steps, step_ids, S)            # (B, S)
    return R, step_rewards, at_steps


@ADVANTAGES.register("spae", consumes="step", needs_groups=True,
                     bounds={"xi": "(-inf, inf)", "threshold": "(0, inf)", "saturation_weight": "[-1, 1]",
                             "eps": "(0, inf)"})
@torch.no_grad()
def spae(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor, step_ids: torch.Tensor,
         *, xi: float = 1.0, threshold: float = 0.9, saturation_weight: float = 0.5, whiten: bool = True,
         scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """SPAE's token advantage from the outcome and the step-potential changes (module docstring).

    Args:
        token_rewards: (B, L) float; the outcome on each row's last trained token and ΔΦ of
            ``spae_potential`` (weight 1) on the last trained token of each probed step, as
            ``finegrain.rewards.combine`` places them.
        loss_mask: (B, L) bool, True = trained-on token; rewards elsewhere are ignored.
        group_ids: (B,) long; samples of one prompt share an id, rows in any order.
        step_ids: (B, L) long, −1 outside steps (``Trajectory.step_ids``).
        xi: ξ, coefficient of the difference shaping.
        threshold: τ, the saturation threshold on the potential reached before a token.
        saturation_weight: λ, the factor on positive outcome credit after saturation.
        whiten: normalise the result over the batch's trained tokens (SPAE's batch normalisation).
        scale_by_std, eps: of the GRPO group advantage.
    Returns:
        advantages (B, L); 0 where loss_mask is False.
    """
    _check(token_rewards, loss_mask, group_ids, step_ids)
    R, step_rewards, at_steps = split_outcome_and_steps(token_rewards, loss_mask, step_ids)
    has_tokens = loss_mask.any(dim=1)                                               # (B,)
    centered, std, _ = _group_centered(R, group_ids, has_tokens)                    # (B,) each
    A = centered / (std + eps) if scale_by_std else centered                        # (B,)
    gained_before = at_steps.cumsum(1) - at_steps                                   # (B, L) Φ̃ before t
    reached = gained_before.cummax(1).values                                        # (B, L) P (0 at t = 0)
    saturated = (reached >= threshold) & (A[:, None] > 0)                           # (B, L)
    f = torch.where(saturated, torch.full_like(reached, saturation_weight), torch.ones_like(reached))
    delta = broadcast_steps_to_tokens(step_rewards, step_ids, fill=0.0)             # (B, L) ΔΦ_{M(t)}
    adv = A[:, None] * f + xi * delta                                               # (B, L)
    adv = torch.where(loss_mask, adv, torch.zeros_like(adv))
    return masked_whiten(adv, loss_mask) if whiten else adv
