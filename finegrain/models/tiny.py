"""Tiny causal LMs built from configs (random init; nothing is downloaded).

Shapes follow real families (Qwen2, Llama) so the code path is the one real models take.
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

TINY_PRESETS: dict[str, dict] = {
    # name: (hidden, intermediate, layers, heads); ~0.9M parameters with a 30-symbol vocabulary
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    "micro": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8),
    # ~50M parameters (the engine and probe benchmarks' larger model)
    "50m": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
}


def tiny_causal_lm(tokenizer, *, family: str = "qwen2", size: str = "tiny", max_positions: int = 512, seed: int = 0):
    """A randomly initialised causal LM sized for ``tokenizer``.

    family: 'qwen2' or 'llama'; size: one of TINY_PRESETS. The init is seeded, so a (seed, config)
    pair always gives the same weights.
    """
    import torch

    if size not in TINY_PRESETS:
        raise ValueError(f"model.size: expected one of {sorted(TINY_PRESETS)}, got '{size}'")
    shape = dict(TINY_PRESETS[size])
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=max_positions, tie_word_embeddings=True,
                  num_key_value_heads=shape["num_attention_heads"], pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    if family == "qwen2":
        cfg = Qwen2Config(**common)
    elif family == "llama":
        cfg = LlamaConfig(**common)
    else:
        raise ValueError(f"model.family: expected 'qwen2' or 'llama', got '{family}'")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model
