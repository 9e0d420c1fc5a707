"""The policy's weights as an inference engine loads them.

``engine_weights(model)`` is what a sampler that keeps its own copy of the model (vLLM) reads in
``sync_weights()``: (name, tensor) pairs named as in the base architecture's Hugging Face
checkpoint (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``), detached, on the
model's device and dtype. A model with LoRA adapters (a peft model, ``finegrain/models/lora.py``)
yields the merged weights W + (α/r)·B·A under the base names, so the engine never sees adapter
tensors, and the trained model is not changed. A sharded model (``train.fsdp``) yields its full
tensors, gathered from every rank.
"""

from __future__ import annotations

from typing import Iterator

import torch

from finegrain.models.lora import is_lora, merged_weights


def engine_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, detached tensor) for every parameter and persistent buffer of ``model``;
    for a LoRA model, those of its base model with every adapted weight merged (``merged_weights``)."""
    if is_lora(model):
        yield from merged_weights(model)
        return
    if _is_sharded(model):  # train.fsdp: gather the full tensors (a collective: every rank syncs together)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        yield from get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)).items()
        return
    for name, t in model.state_dict().items():
        yield name, t.detach()


def _is_sharded(model) -> bool:
    """True if ``model`` is sharded by FSDP2 (``fully_shard``), whatever state its modules are in."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(model, FSDPModule)
