"""The stages of one RL step, as functions the trainer (``loop.py``) calls in order and a
benchmark can call one by one:

    build_run ─► collect_batch ─► update_reward_models("before") ─► score_batch ─► compute_advantages
              ─► update_policy ─► update_critic ─► update_reward_models("after")

Each stage reads the registries through the ``Run`` that ``build_run`` assembles; none knows a
registry entry by its name. The outcome the filters judge groups by is the signal named by
``filters.outcome`` (default: the first outcome-level signal in ``rewards``). A critic exists
when the advantage estimator declares ``needs_values`` (PPO with GAE): ``score_batch`` computes its
values V_old, ``compute_advantages`` hands them to the estimator, ``update_critic`` trains it.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from finegrain.config import FilterSpec, RunConfig, SourceCredit, from_dict, needs_values
from finegrain.credit import ADVANTAGES
from finegrain.credit.combine import combine_source_advantages
from finegrain.credit.gae import gae_advantages_returns
from finegrain.envs import Rollout
from finegrain.filters import FILTERS
from finegrain.losses import KL_ESTIMATORS
from finegrain.models.load import load_pretrained
from finegrain.models.lora import FrozenBase, add_adapters, is_lora
from finegrain.models.value import Critic
from finegrain.train.distributed import SINGLE, DataParallel
from finegrain.train.sft import warm_started_tiny
from finegrain.rewards import REWARDS
from finegrain.rewards.base import RewardOutput, cat_outputs, level_of, select_output
from finegrain.rewards.combine import combine, total
from finegrain.sampling import SAMPLERS, SamplingParams, sample_seed
from finegrain.tasks import TASKS
from finegrain.guards import check_finite
from finegrain.train.update import batch_logprobs, batch_values, critic_update, policy_update
from finegrain.trajectory import Trajectory, concat


@dataclass
class RewardContext:
    """What a reward signal may need to build itself."""

    cfg: RunConfig
    task: Any
    tokenizer: Any
    policy: Any
    initial_policy: Callable[[], Any]  # a frozen copy of the starting policy, made on first request


class RoundSignals(Mapping):
    """{reward name: RewardOutput} on one rollout round, for the filters registered with
    ``needs_signals=True``. A signal is scored when a filter first reads it (the outcome comes
    already scored), so a run pays only for the signals its filters name; ``score_batch`` scores
    them again on the kept rows."""

    def __init__(self, signals: dict, traj: Trajectory, scored: dict[str, RewardOutput]):
        self._signals, self._traj, self._out = signals, traj, dict(scored)

    def __getitem__(self, name: str) -> RewardOutput:
        if name not in self._out:
            self._out[name] = self._signals[name](self._traj)
        return self._out[name]

    def __contains__(self, name) -> bool:  # without scoring anything
        return name in self._signals or name in self._out

    def __iter__(self):
        return iter(self._signals)

    def __len__(self) -> int:
        return len(self._signals)


@dataclass
class Run:
    """Everything a step needs, built once per run by ``build_run``."""

    cfg: RunConfig
    task: Any
    policy: Any
    tokenizer: Any
    init_info: dict
    engine: Rollout
    ref: Any  # frozen reference policy, or None when no KL term is used
    signals: dict[str, Any]
    weights: dict[str, float]
    filters: list[tuple[str, Callable, dict]]
    outcome: str | None  # the signal filters read
    trainables: dict[str, Any]  # signals that train online (registry metadata ``trainable``)
    stateful: dict[str, Any]  # signals with state_dict()/load_state_dict() (registry metadata ``stateful``)
    stateful_filters: dict[str, Any]  # "<index>:<name>" -> filter object with state_dict()/load_state_dict()
    optimizer: torch.optim.Optimizer
    scheduler: Any
    shuffle: torch.Generator = field(default_factory=torch.Generator)
    critic: Critic | None = None  # the value model and its optimizer, when the estimator reads values
    dp: DataParallel = SINGLE  # data parallel: this process's rank and the number of processes


@dataclass
class Scored:
    outputs: dict[str, RewardOutput]
    per_source: dict[str, torch.Tensor]  # name -> (B, L) weighted token rewards
    old_logprobs: torch.Tensor | None  # (B, L), only when the batch is used for several optimizer steps
    ref_logprobs: torch.Tensor | None  # (B, L), only with a KL term
    values: torch.Tensor | None = None  # (B, L) the critic's V_old, only with a critic


def build_policy(cfg: RunConfig, task, log):
    if cfg.model.path:
        model, tok = load_pretrained(cfg.model.path, cfg.model.dtype, cfg.model.device,
                                     trust_remote_code=cfg.model.trust_remote_code)
        return model, tok, {"path": cfg.model.path}
    return warm_started_tiny(task, cfg.task.kwargs, cfg.model, cfg.sft, log)


def with_lora(cfg: RunConfig, model, log):
    """``model`` with LoRA adapters when ``model.lora.enabled`` (``finegrain/models/lora.py``),
    else ``model``; a model that has adapters already is returned as it is."""
    lc = cfg.model.lora
    if not lc.enabled or is_lora(model):
        return model
    model = add_adapters(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules,
                         seed=lc.seed)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log(f"LoRA r={lc.r} alpha={lc.alpha:g}: training {n_train:,} of {n_all:,} parameters")
    return model


def frozen_copy(model):
    """The initial policy, frozen: a copy of ``model``; for a LoRA model, its base with the adapters
    disabled (``FrozenBase``: no second copy; equal to the initial policy since LoRA's B starts at 0)."""
    if is_lora(model):
        return FrozenBase(model)
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def make_schedule(optimizer, cfg: RunConfig):
    total_steps, warm = max(cfg.train.steps, 1), cfg.optim.warmup_steps

    def factor(s: int) -> float:
        w = min(1.0, (s + 1) / warm) if warm else 1.0
        frac = min(1.0, s / total_steps)
        return w * {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[cfg.optim.schedule]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def outcome_signal(cfg: RunConfig) -> str | None:
    """The signal the filters read: ``filters.outcome``, else the first outcome-level one."""
    if cfg.filters.outcome:
        return cfg.filters.outcome
    return next((r.name for r in cfg.rewards if level_of(r.name, r.kwargs) == "outcome"), None)


def build_run(cfg: RunConfig, task, log: Callable[[str], None], *, policy: tuple | None = None,
              dp: DataParallel = SINGLE) -> Run:
    """Load the policy (or take ``policy`` = (model, tokenizer, info)) and build every stage's
    component from the registries."""
    policy, tok, init_info = policy if policy is not None else build_policy(cfg, task, log)
    policy = with_lora(cfg, policy, log)
    initial: dict[str, Any] = {}

    def initial_policy():
        if "m" not in initial:
            if dp.fsdp and "sharded" in initial:  # a copy of a sharded model would hold shards only
                raise RuntimeError("train.fsdp: the initial policy was asked for after the policy was sharded")
            initial["m"] = frozen_copy(policy)
        return initial["m"]

    ref = initial_policy() if cfg.loss.kl_coef > 0 else None
    sampler = SAMPLERS.get(cfg.rollout.engine)(policy, tok, max_batch=cfg.rollout.max_batch)
    engine = Rollout(sampler, segmenter=task.segmenter, env=cfg.rollout.env, env_kwargs=cfg.rollout.env_kwargs,
                     task=task, max_turns=cfg.rollout.max_turns or None, use_chat_template=cfg.model.use_chat_template)
    ctx = RewardContext(cfg, task, tok, policy, initial_policy)
    signals = {r.name: REWARDS.get(r.name).from_context(ctx, **r.kwargs) for r in cfg.rewards}
    filters, stateful_filters = [], {}
    for i, f in enumerate(cfg.filters.filters):
        spec = from_dict(FilterSpec, f, "filters.filters") if isinstance(f, dict) else f
        if FILTERS.meta(spec.name).get("stateful"):  # a class: one object per run, its state checkpointed
            obj = FILTERS.get(spec.name)(**spec.kwargs)
            filters.append((spec.name, obj, {}))
            stateful_filters[f"{i}:{spec.name}"] = obj
        else:
            filters.append((spec.name, FILTERS.get(spec.name), spec.kwargs))
    if dp.fsdp:  # after every component that copies the policy; the optimizer then holds the shards
        dp.shard_model(policy)
        initial["sharded"] = True
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas))
    dp.for_rollout(policy)  # a sharded policy: full weights for the rollout (the optimizer holds the shards)
    critic = (Critic.build(cfg.critic.init, policy, tok, lr=cfg.critic.lr, size=cfg.critic.size,
                           family=cfg.model.family, seed=cfg.train.seed) if needs_values(cfg) else None)
    return Run(cfg=cfg, task=task, policy=policy, tokenizer=tok, init_info=init_info, engine=engine, ref=ref,
               signals=signals, weights={r.name: r.weight for r in cfg.rewards}, filters=filters,
               outcome=outcome_signal(cfg), trainables={n: s for n, s in signals.items() if REWARDS.meta(n).get("trainable")},
               stateful={n: s for n, s in signals.items() if REWARDS.meta(n).get("stateful")},
               stateful_filters=stateful_filters,
               optimizer=optimizer, scheduler=make_schedule(optimizer, cfg), critic=critic, dp=dp)


def pick_prompts(pool: list, n: int, seed: int, step: int, stream: int) -> list:
    """n distinct pool examples for (seed, step, stream): a pure function, so resumes repeat it."""
    rng = random.Random(sample_seed(seed, step, stream))
    return [pool[i] for i in rng.sample(range(len(pool)), min(n, len(pool)))]


def collect_batch(cfg: RunConfig, engine, pool: list, signals: dict, filters: list, step: int, *,
                  outcome: str | None = None, dp: DataParallel = SINGLE) -> tuple[Trajectory | None, dict[str, RewardOutput], dict]:
    """Rollout + filters, with oversampling and bounded refill rounds.

    Filters return a per-row keep mask; a prompt counts towards ``prompts_per_step`` when any of
    its rows is kept, and only kept rows enter the batch. Returns (traj or None when nothing
    passed, pre-scored {outcome signal: RewardOutput} for the kept rows, metrics). The outcome
    signal (``outcome``, default ``outcome_signal(cfg)``) is scored here, once per round, and handed
    back so it is not scored again. A filter registered with ``needs_signals=True`` is also given
    ``signals=RoundSignals(...)``, the run's other signals on the round, scored when it reads them.
    Data parallel (``dp``): each rank takes its share (``dp.shard``) of the round's prompts and
    aims at prompts_per_step / world of them.
    """
    outcome = outcome if outcome is not None else outcome_signal(cfg)
    G, want = cfg.rollout.group_size, cfg.rollout.prompts_per_step // dp.world
    sp = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k, cfg.rollout.max_new_tokens)
    kept, kept_outcomes, generated, sums, rounds, n_seen, n_right, n_kept = [], [], 0, {}, 0, 0, 0.0, 0
    for rnd in range(1 + (cfg.filters.max_refills if filters else 0)):
        rounds += 1
        n_prompts = math.ceil(want * dp.world * cfg.filters.oversample) if rnd == 0 else (want - n_kept) * dp.world
        examples = dp.shard(pick_prompts(pool, n_prompts, cfg.train.seed, step, stream=2 * rnd))
        traj = engine.generate(examples, G, sp, sample_seed(cfg.train.seed, step, 2 * rnd + 1), group_offset=generated)
        generated += len(examples)
        scored = signals[outcome](traj) if outcome in signals else None
        if scored is not None:  # accuracy of everything sampled, before filters pick rows
            n_seen, n_right = n_seen + traj.batch_size, n_right + float(scored.components.get("accuracy", scored.values).sum())
        keep = torch.ones(traj.batch_size, dtype=torch.bool)
        for name, fn, kw in filters:
            # a filter registered with needs_signals=True (e.g. PROF) may read any reward signal on this round
            needs = FILTERS.meta(name).get("needs_signals")
            extra = {"signals": RoundSignals(signals, traj, {outcome: scored})} if needs else {}
            k, loss_mask, m = fn(traj, scored.values, **kw, **extra)
            keep &= k.cpu()
            traj = traj.replace(loss_mask=loss_mask)
            for key, v in m.items():
                sums[f"{name}/{key}"] = sums.get(f"{name}/{key}", 0.0) + float(v)
        keep_groups = traj.group_ids.cpu()[keep].unique()[:want - n_kept]
        rows = torch.isin(traj.group_ids.cpu(), keep_groups) & keep
        n_kept += len(keep_groups)
        if rows.all():  # nothing filtered: no copy
            kept.append(traj)
            kept_outcomes += [scored] if scored is not None else []
        elif rows.any():
            kept.append(traj.select(rows))
            kept_outcomes += [select_output(scored, rows)] if scored is not None else []
        if n_kept >= want:
            break
    metrics = {k: v / rounds for k, v in sums.items()}  # filter metrics: means over rounds
    metrics["generated_prompts"] = generated
    if n_seen:
        metrics["sampled_accuracy"] = n_right / n_seen
    if not kept:
        return None, {}, metrics
    traj = kept[0] if len(kept) == 1 else concat(kept, engine.tokenizer.pad_token_id)
    pre_scored = {outcome: cat_outputs(kept_outcomes)} if kept_outcomes else {}
    metrics["kept_prompts"] = n_kept
    return traj, pre_scored, metrics


def update_reward_models(run: Run, traj: Trajectory, when: str) -> dict[str, float]:
    """Train the online reward models whose update is scheduled ``when`` ('before' scoring or
    'after' the policy update) on this batch; returns their metrics under ``reward/<name>/``."""
    from finegrain.train.logging import prefixed

    out: dict[str, float] = {}
    for name, s in run.trainables.items():
        if s.update_when == when:
            out.update(prefixed(f"reward/{name}", s.update(traj)))
    return out


def score_batch(run: Run, traj: Trajectory, pre_scored: dict[str, RewardOutput], step: int) -> Scored:
    """Every signal on the batch, placed on tokens and weighted; the log-probs the update needs;
    the KL penalty as a token reward in ``kl_mode=reward``; the critic's values V_old when there is
    a critic. Refuses non-finite rewards and values."""
    cfg = run.cfg
    old_logprobs = None
    if cfg.train.ppo_epochs > 1 or cfg.train.minibatches > 1:
        old_logprobs = batch_logprobs(run.policy, traj, cfg.rollout.temperature, cfg.rollout.max_batch)
    outputs = {n: pre_scored[n] if n in pre_scored else s(traj) for n, s in run.signals.items()}
    per_source = combine(outputs, run.weights, traj)
    ref_logprobs = None
    if run.ref is not None:
        ref_logprobs = batch_logprobs(run.ref, traj, cfg.rollout.temperature, cfg.rollout.max_batch)
        if cfg.loss.kl_mode == "reward":
            lp = old_logprobs if old_logprobs is not None else traj.behavior_logprobs
            kl = KL_ESTIMATORS.get(cfg.loss.kl_estimator)(lp, ref_logprobs)
            per_source["kl_penalty"] = -cfg.loss.kl_coef * torch.where(traj.loss_mask, kl, torch.zeros_like(kl))
    for src, r in per_source.items():
        check_finite(f"step {step + 1}: token rewards of '{src}'", r, traj.response_mask)
    values = None
    if run.critic is not None:
        values = batch_values(run.critic.model, traj, cfg.rollout.max_batch)   # (B, L)
        check_finite(f"step {step + 1}: critic values", values, traj.loss_mask)
    return Scored(outputs, per_source, old_logprobs, ref_logprobs, values)


def segments_for(name: str, traj: Trajectory) -> torch.Tensor:
    """The segment ids an estimator reads as its 4th argument: ``traj.turns`` for estimators
    registered with ``segments="turn"``, else the step ids."""
    return traj.turns if ADVANTAGES.meta(name).get("segments") == "turn" else traj.step_ids


def compute_advantages(cfg: RunConfig, per_source: dict[str, torch.Tensor], traj: Trajectory, *,
                       values: torch.Tensor | None = None) -> torch.Tensor:
    """One estimator on the summed token rewards, or one per source, summed with coefficients.

    An estimator registered with ``needs_values`` (only allowed without per_source) also gets
    ``values``, the critic's V_old (B, L) from ``score_batch``."""
    if not cfg.advantage.per_source:
        est = ADVANTAGES.get(cfg.advantage.name)
        inputs = {}
        if ADVANTAGES.meta(cfg.advantage.name).get("needs_values"):
            if values is None:
                raise ValueError(f"advantage '{cfg.advantage.name}' reads a critic's values, and none were given "
                                 "(critic.enabled)")
            inputs["values"] = values
        adv = est(total(per_source), traj.loss_mask, traj.group_ids, segments_for(cfg.advantage.name, traj),
                  **inputs, **cfg.advantage.kwargs)
        return combine_source_advantages({"all": adv}, {"all": 1.0}, traj.loss_mask, whiten=cfg.advantage.whiten)
    advs, coefs = {}, {}
    for src, r in per_source.items():
        spec = from_dict(SourceCredit, cfg.advantage.per_source[src], f"advantage.per_source.{src}")
        advs[src] = ADVANTAGES.get(spec.name)(r, traj.loss_mask, traj.group_ids, segments_for(spec.name, traj),
                                              **spec.kwargs)
        coefs[src] = spec.coef
    return combine_source_advantages(advs, coefs, traj.loss_mask, whiten=cfg.advantage.whiten)


def update_policy(run: Run, traj: Trajectory, advantages: torch.Tensor, scored: Scored, step: int) -> dict:
    """PPO epochs × minibatches × micro-batches on the batch, minibatch order from (seed, step)."""
    cfg = run.cfg
    run.shuffle.manual_seed(sample_seed(cfg.train.seed, step, 99))
    return policy_update(run.policy, run.optimizer, traj, advantages, old_logprobs=scored.old_logprobs,
                         ref_logprobs=scored.ref_logprobs, loss_cfg=cfg.loss, ppo_epochs=cfg.train.ppo_epochs,
                         minibatches=cfg.train.minibatches, grad_accum=cfg.train.grad_accum,
                         temperature=cfg.rollout.temperature, grad_clip=cfg.optim.grad_clip,
                         max_new_tokens=cfg.rollout.max_new_tokens, generator=run.shuffle, dp=run.dp)


def update_critic(run: Run, traj: Trajectory, scored: Scored, step: int) -> dict:
    """Train the critic towards the λ-returns of the summed token rewards (``critic.gamma``,
    ``critic.lam``), with the policy's epochs, minibatches and aggregation; its own shuffle from
    (seed, step). Plain keys (the loop logs them under ``critic/``); {} without a critic."""
    if run.critic is None:
        return {}
    cfg, c = run.cfg, run.cfg.critic
    _, returns = gae_advantages_returns(total(scored.per_source), traj.loss_mask, scored.values,
                                        gamma=c.gamma, lam=c.lam)                  # (B, L)
    run.shuffle.manual_seed(sample_seed(cfg.train.seed, step, 98))
    return critic_update(run.critic.model, run.critic.optimizer, traj, returns, scored.values,
                         aggregation=cfg.loss.aggregation,
                         aggregation_constant=cfg.loss.aggregation_constant or cfg.rollout.max_new_tokens,
                         value_clip=c.value_clip or None, vf_coef=c.vf_coef, ppo_epochs=cfg.train.ppo_epochs,
                         minibatches=cfg.train.minibatches, grad_accum=cfg.train.grad_accum, grad_clip=c.grad_clip,
                         generator=run.shuffle)


def rollout_metrics(traj: Trajectory) -> dict[str, float]:
    """Episode shape from the environment's per-turn reports: turns and tool calls per episode,
    and the rate of each reported error kind per turn (``rollout/errors/<kind>``; an environment
    reports an error as ``metadata["error"]``, e.g. tool_use's malformed / unknown_tool /
    bad_arguments / raised / timeout). Empty for batches without turn reports."""
    if not traj.turn_info:
        return {}
    turns = [len(t) for t in traj.turn_info]
    n_turns = max(sum(turns), 1)
    calls = sum(1 for row in traj.turn_info for t in row if t.get("call"))
    kinds: dict[str, int] = {}
    for row in traj.turn_info:
        for t in row:
            if t.get("error"):
                kinds[str(t["error"])] = kinds.get(str(t["error"]), 0) + 1
    out = {"rollout/turns": sum(turns) / len(turns), "rollout/tool_calls": calls / len(turns)}
    out |= {f"rollout/errors/{k}": v / n_turns for k, v in sorted(kinds.items())}
    return out


def task_for(cfg: RunConfig):
    return TASKS.get(cfg.task.name)(**cfg.task.kwargs)
