"""``train(cfg)``: the RL loop, top to bottom.

    rollout → filter → (reward models: before) → score → credit → update (policy, then the critic
    if the estimator reads values) → (reward models: after) → log → eval → save

Each stage is a function of ``finegrain.train.stages`` calling one registry (samplers and
environments, filters, rewards, estimators, losses); this file holds only their order and the
plumbing (resume, seeding, checkpoints, logging).
"""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from finegrain.config import RunConfig, dump_config, to_dict, validate
from finegrain.eval.runner import evaluate
from finegrain.masked import masked_mean
from finegrain.train import rundir
from finegrain.models.load import load_weights_into, read_weights
from finegrain.train.checkpoint import save_checkpoint
from finegrain.train.distributed import SINGLE, DataParallel, check_data_parallel
from finegrain.guards import check_finite
from finegrain.lock import RunLock
from finegrain.train.logging import RunLogger, prefixed, read_log, require_wandb, wandb_settings
from finegrain.progress import Progress
from finegrain.train.stages import (build_policy, build_run, collect_batch, compute_advantages, rollout_metrics, score_batch, task_for,
                                    update_critic, update_policy, update_reward_models)


def apply_optim_config(optimizer, scheduler, cfg: RunConfig) -> None:
    """After loading saved optimizer/scheduler state, set the configured lr, betas and weight decay
    (``train.resume=force``); the current lr follows the schedule at the saved step."""
    scheduler.base_lrs = [cfg.optim.lr for _ in optimizer.param_groups]
    for g, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        g.update(lr=cfg.optim.lr * fn(scheduler.last_epoch), betas=tuple(cfg.optim.betas),
                 weight_decay=cfg.optim.weight_decay)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def keep_thread_count(saved: int | None, cfg: RunConfig, log) -> None:
    """A resumed run computes with the intra-op thread count it started with, unless the user set
    one (``train.threads``, ``FINEGRAIN_THREADS``, ``OMP_NUM_THREADS``): the count changes how
    reductions are split, so an automatic choice made under another load could change the numbers
    of an otherwise exact resume."""
    import os

    explicit = cfg.train.threads or os.environ.get("FINEGRAIN_THREADS", "").strip() or \
        os.environ.get("OMP_NUM_THREADS", "").strip()
    if saved and not explicit and saved != torch.get_num_threads():
        log(f"resume: using {saved} torch threads, as the run did before (train.threads to choose)")
        torch.set_num_threads(int(saved))


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


def train(cfg: RunConfig, *, stop_after: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Run RL as configured; returns the report (also written to ``<out_dir>/report.json``).

    ``stop_after`` ends the run after that many steps as if it were killed (tests use it to
    check that resuming gives the same metrics as an uninterrupted run). The run directory is
    locked for the whole call; how an existing run there is continued is ``train/rundir.py``.
    """
    validate(cfg)
    dp = DataParallel.from_env(fsdp=cfg.train.fsdp)
    if dp.enabled:
        check_data_parallel(cfg, dp)
        if not dp.is_main:  # rank 0 locks, writes logs and checkpoints; the others only compute
            dp.barrier()    # ... after rank 0 has prepared the run directory (set aside, quarantined)
            return _train(cfg, Path(cfg.train.out_dir), stop_after, lambda s: None, dp)
    with RunLock(cfg.train.out_dir):
        return _train(cfg, Path(cfg.train.out_dir), stop_after, log, dp)


def _train(cfg: RunConfig, out: Path, stop_after: int | None, log: Callable[[str], None],
           dp: DataParallel = SINGLE) -> dict:
    t_start = time.time()
    require_wandb(cfg)
    resume = rundir.prepare(cfg, out, log, record=dp.is_main)  # refusals happen here, before any model is loaded
    if dp.enabled and dp.is_main:
        log(f"data parallel: {dp.world} processes, {cfg.rollout.prompts_per_step // dp.world} prompts each per step"
            f"{', policy sharded (FSDP2)' if dp.fsdp else ''}")
        dp.barrier()
    if resume.finished is not None:
        return resume.finished

    # ---- seeding: the one place the global RNG is seeded; everything else derives from (seed, step)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)

    task = task_for(cfg)
    pool = task.examples("train")
    if cfg.rollout.prompts_per_step > len(pool):
        raise ValueError(f"rollout.prompts_per_step: {cfg.rollout.prompts_per_step} exceeds the {len(pool)} training "
                         f"problems of task '{cfg.task.name}'")
    eval_set = task.examples("test", cfg.eval.n_problems)
    # data parallel: rank 0 builds the policy first, the others after it. A tiny model's SFT warm
    # start is then trained and cached once, and by rank 0, the only rank on which transformers'
    # save_pretrained writes weights once a process group exists (a cache written by another rank
    # would hold no weights).
    if dp.enabled and not dp.is_main:
        dp.barrier()
    policy = build_policy(cfg, task, log)
    if dp.enabled and dp.is_main:
        dp.barrier()
    run = build_run(cfg, task, log, policy=policy, dp=dp)

    start, ck, resumed_state = 0, resume.checkpoint, resume.state
    if ck is not None:
        if dp.fsdp:  # every rank reads the full weights and keeps its shard
            dp.load_model_state(run.policy, read_weights(ck / "policy"))
        else:
            load_weights_into(run.policy, ck / "policy")
        dp.load_optimizer_state(run.policy, run.optimizer, resumed_state["optimizer"])
        run.scheduler.load_state_dict(resumed_state["scheduler"])
        if resume.changes:  # train.resume=force: the new optimizer settings win over the saved ones
            apply_optim_config(run.optimizer, run.scheduler, cfg)
        for n, s in run.trainables.items():
            s.load_checkpoint(ck / n, resumed_state["signals"][n])
        if run.critic is not None:  # PPO with GAE: the value model and its optimizer
            if "critic" not in resumed_state:
                raise ValueError(f"{ck}: state.pt holds no critic (saved without one?); train.resume=false starts over")
            run.critic.load_checkpoint(ck / "critic", resumed_state["critic"])
        for n, s in run.stateful.items():  # e.g. LASER-D's length window, the random reward's generator
            if n not in resumed_state.get("reward_state", {}):
                raise ValueError(f"{ck}: state.pt holds no state for reward '{n}' (saved by an older finegrain?); "
                                 "train.resume=false starts over")
            s.load_state_dict(resumed_state["reward_state"][n])
        for k, f in run.stateful_filters.items():  # e.g. RLPR's std filter EMA
            if k not in resumed_state.get("filter_state", {}):
                raise ValueError(f"{ck}: state.pt holds no state for filter '{k}' (saved by an older finegrain?); "
                                 "train.resume=false starts over")
            f.load_state_dict(resumed_state["filter_state"][k])
        start = resumed_state["step"]
        log(f"resumed from {ck} at step {start}")
        keep_thread_count(resumed_state.get("threads"), cfg, log)
    if ck is not None:
        run.engine.sampler.sync_weights()  # the engine started from the initial weights
    pool = fitting_prompts(run.engine, pool, cfg.rollout.max_new_tokens, "training", log)
    eval_set = fitting_prompts(run.engine, eval_set, cfg.eval.max_new_tokens, "held-out", log)
    if not dp.is_main:  # the other ranks take the same steps on their shards: no eval, log or checkpoint
        for step in range(start, cfg.train.steps):
            dp.reduce_metrics(one_step(cfg, run, pool, step, log))
            if _save_due(cfg, step + 1):
                _save(out, step + 1, run, {})  # joins the gathers of a sharded policy; rank 0 writes
            if stop_after is not None and step + 1 >= stop_after:
                return {"stopped_at": step + 1}
        return {}
    dump_config(cfg, out / "config.yaml")  # only now: the run has validated, loaded and resumed
    logger = RunLogger(out, cfg.train.tensorboard, resume_step=start if ck is not None else None,
                       wandb=wandb_settings(cfg, out))
    ev = dict(samples=cfg.eval.samples, temperature=cfg.eval.temperature, max_new_tokens=cfg.eval.max_new_tokens,
              seed=cfg.eval.seed, greedy_too=cfg.eval.greedy_too)
    # learned PRMs are judged against the task's exact step labels at every evaluation
    ev["step_scorers"] = {n: sig.step_scores for n, sig in run.trainables.items() if hasattr(sig, "step_scores")}
    if resumed_state is not None:
        before = resumed_state["eval_before"]
    else:
        before, _ = evaluate(run.engine, task, eval_set, **ev)
        logger.log(0, prefixed("eval", before))
        log(f"before RL: accuracy {before['accuracy']:.3f} [{before['accuracy_lo']:.3f}, {before['accuracy_hi']:.3f}]")
    with Progress("RL", total=cfg.train.steps, enabled=cfg.train.progress) as bar:
        for step in range(start, cfg.train.steps):
            row = dp.reduce_metrics(one_step(cfg, run, pool, step, log))
            if (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.steps):
                m, _ = evaluate(run.engine, task, eval_set, **ev)
                row.update(prefixed("eval", m))
            logger.log(step + 1, row)
            acc = row.get("filter/sampled_accuracy", float("nan"))
            bar.update(step + 1, info=f"acc {acc:.2f}  loss {row.get('loss/loss', 0):.3f}")
            if _save_due(cfg, step + 1):
                _save(out, step + 1, run, before)
            if stop_after is not None and step + 1 >= stop_after:
                logger.close()
                return {"stopped_at": step + 1}
    after, records = evaluate(run.engine, task, eval_set, **ev, keep_samples=64)
    logger.log(cfg.train.steps, prefixed("eval", after))
    logger.close()
    report = {"eval": {**{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
                       "n_problems": len(eval_set)},
              "steps": cfg.train.steps, "wall_seconds": time.time() - t_start,
              "init": {k: v for k, v in run.init_info.items() if isinstance(v, (int, float, str, bool))},
              "config": str(out / "config.yaml")}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "samples_after.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from finegrain.train.plots import plot_curves

    plot_curves(read_log(out / "metrics.jsonl"), out / "curves.png")
    log(f"after RL: accuracy {after['accuracy']:.3f} [{after['accuracy_lo']:.3f}, {after['accuracy_hi']:.3f}]")
    return report


def one_step(cfg: RunConfig, run, pool: list, step: int, log: Callable[[str], None]) -> dict:
    """One RL step on the run: rollout + filters, reward models, scoring, credit, the policy (and
    critic) update, the weight sync; returns the step's metrics row (before data-parallel reduction)."""
    t0 = time.time()
    # ---- rollout + filters
    traj, pre_scored, fmetrics = collect_batch(cfg, run.engine, pool, run.signals, run.filters, step,
                                               outcome=run.outcome, dp=run.dp)
    if traj is None:  # no update; the eval, log and checkpoint below still happen on schedule
        log(f"step {step + 1}: every group was filtered out; skipping the update")
        with warnings.catch_warnings():  # the schedule advances without an optimizer step, on purpose
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            run.scheduler.step()
        row = prefixed("filter", fmetrics)
    else:
        t_gen = time.time()
        # ---- online reward models that learn before scoring, then score every signal
        rm_metrics = update_reward_models(run, traj, "before")
        scored = score_batch(run, traj, pre_scored, step)
        t_score = time.time()
        # ---- credit
        advantages = compute_advantages(cfg, scored.per_source, traj, values=scored.values)
        check_finite(f"step {step + 1}: advantages", advantages, traj.loss_mask)
        # ---- update: the policy, the critic (if any), then online reward models that learn after it
        umetrics = update_policy(run, traj, advantages, scored, step)
        cmetrics = update_critic(run, traj, scored, step)
        rm_metrics |= update_reward_models(run, traj, "after")
        run.scheduler.step()
        t_upd = time.time()
        run.engine.sampler.sync_weights()  # an engine with its own copy (vLLM) takes the new weights
        t_sync = time.time()
        # ---- log
        row = {**prefixed("loss", umetrics), **prefixed("critic", cmetrics), **prefixed("filter", fmetrics),
               **rm_metrics}
        for n, o in scored.outputs.items():
            row[f"reward/{n}/mean"] = float(o.values[o.mask].float().mean()) if o.mask.any() else 0.0
            row.update(prefixed(f"reward/{n}", o.components))
        row |= {"adv/mean": masked_mean(advantages, traj.loss_mask), "adv/abs_mean": masked_mean(advantages.abs(), traj.loss_mask),
               "rollout/response_len": traj.response_mask.sum(1).float().mean(),
               "rollout/truncated_frac": traj.truncated.float().mean(), "rollout/rows": traj.batch_size,
               **rollout_metrics(traj),
               "optim/lr": run.scheduler.get_last_lr()[0], "time/generate": t_gen - t0, "time/score": t_score - t_gen,
               "time/update": t_upd - t_score, "time/sync": t_sync - t_upd, "time/step": t_sync - t0}
    return row


def _save_due(cfg: RunConfig, step: int) -> bool:
    """Checkpoint after ``step``: every ``train.save_every`` steps and after the last."""
    return bool(cfg.train.save_every and step % cfg.train.save_every == 0) or step == cfg.train.steps


def _save(out: Path, step: int, run, before: dict) -> None:
    """Checkpoint the run (rank 0 writes). Every rank calls it: a sharded policy's weights and
    optimizer state are gathered from all of them first."""
    policy_state = run.dp.model_state(run.policy)  # None unless sharded
    optimizer_state = run.dp.optimizer_state(run.policy, run.optimizer)
    if not run.dp.is_main:
        return
    models = {"policy": (run.policy, run.tokenizer)}
    state = {"optimizer": optimizer_state, "scheduler": run.scheduler.state_dict(), "eval_before": before,
             "signals": {}, "config": to_dict(run.cfg), "threads": torch.get_num_threads(),
             "reward_state": {n: s.state_dict() for n, s in run.stateful.items()},
             "filter_state": {k: f.state_dict() for k, f in run.stateful_filters.items()}}
    for n, s in run.trainables.items():
        model, extra = s.state_dict_for_checkpoint()
        models[n] = (model, None)
        state["signals"][n] = extra
    if run.critic is not None:
        model, state["critic"] = run.critic.state_dict_for_checkpoint()
        models["critic"] = (model, None)
    save_checkpoint(out, step, models, state, state_dicts={"policy": policy_state} if policy_state is not None else None)
