"""Turn-level advantage estimators for multi-turn (tool-use, search) episodes.

Every estimator here has the ``ADVANTAGES`` signature and is registered with ``segments="turn"``,
so the trainer passes the turn id of each token (``Trajectory.turns``) as the 4th argument::

    fn(token_rewards (B, L), loss_mask (B, L) bool, group_ids (B,) long, turn_ids (B, L) long,
       *, **hyperparameters) -> advantages (B, L)

Shapes: B rows, L response tokens, T turns (T = max turn id + 1). All three consume 'turn'
rewards: the combiner has already put each turn reward on the last trained token of its turn and
the outcome on the last trained token of the row, so the reward of turn k is

    r_{i,k} = Σ_{t: turn(t)=k, m_{i,t}} token_rewards[i, t]          (m = loss_mask)

which is exact for turn- and outcome-level rewards. A turn *exists* in row i when it has at
least one trained token; tool-output tokens (loss_mask False) carry the turn they answer and
never receive an advantage. Every estimator returns 0 wherever loss_mask is False.

    turn_rloo   finegrain's per-turn baseline: return-to-go of turn k minus the mean return-to-go
                of the *other* samples of the prompt that reached turn k. Unbiased when the agent
                chooses how many turns to take (see its docstring and docs/algorithms/turn_baseline.md).
    igpo        IGPO's estimator (arXiv:2510.14967): group-normalise the reward positions (IG turn
                rewards and the final outcome; joint or separate), then accumulate over turns.
    matchtir    MatchTIR's dual-level estimator (arXiv:2601.10712): ½ (trajectory GRPO +
                per-(prompt, turn index) normalised discounted turn returns).

Why a baseline per turn index can be biased (verl-project/verl issue #7244): a turn's
advantage must not subtract anything that depends on the sample's own later actions. If one
centres every turn reward by the mean reward *of its turn index* and then sums over the turns
left, the subtracted term Σ_{k'=k}^{K_i−1} μ_{k'} has as many terms as the sample has turns
left, i.e. it depends on the sample's own decision to continue. The estimator then adds a hidden
−E[r_intermediate] to every "take another turn" decision. ``igpo`` has this construction (each
reward position is centred by its group mean, then summed to go); ``turn_rloo`` does not: it
centres the *return* from turn k by the other samples' returns from turn k, a baseline that does
not depend on the sample itself. ``tests/credit/test_turns.py`` computes both biases exactly.

>>> import torch
>>> m = torch.tensor([[True, True, False, True], [True, True, False, False]])
>>> turns = torch.tensor([[0, 0, 0, 1], [0, 0, -1, -1]])   # row 0: tool call, output, answer
>>> r = torch.tensor([[0., -0.5, 9., 1.], [0., 1., 0., 0.]])  # 9. sits on a tool-output token
>>> turn_rloo(r, m, torch.tensor([3, 3]), turns)            # G_0 = 0.5 vs 1; turn 1: nobody else
tensor([[-0.5000, -0.5000,  0.0000,  0.0000],
        [ 0.5000,  0.5000,  0.0000,  0.0000]])
"""

from __future__ import annotations

import torch

from finegrain.credit import ADVANTAGES
from finegrain.credit.outcome import _group_centered
from finegrain.masked import group_index, group_mean_std, group_min_max, masked_reverse_cumsum
from finegrain.shapes import check_mask, check_shapes
from finegrain.trajectory import broadcast_steps_to_tokens, token_to_step_sum


def _check(token_rewards, loss_mask, group_ids, turn_ids) -> None:
    check_shapes(token_rewards=(token_rewards, ("B", "L")), loss_mask=(loss_mask, ("B", "L")),
                 group_ids=(group_ids, ("B",)), turn_ids=(turn_ids, ("B", "L")))
    check_mask("loss_mask", loss_mask)


def turn_rewards_of(token_rewards: torch.Tensor, loss_mask: torch.Tensor, turn_ids: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-turn rewards from placed token rewards: r[i, k] = Σ_{t: turn(t)=k, m_{i,t}} token_rewards[i, t].

    Args: token_rewards (B, L) float; loss_mask (B, L) bool; turn_ids (B, L) long, −1 on padding.
    Returns: r (B, T) float and exists (B, T) bool (turn k of row i has a trained token),
             T = max turn id + 1 (at least 1). Values under a False loss_mask never count (NaN ok).

    >>> turn_rewards_of(torch.tensor([[1., 2., 5., 3.]]), torch.tensor([[True, True, False, True]]),
    ...                 torch.tensor([[0, 0, 1, 2]]))
    (tensor([[3., 0., 3.]]), tensor([[ True, False,  True]]))
    """
    T = max(int(turn_ids.max()) + 1, 1) if turn_ids.numel() else 1
    return token_to_step_sum(token_rewards, loss_mask, turn_ids, T)


def _to_tokens(turn_values: torch.Tensor, loss_mask: torch.Tensor, turn_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, L): each trained token gets its turn's value; 0 elsewhere."""
    out = broadcast_steps_to_tokens(turn_values, turn_ids, fill=0.0)
    return torch.where(loss_mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _turn_keys(group_ids: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) long key of (prompt group, turn index) pairs: dense_group · T + k."""
    g, _ = group_index(group_ids)                                            # (B,)
    k = torch.arange(T, device=group_ids.device)
    return g[:, None] * T + k[None, :]


@ADVANTAGES.register("turn_rloo", consumes="turn", segments="turn", needs_groups=True, bounds={"gamma": "[0, 1]"})
@torch.no_grad()
def turn_rloo(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor,
              turn_ids: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """Per-turn leave-one-out advantage that stays unbiased when the agent picks its turn count.

    G_{i,k} = Σ_{k'≥k, k' exists in i} γ^{n(k,k')} r_{i,k'}        (return-to-go from turn k;
                                                                   n counts existing turns between)
    b_{i,k} = mean_{j∈g(i), j≠i, turn k exists in j} G_{j,k}        (the other samples that reached k)
    A_{i,k} = G_{i,k} − b_{i,k}    if some other sample of the group reached turn k, else 0
    A_{i,t} = A_{i,turn(t)} · m_{i,t}

    Why unbiased: the policy-gradient term of turn k is ∇log π(turn k | history)·(G_{i,k} − b).
    b is built from the other samples only, so it does not depend on anything sample i does at
    or after turn k (including whether it stops), and E[∇log π · b] = 0. A baseline per turn
    index that is summed over the sample's *remaining* turns (the construction of verl issue
    #7244, and of ``igpo``) subtracts a number of terms that the sample's own stopping decision
    sets, which biases the gradient on that decision by −E[r_intermediate] per extra turn. When
    no other sample reached turn k the turn gets 0 (no gradient), a weight that depends on the
    other samples only, so it does not bias the choice either; this also makes a one-turn batch
    exactly ``rloo``.

    Sources: RLOO (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740) applied per turn
    index to returns-to-go; the bias it avoids is described in verl-project/verl issue #7244
    ("a turn-level baseline that stays unbiased under variable turn counts"). There is no paper
    version to depart from; the choices are: leave-one-out (exactly the return minus a baseline
    that does not involve the sample; including it would rescale turn k by (n_k − 1)/n_k), no std division
    (a per-index std includes the sample's own return; use ``advantage.whiten`` for a global
    scale), and 0 for a turn no other sample reached.

    Args:
        token_rewards: (B, L) float; turn rewards on each turn's last trained token, the outcome
            on the row's last trained token (as ``finegrain.rewards.combine`` places them).
        loss_mask: (B, L) bool, True = trained-on token; rewards elsewhere are ignored.
        group_ids: (B,) long; samples of one prompt share an id, rows in any order.
        turn_ids: (B, L) long; turn index of each token, −1 on padding (``Trajectory.turns``).
        gamma: discount per turn.
    Returns:
        advantages (B, L); 0 where loss_mask is False.
    """
    _check(token_rewards, loss_mask, group_ids, turn_ids)
    r, exists = turn_rewards_of(token_rewards, loss_mask, turn_ids)         # (B, T) each
    G = masked_reverse_cumsum(r, exists, gamma)                             # (B, T)
    keys = _turn_keys(group_ids, r.shape[1])                                # (B, T)
    # G − mean_{j≠i} G_j = n/(n−1)·(G − mean_j G_j) over the n samples with turn k (as ``rloo``):
    # exactly 0 for a constant (group, turn) and for a turn that no other sample reached
    centered, _, n = _group_centered(G.flatten(), keys.flatten(), exists.flatten())   # (B·T,) each
    scale = torch.where(n > 1, n / (n - 1).clamp(min=1), torch.zeros_like(n))
    adv = (centered * scale).view_as(G)                                     # (B, T), 0 where absent
    return _to_tokens(adv, loss_mask, turn_ids)


def _igpo_normalise(values: torch.Tensor, keys: torch.Tensor, *, scale_by_std: bool, eps: float) -> torch.Tensor:
    """IGPO's group statistics over a set of reward positions, one set per key (prompt group).

    r̃ = (r − μ) / (σ + ε),  μ = mean, σ = sqrt(population variance + 1e-8), σ = 1 for a set of
    one; exactly 0 for a set whose values are all equal. values, keys (N,) -> (N,).
    """
    if values.numel() == 0:
        return values
    mean, std, count = group_mean_std(values, keys, unbiased=False)
    lo, hi = group_min_max(values, keys)
    centered = torch.where(lo == hi, torch.zeros_like(values), values - mean)
    if not scale_by_std:
        return centered
    std = torch.where(count <= 1, torch.ones_like(std), torch.sqrt(std ** 2 + 1e-8))
    return centered / (std + eps)


@ADVANTAGES.register("igpo", consumes="turn", segments="turn", needs_groups=True,
                     bounds={"gamma": "[0, 1]", "eps": "(0, inf)"})
@torch.no_grad()
def igpo(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor, turn_ids: torch.Tensor,
         *, norm_mode: str = "separate", scale_by_std: bool = True, gamma: float = 1.0,
         eps: float = 1e-6) -> torch.Tensor:
    """IGPO: group-normalised turn rewards (information gain + final outcome), summed over turns.

    Reward positions of row i: the outcome position O_i = its last existing turn (the answer
    turn; IGPO's F1 reward) and the IG positions = every earlier turn with r_{i,k} ≠ 0 (IGPO's
    information-gain rewards; a zero is read as "no reward", as in the reference).
        separate:  r̃ = (r − μ_O)/(σ_O + ε) at outcome positions,  (r − μ_IG)/(σ_IG + ε) at IG ones
        joint:     r̃ = (r − μ)/(σ + ε) with one μ, σ over both sets
    μ, σ pooled over every position of the set in the prompt group; σ = sqrt(population var
    + 1e-8), σ = 1 for a set of one; ``scale_by_std=False`` keeps r − μ.
        A_{i,k} = Σ_{k'≥k, k' exists in i} γ^{n(k,k')} r̃_{i,k'},   A_{i,t} = A_{i,turn(t)} · m_{i,t}

    Source: IGPO (arXiv:2510.14967); reference code debajoycs98/IGPO
    verl/trainer/ppo/core_algos.py @ 9dc30d43b79afa592a21e4b3de0d16a890528404
    (compute_grpo_outcome_advantage + _compute_turn_level_advantage; train.sh default
    info_gain_norm_mode=separate, gamma=1). The original GuoqingWang1/IGPO used a token-level
    return minus a per-position mean instead.

    Known property (kept, because it is the paper's estimator): centring every position by its
    group mean and then summing over the turns left subtracts (K_i − k)·μ_IG, a term set by the
    sample's own number of turns: continuing is favoured or penalised by −μ_IG per extra turn
    whatever the rewards say (verl issue #7244). ``turn_rloo`` on the same rewards has no such bias.

    Departures from the reference code:
    1. Turns come from ``turn_ids``; the reference finds them from the nonzero *normalised*
       rewards, so a position whose normalised value is exactly 0 (a value equal to the group
       mean) silently merges its turn into the next one. With γ < 1 we discount once per
       existing turn; the reference once per reward position.
    2. The outcome position is the last trained token; the reference takes index
       ``response_mask.sum() − 1``, which is not the last trained token when tool-output tokens
       (mask 0) sit inside the response.
    3. A set whose values are all equal gets exactly 0 (the reference divides float rounding
       noise by σ + ε); a group of one row is finite (σ = 1 for a single position, as in the
       reference).
    4. The optional F1/IG curriculum weights of the reference are not here: give the two reward
       signals weights in the config instead.

    Args:
        token_rewards: (B, L) float; IG rewards on the last trained token of each non-final turn
            (``rewards.agents.InfoGain``), the outcome on the row's last trained token.
        loss_mask: (B, L) bool, True = trained-on token; rewards elsewhere are ignored.
        group_ids: (B,) long; samples of one prompt share an id.
        turn_ids: (B, L) long; turn of each token, −1 on padding.
        norm_mode: 'separate' (reference default) or 'joint'.
        scale_by_std: divide by σ + ε (the reference's norm_adv_by_std_in_grpo).
        gamma: turn-level discount (reference default 1.0).
        eps: added to σ.
    Returns:
        advantages (B, L); 0 where loss_mask is False.
    """
    _check(token_rewards, loss_mask, group_ids, turn_ids)
    if norm_mode not in ("separate", "joint"):
        raise ValueError(f"igpo: norm_mode must be 'separate' or 'joint', got '{norm_mode}'")
    r, exists = turn_rewards_of(token_rewards, loss_mask, turn_ids)         # (B, T)
    B, T = r.shape
    k = torch.arange(T, device=r.device)
    last = torch.where(exists, k, torch.full_like(k, -1)).max(dim=1).values  # (B,) last existing turn
    outcome_pos = exists & (k[None, :] == last[:, None])                     # (B, T)
    ig_pos = exists & ~outcome_pos & (r != 0)                                # (B, T)
    g, _ = group_index(group_ids)
    keys = g[:, None].expand(B, T)                                           # (B, T)
    sets = [outcome_pos, ig_pos] if norm_mode == "separate" else [outcome_pos | ig_pos]
    shaped = torch.zeros_like(r)
    for pos in sets:
        shaped[pos] = _igpo_normalise(r[pos], keys[pos], scale_by_std=scale_by_std, eps=eps)
    adv = masked_reverse_cumsum(shaped, exists, gamma)                        # (B, T)
    return _to_tokens(adv, loss_mask, turn_ids)


@ADVANTAGES.register("matchtir", consumes="turn", segments="turn", needs_groups=True,
                     bounds={"lam": "[0, 1]", "eps": "(0, inf)"})
@torch.no_grad()
def matchtir(token_rewards: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor, turn_ids: torch.Tensor,
             *, lam: float = 0.9, eps: float = 1e-6) -> torch.Tensor:
    """MatchTIR's dual-level advantage: half trajectory-level GRPO, half per-turn-index GRPO on returns.

    R_i = Σ_k r_{i,k};   A^traj_i = (R_i − mean_{g(i)} R) / (std_{g(i)} R + ε)
    G_{i,k} = Σ_{k'≥k} λ^{k'−k} r_{i,k'}                         (over existing turns)
    A^turn_{i,k} = (G_{i,k} − mean_{(g(i),k)} G) / (std_{(g(i),k)} G + ε)   over the samples of the
                   group that have turn k (std unbiased, torch.std)
    A_{i,k} = (A^traj_i + A^turn_{i,k}) / 2,   A_{i,t} = A_{i,turn(t)} · m_{i,t}

    Source: MatchTIR (arXiv:2601.10712); reference code quchangle1/MatchTIR
    Code/verl/trainer/ppo/core_algos.py::compute_grpo_outcome_advantage, read from the copy
    CyberSculptor96/MatchTIR @ 02ee2a53b5a801cb2ce34414ed934375d3eae970 (λ = 0.9 hard-coded there).
    The per-index statistics are over *returns*, not rewards, so unlike ``igpo`` the baseline of
    turn k does not grow with the sample's remaining turns; it does include the sample itself
    (the usual GRPO self-inclusion).

    Departures from the reference code:
    1. Turns come from ``turn_ids``; the reference takes each contiguous run of loss-mask-1
       tokens as a turn and reads its reward at the run's last token, so two model turns with no
       tool output between them count as one.
    2. A group of one row, and a (group, turn index) reached by one row only, get 0 for that
       part; the reference uses mean 0 and std 1 there, pushing a lone sample by R/(1 + ε).
    3. A constant set gets exactly 0 (the reference divides float rounding noise by std + ε).
    4. Rewards are read only where loss_mask is True (R_i sums trained tokens; the reference
       sums the whole row).

    Args:
        token_rewards: (B, L) float; turn rewards (``rewards.agents.ToolCallMatch``) on each
            turn's last trained token, the answer reward on the row's last trained token.
        loss_mask: (B, L) bool, True = trained-on token.
        group_ids: (B,) long.
        turn_ids: (B, L) long; turn of each token, −1 on padding.
        lam: discount over turns (0.9 in the reference).
        eps: added to the std.
    Returns:
        advantages (B, L); 0 where loss_mask is False.
    """
    _check(token_rewards, loss_mask, group_ids, turn_ids)
    r, exists = turn_rewards_of(token_rewards, loss_mask, turn_ids)         # (B, T)
    has = exists.any(dim=1)                                                  # (B,)
    R = r.sum(dim=1)                                                         # (B,) (0 on absent turns)
    c_traj, s_traj, _ = _group_centered(R, group_ids, has)
    a_traj = c_traj / (s_traj + eps)                                         # (B,)
    G = masked_reverse_cumsum(r, exists, lam)                                # (B, T)
    keys = _turn_keys(group_ids, r.shape[1])
    c_turn, s_turn, _ = _group_centered(G.flatten(), keys.flatten(), exists.flatten())
    a_turn = (c_turn / (s_turn + eps)).view_as(G)                            # (B, T)
    adv = torch.where(exists, (a_traj[:, None] + a_turn) / 2, torch.zeros_like(G))
    return _to_tokens(adv, loss_mask, turn_ids)

