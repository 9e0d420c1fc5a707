"""finegrain's advantage estimators, policy losses and reward signals inside verl 0.9.1.

``register_with_verl(prefix="fg_")`` puts every finegrain estimator into verl's
``ADV_ESTIMATOR_REGISTRY`` and every finegrain policy loss into ``POLICY_LOSS_REGISTRY``
(``verl/trainer/ppo/core_algos.py``) under ``prefix + <finegrain name>``, so a verl config selects
them with ``algorithm.adv_estimator=fg_p2s`` and ``actor_rollout_ref.actor.policy_loss.loss_mode=
fg_ppo_clip``. The prefix is on by default because three finegrain names are verl names with other
semantics (``grpo``, ``rloo``, ``gae``: finegrain's grpo gives a lone sample 0 where verl's gives
R/(1+ε), see ``finegrain.credit.outcome``); ``prefix=""`` is refused while any name would replace
an entry that is not finegrain's. Importing this module registers with the default prefix when
verl is importable, so ``VERL_USE_EXTERNAL_MODULES=finegrain.integrations.verl`` (read by
``import verl`` in every process: driver, TaskRunner, actor and reward workers) is all a verl run
needs. verl is imported lazily; without it this module imports and registers nothing.

How token and step rewards reach our estimators unsummed
--------------------------------------------------------
verl's own ``grpo`` estimator reduces ``token_level_rewards`` (bs, L) to one number per row
(``scores = token_level_rewards.sum(dim=-1)``). Nothing before the estimator sums: the trainer sets
``token_level_rewards = token_level_scores = rm_scores`` (plus the per-token KL penalty when
``algorithm.use_kl_in_reward``), a (bs, L) tensor, and for any registered estimator that is not
verl's GAE or GRPO, ``ray_trainer.compute_advantage`` calls ``fn(token_level_rewards=...,
response_mask=..., index=uid, config=algorithm config)`` with that tensor as is. So what matters is
that ``rm_scores`` holds the rewards on their tokens:

1. ``FinegrainRewardManager`` (a verl reward-loop manager) builds a finegrain ``Trajectory`` from
   the sample (prompt and response ids, step ids from finegrain's segmenter on the decoded
   response, the example from ``reward_model.ground_truth`` and ``extra_info``), runs the
   configured finegrain reward signals and places them with finegrain's combiner
   (``finegrain.rewards.combine``: outcome on the last response token, each step's reward on the
   step's last token, with tokens outside every step counted in the step before them as the
   estimators count them, ``TokenRewardScorer.counted_steps``; token rewards as they are),
   weighted and summed *over sources* per token:
   the (L,) tensor every finegrain estimator takes. ``run_single`` returns that list as
   ``reward_score``.
2. verl 0.9.1 turns a sample's ``reward_score`` into ``rm_scores`` in one of two places; both are
   covered. (a) Rewards scored during rollout (the default, rule-based case, v1 trainer): the agent
   loop's ``AgentLoopOutput.as_dict`` writes a float ``reward_score`` on the last token;
   ``FinegrainSingleTurnAgentLoop`` returns a ``TokenRewardAgentLoopOutput`` whose ``as_dict``
   writes the list on the response tokens instead (select it with
   ``actor_rollout_ref.rollout.agent.default_agent_loop=finegrain_single_turn`` and
   ``agent_loop_config_path=examples/verl/agent_loops.yaml``). (b) Rewards scored after rollout
   (``RewardLoopManager.compute_rm_score``, the colocated reward-model path):
   ``FinegrainRewardManager.assemble_rm_scores`` places each list on its row.
3. The adapter registered by ``register_with_verl`` passes ``token_level_rewards`` unchanged to
   the finegrain estimator, with ``response_mask`` as ``loss_mask``.

Step ids. verl 0.9.1's ``compute_advantage`` passes no per-token field but the rewards and
``response_mask`` (the v1 trainer even reads only ``uid, response_mask, rm_scores, ...`` back from
its store), so a ``step_ids`` batch field could not reach the estimator without patching verl.
The adapter takes them, in this order, from: a ``step_ids=`` keyword (a caller of the adapter, or
``compute_advantage(data, ...)`` below, reads them from ``data.batch["step_ids"]``); otherwise from
the reward layout of step 1, ``steps_from_rewards``: a step ends at every trained token carrying a
nonzero reward, and at the last trained token. This is exact for every estimator that only reads
rewards (outcome estimators, ``reinforce_pp``, ``prime_*`` with ``reward_at="token"``) and for
``p2s`` given that placement (its reward positions are the same rule, and a zero-reward step
takes the advantage of the next position either way; the test checks it with zero-reward steps, a
separator and an EOS outside steps). It is NOT exact for ``spae`` (a step with ΔΦ = 0
joins the next step and takes its ΔΦ), ``prl`` with ``step_len=0`` (its kept positions are step
ends; use ``step_len > 0``) or ``prime_*`` with ``reward_at="step_end"``: docs/verl.md. Turn ids
(estimators registered with ``segments="turn"``) come from ``response_mask``: turn k is the k-th
maximal run of trained tokens (verl's multi-turn agent loop masks tool outputs with 0), −1
elsewhere (``turns_from_mask``).

Not registered: estimators with ``needs_values`` (``gae``): verl passes values only to its own GAE.
"""

from __future__ import annotations

import inspect
import json
import math
from importlib.util import find_spec
from typing import Any, Callable, Sequence

import torch

from finegrain.credit import ADVANTAGES
from finegrain.losses import AGGREGATIONS, POLICY_LOSSES

VERL_VERSION = "0.9.1"  # the verl release this adapter was written and tested against
DEFAULT_PREFIX = "fg_"
AGENT_LOOP_NAME = "finegrain_single_turn"

# verl's standard fields mapped onto finegrain keyword arguments, used when the finegrain entry
# takes that keyword and ``algorithm.finegrain_kwargs`` does not set it
_ALGO_FIELDS = {"gamma": "gamma", "scale_by_std": "norm_adv_by_std_in_grpo"}

_ADAPTERS: dict[tuple[str, str], Callable[..., Any]] = {}  # (family, finegrain name) -> adapter


# ---------------------------------------------------------------- tensors from verl's arguments
def group_ids_from_index(index: Sequence[Any], batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """verl's ``index`` (``non_tensor_batch["uid"]``: one hashable uid per row, usually a uuid
    string) -> (B,) long group ids, numbered by first appearance.

    >>> group_ids_from_index(["b", "a", "b", "c"], 4).tolist()
    [0, 1, 0, 2]
    """
    values = index.tolist() if hasattr(index, "tolist") else list(index)
    if len(values) != batch_size:
        raise ValueError(f"index: expected {batch_size} uids (one per row), got {len(values)}")
    ids: dict[Any, int] = {}
    return torch.tensor([ids.setdefault(v, len(ids)) for v in values], dtype=torch.long, device=device)


def steps_from_rewards(token_rewards: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Step ids recovered from placed rewards (module docstring, "Step ids").

    p_t     = m_t ∧ (r_t ≠ 0)                 a reward position ends a step
    s_t     = Σ_{u<t} p_u   where m_t,  −1 where not m_t
    so step k runs from after the k-th position to the (k+1)-th, and trained tokens after the
    last position form the last step (its end is the last trained token).

    Args: token_rewards (B, L) float; loss_mask (B, L) bool.
    Returns: step_ids (B, L) long.

    >>> r = torch.tensor([[0., 2., 0., 0., 1.]])
    >>> steps_from_rewards(r, torch.tensor([[True, True, True, False, True]])).tolist()
    [[0, 0, 1, -1, 1]]
    """
    if token_rewards.shape != loss_mask.shape or token_rewards.dim() != 2:
        raise ValueError(f"token_rewards and loss_mask: expected equal (B, L) shapes, got "
                         f"{tuple(token_rewards.shape)} and {tuple(loss_mask.shape)}")
    m = loss_mask.bool()
    pos = (m & (token_rewards != 0)).long()                                   # (B, L)
    before = pos.cumsum(dim=1) - pos                                          # positions strictly before t
    return torch.where(m, before, torch.full_like(before, -1))


def turns_from_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Turn ids from a multi-turn response mask: turn k = the k-th maximal run of True, −1 elsewhere.

    start_t = m_t ∧ ¬m_{t−1};   turn_t = Σ_{u≤t} start_u − 1 where m_t, −1 where not m_t

    >>> turns_from_mask(torch.tensor([[True, True, False, True, False]])).tolist()
    [[0, 0, -1, 1, -1]]
    """
    m = loss_mask.bool()
    prev = torch.zeros_like(m)
    prev[:, 1:] = m[:, :-1]
    starts = (m & ~prev).long()
    turn = starts.cumsum(dim=1) - 1
    return torch.where(m, turn, torch.full_like(turn, -1))


def _cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for a DictConfig, verl dataclass config, dict or None."""
    if config is None:
        return default
    if hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def _keyword_only(fn: Callable[..., Any]) -> set[str]:
    return {p for p, v in inspect.signature(fn).parameters.items() if v.kind == inspect.Parameter.KEYWORD_ONLY}


def estimator_kwargs(name: str, config: Any) -> dict[str, Any]:
    """Hyperparameters of finegrain estimator ``name`` from verl's algorithm config.

    ``algorithm.finegrain_kwargs`` (a dict) gives them by finegrain's names and is checked like
    finegrain's ``advantage.kwargs``; a keyword it leaves out is taken from verl's own field when
    there is one: ``gamma`` <- ``algorithm.gamma``, ``scale_by_std`` <- ``algorithm.norm_adv_by_std_in_grpo``.
    """
    user = dict(_cfg_get(config, "finegrain_kwargs", None) or {})
    ADVANTAGES.check_kwargs(name, user, "algorithm.finegrain_kwargs")
    takes = _keyword_only(ADVANTAGES.get(name))
    mapped = {}
    for ours, theirs in _ALGO_FIELDS.items():
        value = _cfg_get(config, theirs, None)
        if ours in takes and ours not in user and value is not None:
            mapped[ours] = bool(value) if ours == "scale_by_std" else float(value)
    ADVANTAGES.check_kwargs(name, mapped, "algorithm")
    return {**mapped, **user}


def loss_kwargs(name: str, config: Any) -> dict[str, Any]:
    """Hyperparameters of finegrain policy loss ``name`` from verl's actor config.

    ActorConfig is a closed dataclass, so only verl's own fields can be read:
    ``clip_low`` <- ``clip_ratio_low`` (``clip_ratio`` when None), ``clip_high`` <- ``clip_ratio_high``
    (likewise), ``dual_clip_c`` <- ``clip_ratio_c`` (verl applies its dual clip always, c = 3 by
    default; finegrain's own default is no dual clip).
    """
    takes = _keyword_only(POLICY_LOSSES.get(name))
    if config is None:
        return {}
    clip = _cfg_get(config, "clip_ratio", None)
    fields = {
        "clip_low": _cfg_get(config, "clip_ratio_low", None),
        "clip_high": _cfg_get(config, "clip_ratio_high", None),
        "dual_clip_c": _cfg_get(config, "clip_ratio_c", None),
    }
    if clip is not None:
        fields["clip_low"] = clip if fields["clip_low"] is None else fields["clip_low"]
        fields["clip_high"] = clip if fields["clip_high"] is None else fields["clip_high"]
    out = {k: float(v) for k, v in fields.items() if k in takes and v is not None}
    POLICY_LOSSES.check_kwargs(name, out, "actor_rollout_ref.actor")
    return out


# ---------------------------------------------------------------- adapters in verl's signatures
def verl_estimator(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """finegrain estimator ``name`` in verl's signature (one adapter object per name).

    verl calls ``fn(token_level_rewards (bs, L), response_mask (bs, L), index=uids, config=algo)``
    and expects ``(advantages (bs, L), returns (bs, L))``. The adapter calls
    ``ADVANTAGES[name](token_level_rewards, response_mask.bool(), group_ids, step_or_turn_ids,
    **estimator_kwargs(name, config))`` and returns (advantages, advantages), as verl's other
    critic-free estimators do (returns only feed a critic, which these estimators do not use).
    """
    key = ("advantage", name)
    if key in _ADAPTERS:
        return _ADAPTERS[key]
    fn, meta = ADVANTAGES.get(name), ADVANTAGES.meta(name)
    if meta.get("needs_values"):
        raise ValueError(f"advantage estimator '{name}' reads a critic's values, which verl passes only to its own 'gae'")

    def estimator(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any = None,
                  config: Any = None, step_ids: torch.Tensor | None = None, turn_ids: torch.Tensor | None = None,
                  reward_baselines: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if reward_baselines is not None:
            raise ValueError(f"reward_baselines: finegrain estimator '{name}' takes none (they are ReMax's)")
        mask = response_mask.bool()
        B = token_level_rewards.shape[0]
        if index is None:
            if meta.get("needs_groups"):
                raise ValueError(f"index: estimator '{name}' compares samples of a prompt and needs verl's uid per row")
            groups = torch.arange(B, device=token_level_rewards.device)
        else:
            groups = group_ids_from_index(index, B, token_level_rewards.device)
        if meta.get("segments") == "turn":
            segments = turns_from_mask(mask) if turn_ids is None else turn_ids.long()
        else:
            segments = steps_from_rewards(token_level_rewards, mask) if step_ids is None else step_ids.long()
        adv = fn(token_level_rewards, mask, groups, segments, **estimator_kwargs(name, config))
        return adv, adv

    estimator.__name__ = estimator.__qualname__ = f"finegrain_{name}"
    estimator.__doc__ = f"finegrain's '{name}' advantage estimator in verl's signature (finegrain.integrations.verl)."
    _ADAPTERS[key] = estimator
    return estimator


def verl_policy_loss(name: str) -> Callable[..., tuple[torch.Tensor, dict[str, float]]]:
    """finegrain policy loss ``name`` in verl's ``PolicyLossFn`` signature (one adapter per name).

    l_{i,t}  = POLICY_LOSSES[name](log_prob, old_log_prob, advantages, mask, **loss_kwargs)  (B, L)
    l_{i,t} ← l_{i,t} · w_{i,t}  when verl passes rollout importance weights w (as verl's losses do)
    loss     = verl ``agg_loss(l, mask, loss_agg_mode, **config.global_batch_info)``

    ``loss_agg_mode`` must be one of finegrain's ``AGGREGATIONS`` (the four names are shared; verl's
    "token-sum" has no finegrain counterpart and is refused). verl's ``agg_loss`` is used rather
    than ``finegrain.losses.aggregate`` because only it knows the global normalisers (dp size,
    global token and sequence counts, ``loss_scale_factor`` = finegrain's ``constant``) that make
    micro-batch gradient accumulation exact; with none of them set it equals finegrain's
    aggregation (``seq-mean-token-mean`` up to verl's +1e-8 in the per-row divisor; the test
    checks it). Metrics are floats under ``actor/fg_<key>``.
    """
    key = ("loss", name)
    if key in _ADAPTERS:
        return _ADAPTERS[key]
    fn = POLICY_LOSSES.get(name)

    def policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                    rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        from verl.trainer.ppo.core_algos import agg_loss

        if loss_agg_mode not in AGGREGATIONS:
            raise ValueError(f"actor_rollout_ref.actor.loss_agg_mode: finegrain's losses take one of "
                             f"{' | '.join(AGGREGATIONS.names())}, got '{loss_agg_mode}'")
        mask = response_mask.bool()
        per_token, metrics = fn(log_prob, old_log_prob, advantages, mask, **loss_kwargs(name, config))
        if rollout_is_weights is not None:
            per_token = torch.where(mask, per_token * rollout_is_weights, torch.zeros_like(per_token))
        info = dict(_cfg_get(config, "global_batch_info", None) or {})
        loss = agg_loss(loss_mat=per_token, loss_mask=mask, loss_agg_mode=loss_agg_mode, **info)
        return loss, {f"actor/fg_{k}": float(v) for k, v in metrics.items()}

    policy_loss.__name__ = policy_loss.__qualname__ = f"finegrain_{name}"
    policy_loss.__doc__ = f"finegrain's '{name}' policy loss in verl's signature (finegrain.integrations.verl)."
    _ADAPTERS[key] = policy_loss
    return policy_loss


def register_with_verl(prefix: str = DEFAULT_PREFIX) -> dict[str, dict[str, str]]:
    """Register every finegrain estimator and policy loss in verl's registries as ``prefix + name``.

    Idempotent: the adapters are one object per finegrain name, so registering again (with the
    same or another prefix) changes nothing already there. Refused, before anything is registered,
    when a target name holds an entry that is not finegrain's adapter (``prefix=""`` would replace
    verl's ``grpo``, ``rloo``): one line naming them.

    Returns {"advantages": {verl name: finegrain name}, "losses": {...}, "skipped": {finegrain
    name: reason}}.
    """
    if not isinstance(prefix, str):
        raise ValueError(f"prefix: expected a string, got {prefix!r}")
    from verl.trainer.ppo import core_algos

    plan: dict[str, dict[str, str]] = {"advantages": {}, "losses": {}, "skipped": {}}
    for name in ADVANTAGES.names():
        if ADVANTAGES.meta(name).get("needs_values"):
            plan["skipped"][name] = "needs a critic's values (verl passes them only to its own gae)"
        else:
            plan["advantages"][prefix + name] = name
    for name in POLICY_LOSSES.names():
        plan["losses"][prefix + name] = name
    clashes = [n for n, fg in plan["advantages"].items()
               if _taken(core_algos.ADV_ESTIMATOR_REGISTRY, n, ("advantage", fg))]
    clashes += [n for n, fg in plan["losses"].items() if _taken(core_algos.POLICY_LOSS_REGISTRY, n, ("loss", fg))]
    if clashes:
        raise ValueError(f"register_with_verl(prefix={prefix!r}): verl already has other entries named "
                         f"{', '.join(sorted(clashes))}; use a prefix (default '{DEFAULT_PREFIX}')")
    for verl_name, name in plan["advantages"].items():
        core_algos.register_adv_est(verl_name)(verl_estimator(name))
    for verl_name, name in plan["losses"].items():
        core_algos.register_policy_loss(verl_name)(verl_policy_loss(name))
    return plan


def _taken(registry: dict, verl_name: str, key: tuple[str, str]) -> bool:
    """True when verl's ``registry`` holds ``verl_name`` and it is not finegrain's adapter ``key``."""
    return verl_name in registry and registry[verl_name] is not _ADAPTERS.get(key)


def compute_advantage(data: Any, adv_estimator: str, config: Any = None) -> Any:
    """For a custom trainer: run a registered finegrain estimator on a verl ``DataProto`` with its
    own step ids, ``data.batch["step_ids"]`` (B, L) long, −1 outside steps (turn ids for
    ``segments="turn"`` estimators). Writes ``advantages`` and ``returns``; returns ``data``."""
    from verl.trainer.ppo import core_algos

    fn = core_algos.get_adv_estimator_fn(adv_estimator)
    names = [n for (family, n), a in _ADAPTERS.items() if family == "advantage" and a is fn]
    if not names:
        raise ValueError(f"adv_estimator: '{adv_estimator}' is not a finegrain estimator registered in verl")
    if "step_ids" not in data.batch.keys():
        raise ValueError("data.batch['step_ids']: missing; without it use verl's own compute_advantage")
    key = "turn_ids" if ADVANTAGES.meta(names[0]).get("segments") == "turn" else "step_ids"
    adv, ret = fn(token_level_rewards=data.batch["token_level_rewards"], response_mask=data.batch["response_mask"],
                  index=data.non_tensor_batch.get("uid"), config=config, **{key: data.batch["step_ids"]})
    data.batch["advantages"], data.batch["returns"] = adv, ret
    return data


# ---------------------------------------------------------------- reward signals for verl
class TokenRewardScorer:
    """finegrain reward signals -> token rewards (B, L) placed by finegrain's combiner.

    Built from the free-form dict verl keeps in ``reward.custom_reward_function.reward_kwargs``::

        task: arith                     a finegrain task (TASKS), built with task_kwargs
        task_kwargs: {}
        segmenter: newline              a finegrain segmenter (finegrain.segment.SEGMENTERS)
        rewards: [{name: verifier, weight: 1.0, kwargs: {}}, {name: step_labels, weight: 0.5}]

    r_{i,t} = Σ_n w_n · place_n(signal_n(traj))_{i,t}     (finegrain.rewards.combine.combine/total)

    Signals are built with a context that has the task and the tokenizer but no policy model and
    no finegrain run config: probe-based signals (they score with the policy), trainable ones and
    ones that compare rows of a group are refused with one line.
    """

    def __init__(self, tokenizer: Any, *, task: str, rewards: Sequence[dict[str, Any]], segmenter: str = "newline",
                 task_kwargs: dict[str, Any] | None = None):
        from finegrain.rewards import REWARDS
        from finegrain.segment import SEGMENTERS
        from finegrain.tasks import TASKS
        from finegrain.train.stages import RewardContext

        if not rewards:
            raise ValueError("reward_kwargs.rewards: expected at least one {name, weight} entry")
        SEGMENTERS.get(segmenter)
        self.tokenizer, self.segmenter = tokenizer, segmenter
        self.task = TASKS.get(task)(**dict(task_kwargs or {}))
        ctx = RewardContext(cfg=None, task=self.task, tokenizer=tokenizer, policy=None,
                            initial_policy=_no_policy)
        self.signals, self.weights = {}, {}
        for i, entry in enumerate(rewards):
            entry = dict(entry)
            name = entry.get("name")
            if name not in REWARDS:
                REWARDS.get(str(name))  # raises with the list of names
            if "weight" not in entry or isinstance(entry["weight"], bool) or not isinstance(entry["weight"], (int, float)) \
                    or not math.isfinite(entry["weight"]):
                raise ValueError(f"reward_kwargs.rewards[{i}].weight: expected a finite number, got {entry.get('weight')!r}")
            meta = REWARDS.meta(name)
            if meta.get("trainable"):
                raise ValueError(f"reward_kwargs.rewards[{i}]: '{name}' is trained online, not supported inside verl")
            kwargs = dict(entry.get("kwargs") or {})
            REWARDS.check_kwargs(name, kwargs, f"reward_kwargs.rewards[{i}].kwargs")
            try:
                self.signals[name] = REWARDS.get(name).from_context(ctx, **kwargs)
            except (AttributeError, TypeError) as e:
                raise ValueError(f"reward_kwargs.rewards[{i}]: '{name}' needs more than a task and a tokenizer "
                                 f"(a policy model or a finegrain run config): {e}") from e
            self.weights[name] = float(entry["weight"])

    def trajectory(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   ground_truths: Sequence[Any], extra_infos: Sequence[dict[str, Any] | None]):
        """A finegrain ``Trajectory`` of B rows (one group per row) from unpadded token-id lists.

        Row b's example: answer = ground_truths[b]; meta = extra_infos[b], with the keys of the JSON
        object in its ``meta_json`` string merged in (parquet cannot hold every meta, e.g. arith's
        mixed [op, number] lists; ``examples/verl/make_arith_data.py`` writes it); id = its
        ``index``; prompt = its ``question``, else the decoded prompt."""
        from finegrain.segment import token_step_ids
        from finegrain.tasks.base import Example
        from finegrain.trajectory import Trajectory

        B = len(response_ids)
        if not (len(prompt_ids) == len(ground_truths) == len(extra_infos) == B):
            raise ValueError(f"trajectory: expected {B} prompts, ground truths and extra infos, got "
                             f"{len(prompt_ids)}, {len(ground_truths)}, {len(extra_infos)}")
        P = max([len(p) for p in prompt_ids] + [1])
        L = max([len(r) for r in response_ids] + [1])
        pad = int(getattr(self.tokenizer, "pad_token_id", None) or 0)
        pids = torch.full((B, P), pad, dtype=torch.long)
        pmask = torch.zeros(B, P, dtype=torch.bool)
        rids = torch.full((B, L), pad, dtype=torch.long)
        rmask = torch.zeros(B, L, dtype=torch.bool)
        for b in range(B):
            p, r = list(prompt_ids[b]), list(response_ids[b])
            if p:
                pids[b, P - len(p):], pmask[b, P - len(p):] = torch.tensor(p), True
            if r:
                rids[b, :len(r)], rmask[b, :len(r)] = torch.tensor(r), True
        prompts = [self.tokenizer.decode(list(p), skip_special_tokens=True) for p in prompt_ids]
        examples = []
        for b in range(B):
            info = dict(extra_infos[b] or {})
            meta = {**info, **json.loads(info.pop("meta_json"))} if "meta_json" in info else info
            meta.pop("meta_json", None)
            examples.append(Example(id=str(info.get("index", b)), prompt=str(info.get("question", prompts[b])),
                                    answer=str(ground_truths[b]), meta=meta))
        return Trajectory(
            prompt_ids=pids, prompt_mask=pmask, response_ids=rids, response_mask=rmask, loss_mask=rmask.clone(),
            group_ids=torch.arange(B), step_ids=self.counted_steps(token_step_ids(self.tokenizer, rids, rmask, self.segmenter), rmask),
            behavior_logprobs=torch.zeros(B, L), truncated=torch.zeros(B, dtype=torch.bool),
            prompt_texts=prompts,
            response_texts=[self.tokenizer.decode(list(r), skip_special_tokens=True) for r in response_ids],
            examples=examples)

    @staticmethod
    def counted_steps(step_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """Step ids as finegrain's estimators count them: e(t) = max(max_{u≤t} s_u, 0) on real
        tokens (a token outside every step joins the step before it, ``finegrain.credit.p2s.
        counting_steps``), −1 on padding. (B, L) long -> (B, L) long.

        The combiner then puts step k's reward on the last token of e's step k, so the trailing
        EOS carries the last step's reward with the outcome, and every reward sits on a step end:
        the layout ``steps_from_rewards`` reads back (module docstring).

        >>> TokenRewardScorer.counted_steps(torch.tensor([[-1, 0, -1, 1, -1, -1]]),
        ...                                 torch.tensor([[True, True, True, True, True, False]])).tolist()
        [[0, 0, 0, 1, 1, -1]]
        """
        from finegrain.credit.p2s import counting_steps

        return torch.where(response_mask, counting_steps(step_ids), torch.full_like(step_ids, -1))

    def score(self, traj) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns total token rewards (B, L) and each source's placed rewards {name: (B, L)}."""
        from finegrain.rewards.combine import combine, total

        per_source = combine({n: s(traj) for n, s in self.signals.items()}, self.weights, traj)
        return total(per_source), per_source


def _no_policy():
    raise ValueError("this reward signal needs the policy model, which verl's reward worker does not have")


def place_token_rewards(rows: Sequence[Sequence[float]], response_length: int) -> torch.Tensor:
    """Per-row token-reward lists (row i: its n_i real response tokens) -> (B, L) float32 on the
    first n_i positions (verl's responses are right-padded), 0 elsewhere. A list longer than L
    raises."""
    out = torch.zeros(len(rows), response_length, dtype=torch.float32)
    for i, r in enumerate(rows):
        r = [float(v) for v in r]
        if len(r) > response_length:
            raise ValueError(f"reward_score[{i}]: {len(r)} token rewards for a response of {response_length} tokens")
        out[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def _build_reward_manager():
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

    class FinegrainRewardManager(RewardManagerBase):
        """verl reward-loop manager: finegrain signals -> a list of token rewards per sample
        (module docstring, steps 1-2). Settings: ``reward.custom_reward_function.reward_kwargs``
        (``TokenRewardScorer``); verl's ``compute_score`` is not used."""

        def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None,
                     reward_model_tokenizer=None, **_unused):
            super().__init__(config, tokenizer, compute_score)
            settings = _cfg_get(_cfg_get(_cfg_get(config, "reward", None), "custom_reward_function", None),
                                "reward_kwargs", None)
            if not settings:
                raise ValueError("reward.custom_reward_function.reward_kwargs: FinegrainRewardManager needs "
                                 "{task, rewards, segmenter} there (docs/verl.md)")
            settings = _plain(settings)
            self.scorer = TokenRewardScorer(tokenizer, **settings)

        def score_item(self, data_item) -> dict:
            prompts, responses = data_item.batch["prompts"], data_item.batch["responses"]
            attn = data_item.batch["attention_mask"]
            P, L = prompts.shape[-1], responses.shape[-1]
            n_prompt, n_resp = int(attn[:P].sum()), int(attn[-L:].sum())
            nt = data_item.non_tensor_batch
            traj = self.scorer.trajectory([prompts[P - n_prompt:].tolist()], [responses[:n_resp].tolist()],
                                          [_plain(nt["reward_model"])["ground_truth"]], [_plain(nt.get("extra_info", {}))])
            tokens, per_source = self.scorer.score(traj)
            info = {f"fg/{n}": float(v[0].sum()) for n, v in per_source.items()}
            return {"reward_score": tokens[0, :n_resp].tolist(), "reward_extra_info": info}

        async def run_single(self, data) -> dict:
            item = data[-1:][0]  # as verl's naive manager: score the last sequence of a multi-output sample
            return await self.loop.run_in_executor(None, lambda: self.score_item(item))

        @classmethod
        def assemble_rm_scores(cls, data, scores) -> torch.Tensor:
            return place_token_rewards(scores, data.batch["responses"].size(1))

    return FinegrainRewardManager


def _build_agent_loop_classes():
    from typing import Optional, Union

    from verl.experimental.agent_loop.agent_loop import AgentLoopOutput
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

    class TokenRewardAgentLoopOutput(AgentLoopOutput):
        """verl's AgentLoopOutput whose ``reward_score`` may be a list of token rewards: ``as_dict``
        then writes ``rm_scores`` (L,) with the list on the response tokens (verl writes a float on
        the last token)."""

        reward_score: Optional[Union[float, list[float]]] = None

        def as_dict(self) -> dict:
            score = self.reward_score
            if not isinstance(score, (list, tuple)):
                return super().as_dict()
            out = self.model_copy(update={"reward_score": None}).as_dict()
            out.pop("rm_scores", None)
            out["rm_scores"] = place_token_rewards([score], int(out["response_mask"].shape[0]))[0]
            return out

    class FinegrainSingleTurnAgentLoop(SingleTurnAgentLoop):
        """verl's single-turn agent loop returning ``TokenRewardAgentLoopOutput``."""

        async def run(self, sampling_params, **kwargs):
            out = await super().run(sampling_params, **kwargs)
            return TokenRewardAgentLoopOutput.model_construct(_fields_set=set(out.model_fields_set), **dict(out))

    return {"TokenRewardAgentLoopOutput": TokenRewardAgentLoopOutput,
            "FinegrainSingleTurnAgentLoop": FinegrainSingleTurnAgentLoop}


def _plain(value: Any) -> Any:
    """DictConfig / numpy object / nested containers -> plain Python containers."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


_LAZY = {"FinegrainRewardManager": lambda: {"FinegrainRewardManager": _build_reward_manager()},
         "TokenRewardAgentLoopOutput": _build_agent_loop_classes,
         "FinegrainSingleTurnAgentLoop": _build_agent_loop_classes}


def __getattr__(name: str) -> Any:
    """The classes that subclass verl's are built on first access (verl is imported then), so
    verl's importlib / hydra paths ``finegrain.integrations.verl.FinegrainRewardManager`` and
    ``...FinegrainSingleTurnAgentLoop`` resolve while this module imports without verl."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for key, cls in _LAZY[name]().items():
        cls.__module__, cls.__qualname__ = __name__, key
        globals()[key] = cls
    return globals()[name]


if find_spec("verl") is not None:
    register_with_verl()
