"""The policy's weights as an inference engine loads them.

``engine_weights(model)`` is what a sampler that keeps its own copy of the model (vLLM) reads in
``sync_weights()``: (name, tensor) pairs named as in the base architecture's Hugging Face
checkpoint (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``), detached, on the
model's device and dtype. (LoRA-adapted models will yield merged weights under the base names:
``finegrain/models/lora.py``, in progress.)
"""

from __future__ import annotations

from typing import Iterator

import torch


def engine_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, detached tensor) for every parameter and persistent buffer of ``model``."""
    for name, t in model.state_dict().items():
        yield name, t.detach()
