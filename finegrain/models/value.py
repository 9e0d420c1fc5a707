"""The critic for PPO with GAE: a transformer backbone with a scalar value head, and its optimizer.

    V_t = w · h_t + b,   h_t = the backbone's last hidden state at the position *before* response
                           token t (the one whose logits predict y_t), so V_t = V(x, y_<t)

Two ways to get the backbone (``critic.init``):

    policy  a copy of the policy's backbone (the causal LM without its LM head), trained separately
            from the policy (the default; Fine-Grained RLHF and verl start the critic from the
            same SFT model as the policy, without sharing weights)
    tiny    a separate tiny random model (``finegrain.models.tiny``) of size ``critic.size``, for
            CPU runs or a cheap critic beside a real policy; it reads the same token ids

The head is zero-initialised, so the first values are exactly 0 and the first GAE advantages are
the (γλ)-discounted returns. A ``ValueModel`` saves as a directory (``config.json`` +
``model.safetensors``) and loads back into an existing one (``load_weights``) or from scratch
(``from_pretrained``); ``Critic`` adds its own AdamW, whose state the trainer keeps in the
checkpoint's ``state.pt`` so a resumed run continues exactly.

Departures: (1) a linear head on the last hidden state, no dropout (TRL's ``ValueHead`` adds
dropout; verl uses ``AutoModelForTokenClassification`` with one label); (2) the head starts at 0
rather than a random init; (3) a constant learning rate (no schedule) and no weight decay.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from finegrain.models.load import load_weights_into
from finegrain.models.lora import base_copy, is_lora
from finegrain.shapes import check_shapes

CONFIG_KIND = "finegrain.ValueModel"


class ValueModel(torch.nn.Module):
    """A backbone (a transformers base model: embeddings + decoder layers, no LM head) and a
    zero-initialised ``Linear(hidden_size, 1)`` head."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        p = next(backbone.parameters())
        # skip_init: no random init (and no draw from the global RNG) for weights zeroed next
        self.value_head = torch.nn.utils.skip_init(torch.nn.Linear, backbone.config.hidden_size, 1,
                                                   device=p.device, dtype=p.dtype)
        with torch.no_grad():
            self.value_head.weight.zero_()
            self.value_head.bias.zero_()

    @classmethod
    def from_policy(cls, policy) -> "ValueModel":
        """A copy of ``policy``'s backbone (``policy.base_model``) with a new head; shares nothing.
        For a LoRA policy, the backbone of its base model, without adapters (``lora.base_copy``)."""
        backbone = base_copy(policy).base_model if is_lora(policy) else copy.deepcopy(policy.base_model)
        for p in backbone.parameters():
            p.requires_grad_(True)
        return cls(backbone)

    @classmethod
    def from_tiny(cls, tokenizer, *, family: str = "qwen2", size: str = "tiny", vocab_size: int | None = None,
                  max_positions: int = 512, seed: int = 0, device: str | torch.device = "cpu") -> "ValueModel":
        """A tiny random backbone for ``tokenizer`` (float32), seeded, so (seed, size) gives the same
        weights; ``vocab_size`` larger than the tokenizer's (a policy whose embedding matrix has
        extra rows) grows the embeddings so every id the policy can sample is readable."""
        from finegrain.models.tiny import tiny_causal_lm

        lm = tiny_causal_lm(tokenizer, family=family, size=size, max_positions=max_positions, seed=seed)
        if vocab_size is not None and vocab_size > lm.config.vocab_size:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                lm.resize_token_embeddings(vocab_size)
        return cls(lm.base_model.to(device))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
        """V_t for the last ``response_len`` positions: (B, L) float32.

        input_ids (B, P + L) = left-padded prompt then right-padded response; attention_mask
        (B, P + L) bool. Position ids come from the mask, as for the policy's log-probs
        (``finegrain.models.logprobs.response_logits``). Padding positions hold garbage: mask them.
        """
        check_shapes(input_ids=(input_ids, ("B", "T")), attention_mask=(attention_mask, ("B", "T")))
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=pos, use_cache=False)
        T = input_ids.shape[1]
        h = out.last_hidden_state[:, T - response_len - 1: T - 1]     # (B, L, H): the state before y_t
        return self.value_head(h).squeeze(-1).float()                  # (B, L)

    def save_pretrained(self, directory: str | Path) -> None:
        """``directory/config.json`` (the backbone's config) and ``directory/model.safetensors``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(d / "model.safetensors"))
        config = {"kind": CONFIG_KIND, "head": "linear(hidden_size, 1)",
                  "backbone": json.loads(self.backbone.config.to_json_string(use_diff=False))}
        (d / "config.json").write_text(json.dumps(config, indent=2))

    def load_weights(self, directory: str | Path) -> None:
        """Copy weights saved by ``save_pretrained`` into this model (keeps device and dtype)."""
        load_weights_into(self, Path(directory))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "ValueModel":
        """Rebuild a saved ``ValueModel``: its backbone from ``config.json``, then its weights."""
        from transformers import AutoConfig, AutoModel

        d = Path(directory)
        config = json.loads((d / "config.json").read_text())
        if config.get("kind") != CONFIG_KIND:
            raise ValueError(f"{d}: config.json is not a finegrain value model (kind {config.get('kind')!r})")
        bb = dict(config["backbone"])
        backbone_cfg = AutoConfig.for_model(bb.pop("model_type"), **bb)
        with torch.random.fork_rng():  # the random init is overwritten by the saved weights
            model = cls(AutoModel.from_config(backbone_cfg).to(device))
        model.load_weights(d)
        return model


class Critic:
    """A ``ValueModel`` with its own AdamW (constant learning rate, no weight decay).

    Checkpointed like an online reward model: ``state_dict_for_checkpoint()`` gives the model
    (saved as its own directory) and the optimizer state (saved in ``state.pt``);
    ``load_checkpoint`` puts both back.
    """

    def __init__(self, model: ValueModel, *, lr: float, betas: tuple[float, float] = (0.9, 0.999)):
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas), weight_decay=0.0)

    @classmethod
    def build(cls, init: str, policy, tokenizer, *, lr: float, size: str = "tiny", family: str = "qwen2",
              seed: int = 0) -> "Critic":
        """``init='policy'``: a copy of the policy's backbone; ``init='tiny'``: a tiny random model."""
        if init == "policy":
            model = ValueModel.from_policy(policy)
        elif init == "tiny":
            cfg = policy.config
            model = ValueModel.from_tiny(tokenizer, family=family, size=size, vocab_size=cfg.vocab_size,
                                         max_positions=getattr(cfg, "max_position_embeddings", 512) or 512,
                                         seed=seed, device=next(policy.parameters()).device)
        else:
            raise ValueError(f"critic.init: expected 'policy' or 'tiny', got '{init}'")
        return cls(model, lr=lr)

    def state_dict_for_checkpoint(self) -> tuple[ValueModel, dict]:
        return self.model, {"optimizer": self.optimizer.state_dict()}

    def load_checkpoint(self, directory: str | Path, extra: dict) -> None:
        self.model.load_weights(directory)
        self.optimizer.load_state_dict(extra["optimizer"])
