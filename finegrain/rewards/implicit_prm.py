"""Implicit process rewards: β · log-ratio of a PRM language model to a reference, per token or step.

An implicit PRM is a causal LM π_φ trained only with response-level labels (losses in
``finegrain.losses.prm``). Its log-ratio to a reference π_ref gives a dense reward for free
(Yuan et al. 2024, Free Process Rewards without Process Labels, arXiv:2412.01981; used online by
PRIME, Cui et al. 2025, arXiv:2502.01456):

    q_t   = log π_φ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)      per-token log-ratio
    r_t   = β · q_t                                                 token reward
    Q^t   = Σ_{s≤t} r_s                                             implicit Q-value of the prefix
    r_k   = Σ_{t ∈ step k} r_t  = Q^{end(k)} − Q^{end(k−1)}         step reward ("single" mode)

Reference code read: PRIME-RL/PRIME training/verl/workers/actor/dp_prime.py::
compute_implicit_reward and update_policy (fork zkcpku/PRIME @ c1ae6d3f1b356dc8c0ba9d801f4aa5187de45ab1).
Step aggregation follows PRIME-RL/ImplicitPRM eval/bon_eval.py ('min' default, 'sum', 'mean') as
summarised in docs (methods.md §2); that file itself is not in the code index we could read.

Where this module departs from the paper and the reference code:

1. Rewards carry β (r_t = β·q_t), as in the papers and verl's recipe. PRIME-RL/PRIME's
   ``compute_implicit_reward`` returns q without β; after ``prime_norm=batch_norm`` the two agree.
2. The PRM and reference forwards run batched (``micro_batch`` rows at a time, left-padded
   prompts with position ids from the attention mask). The reference forwards one row at a time
   (``data[i:i + 1]``) inside each micro-batch.
3. ``granularity='whole'`` writes Σ_t r_t on the last real response token and marks only that
   token as applicable (``mask``); PRIME writes the same sum and leaves zeros elsewhere, which the
   ``RewardOutput`` contract would read as "reward 0", not "no reward".
4. The reference ``update == 'before'`` mode crashes (``data`` is rebound to a metrics dict before
   the second pass, and ``compute_implicit_reward`` is called with an extra argument). Here the
   caller decides the order: ``logprobs(traj, grad=True)`` gives the forward for the loss, and
   ``output_from_log_ratio`` turns the same (detached) log-ratio into rewards, so 'after' costs one
   forward and 'before' is "update, then call the signal again".
5. ``ref_model=None`` uses the rollout's ``behavior_logprobs`` as π_ref (PRIME's ref_type=policy,
   ``old_log_probs``). They must come from the same temperature as ``temperature`` here.
6. The model's train/eval mode is left as the caller set it (no ``.eval()`` toggling here).
"""

from __future__ import annotations

import torch

from finegrain.masked import last_true_index, masked_mean, masked_sum
from finegrain.models.logprobs import response_logprobs
from finegrain.registry import Registry
from finegrain.rewards.base import RewardOutput
from finegrain.shapes import check_mask, check_shapes
from finegrain.trajectory import token_to_step_sum

# fn(step_values (B, S), step_mask (B, S) bool) -> (B,); a row with no step scores 0.
STEP_SCORE_AGGREGATIONS = Registry("step score aggregation")


def implicit_token_rewards(prm_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *,
                           beta: float) -> torch.Tensor:
    """r_t = β · (log π_φ(y_t|·) − log π_ref(y_t|·)), 0 where ``mask`` is False.

    arXiv:2412.01981 (token process reward r^t = q^t − q^{t−1}); arXiv:2502.01456 Eq. for r_φ(y_t).

    Args:
        prm_logprobs: (B, L) float, log-probs of the response tokens under the PRM.
        ref_logprobs: (B, L) float, the same under the reference.
        mask: (B, L) bool, True = real response token. Garbage (NaN, inf) elsewhere is ignored.
        beta: β > 0 (0.05 in PRIME and ImplicitPRM).
    Returns:
        (B, L) float. Gradients flow into prm_logprobs where mask is True.
    """
    check_shapes(prm_logprobs=(prm_logprobs, ("B", "L")), ref_logprobs=(ref_logprobs, ("B", "L")),
                 mask=(mask, ("B", "L")))
    check_mask("mask", mask)
    zero = torch.zeros((), dtype=prm_logprobs.dtype, device=prm_logprobs.device)
    return torch.where(mask, beta * (prm_logprobs - ref_logprobs), zero)


def implicit_step_rewards(token_rewards: torch.Tensor, mask: torch.Tensor, step_ids: torch.Tensor,
                          num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step reward = sum of the step's token rewards: r_k = Σ_{t: step_ids[t]=k, mask_t} r_t.

    Equivalently Q at the step's last token minus Q at the previous step's last token
    (ImplicitPRM eval "single" mode, methods.md §2).

    Args:
        token_rewards: (B, L) float; mask: (B, L) bool (True = real token);
        step_ids: (B, L) long, −1 outside steps; num_steps: S.
    Returns:
        values (B, S) float, step_mask (B, S) bool (True = the step has ≥ 1 included token).
    """
    check_shapes(token_rewards=(token_rewards, ("B", "L")), mask=(mask, ("B", "L")),
                 step_ids=(step_ids, ("B", "L")))
    check_mask("mask", mask)
    return token_to_step_sum(token_rewards, mask, step_ids, num_steps)


def _zero_if_empty(score: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    return torch.where(step_mask.any(dim=1), score, torch.zeros_like(score))


@STEP_SCORE_AGGREGATIONS.register("min")
def _score_min(step_values: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """min_k r_k: a response is as good as its worst step (ImplicitPRM best-of-N default)."""
    if step_values.shape[1] == 0:  # a batch in which no response has a step
        return step_values.new_zeros(step_values.shape[0])
    inf = torch.full((), float("inf"), dtype=step_values.dtype, device=step_values.device)
    return _zero_if_empty(torch.where(step_mask, step_values, inf).min(dim=1).values, step_mask)


@STEP_SCORE_AGGREGATIONS.register("sum")
def _score_sum(step_values: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """Σ_k r_k = the outcome reward β·log π_φ(y)/π_ref(y) restricted to tokens inside steps."""
    return masked_sum(step_values, step_mask, dim=1)


@STEP_SCORE_AGGREGATIONS.register("mean")
def _score_mean(step_values: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """(1/K) Σ_k r_k over the row's K steps."""
    return masked_mean(step_values, step_mask, dim=1)


@STEP_SCORE_AGGREGATIONS.register("last")
def _score_last(step_values: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """r_K, the reward of the row's last step."""
    if step_values.shape[1] == 0:
        return step_values.new_zeros(step_values.shape[0])
    last = last_true_index(step_mask)                                            # (B,)
    picked = torch.gather(step_values, 1, last.clamp(min=0)[:, None]).squeeze(1)  # (B,)
    return torch.where(last >= 0, picked, torch.zeros_like(picked))


def sequence_score(step_values: torch.Tensor, step_mask: torch.Tensor, how: str = "min") -> torch.Tensor:
    """One score per response from its step rewards, for best-of-N selection or filtering.

    how: 'min' (min_k r_k), 'sum' (Σ_k r_k), 'mean' ((1/K) Σ_k r_k), 'last' (r_K); see
    ``STEP_SCORE_AGGREGATIONS``. ImplicitPRM's eval/bon_eval.py uses 'min' by default and 'sum'.

    Args:
        step_values: (B, S) float; step_mask: (B, S) bool, True = the step exists (values under
        False are ignored, even NaN).
    Returns:
        (B,) float. A row with no step scores 0 for every ``how`` (a neutral value, not "good":
        with 'min' it can outrank a response whose worst step is negative; check
        ``step_mask.any(1)`` when that matters).
    """
    check_shapes(step_values=(step_values, ("B", "S")), step_mask=(step_mask, ("B", "S")))
    check_mask("step_mask", step_mask)
    return STEP_SCORE_AGGREGATIONS.get(how)(step_values, step_mask)


_LEVELS = ("token", "step")
_GRANULARITIES = ("token", "whole")


class ImplicitPRM:
    """Reward signal: β · (log π_φ − log π_ref) per response token, or summed per step.

    ImplicitPRM(prm_model, ref_model, *, beta=0.05, level='token', granularity='token',
                micro_batch=None, temperature=1.0)

    prm_model: causal LM π_φ (same tokenizer as the policy). ref_model: frozen causal LM π_ref, or
    None to use ``traj.behavior_logprobs`` (PRIME's ref_type = policy).
    level: 'token' → values (B, L); 'step' → values (B, S), the sum of each step's token rewards.
    granularity ('token' level only): 'token' = r_t on every response token; 'whole' = Σ_t r_t on
    the last response token only (PRIME's prime_granularity).
    micro_batch: rows per forward (all at once if None). temperature: divides the logits; must
    match the temperature of behavior_logprobs when ref_model is None.

    Output components (B,), for logging: 'seq_sum' = β Σ_t q_t, 'token_mean' = β mean_t q_t.
    """

    name = "implicit_prm"

    def __init__(self, prm_model, ref_model, *, beta: float = 0.05, level: str = "token",
                 granularity: str = "token", micro_batch: int | None = None, temperature: float = 1.0):
        if level not in _LEVELS:
            raise ValueError(f"implicit_prm.level: expected one of {_LEVELS}, got '{level}'")
        if granularity not in _GRANULARITIES:
            raise ValueError(f"implicit_prm.granularity: expected one of {_GRANULARITIES}, got '{granularity}'")
        if level == "step" and granularity != "token":
            raise ValueError("implicit_prm: granularity='whole' puts one reward on the last token; "
                             "it has no step-level form (use level='token')")
        if not beta > 0:
            raise ValueError(f"implicit_prm.beta: expected > 0, got {beta}")
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"implicit_prm.micro_batch: expected ≥ 1 or None, got {micro_batch}")
        self.prm_model = prm_model
        self.ref_model = ref_model
        self.beta = beta
        self.level = level
        self.granularity = granularity
        self.micro_batch = micro_batch
        self.temperature = temperature

    def logprobs(self, traj, *, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(prm_logprobs (B, L), ref_logprobs (B, L)) of the response tokens; garbage at padding.

        ``grad=True`` keeps the PRM graph (for ``finegrain.losses.prm``); the reference never has one.
        """
        L = traj.response_ids.shape[1]
        args = (traj.input_ids, traj.attention_mask, L, self.temperature, self.micro_batch)
        with torch.set_grad_enabled(grad):
            prm_lp = response_logprobs(self.prm_model, *args)                   # (B, L)
        if self.ref_model is None:
            ref_lp = traj.behavior_logprobs.to(prm_lp.dtype)                   # (B, L)
        else:
            with torch.no_grad():
                ref_lp = response_logprobs(self.ref_model, *args)               # (B, L)
        return prm_lp, ref_lp

    @torch.no_grad()
    def log_ratio(self, traj) -> torch.Tensor:
        """q_t = log π_φ − log π_ref per response token: (B, L), 0 where response_mask is False."""
        prm_lp, ref_lp = self.logprobs(traj)
        return implicit_token_rewards(prm_lp, ref_lp, traj.response_mask, beta=1.0)

    @torch.no_grad()
    def output_from_log_ratio(self, log_ratio: torch.Tensor, traj) -> RewardOutput:
        """Rewards from a log-ratio already computed (e.g. in the PRM update's forward).

        Args: log_ratio (B, L) float (garbage where response_mask is False is ignored); traj.
        Returns: RewardOutput at ``self.level``.
        """
        mask = traj.response_mask
        check_shapes(log_ratio=(log_ratio, ("B", "L")), response_mask=(mask, ("B", "L")))
        zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
        token_r = torch.where(mask, self.beta * log_ratio.detach(), zero)         # (B, L)
        seq_sum = token_r.sum(dim=1)                                             # (B,)
        components = {"seq_sum": seq_sum, "token_mean": masked_mean(token_r, mask, dim=1)}
        if self.level == "step":
            S = int(traj.step_ids.max().clamp(min=-1)) + 1
            values, step_mask = implicit_step_rewards(token_r, mask, traj.step_ids, S)  # (B, S) each
            return RewardOutput(values, step_mask, "step", components)
        if self.granularity == "whole":
            last = last_true_index(mask)                                         # (B,)
            pos = torch.arange(mask.shape[1], device=mask.device)
            at_last = (pos[None, :] == last[:, None]) & mask                     # (B, L)
            values = torch.where(at_last, seq_sum[:, None], torch.zeros_like(token_r))
            return RewardOutput(values, at_last, "token", components)
        return RewardOutput(token_r, mask.clone(), "token", components)

    def __call__(self, traj) -> RewardOutput:
        return self.output_from_log_ratio(self.log_ratio(traj), traj)
