"""Load the policy: a Hugging Face model (path or Hub id), or a tiny model warm-started by SFT and cached."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.train.lock import RunLock

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


def sft_cache_key(payload: dict) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def warm_started_tiny(task, task_kwargs: dict, model_cfg, sft_cfg, log=print):
    """A tiny model for ``task`` trained from scratch on the task's worked solutions, cached on disk.

    The cache key hashes the task, model and SFT settings, so any change retrains; a second call
    with the same settings loads the saved directory. Returns (model, tokenizer, info dict).
    """
    from finegrain.train.sft import run_sft

    payload = {"task": task.name, "task_kwargs": task_kwargs, "family": model_cfg.family,
               "size": model_cfg.size, "sft": {k: v for k, v in vars(sft_cfg).items() if k != "cache_dir"}, "v": 1}
    cache = Path(os.environ.get("FINEGRAIN_CACHE", sft_cfg.cache_dir)) / f"sft-{task.name}-{sft_cache_key(payload)}"
    device = resolve_device(model_cfg.device)
    with RunLock(cache, wait=True):  # two runs wanting the same cache: one builds it, the other waits
        if (cache / "done.json").exists():
            tok = load_tokenizer(cache)
            model = load_causal_lm(str(cache), model_cfg.dtype, model_cfg.device, where="sft cache")
            info = json.loads((cache / "done.json").read_text())
            log(f"loaded warm-started model from cache {cache}")
            return model, tok, {**info, "cached": True, "path": str(cache)}
        if hasattr(task, "sft_corpus"):
            corpus = task.sft_corpus(sft_cfg.n_examples, sft_cfg.flawed_fraction, sft_cfg.seed)
        else:  # a task without flawed solutions: its gold worked solutions
            corpus = [(ex, ex.solution) for ex in task.examples("train", sft_cfg.n_examples) if ex.solution]
            if not corpus:
                raise ValueError(f"task '{task.name}': no worked solutions to warm-start a tiny model; set model.path")
            if sft_cfg.flawed_fraction > 0:
                log(f"task '{task.name}' has no flawed solutions; sft.flawed_fraction is ignored")
        pairs = [(task.format_prompt(ex), sol) for ex, sol in corpus]
        alphabet = sorted(set("".join(p + s for p, s in pairs)) | set("0123456789"))
        tok = char_tokenizer(alphabet)
        model = tiny_causal_lm(tok, family=model_cfg.family, size=model_cfg.size, seed=sft_cfg.seed).to(device)
        from finegrain.train.progress import Progress

        with Progress("SFT warm start", total=None) as bar:
            info = run_sft(model, tok, pairs, epochs=sft_cfg.epochs, batch_size=sft_cfg.batch_size, lr=sft_cfg.lr,
                           warmup_steps=sft_cfg.warmup_steps, seed=sft_cfg.seed,
                           progress=lambda s, n, l: bar.update(s, n, f"loss {l:.3f}"))
        cache.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cache)
        tok.save_pretrained(cache)
        (cache / "done.json").write_text(json.dumps(info))
        log(f"SFT done in {info['sft/seconds']:.0f}s (loss {info['sft/loss']:.3f}); cached at {cache}")
        return model, tok, {**info, "cached": False, "path": str(cache)}
