"""LoRA adapters on the policy, through peft (``model.lora.enabled``; ``pip install finegrain[lora]``).

    h = W x + (α/r) · B A x        Hu et al. 2021, "LoRA", arXiv:2106.09685, eq. (3)
    W (out, in) frozen;  A (r, in) random (peft's Kaiming-uniform init);  B (out, r) zero-initialised

Only A and B train. Because B starts at 0, the model right after ``add_adapters`` computes exactly
what the base model computes, so the *base model with its adapters disabled* is the initial policy,
and the trainer's reference policy is that view of the one model in memory (``FrozenBase``), not
a second copy.

What else follows, and where this departs from a full-weight run:

1. The reference is the base model, not "the policy at step 0", whenever the two differ: a user
   who puts non-zero adapter weights into the model before training (e.g. loads an adapter trained
   elsewhere) gets the KL to the base model. finegrain itself only loads adapters on resume, where
   the base is the reference of the whole run, as it was before the interruption.
2. A checkpoint's ``policy/`` holds the adapters only: ``adapter_model.safetensors`` (peft's key
   names, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) and
   ``adapter_config.json``, plus the tokenizer. The base model is rebuilt from the run's config
   (``model.path``, or the warm-started tiny model's SFT cache) before the adapters are loaded.
3. An inference engine with its own copy of the weights (vLLM) gets W + (α/r)·B·A under the base
   model's names (``merged_weights``), computed in float32 and cast to W's dtype; the trained model
   is never merged in place.
4. Only linear layers are adapted (peft's LoRA on ``nn.Linear``); DoRA, bias training and
   ``modules_to_save`` are not used.

peft is imported lazily: nothing here loads it until a LoRA model is built, and ``is_lora`` is
False for every model when peft was never imported.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# the adapter_config.json fields a checkpoint must share with the model it is loaded into
_SHAPE_KEYS = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "bias", "fan_in_fan_out")


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("model.lora.enabled: LoRA needs the peft package (pip install 'finegrain[lora]')") from None
    return peft


def is_lora(model) -> bool:
    """True if ``model`` is a peft model (then it was built by ``add_adapters`` or peft itself)."""
    peft = sys.modules.get("peft")  # a model cannot be a peft model if peft was never imported
    return peft is not None and isinstance(model, peft.PeftModel)


def add_adapters(model, *, r: int, alpha: float, dropout: float = 0.0, target_modules=None, seed: int = 0):
    """``model`` (a transformers causal LM) with LoRA adapters: a ``peft.PeftModelForCausalLM`` in
    which only the adapters require grad. The base modules are wrapped in place (``model`` itself
    becomes the peft model's base). A is drawn from a generator seeded with ``seed`` (the global RNG
    is left as it was); B is zero, so the result computes exactly what ``model`` computed.

    target_modules: a list of module names (``q_proj`` ...) or ``"all-linear"``.
    """
    peft = _peft()
    if target_modules is None:
        raise ValueError("model.lora.target_modules: expected a list of module names or 'all-linear', got None")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                             target_modules=target_modules if isinstance(target_modules, str) else list(target_modules))
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        try:
            wrapped = peft.get_peft_model(model, config)
        except ValueError as e:  # e.g. no module matches target_modules
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ValueError(f"model.lora.target_modules: {first}") from None
    for name, p in wrapped.named_parameters():
        if p.requires_grad != _is_adapter(name):
            raise RuntimeError(f"LoRA: parameter {name} has requires_grad={p.requires_grad}; only adapters should train")
    return wrapped


def _is_adapter(name: str) -> bool:
    return ".lora_" in name


def adapter_parameters(model) -> list[torch.nn.Parameter]:
    """The adapter parameters (A and B of every adapted layer) of a LoRA model."""
    return [p for n, p in model.named_parameters() if _is_adapter(n)]


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    """{module name in the base model (``model.layers.0.self_attn.q_proj``): peft LoRA layer}."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


# ---------------------------------------------------------------------------------------------
# the reference policy: the base model under ``disable_adapter()``


class FrozenBase:
    """The base model of a LoRA policy (adapters disabled), used like a frozen model.

    Because LoRA's B is zero-initialised, this is the initial policy (see the module docstring for
    when it is not). It holds no weights of its own: ``model(input_ids=..., attention_mask=...)``
    and ``generate(...)`` run the policy's own modules under ``disable_adapter()``, in eval mode
    and without gradients, and restore the policy's train/eval mode afterwards. ``parameters()``
    gives the base parameters (all frozen), so ``next(ref.parameters()).device`` works; ``eval()``
    and ``train()`` change nothing (the mode is set per call). Attributes not listed here are
    refused rather than forwarded, since forwarding them would reach the adapted model.
    """

    def __init__(self, model):
        if not is_lora(model):
            raise TypeError(f"FrozenBase: expected a peft LoRA model, got {type(model).__name__}")
        self.model = model

    @contextmanager
    def _base(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                yield
        finally:
            self.model.train(was_training)

    def __call__(self, *args, **kwargs):
        with self._base():
            return self.model(*args, **kwargs)

    forward = __call__

    def generate(self, *args, **kwargs):
        with self._base():
            return self.model.generate(*args, **kwargs)

    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def training(self) -> bool:
        return False

    def named_parameters(self, *args, **kwargs) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters(*args, **kwargs) if not _is_adapter(n))

    def parameters(self, *args, **kwargs) -> Iterator[torch.nn.Parameter]:
        return (p for _, p in self.named_parameters(*args, **kwargs))

    def eval(self) -> "FrozenBase":
        return self

    def train(self, mode: bool = True) -> "FrozenBase":
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "FrozenBase":
        if requires_grad:
            raise ValueError("FrozenBase: the reference policy is the frozen base of the LoRA policy and cannot train")
        return self

    def __getattr__(self, name: str):
        raise AttributeError(f"FrozenBase (the LoRA policy's base, adapters disabled) has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# merged weights for an inference engine


@torch.no_grad()
def merged_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(base checkpoint name, tensor) for every entry of the base model's state dict, with each
    adapted weight merged, without changing ``model``:

        W' = W + (α/r) · B A        W (out, in), B (out, r), A (r, in)   (Hu et al. 2021, §4.1)

    computed in float32 and cast to W's dtype (and transposed for peft's ``fan_in_fan_out``
    layers). Names are the base model's (``model.layers.0.self_attn.q_proj.weight``): peft's
    ``base_layer`` level is removed and adapter tensors are left out. Other tensors are yielded
    detached, as they are.
    """
    layers = _lora_layers(model)
    adapter = model.active_adapter
    for mod_name, mod in layers.items():
        if mod.merged:
            raise ValueError(f"{mod_name}: the adapter is merged into the weight already; unmerge it first")
        if adapter not in mod.lora_A:
            raise ValueError(f"{mod_name}: LoRA layer has no adapter '{adapter}' (only {sorted(mod.lora_A)})")
        if mod.use_dora.get(adapter, False):
            raise ValueError(f"{mod_name}: DoRA adapters are not supported by merged_weights")
        if not isinstance(mod.get_base_layer(), torch.nn.Linear):
            raise ValueError(f"{mod_name}: LoRA on {type(mod.get_base_layer()).__name__} is not supported "
                             f"(only linear layers)")
    for name, t in model.get_base_model().state_dict().items():
        if _is_adapter(name):
            continue
        clean = name.replace(".base_layer.", ".")
        owner, _, leaf = clean.rpartition(".")
        mod = layers.get(owner)
        if mod is None or leaf != "weight":
            yield clean, t.detach()
            continue
        A, B = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight        # (r, in), (out, r)
        delta = B.float() @ A.float()                                          # (out, in)
        if mod.fan_in_fan_out:
            delta = delta.T
        yield clean, (t.float() + mod.scaling[adapter] * delta).to(t.dtype)


# ---------------------------------------------------------------------------------------------
# checkpoints: adapters only


def save_adapters(model, directory: str | Path) -> None:
    """``directory/adapter_model.safetensors`` (the adapter tensors, peft's key names) and
    ``directory/adapter_config.json``. Refused when a base parameter is trainable: saving the
    adapters alone would lose its training."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    trained_base = [n for n, p in model.named_parameters() if p.requires_grad and not _is_adapter(n)]
    if trained_base:
        raise ValueError(f"LoRA checkpoint: base parameter {trained_base[0]} is trainable; a checkpoint of adapters "
                         f"only would lose it")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = get_peft_model_state_dict(model)
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(d / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    model.peft_config[model.active_adapter].save_pretrained(str(d))


def has_adapters(directory: str | Path) -> bool:
    """True if ``directory`` is an adapter checkpoint (it has ``adapter_config.json``)."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def _inside(directory: Path, name: str) -> Path:
    """``directory/name`` as a regular file that resolves inside ``directory`` (no symlink out)."""
    f = directory / name
    if not f.is_file():
        raise FileNotFoundError(f"checkpoint {directory}: no {name}")
    if not f.resolve().is_relative_to(directory.resolve()):
        raise ValueError(f"checkpoint {directory}: {name} points outside the checkpoint directory; refused")
    return f


def _shape_of(config: dict) -> dict:
    out = {k: config.get(k) for k in _SHAPE_KEYS}
    t = out["target_modules"]
    out["target_modules"] = t if isinstance(t, str) or t is None else sorted(t)
    return out


def load_adapters(model, directory: str | Path) -> None:
    """Copy the adapters saved by ``save_adapters`` into LoRA ``model`` (keeps device and dtype).

    Safe to call on an untrusted directory: the config is JSON, the weights are read from
    ``adapter_model.safetensors`` only (never a pickle), and both files must resolve inside
    ``directory``. Refused (one line) when the saved adapter's shape (r, alpha, target modules,
    ...) differs from the model's, or a tensor is missing, unexpected or of another shape.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    d = Path(directory)
    if not has_adapters(d) and (d / "config.json").is_file():
        raise ValueError(f"checkpoint {d}: holds full model weights, not LoRA adapters (it was trained without "
                         f"model.lora.enabled)")
    try:
        saved = json.loads(_inside(d, ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {d}: {ADAPTER_CONFIG} is not valid JSON ({e.msg})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {d}: {ADAPTER_CONFIG} is not a JSON object")
    have = _shape_of(model.peft_config[model.active_adapter].to_dict())
    got = _shape_of(saved)
    diff = [f"{k} {got[k]!r} (model: {have[k]!r})" for k in _SHAPE_KEYS if got[k] != have[k]]
    if diff:
        raise ValueError(f"checkpoint {d}: the saved adapters differ from model.lora: {', '.join(diff)}")
    sd = load_file(str(_inside(d, ADAPTER_WEIGHTS)))
    expected = get_peft_model_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {d}: adapter tensors missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"checkpoint {d}: adapter tensor {k} has shape {tuple(v.shape)}, the model "
                             f"{tuple(expected[k].shape)}")
    result = set_peft_model_state_dict(model, sd)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {d}: adapter tensors not placed: {result.unexpected_keys[:3]}")


# ---------------------------------------------------------------------------------------------
# copies without adapters


def base_copy(model):
    """A standalone copy of the base causal LM of LoRA ``model`` (no adapters, no peft wrapper;
    shares nothing with ``model``), e.g. for a critic that starts from the policy's backbone."""
    import copy

    if not is_lora(model):
        raise TypeError(f"base_copy: expected a peft LoRA model, got {type(model).__name__}")
    return copy.deepcopy(model).unload()


def merge_and_unwrap(model):
    """The plain causal LM under LoRA ``model``, its adapted weights replaced by the merged
    W + (α/r)·B A of ``merged_weights`` (the numbers the inference engine gets). It *consumes*
    ``model``: peft's wrappers are removed in place (``unload``), so use the result, not ``model``,
    afterwards. Used to evaluate a LoRA checkpoint without peft in the loop."""
    if not is_lora(model):
        raise TypeError(f"merge_and_unwrap: expected a peft LoRA model, got {type(model).__name__}")
    merged = {n: t for n, t in merged_weights(model)}  # new tensors for the adapted weights only
    plain = model.unload()
    missing, unexpected = plain.load_state_dict(merged, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"merge_and_unwrap: names do not match the base model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return plain


def merged_copy(model):
    """A standalone plain causal LM with the merged weights of LoRA ``model`` (``merged_weights``),
    sharing nothing with it; ``model`` is not changed. For a component that trains its own full
    copy of the policy (e.g. an online PRM)."""
    import copy

    return merge_and_unwrap(copy.deepcopy(model))
