"""``train(cfg)``: the RL loop, top to bottom.

    rollout → filter → score → credit → update → log → eval → save

Each stage is one call into a registry (engines, filters, rewards, estimators, losses); this file
holds only the order of stages and the plumbing (seeding, checkpoints, logging).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from finegrain.config import FilterSpec, RunConfig, SourceCredit, dump_config, from_dict, to_dict, validate
from finegrain.credit import ADVANTAGES
from finegrain.credit.combine import combine_source_advantages
from finegrain.eval.runner import evaluate
from finegrain.filters import FILTERS
from finegrain.losses import KL_ESTIMATORS
from finegrain.masked import masked_mean
from finegrain.models.load import load_pretrained, warm_started_tiny
from finegrain.rewards import REWARDS
from finegrain.rewards.base import cat_outputs, select_output
from finegrain.rewards.combine import combine, total
from finegrain.envs import Rollout
from finegrain.sampling import SAMPLERS, SamplingParams, sample_seed
from finegrain.tasks import TASKS
from finegrain.train import rundir
from finegrain.train.checkpoint import load_weights_into, save_checkpoint
from finegrain.train.guards import check_finite
from finegrain.train.lock import RunLock
from finegrain.train.logging import RunLogger, prefixed, read_log, require_wandb, wandb_settings
from finegrain.train.progress import Progress
from finegrain.train.update import batch_logprobs, policy_update
from finegrain.trajectory import concat


@dataclass
class RewardContext:
    """What a reward signal may need to build itself."""

    cfg: RunConfig
    task: Any
    tokenizer: Any
    policy: Any
    initial_policy: Callable[[], Any]  # a frozen copy of the starting policy, made on first request


def build_policy(cfg: RunConfig, task, log):
    if cfg.model.path:
        model, tok = load_pretrained(cfg.model.path, cfg.model.dtype, cfg.model.device,
                                     trust_remote_code=cfg.model.trust_remote_code)
        return model, tok, {"path": cfg.model.path}
    return warm_started_tiny(task, cfg.task.kwargs, cfg.model, cfg.sft, log)


def frozen_copy(model):
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def pick_prompts(pool: list, n: int, seed: int, step: int, stream: int) -> list:
    """n distinct pool examples for (seed, step, stream): a pure function, so resumes repeat it."""
    rng = random.Random(sample_seed(seed, step, stream))
    return [pool[i] for i in rng.sample(range(len(pool)), min(n, len(pool)))]


def make_schedule(optimizer, cfg: RunConfig):
    total, warm = max(cfg.train.steps, 1), cfg.optim.warmup_steps

    def factor(s: int) -> float:
        w = min(1.0, (s + 1) / warm) if warm else 1.0
        frac = min(1.0, s / total)
        return w * {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[cfg.optim.schedule]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_optim_config(optimizer, scheduler, cfg: RunConfig) -> None:
    """After loading saved optimizer/scheduler state, set the configured lr, betas and weight decay
    (``train.resume=force``); the current lr follows the schedule at the saved step."""
    scheduler.base_lrs = [cfg.optim.lr for _ in optimizer.param_groups]
    for g, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        g.update(lr=cfg.optim.lr * fn(scheduler.last_epoch), betas=tuple(cfg.optim.betas),
                 weight_decay=cfg.optim.weight_decay)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def fitting_prompts(engine, examples: list, max_new_tokens: int, what: str, log) -> list:
    """The examples whose prompt plus ``max_new_tokens`` fits the model's context; says how many
    were dropped, and refuses when none fit."""
    fits = engine.prompt_fits(examples, max_new_tokens)
    kept = [e for e, ok in zip(examples, fits) if ok]
    if len(kept) < len(examples):
        log(f"dropped {len(examples) - len(kept)} of {len(examples)} {what} problems whose prompt plus "
            f"{max_new_tokens} new tokens exceeds the model's context of {engine.context_length} tokens")
    if examples and not kept:
        raise ValueError(f"every {what} prompt is too long for the model's context of {engine.context_length} tokens "
                         f"with {max_new_tokens} new tokens (rollout.max_new_tokens / eval.max_new_tokens)")
    return kept


def collect_batch(cfg: RunConfig, engine, pool, signals, filters, step: int):
    """Rollout + filters, with oversampling and bounded refill rounds.

    Returns (traj or None when nothing passed, pre-scored {name: RewardOutput} for the kept rows,
    metrics). Filters need the outcome, so the 'verifier' signal is scored here, once per round,
    and its output is handed back so the trainer does not score it again.
    """
    G, want = cfg.rollout.group_size, cfg.rollout.prompts_per_step
    sp = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k, cfg.rollout.max_new_tokens)
    kept, kept_outcomes, generated, sums, rounds, n_seen, n_right = [], [], 0, {}, 0, 0, 0.0
    for rnd in range(1 + (cfg.filters.max_refills if filters else 0)):
        rounds += 1
        n_prompts = math.ceil(want * cfg.filters.oversample) if rnd == 0 else want - sum(t.batch_size for t in kept) // G
        examples = pick_prompts(pool, n_prompts, cfg.train.seed, step, stream=2 * rnd)
        traj = engine.generate(examples, G, sp, sample_seed(cfg.train.seed, step, 2 * rnd + 1), group_offset=generated)
        generated += len(examples)
        verified = signals["verifier"](traj) if "verifier" in signals else None
        if verified is not None:  # accuracy of everything sampled, before filters pick rows
            n_seen, n_right = n_seen + traj.batch_size, n_right + float(verified.components.get("accuracy", verified.values).sum())
        keep = torch.ones(traj.batch_size, dtype=torch.bool)
        for name, fn, kw in filters:
            outcome = verified.values if verified is not None else torch.zeros(traj.batch_size)
            k, loss_mask, m = fn(traj, outcome, **kw)
            keep &= k.cpu()
            traj = traj.replace(loss_mask=loss_mask)
            for key, v in m.items():
                sums[f"{name}/{key}"] = sums.get(f"{name}/{key}", 0.0) + float(v)
        room = want - sum(t.batch_size for t in kept) // G
        keep_groups = traj.group_ids[keep].unique()[:room]
        rows = torch.isin(traj.group_ids, keep_groups).cpu()
        if rows.all():  # nothing filtered: no copy
            kept.append(traj)
            kept_outcomes += [verified] if verified is not None else []
        elif rows.any():
            kept.append(traj.select(rows))
            kept_outcomes += [select_output(verified, rows)] if verified is not None else []
        if sum(t.batch_size for t in kept) // G >= want:
            break
    metrics = {k: v / rounds for k, v in sums.items()}  # filter metrics: means over rounds
    metrics["generated_prompts"] = generated
    if n_seen:
        metrics["sampled_accuracy"] = n_right / n_seen
    if not kept:
        return None, {}, metrics
    traj = kept[0] if len(kept) == 1 else concat(kept, engine.tokenizer.pad_token_id)
    pre_scored = {"verifier": cat_outputs(kept_outcomes)} if kept_outcomes else {}
    metrics["kept_prompts"] = traj.batch_size // G
    return traj, pre_scored, metrics


def compute_advantages(cfg: RunConfig, per_source: dict[str, torch.Tensor], traj) -> torch.Tensor:
    """One estimator on the summed token rewards, or one per source, summed with coefficients."""
    if not cfg.advantage.per_source:
        est = ADVANTAGES.get(cfg.advantage.name)
        adv = est(total(per_source), traj.loss_mask, traj.group_ids, traj.step_ids, **cfg.advantage.kwargs)
        return combine_source_advantages({"all": adv}, {"all": 1.0}, traj.loss_mask, whiten=cfg.advantage.whiten)
    advs, coefs = {}, {}
    for src, r in per_source.items():
        spec = from_dict(SourceCredit, cfg.advantage.per_source[src], f"advantage.per_source.{src}")
        advs[src] = ADVANTAGES.get(spec.name)(r, traj.loss_mask, traj.group_ids, traj.step_ids, **spec.kwargs)
        coefs[src] = spec.coef
    return combine_source_advantages(advs, coefs, traj.loss_mask, whiten=cfg.advantage.whiten)


def train(cfg: RunConfig, *, stop_after: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Run RL as configured; returns the report (also written to ``<out_dir>/report.json``).

    ``stop_after`` ends the run after that many steps as if it were killed (tests use it to
    check that resuming gives the same metrics as an uninterrupted run). The run directory is
    locked for the whole call; how an existing run there is continued is ``train/rundir.py``.
    """
    validate(cfg)
    with RunLock(cfg.train.out_dir):
        return _train(cfg, Path(cfg.train.out_dir), stop_after, log)


def _train(cfg: RunConfig, out: Path, stop_after: int | None, log: Callable[[str], None]) -> dict:
    t_start = time.time()
    require_wandb(cfg)
    resume = rundir.prepare(cfg, out, log)  # refusals happen here, before any model is loaded
    if resume.finished is not None:
        return resume.finished

    # ---- seeding: the one place the global RNG is seeded; everything else derives from (seed, step)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)

    task = TASKS.get(cfg.task.name)(**cfg.task.kwargs)
    pool = task.examples("train")
    if cfg.rollout.prompts_per_step > len(pool):
        raise ValueError(f"rollout.prompts_per_step: {cfg.rollout.prompts_per_step} exceeds the {len(pool)} training "
                         f"problems of task '{cfg.task.name}'")
    eval_set = task.examples("test", cfg.eval.n_problems)
    policy, tok, init_info = build_policy(cfg, task, log)
    device = policy.device
    initial: dict[str, Any] = {}

    def initial_policy():
        if "m" not in initial:
            initial["m"] = frozen_copy(policy)
        return initial["m"]

    ref = initial_policy() if cfg.loss.kl_coef > 0 else None
    sampler = SAMPLERS.get(cfg.rollout.engine)(policy, tok, max_batch=cfg.rollout.max_batch)
    engine = Rollout(sampler, segmenter=task.segmenter, env=cfg.rollout.env, env_kwargs=cfg.rollout.env_kwargs, task=task,
                     max_turns=cfg.rollout.max_turns or None, use_chat_template=cfg.model.use_chat_template)
    ctx = RewardContext(cfg, task, tok, policy, initial_policy)
    signals = {r.name: REWARDS.get(r.name).from_context(ctx, **r.kwargs) for r in cfg.rewards}
    weights = {r.name: r.weight for r in cfg.rewards}
    filters = []
    for f in cfg.filters.filters:
        spec = from_dict(FilterSpec, f, "filters.filters") if isinstance(f, dict) else f
        filters.append((spec.name, FILTERS.get(spec.name), spec.kwargs))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=tuple(cfg.optim.betas))
    scheduler = make_schedule(optimizer, cfg)
    trainables = {n: s for n, s in signals.items() if hasattr(s, "state_dict_for_checkpoint")}

    start, ck, resumed_state = 0, resume.checkpoint, resume.state
    if ck is not None:
        load_weights_into(policy, ck / "policy")
        optimizer.load_state_dict(resumed_state["optimizer"])
        scheduler.load_state_dict(resumed_state["scheduler"])
        if resume.changes:  # train.resume=force: the new optimizer settings win over the saved ones
            apply_optim_config(optimizer, scheduler, cfg)
        for n, s in trainables.items():
            s.load_checkpoint(ck / n, resumed_state["signals"][n])
        start = resumed_state["step"]
        log(f"resumed from {ck} at step {start}")
    pool = fitting_prompts(engine, pool, cfg.rollout.max_new_tokens, "training", log)
    eval_set = fitting_prompts(engine, eval_set, cfg.eval.max_new_tokens, "held-out", log)
    dump_config(cfg, out / "config.yaml")  # only now: the run has validated, loaded and resumed
    logger = RunLogger(out, cfg.train.tensorboard, resume_step=start if ck is not None else None,
                       wandb=wandb_settings(cfg, out))
    ev = dict(samples=cfg.eval.samples, temperature=cfg.eval.temperature, max_new_tokens=cfg.eval.max_new_tokens,
              seed=cfg.eval.seed, greedy_too=cfg.eval.greedy_too)
    if resumed_state is not None:
        before = resumed_state["eval_before"]
    else:
        before, _ = evaluate(engine, task, eval_set, **ev)
        logger.log(0, prefixed("eval", before))
        log(f"before RL: accuracy {before['accuracy']:.3f} [{before['accuracy_lo']:.3f}, {before['accuracy_hi']:.3f}]")
    shuffle_gen = torch.Generator()
    with Progress("RL", total=cfg.train.steps, enabled=cfg.train.progress) as bar:
        for step in range(start, cfg.train.steps):
            t0 = time.time()
            # ---- rollout + filters
            traj, pre_scored, fmetrics = collect_batch(cfg, engine, pool, signals, filters, step)
            if traj is None:
                log(f"step {step + 1}: every group was filtered out; skipping the update")
                logger.log(step + 1, prefixed("filter", fmetrics))
                scheduler.step()
                continue
            t_gen = time.time()
            # ---- score: every signal, placed on tokens, weighted
            old_logprobs = None
            if cfg.train.ppo_epochs > 1 or cfg.train.minibatches > 1:
                old_logprobs = batch_logprobs(policy, traj, cfg.rollout.temperature, cfg.rollout.max_batch)
            outputs = {n: pre_scored[n] if n in pre_scored else s(traj) for n, s in signals.items()}
            per_source = combine(outputs, weights, traj)
            ref_logprobs = batch_logprobs(ref, traj, cfg.rollout.temperature, cfg.rollout.max_batch) if ref is not None else None
            if ref is not None and cfg.loss.kl_mode == "reward":
                lp = old_logprobs if old_logprobs is not None else traj.behavior_logprobs
                kl = KL_ESTIMATORS.get(cfg.loss.kl_estimator)(lp, ref_logprobs)
                per_source["kl_penalty"] = -cfg.loss.kl_coef * torch.where(traj.loss_mask, kl, torch.zeros_like(kl))
            t_score = time.time()
            for src, r in per_source.items():
                check_finite(f"step {step + 1}: token rewards of '{src}'", r, traj.response_mask)
            # ---- credit
            advantages = compute_advantages(cfg, per_source, traj)
            check_finite(f"step {step + 1}: advantages", advantages, traj.loss_mask)
            # ---- update
            shuffle_gen.manual_seed(sample_seed(cfg.train.seed, step, 99))
            umetrics = policy_update(policy, optimizer, traj, advantages, old_logprobs=old_logprobs,
                                     ref_logprobs=ref_logprobs, loss_cfg=cfg.loss, ppo_epochs=cfg.train.ppo_epochs,
                                     minibatches=cfg.train.minibatches, grad_accum=cfg.train.grad_accum,
                                     temperature=cfg.rollout.temperature, grad_clip=cfg.optim.grad_clip,
                                     max_new_tokens=cfg.rollout.max_new_tokens, generator=shuffle_gen)
            smetrics = {}
            for n, s in trainables.items():  # online reward-model updates (implicit PRM)
                smetrics.update(prefixed(f"reward/{n}", s.update(traj)))
            scheduler.step()
            t_upd = time.time()
            # ---- log
            row = {**prefixed("loss", umetrics), **prefixed("filter", fmetrics), **smetrics}
            for n, o in outputs.items():
                row[f"reward/{n}/mean"] = float(o.values[o.mask].float().mean()) if o.mask.any() else 0.0
                row.update(prefixed(f"reward/{n}", o.components))
            row |= {"adv/mean": masked_mean(advantages, traj.loss_mask), "adv/abs_mean": masked_mean(advantages.abs(), traj.loss_mask),
                   "rollout/response_len": traj.response_mask.sum(1).float().mean(),
                   "rollout/truncated_frac": traj.truncated.float().mean(), "rollout/rows": traj.batch_size,
                   "optim/lr": scheduler.get_last_lr()[0], "time/generate": t_gen - t0, "time/score": t_score - t_gen,
                   "time/update": t_upd - t_score, "time/step": t_upd - t0}
            if (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.steps):
                m, _ = evaluate(engine, task, eval_set, **ev)
                row.update(prefixed("eval", m))
            logger.log(step + 1, row)
            acc = row.get("filter/sampled_accuracy", row.get("reward/verifier/accuracy", float("nan")))
            bar.update(step + 1, info=f"acc {acc:.2f}  loss {row.get('loss/loss', 0):.3f}")
            if (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0) or step + 1 == cfg.train.steps:
                _save(out, step + 1, policy, tok, optimizer, scheduler, trainables, before, cfg)
            if stop_after is not None and step + 1 >= stop_after:
                logger.close()
                return {"stopped_at": step + 1}
    after, records = evaluate(engine, task, eval_set, **ev, keep_samples=64)
    logger.log(cfg.train.steps, prefixed("eval", after))
    logger.close()
    report = {"eval": {**{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
                       "n_problems": len(eval_set)},
              "steps": cfg.train.steps, "wall_seconds": time.time() - t_start,
              "init": {k: v for k, v in init_info.items() if isinstance(v, (int, float, str, bool))},
              "config": str(out / "config.yaml")}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "samples_after.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from finegrain.train.plots import plot_curves

    plot_curves(read_log(out / "metrics.jsonl"), out / "curves.png")
    log(f"after RL: accuracy {after['accuracy']:.3f} [{after['accuracy_lo']:.3f}, {after['accuracy_hi']:.3f}]")
    return report


def _save(out, step, policy, tok, optimizer, scheduler, trainables, before, cfg) -> None:
    models = {"policy": (policy, tok)}
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "eval_before": before,
             "signals": {}, "config": to_dict(cfg)}
    for n, s in trainables.items():
        model, extra = s.state_dict_for_checkpoint()
        models[n] = (model, None)
        state["signals"][n] = extra
    save_checkpoint(out, step, models, state)
