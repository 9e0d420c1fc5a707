"""One policy update on a rollout batch: PPO epochs × minibatches × gradient-accumulation micro-batches;
and the critic's update on the same batch with the same schedule."""

from __future__ import annotations

import torch

from finegrain.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from finegrain.losses.entropy import entropy_from_logits
from finegrain.losses.rollout_correction import rollout_is_weights
from finegrain.train.distributed import SINGLE, DataParallel
from finegrain.losses.value import clipped_value_loss
from finegrain.masked import masked_mean
from finegrain.models.logprobs import logprobs_from_logits, response_logits
from finegrain.guards import check_finite, clip_and_step
from finegrain.trajectory import Trajectory


@torch.no_grad()
def batch_logprobs(model, traj: Trajectory, temperature: float, micro_batch: int) -> torch.Tensor:
    """log π(y_t|·) of every response token under ``model``, (B, L), computed in micro-batches."""
    L = traj.response_ids.shape[1]
    out = []
    for s in range(0, traj.batch_size, micro_batch):
        rows = slice(s, s + micro_batch)
        logits = response_logits(model, traj.input_ids[rows], traj.attention_mask[rows], L)
        out.append(logprobs_from_logits(logits, traj.response_ids[rows], temperature))
    return torch.cat(out)


def _weight(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """How much a micro-batch counts in its minibatch's aggregate: its trained tokens for
    token-mean, its rows with any trained token for the seq-* modes."""
    return mask.sum() if mode == "token-mean" else mask.any(1).sum()


def policy_update(policy, optimizer, traj: Trajectory, advantages: torch.Tensor, *, old_logprobs: torch.Tensor | None,
                  ref_logprobs: torch.Tensor | None, loss_cfg, ppo_epochs: int, minibatches: int, grad_accum: int,
                  temperature: float, grad_clip: float, max_new_tokens: int, generator: torch.Generator,
                  dp: DataParallel = SINGLE) -> dict:
    """Update ``policy`` in place; returns mean metrics over all micro-batches (plain keys).

    old_logprobs None means the batch is used for exactly one optimizer step, so π_old = π_θ and
    the detached current log-probs serve (no extra forward pass). Gradient accumulation: each
    micro-batch's aggregated loss is scaled by its share of the minibatch (tokens for token-mean,
    rows for the seq-* modes), so the accumulated gradient equals the minibatch's.
    The sampler's ``traj.behavior_logprobs`` are compared with π_old on every micro-batch
    (``mismatch_*`` metrics); ``loss_cfg.rollout_correction`` tis / mask multiplies the policy-gradient
    term by the truncated importance weight (``finegrain.losses.rollout_correction``).
    Data parallel (``dp``, ``finegrain/train/distributed.py``): ``traj`` is this rank's shard; the
    minibatch weight is summed over ranks and so are the gradients before the step, which makes
    the step equal to one process's on the global batch (with ``minibatches`` 1: the minibatch
    draws are per shard). With ``dp.fsdp`` the policy is resharded for the update and gathered
    again after it; FSDP's reduce-scatter sums the gradients.
    """
    loss_fn = POLICY_LOSSES.get(loss_cfg.name)
    agg_fn = AGGREGATIONS.get(loss_cfg.aggregation)
    agg_kw = {"constant": loss_cfg.aggregation_constant or max_new_tokens} if loss_cfg.aggregation == "seq-mean-token-sum-norm" else {}
    kl_fn = KL_ESTIMATORS.get(loss_cfg.kl_estimator)
    use_kl_loss = loss_cfg.kl_coef > 0 and loss_cfg.kl_mode == "loss"
    B, L = traj.response_ids.shape
    sums: dict[str, float] = {}
    count = 0
    dp.check_same_rows(B)
    dp.for_update(policy)  # a sharded policy (train.fsdp) trains on its shards, gathered layer by layer
    policy.train()
    for _ in range(ppo_epochs):
        perm = torch.randperm(B, generator=generator)
        for mb in dp.split(perm, minibatches):
            mb_weight = dp.all_sum(_weight(traj.loss_mask[mb], loss_cfg.aggregation)).clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            for micro in mb.chunk(grad_accum):
                if micro.numel() == 0:  # an empty shard (data parallel) still joins the gradient sum
                    continue
                mask = traj.loss_mask[micro]  # (b, L)
                logits = response_logits(policy, traj.input_ids[micro], traj.attention_mask[micro], L)  # (b, L, V)
                logprobs = logprobs_from_logits(logits, traj.response_ids[micro], temperature)  # (b, L)
                old = logprobs.detach() if old_logprobs is None else old_logprobs[micro]
                per_token, metrics = loss_fn(logprobs, old, advantages[micro], mask, **loss_cfg.kwargs)
                # sampler vs trainer: the mismatch is always measured; TIS / mask reweight the PG term only
                w, is_metrics = rollout_is_weights(old, traj.behavior_logprobs[micro], mask,
                                                   mode=loss_cfg.rollout_correction, cap=loss_cfg.rollout_is_cap,
                                                   low=loss_cfg.rollout_is_low)
                if loss_cfg.rollout_correction != "none":
                    per_token = per_token * w.to(per_token.dtype)
                metrics |= is_metrics
                if use_kl_loss:
                    kl = kl_fn(logprobs, ref_logprobs[micro])  # (b, L)
                    per_token = per_token + loss_cfg.kl_coef * kl
                    metrics["kl"] = masked_mean(kl.detach(), mask)
                if loss_cfg.entropy_coef > 0:
                    ent = entropy_from_logits(logits.float() / temperature)  # (b, L)
                    per_token = per_token - loss_cfg.entropy_coef * ent
                    metrics["entropy"] = masked_mean(ent.detach(), mask)
                share = _weight(mask, loss_cfg.aggregation) / mb_weight
                loss = agg_fn(per_token, mask, **agg_kw) * share
                check_finite("policy loss", loss)
                loss.backward()
                metrics["loss"] = loss.detach() / share.clamp(min=1e-12)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
            dp.sum_grads(policy.parameters())
            gnorm = clip_and_step(policy.parameters(), optimizer, grad_clip, "policy update")
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + gnorm * grad_accum
    dp.for_rollout(policy)  # full weights again for the next rollout
    return {k: v / max(count, 1) for k, v in sums.items()}


@torch.no_grad()
def batch_values(model, traj: Trajectory, micro_batch: int) -> torch.Tensor:
    """The critic's V_t of every response token, (B, L) float32, computed in micro-batches."""
    L = traj.response_ids.shape[1]
    return torch.cat([model(traj.input_ids[s:s + micro_batch], traj.attention_mask[s:s + micro_batch], L)
                      for s in range(0, traj.batch_size, micro_batch)])


def critic_update(model, optimizer, traj: Trajectory, returns: torch.Tensor, old_values: torch.Tensor, *,
                  aggregation: str, aggregation_constant: float | None, value_clip: float | None, vf_coef: float,
                  ppo_epochs: int, minibatches: int, grad_accum: int, grad_clip: float,
                  generator: torch.Generator) -> dict:
    """Update the critic ``model`` in place towards ``returns``; mean metrics over micro-batches (plain keys).

    The policy's schedule (PPO epochs × minibatches × micro-batches) and aggregation mode, with the
    same accumulation shares as ``policy_update``; each micro-batch's loss is
    vf_coef · aggregate(½·max((V − R)², (clip(V, V_old ± ε) − R)²)) · share.
    ``loss`` is reported without vf_coef.
    """
    agg_fn = AGGREGATIONS.get(aggregation)
    agg_kw = {"constant": aggregation_constant} if aggregation == "seq-mean-token-sum-norm" else {}
    B, L = traj.response_ids.shape
    sums: dict[str, float] = {}
    count = 0
    model.train()
    for _ in range(ppo_epochs):
        perm = torch.randperm(B, generator=generator)
        for mb in perm.chunk(minibatches):
            mb_weight = _weight(traj.loss_mask[mb], aggregation).clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            for micro in mb.chunk(grad_accum):
                mask = traj.loss_mask[micro]  # (b, L)
                values = model(traj.input_ids[micro], traj.attention_mask[micro], L)  # (b, L)
                per_token, metrics = clipped_value_loss(values, old_values[micro], returns[micro], mask,
                                                        value_clip=value_clip)
                share = _weight(mask, aggregation) / mb_weight
                value_loss = agg_fn(per_token, mask, **agg_kw)
                loss = vf_coef * value_loss * share
                check_finite("critic loss", loss)
                loss.backward()
                metrics["loss"] = value_loss.detach()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
            gnorm = clip_and_step(model.parameters(), optimizer, grad_clip, "critic update")
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + gnorm * grad_accum
    return {k: v / count for k, v in sums.items()}
