"""Typed run configuration. YAML is only how a ``RunConfig`` is saved and loaded.

Every field's ``help`` metadata is its documentation and the CLI help (``finegrain train --help-config``).
``load_config`` rejects a misspelt key or a value of the wrong type with one line naming it.
Overrides use dotted keys: ``finegrain train configs/demo_cpu.yaml train.steps=50 rollout.temperature=0.8``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finegrain.ranges import check_range


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that ``3e-4`` is a float: YAML 1.1 wants a dot in the
    mantissa (``3.0e-4``) and would load a learning rate of ``3e-4`` as the string '3e-4'."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def load_yaml(text: str):
    """YAML text as Python data, safely (no tags that build objects); ``3e-4`` is a number."""
    return yaml.load(text, Loader=_Loader)


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    enabled: bool = _f(False, "Train LoRA adapters (h = W x + (alpha/r)·B A x, Hu et al. 2021, arXiv:2106.09685) "
                              "instead of every weight: the base model is frozen, the reference policy is the base "
                              "with the adapters disabled (no second copy), checkpoints hold the adapters only, and "
                              "the inference engine gets the merged weights (finegrain/models/lora.py; needs peft: "
                              "pip install finegrain[lora]).")
    r: int = _f(16, "Rank r of every adapter.", range="[1, inf)")
    alpha: float = _f(32.0, "LoRA alpha: the adapter's output is scaled by alpha/r.", range="(0, inf)")
    dropout: float = _f(0.0, "Dropout on the adapter's input (training only).", range="[0, 1)")
    target_modules: Any = _f(list(LORA_TARGETS), "Linear layers that get adapters: a list of module names (default: "
                                                 "the attention and MLP projections of Llama/Qwen2) or 'all-linear' "
                                                 "(every linear layer but the LM head).")
    seed: int = _f(0, "Seed of the adapters' A init (B starts at 0, so the first policy is the base model).",
                   range="[0, inf)")


@dataclass
class ModelConfig:
    path: str = _f("", "Hugging Face model directory or Hub id; '' builds a tiny model from scratch for the task "
                       "and warm-starts it with SFT (cached under sft.cache_dir).")
    family: str = _f("qwen2", "Architecture of the tiny model when path is '': qwen2 | llama.")
    size: str = _f("tiny", "Preset of the tiny model when path is '': micro | tiny | small | 50m.")
    dtype: str = _f("float32", "Parameter dtype: float32 | bfloat16 | float16.")
    device: str = _f("auto", "cpu | cuda | cuda:N | auto (cuda when available).")
    use_chat_template: bool = _f(True, "Wrap prompts in the tokenizer's chat template when it has one.")
    trust_remote_code: bool = _f(False, "Let a model directory run its own Python code (auto_map). Off: such a "
                                        "model is refused with a clear error, never an interactive prompt.")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapters on the policy."})


@dataclass
class TaskConfig:
    name: str = _f("arith", "Task name in finegrain.tasks.TASKS: arith | gsm8k.")
    kwargs: dict = _f({}, "Keyword arguments of the task constructor (e.g. {min_steps: 2, max_steps: 4}).")


@dataclass
class SFTConfig:
    n_examples: int = _f(30000, "Worked solutions in the SFT corpus.", range="[1, inf)")
    flawed_fraction: float = _f(0.3, "Fraction of SFT solutions with one deliberately wrong step (arith), so the "
                                      "warm-started model is imperfect.", range="[0, 1]")
    epochs: int = _f(1, "Passes over the corpus.", range="[1, inf)")
    batch_size: int = _f(64, "Sequences per optimizer step.", range="[1, inf)")
    lr: float = _f(3e-3, "Peak learning rate (AdamW, linear warmup then cosine decay).", range="(0, inf)")
    warmup_steps: int = _f(50, "Linear warmup steps.", range="[0, inf)")
    group_by_length: bool = _f(False, "Batch traces of similar length together (less padding, faster steps on "
                                      "corpora of mixed lengths such as multi-hop tool traces); batch order stays "
                                      "random.")
    seed: int = _f(0, "Seed of the corpus and the model init.", range="[0, inf)")
    cache_dir: str = _f(".cache/finegrain", "Where warm-started tiny models are cached (keyed by a hash of the "
                                             "task, model and SFT settings).")


@dataclass
class RolloutConfig:
    engine: str = _f("hf", "Sampler in finegrain.sampling.SAMPLERS (every generation goes through it).")
    prompts_per_step: int = _f(16, "Prompts per RL step (after filtering).", range="[1, inf)")
    group_size: int = _f(8, "Samples per prompt (G).", range="[1, inf)")
    temperature: float = _f(1.0, "Sampling temperature; also divides the logits when the loss takes log-probs "
                                 "(> 0: RL needs sampled log-probs; greedy is for eval).", range="(0, 100]")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1.0 = off).", range="(0, 1]")
    top_k: int = _f(0, "Top-k sampling (0 = off).", range="[0, inf)")
    max_new_tokens: int = _f(48, "Maximum response length in tokens.", range="[1, inf)")
    max_batch: int = _f(256, "Rows per generate call.", range="[1, inf)")
    env: str = _f("single_turn", "Environment in finegrain.envs.ENVIRONMENTS (single_turn: prompt, one response).")
    env_kwargs: dict = _f({}, "Keyword arguments of the environment.")
    max_turns: int = _f(0, "Turns per episode (0 = the environment's own limit, 1 for single_turn).", range="[0, inf)")


@dataclass
class RewardSpec:
    name: str = _f("verifier", "Reward signal in finegrain.rewards.REWARDS.")
    weight: float = _f(1.0, "Coefficient on this signal's token rewards (always applied).")
    kwargs: dict = _f({}, "Keyword arguments of the signal.")


@dataclass
class SourceCredit:
    name: str = _f("rloo", "Advantage estimator for this source.")
    coef: float = _f(1.0, "Coefficient on this source's advantages.")
    kwargs: dict = _f({}, "Estimator hyperparameters.")


@dataclass
class AdvantageConfig:
    name: str = _f("grpo", "Advantage estimator in finegrain.credit.ADVANTAGES, applied to the summed token "
                           "rewards. Ignored when per_source is set.")
    kwargs: dict = _f({}, "Estimator hyperparameters (e.g. {scale_by_std: false}).")
    per_source: dict = _f({}, "Per reward source: {source: {name, coef, kwargs}}; advantages are summed over sources "
                              "(PRIME). Every reward source needs an entry.")
    whiten: bool = _f(False, "Whiten the final advantages over the batch's trained tokens.")
    preference_direction: Any = _f(None, "DPA (arXiv:2402.18571): true = the objective weights are a user preference "
                                         "direction v, and the run is refused unless ||v||_2 = 1 (within 1e-2). The "
                                         "weights are advantage.per_source.<source>.coef when per_source is set (each "
                                         "source normalised on its own, as in normalize-then-sum), else "
                                         "rewards[i].weight (one estimator on their weighted sum); kl_penalty is not an "
                                         "objective. null or false: no check (null is the default, so run "
                                         "directories saved before this key existed resume unchanged).")


@dataclass
class CriticConfig:
    enabled: bool = _f(False, "Train a critic (value model) for PPO with GAE. Required by, and only allowed with, an "
                              "advantage estimator that reads values (registry metadata needs_values, e.g. gae). It trains "
                              "with the policy's train.ppo_epochs, train.minibatches, train.grad_accum and loss.aggregation.")
    init: str = _f("policy", "policy: a copy of the policy's backbone with a zero-initialised scalar head; tiny: a "
                             "separate tiny random model of size critic.size (finegrain/models/value.py).")
    size: str = _f("tiny", "Preset of the tiny critic when init is tiny: micro | tiny | small | 50m.")
    lr: float = _f(1e-4, "Critic learning rate (its own AdamW, constant, no weight decay).", range="(0, inf)")
    grad_clip: float = _f(1.0, "Clip the critic's gradient norm to this (0 = off).", range="[0, inf)")
    value_clip: float = _f(0.2, "ε of the clipped value loss ½·max((V−R)², (clip(V, V_old±ε)−R)²) (0 = unclipped).",
                           range="[0, inf)")
    vf_coef: float = _f(1.0, "Weight of the value loss. The critic has its own optimizer, so this only scales its "
                             "gradient (it matters through critic.grad_clip and Adam's ε).", range="(0, inf)")
    gamma: float = _f(1.0, "γ of the critic's targets R = A^GAE(γ, λ) + V_old; set equal to advantage.kwargs.gamma "
                           "for standard PPO.", range="[0, 1]")
    lam: float = _f(0.95, "λ of the critic's targets; equal to advantage.kwargs.lam for standard PPO, 1.0 for "
                          "VAPO's Decoupled-GAE (arXiv:2504.05118; Monte-Carlo value targets).", range="[0, 1]")


@dataclass
class FilterSpec:
    name: str = _f("zero_variance", "Filter in finegrain.filters.FILTERS.")
    kwargs: dict = _f({}, "Filter hyperparameters.")


@dataclass
class FilterConfig:
    filters: list = _f([], "Filters applied in order to each rollout batch: a list of {name, kwargs}.")
    oversample: float = _f(1.0, "Generate this many times prompts_per_step prompts, then keep the first groups "
                                "that pass.", range="[1, 100]")
    outcome: str = _f("", "Reward signal whose outcome values the filters judge groups by (its 'accuracy' "
                          "component is logged as filter/sampled_accuracy); '' = the first outcome-level signal "
                          "in rewards.")
    max_refills: int = _f(2, "Extra generate rounds when too few groups pass; after them the batch may be smaller.", range="[0, inf)")


@dataclass
class LossConfig:
    name: str = _f("ppo_clip", "Policy loss in finegrain.losses.POLICY_LOSSES.")
    kwargs: dict = _f({}, "Loss hyperparameters (e.g. {clip_low: 0.2, clip_high: 0.28}).")
    aggregation: str = _f("token-mean", "How the per-token loss becomes a scalar: token-mean | seq-mean-token-mean | "
                                        "seq-mean-token-sum | seq-mean-token-sum-norm.")
    aggregation_constant: Any = _f(None, "Normaliser of seq-mean-token-sum-norm (default: max_new_tokens).")
    kl_coef: float = _f(0.0, "Weight of the KL to the reference model (0 = no reference model is kept).", range="[0, inf)")
    kl_estimator: str = _f("k3", "KL estimator: k1 | k2 | k3.")
    kl_mode: str = _f("loss", "'loss': add kl_coef·KL to the per-token loss; 'reward': subtract it from the token "
                              "rewards (needs a token-level estimator).")
    entropy_coef: float = _f(0.0, "Entropy bonus weight (subtracted from the loss).", range="[0, inf)")
    rollout_correction: str = _f("none", "Correct for the sampler's log-probs differing from the trainer's (vLLM): "
                                         "none | tis (weight each token's loss by min(π_old/π_rollout, cap)) | mask "
                                         "(weight by the ratio, 0 outside [rollout_is_low, cap]). The mismatch is "
                                         "logged either way (docs/algorithms/rollout_correction.md).")
    rollout_is_cap: float = _f(2.0, "Upper cap C of the rollout importance weight.", range="(0, inf)")
    rollout_is_low: float = _f(0.5, "Lower bound of the ratio in rollout_correction=mask.", range="[0, inf)")


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, "Policy learning rate (AdamW).", range="(0, inf)")
    weight_decay: float = _f(0.0, "AdamW weight decay.", range="[0, inf)")
    betas: list = _f([0.9, 0.999], "AdamW betas.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 = off).", range="[0, inf)")
    schedule: str = _f("constant", "LR schedule: constant | linear | cosine (decay to 0 over train.steps).")
    warmup_steps: int = _f(0, "Linear warmup steps.", range="[0, inf)")


@dataclass
class EvalConfig:
    n_problems: int = _f(200, "Held-out problems per evaluation.", range="[1, inf)")
    samples: int = _f(4, "Samples per problem (accuracy is their mean; pass@k is reported too).", range="[1, inf)")
    temperature: float = _f(1.0, "Eval sampling temperature (0 = greedy; then samples is forced to 1).",
                            range="[0, 100]")
    max_new_tokens: int = _f(48, "Maximum response length at eval.", range="[1, inf)")
    greedy_too: bool = _f(True, "Also report greedy accuracy (eval/greedy_accuracy).")
    seed: int = _f(1234, "Eval sampling seed (the same before and after training).", range="[0, inf)")


@dataclass
class TrainConfig:
    steps: int = _f(100, "RL steps (one rollout batch each).", range="[1, inf)")
    ppo_epochs: int = _f(1, "Passes over each rollout batch.", range="[1, inf)")
    minibatches: int = _f(1, "Optimizer steps per pass (the batch is split into this many minibatches).", range="[1, inf)")
    grad_accum: int = _f(1, "Micro-batches per minibatch (gradient accumulation).", range="[1, inf)")
    eval_every: int = _f(50, "Evaluate every N steps (0 = only before and after).", range="[0, inf)")
    save_every: int = _f(25, "Checkpoint every N steps (0 = only at the end).", range="[0, inf)")
    seed: int = _f(0, "Run seed: prompt order, sampling seeds and minibatch shuffles derive from it.", range="[0, inf)")
    out_dir: str = _f("runs/demo", "Run directory (logs, checkpoints, report).")
    resume: Any = _f(True, "true: resume from the newest valid checkpoint in out_dir (refused if the config "
                           "differs in a key that changes training); force: resume and apply the new config, "
                           "recording the change in config_changes.jsonl; false: start fresh (refused if out_dir "
                           "already holds a run).")
    tensorboard: bool = _f(True, "Also log to TensorBoard (needs the tensorboard package).")
    wandb_project: str = _f("", "Also log to Weights & Biases under this project ('' = off; needs the wandb "
                                "package; WANDB_MODE=offline works without a network).")
    wandb_mode: str = _f("online", "W&B mode: online | offline | disabled (WANDB_MODE, when set, wins).")
    progress: bool = _f(True, "Show a progress bar.")
    fsdp: bool = _f(False, "Data parallel with the policy sharded (FSDP2 fully_shard): parameters, gradients and "
                           "AdamW state split over the processes during the update, full weights gathered on every "
                           "process for the rollout (docs/distributed.md). Needs 2 or more processes.")
    threads: int = _f(0, "torch CPU threads for finegrain demo/train/sft; 0 = automatic: the CPUs other jobs leave "
                         "free (FINEGRAIN_THREADS=N|auto|torch and OMP_NUM_THREADS are honoured; finegrain/threads.py).",
                      range="[0, inf)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list = field(default_factory=lambda: [RewardSpec()], metadata={
        "help": "Reward signals: a list of {name, weight, kwargs}.", "item": RewardSpec})
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
# loading, validation, dumping

_SCALARS = (bool, int, float, str)

# keys of earlier versions, with where their settings live now
MOVED = {"prm": "the implicit PRM's settings (beta, update, loss, lr, grad_clip, ref) moved to the kwargs of its "
                "reward: rewards: [{name: implicit_prm, kwargs: {beta: 0.05, lr: 1.0e-4, ...}}]"}


def _check_value(where: str, value: Any, ftype: Any) -> Any:
    """Coerce/validate one scalar field; raise a one-line ValueError naming ``where``."""
    if ftype is Any:
        return value
    if isinstance(ftype, str):
        ftype = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list, "Any": Any}.get(ftype, Any)
    if ftype is Any:
        return value
    if ftype is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if ftype is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if ftype is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if ftype is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {value!r}")
    if ftype is dict:
        if isinstance(value, dict):
            return value
        raise ValueError(f"{where}: expected a mapping, got {value!r}")
    if ftype is list:
        if isinstance(value, list):
            return value
        raise ValueError(f"{where}: expected a list, got {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a plain dict; unknown keys and bad types raise one line."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            if path in MOVED:
                raise ValueError(f"{path}: {MOVED[path]}")
            raise ValueError(f"{path}: unknown key; allowed: {', '.join(fields)}")
        f = fields[key]
        sub = _dataclass_type(f)
        if sub is not None:
            kwargs[key] = from_dict(sub, value or {}, path)
        elif "item" in f.metadata:
            if not isinstance(value, list):
                raise ValueError(f"{path}: expected a list, got {value!r}")
            kwargs[key] = [from_dict(f.metadata["item"], v, f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[key] = _check_value(path, value, f.type)
    return cls(**kwargs)


def _dataclass_type(f: dataclasses.Field) -> type | None:
    t = f.type
    if isinstance(t, str):
        t = globals().get(t)
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=3' -> (['a', 'b'], 3); the value is parsed as YAML (so 'true', '0.5', '[1, 2]' work)."""
    if "=" not in text:
        raise ValueError(f"override '{text}': expected key=value, e.g. train.steps=50")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{key.strip()}: the value {raw!r} is not valid YAML ({problem}); quote the whole "
                         f"key=value for the shell") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides to ``data`` in place; a number part of the key indexes a list.

    >>> apply_overrides({"rewards": [{"name": "a"}, {"name": "b"}]}, ["rewards.1.kwargs.lr=1e-5", "train.steps=5"])
    {'rewards': [{'name': 'a'}, {'name': 'b', 'kwargs': {'lr': 1e-05}}], 'train': {'steps': 5}}
    """
    for ov in overrides:
        keys, value = parse_override(ov)
        node = data
        for i, k in enumerate(keys):
            where = ".".join(keys[:i]) or "the config"
            if isinstance(node, list):
                if not k.isdigit() or int(k) >= len(node):
                    raise ValueError(f"override '{ov}': '{where}' is a list of {len(node)}; expected an index "
                                     f"0..{len(node) - 1}, got '{k}'")
                k = int(k)
            elif not isinstance(node, dict):
                raise ValueError(f"override '{ov}': '{where}' is not a section")
            if i == len(keys) - 1:
                node[k] = value
            else:
                node = node[k] if isinstance(node, list) else node.setdefault(k, {})
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML RunConfig (or defaults when path is None) and apply dotted overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p}: {'is a directory' if p.is_dir() else 'not found'}")
        try:
            data = load_yaml(p.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p}: not valid YAML ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError:
            raise ValueError(f"config file {p}: not UTF-8 text") from None
        if data is None or data == {}:  # an empty file would silently start a full default run
            raise ValueError(f"config file {p}: empty; start from a file in configs/ "
                             f"(`finegrain config configs/arith_grpo.yaml` prints one)")
        if not isinstance(data, dict):
            raise ValueError(f"config file {p}: expected a mapping of sections (model, rollout, ...), "
                             f"got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def with_defaults(saved: dict) -> dict:
    """A saved config (a dict read from a run's config.yaml or state.pt) with every field it lacks
    set to today's default, as loading it would set it: a field added to finegrain after the run
    was saved then compares equal to its default instead of looking changed. A dict that no
    longer loads (e.g. a key that was removed) is returned as it is, so the caller reports it.

    >>> with_defaults({"train": {"steps": 7}})["train"]["steps"], "critic" in with_defaults({})
    (7, True)
    """
    try:
        return to_dict(from_dict(RunConfig, saved))
    except (ValueError, TypeError):
        return saved


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _choice(where: str, value: str, allowed: list[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{where}: expected one of {', '.join(allowed)}, got '{value}'")


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Every numeric field of a config dataclass (recursively) is finite and inside the range its
    ``range`` metadata declares; fields without a range must still be finite."""
    for f in dataclasses.fields(obj):
        value, where = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, where + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, v in enumerate(value):
                check_ranges(v, f"{where}[{i}].")
        else:
            check_range(where, value, f.metadata.get("range"))


def _check_special(cfg: RunConfig) -> None:
    """The fields whose allowed values are not one numeric interval."""
    b = cfg.optim.betas
    if len(b) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in b):
        raise ValueError(f"optim.betas: expected two numbers [beta1, beta2], got {b!r}")
    for i, x in enumerate(b):
        check_range(f"optim.betas[{i}]", x, "[0, 1)")
    c = cfg.loss.aggregation_constant
    if c is not None:
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise ValueError(f"loss.aggregation_constant: expected a number or null, got {c!r}")
        check_range("loss.aggregation_constant", c, "(0, inf)")
    if cfg.train.resume not in (True, False, "force"):
        raise ValueError(f"train.resume: expected true, false or force, got {cfg.train.resume!r}")
    if not cfg.train.out_dir.strip():
        raise ValueError("train.out_dir: expected a directory path, got ''")
    _check_lora(cfg.model.lora)


def _check_lora(lora: LoraConfig) -> None:
    """model.lora.target_modules: 'all-linear' or a non-empty list of distinct module names (the
    numeric fields are checked by their ranges); enabled needs the peft package."""
    import importlib.util

    if lora.enabled and importlib.util.find_spec("peft") is None:
        raise ValueError("model.lora.enabled: LoRA needs the peft package (pip install 'finegrain[lora]')")
    t = lora.target_modules
    if isinstance(t, str):
        if t != "all-linear":
            raise ValueError(f"model.lora.target_modules: expected a list of module names or 'all-linear', got {t!r}")
        return
    if not isinstance(t, list) or not t:
        raise ValueError(f"model.lora.target_modules: expected a non-empty list of module names (e.g. "
                         f"[q_proj, v_proj]) or 'all-linear', got {t!r}")
    bad = [x for x in t if not isinstance(x, str) or not x.strip()]
    if bad:
        raise ValueError(f"model.lora.target_modules: expected module names (strings), got {bad[0]!r}")
    if len(set(t)) != len(t):
        raise ValueError(f"model.lora.target_modules: each module name may appear once, got {t}")


def _check_groups(cfg: RunConfig) -> None:
    """Group-relative estimators and group filters need at least 2 samples per prompt: with one,
    every advantage is 0 (or every group is filtered out) and the run cannot learn."""
    from finegrain.credit import ADVANTAGES
    from finegrain.filters import FILTERS

    if cfg.rollout.group_size >= 2:
        return
    ests = ([(f"advantage.per_source.{src}", spec["name"]) for src, spec in cfg.advantage.per_source.items()]
            if cfg.advantage.per_source else [("advantage.name", cfg.advantage.name)])
    for i, f in enumerate(cfg.filters.filters):
        name = f["name"] if isinstance(f, dict) else f.name
        if FILTERS.meta(name).get("needs_groups"):
            raise ValueError(f"filters.filters[{i}]: '{name}' compares samples of a prompt, but rollout.group_size is "
                             f"{cfg.rollout.group_size}; use group_size ≥ 2")
    from finegrain.rewards import REWARDS

    for i, r in enumerate(cfg.rewards):
        if REWARDS.meta(r.name).get("needs_groups"):
            raise ValueError(f"rewards[{i}].name: '{r.name}' compares samples of a prompt, but rollout.group_size is "
                             f"{cfg.rollout.group_size}; use group_size ≥ 2")
    for where, name in ests:
        if ADVANTAGES.meta(name).get("needs_groups"):
            raise ValueError(f"{where}: '{name}' is group-relative and needs rollout.group_size ≥ 2, got "
                             f"{cfg.rollout.group_size} (every advantage would be 0); or use reinforce_pp")


def validate(cfg: RunConfig) -> None:
    """Check names against the registries and every value against its range, before any work."""
    from finegrain.credit import ADVANTAGES
    from finegrain.filters import FILTERS
    from finegrain.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
    from finegrain.rewards import REWARDS
    from finegrain.envs import ENVIRONMENTS
    from finegrain.sampling import SAMPLERS
    from finegrain.tasks import TASKS

    check_ranges(cfg)
    _check_special(cfg)
    _choice("task.name", cfg.task.name, TASKS.names())
    _choice("model.family", cfg.model.family, ["qwen2", "llama"])
    _choice("model.dtype", cfg.model.dtype, ["float32", "bfloat16", "float16"])
    _choice("rollout.engine", cfg.rollout.engine, SAMPLERS.names())
    _choice("rollout.env", cfg.rollout.env, ENVIRONMENTS.names())
    for i, r in enumerate(cfg.rewards):
        _choice(f"rewards[{i}].name", r.name, REWARDS.names())
        REWARDS.check_kwargs(r.name, r.kwargs, f"rewards[{i}].kwargs")
    _check_train_verifier(cfg)
    names = [r.name for r in cfg.rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"rewards: each signal may appear once, got {names}")
    if not names:
        raise ValueError("rewards: at least one reward signal is needed")
    if cfg.advantage.per_source:
        for src, spec in cfg.advantage.per_source.items():
            if src not in names and src != "kl_penalty":
                raise ValueError(f"advantage.per_source.{src}: not a reward source; sources: {', '.join(names)}")
            sc = from_dict(SourceCredit, spec, f"advantage.per_source.{src}")
            check_ranges(sc, f"advantage.per_source.{src}.")
            _choice(f"advantage.per_source.{src}.name", sc.name, ADVANTAGES.names())
            ADVANTAGES.check_kwargs(sc.name, sc.kwargs, f"advantage.per_source.{src}.kwargs")
        needed = names + (["kl_penalty"] if cfg.loss.kl_coef > 0 and cfg.loss.kl_mode == "reward" else [])
        missing = [n for n in needed if n not in cfg.advantage.per_source]
        if missing:
            raise ValueError(f"advantage.per_source: no estimator for reward source(s) {missing}")
    else:
        _choice("advantage.name", cfg.advantage.name, ADVANTAGES.names())
        ADVANTAGES.check_kwargs(cfg.advantage.name, cfg.advantage.kwargs, "advantage.kwargs")
    _check_preference_direction(cfg)
    for i, f in enumerate(cfg.filters.filters):
        spec = from_dict(FilterSpec, f, f"filters.filters[{i}]") if isinstance(f, dict) else f
        _choice(f"filters.filters[{i}].name", spec.name, FILTERS.names())
        FILTERS.check_kwargs(spec.name, spec.kwargs, f"filters.filters[{i}].kwargs")
        lo, hi = spec.kwargs.get("low"), spec.kwargs.get("high")
        if spec.name == "accuracy_band" and lo is not None and hi is not None and lo > hi:
            raise ValueError(f"filters.filters[{i}].kwargs: low ({lo}) must be ≤ high ({hi})")
    check_levels(cfg)
    _check_critic(cfg)
    _check_outcome(cfg)
    _choice("loss.name", cfg.loss.name, POLICY_LOSSES.names())
    POLICY_LOSSES.check_kwargs(cfg.loss.name, cfg.loss.kwargs, "loss.kwargs")
    _choice("loss.aggregation", cfg.loss.aggregation, AGGREGATIONS.names())
    _choice("loss.kl_estimator", cfg.loss.kl_estimator, KL_ESTIMATORS.names())
    _choice("loss.kl_mode", cfg.loss.kl_mode, ["loss", "reward"])
    _choice("loss.rollout_correction", cfg.loss.rollout_correction, ["none", "tis", "mask"])
    if cfg.loss.rollout_is_low > cfg.loss.rollout_is_cap:
        raise ValueError(f"loss.rollout_is_low: {cfg.loss.rollout_is_low} exceeds loss.rollout_is_cap "
                         f"({cfg.loss.rollout_is_cap}); expected low <= cap")
    _choice("optim.schedule", cfg.optim.schedule, ["constant", "linear", "cosine"])
    _choice("train.wandb_mode", cfg.train.wandb_mode, ["online", "offline", "disabled"])
    _check_groups(cfg)
    B = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    if B % (cfg.train.minibatches * cfg.train.grad_accum):
        raise ValueError(f"train.minibatches × train.grad_accum = {cfg.train.minibatches * cfg.train.grad_accum} "
                         f"must divide the batch of prompts_per_step × group_size = {B} rows")


def _check_train_verifier(cfg: RunConfig) -> None:
    """A task whose ``verify`` is for evaluation only (class attribute ``train_verifier = False``,
    e.g. arith_words) trains on no reward that calls it (registry metadata ``needs="verify"``), at
    any weight. The filters judge groups by one of the rewards (``_check_outcome``), so this
    refuses a filter reading the verifier too."""
    from finegrain.rewards import REWARDS
    from finegrain.tasks import TASKS

    if getattr(TASKS.get(cfg.task.name), "train_verifier", True):
        return
    for i, r in enumerate(cfg.rewards):
        if REWARDS.meta(r.name).get("needs") == "verify":
            raise ValueError(f"rewards[{i}].name: '{r.name}' scores with the rule verifier of task '{cfg.task.name}', "
                             f"which is for evaluation only (train_verifier = False); train on a signal that needs "
                             f"no verifier, e.g. rlpr")


def needs_values(cfg: RunConfig) -> bool:
    """The advantage estimator reads a critic's values (registry metadata ``needs_values``)."""
    from finegrain.credit import ADVANTAGES

    return not cfg.advantage.per_source and bool(ADVANTAGES.meta(cfg.advantage.name).get("needs_values"))


def _check_critic(cfg: RunConfig) -> None:
    """A critic is trained exactly when the estimator reads values, and only on the summed rewards:
    the critic predicts the return of the total token reward, so a per-source estimator cannot use it."""
    from finegrain.credit import ADVANTAGES
    from finegrain.models.tiny import TINY_PRESETS

    _choice("critic.init", cfg.critic.init, ["policy", "tiny"])
    _choice("critic.size", cfg.critic.size, sorted(TINY_PRESETS))
    for src, spec in cfg.advantage.per_source.items():
        name = from_dict(SourceCredit, spec, f"advantage.per_source.{src}").name
        if ADVANTAGES.meta(name).get("needs_values"):
            raise ValueError(f"advantage.per_source.{src}.name: '{name}' reads the critic's values of the total token "
                             f"reward; use it as advantage.name, without per_source")
    if needs_values(cfg) and not cfg.critic.enabled:
        raise ValueError(f"advantage.name: '{cfg.advantage.name}' reads a critic's values; set critic.enabled=true")
    if cfg.critic.enabled and not needs_values(cfg):
        used = "advantage.per_source" if cfg.advantage.per_source else f"advantage.name '{cfg.advantage.name}'"
        raise ValueError(f"critic.enabled: no advantage estimator reads the critic's values ({used}); use gae, or "
                         f"set critic.enabled=false")


def _check_preference_direction(cfg: RunConfig) -> None:
    """``advantage.preference_direction: true``: the objective weights must be a unit vector (DPA)."""
    from finegrain.credit.multi import check_direction

    flag = cfg.advantage.preference_direction
    if flag is None or flag is False:
        return
    if flag is not True:
        raise ValueError(f"advantage.preference_direction: expected true, false or null, got {flag!r}")
    if cfg.advantage.per_source:
        weights = {src: from_dict(SourceCredit, spec).coef for src, spec in cfg.advantage.per_source.items()
                   if src != "kl_penalty"}
        where = "advantage.preference_direction (the advantage.per_source coefs)"
    else:
        weights = {r.name: r.weight for r in cfg.rewards}
        where = "advantage.preference_direction (the rewards' weights)"
    check_direction(list(weights.values()), names=list(weights), where=where)


def _check_outcome(cfg: RunConfig) -> None:
    """Filters need an outcome-level signal to judge groups by: the declared one, or the first."""
    from finegrain.rewards.base import level_of

    outcome = [r.name for r in cfg.rewards if level_of(r.name, r.kwargs) == "outcome"]
    if cfg.filters.outcome:
        if cfg.filters.outcome not in outcome:
            raise ValueError(f"filters.outcome: '{cfg.filters.outcome}' is not an outcome-level signal in rewards; "
                             f"those are: {', '.join(outcome) or '(none)'}")
    elif cfg.filters.filters and not outcome:
        raise ValueError("filters.filters: filters judge groups by an outcome, but no reward signal is outcome-level; "
                         "add one (e.g. verifier) or remove the filters")


def check_levels(cfg: RunConfig) -> None:
    """Refuse to feed an estimator rewards finer than it consumes (nothing is summed away silently).

    A signal's level is its registry ``level`` unless its kwargs set ``level``; the KL penalty in
    reward mode is a token-level source.
    """
    from finegrain.credit import ADVANTAGES
    from finegrain.rewards import REWARDS
    from finegrain.rewards.base import level_rank

    sources = {r.name: r.kwargs.get("level", REWARDS.meta(r.name)["level"]) for r in cfg.rewards}
    if cfg.loss.kl_coef > 0 and cfg.loss.kl_mode == "reward":
        sources["kl_penalty"] = "token"
    pairs = ([(src, cfg.advantage.per_source[src]["name"]) for src in sources] if cfg.advantage.per_source
             else [(src, cfg.advantage.name) for src in sources])
    for src, est in pairs:
        consumes = ADVANTAGES.meta(est)["consumes"]
        if level_rank(sources[src]) > level_rank(consumes):
            finer = [n for n in ADVANTAGES.names() if level_rank(ADVANTAGES.meta(n)["consumes"]) >= level_rank(sources[src])]
            raise ValueError(f"advantage '{est}' consumes {consumes} rewards but '{src}' gives {sources[src]} rewards; "
                             f"use one of: {', '.join(finer)}")


def describe(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per field: dotted key, default, help (the CLI's --help-config)."""
    lines = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(f)
        key = f"{prefix}{f.name}"
        if sub is not None:
            lines += describe(sub, key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
                default = [dataclasses.asdict(d) for d in default]
            lines.append(f"{key} = {default!r}\n    {f.metadata.get('help', '')}")
    return lines
