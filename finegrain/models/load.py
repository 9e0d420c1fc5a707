"""Load the policy: a Hugging Face model (path or Hub id), or a tiny model warm-started by SFT and cached."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from finegrain.models.lora import has_adapters, is_lora, load_adapters


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"model.device: '{name}' requested but CUDA is not available")
    return torch.device(name)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_path(where: str, path: str) -> str:
    """``path`` as given if it is a model directory or a Hub id; a one-line error otherwise.

    A value that looks like a local path — it starts with ``.``, ``/`` or ``~``, ends with a
    separator, has more than one ``/``, or its first component is an existing directory (so
    ``runs/x`` when ``runs/`` exists) — must exist: a typo is reported as a missing directory,
    never sent to the Hub as an id. Only ``owner/name`` that is not such a path is a Hub id.
    """
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"{where}: '{path}' is not a directory (expected a saved Hugging Face model directory)")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{where}: '{path}' has no config.json (not a saved Hugging Face model directory)")
        return path
    parts = Path(path).parts
    looks_local = (path.startswith((".", "/", "~")) or path.endswith(("/", os.sep)) or path.count("/") > 1
                   or (len(parts) > 1 and Path(parts[0]).is_dir()) or not _HUB_ID.fullmatch(path))
    if looks_local:
        hint = "" if "/" in path else " (a Hub id is owner/name)"
        if len(parts) > 1 and Path(parts[0]).is_dir():
            hint = f" ('{parts[0]}/' is a local directory, so this is read as a local path)"
        raise FileNotFoundError(f"{where}: '{path}': no such directory{hint}")
    return path


def _reason(err: Exception) -> str:
    """One line for a transformers loading error; custom code gets finegrain's own words."""
    text = str(err)
    if "trust_remote_code" in text or "custom code" in text:
        return "it needs its own Python code (auto_map), which finegrain runs only with model.trust_remote_code=true"
    return (text.strip().splitlines() or [type(err).__name__])[0][:300]


def _offline_kwargs() -> dict:
    return {"local_files_only": True} if hub_offline() else {}


def load_causal_lm(path: str, dtype: str = "float32", device: str = "auto", *, trust_remote_code: bool = False,
                   where: str = "model.path"):
    """``AutoModelForCausalLM.from_pretrained`` with the safety rules every loader shares.

    ``trust_remote_code`` is passed explicitly (False unless the user sets it), so a directory
    with ``auto_map`` code is refused with an error instead of transformers' interactive
    "run custom code?" prompt; weights load from safetensors when the directory has them;
    ``HF_HUB_OFFLINE`` makes Hub ids resolve from the local cache only.
    """
    check_model_path(where, path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                     **_offline_kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{where}: cannot load a causal LM from '{path}': {_reason(e)}") from None
    return model.to(resolve_device(device))


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer saved at ``path`` (a directory or Hub id).

    Tokenizers we build ourselves (``finegrain.models.tokenizer``) are saved as a plain
    ``tokenizers`` backend. ``AutoTokenizer`` would load them as the model family's own class
    (e.g. Qwen2Tokenizer for a Qwen2-shaped model), which re-splits text its own way and drops
    spaces and newlines, so those are loaded as PreTrainedTokenizerFast.
    """
    cfg = Path(path) / "tokenizer_config.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path, **_offline_kwargs())
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **_offline_kwargs())


def load_pretrained(path: str, dtype: str = "float32", device: str = "auto", *, trust_remote_code: bool = False,
                    where: str = "model.path"):
    """Any AutoModelForCausalLM from a local directory or the Hub, with its tokenizer.

    A tokenizer without a pad token gets its EOS as pad (the rollout engine needs one). Safety
    rules as ``load_causal_lm``; errors are one line naming ``where``.
    """
    check_model_path(where, path)
    try:
        tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{where}: cannot load a tokenizer from '{path}': {_reason(e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return load_causal_lm(path, dtype, device, trust_remote_code=trust_remote_code, where=where), tok


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files of a model directory (never a pickle)."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {directory}: no *.safetensors file")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def load_weights_into(model, directory: Path) -> None:
    """Copy saved safetensors weights into an existing model (keeps device and dtype); a LoRA
    model gets its adapters back from an adapter directory (``lora.load_adapters``)."""
    if is_lora(model):
        load_adapters(model, directory)
        return
    if has_adapters(directory):
        raise ValueError(f"checkpoint {directory}: holds LoRA adapters (adapter_config.json), but the model has none "
                         f"(model.lora.enabled is false)")

    missing, unexpected = model.load_state_dict(read_weights(directory), strict=False)
    # tied embeddings are saved once; lm_head.weight is then legitimately missing
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {directory}: missing {missing[:3]}, unexpected {unexpected[:3]}")
