"""LoRA through peft (finegrain/models/lora.py): the config and its one-line errors, the adapted
model at init, the reference as the base with adapters disabled (no second copy), merged engine
weights against a merge computed here, adapter checkpoints (exact round trip, safe loading), the
critic's copy of the base."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

pytest.importorskip("peft")

from finegrain.config import LoraConfig, RunConfig, load_config, to_dict, with_defaults  # noqa: E402
from finegrain.models import lora  # noqa: E402
from finegrain.models.tiny import tiny_causal_lm  # noqa: E402
from finegrain.models.tokenizer import char_tokenizer  # noqa: E402
from finegrain.models.weights import engine_weights  # noqa: E402

ALPHABET = "0123456789+-*=:QA \n"
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(ALPHABET)


def plain_and_lora(tok, family="qwen2", r=4, alpha=8.0, targets=TARGETS, seed=0):
    """(an untouched copy of the base model, the same model with adapters)."""
    base = tiny_causal_lm(tok, family=family, size="micro", seed=seed)
    plain = copy.deepcopy(base)
    return plain, lora.add_adapters(base, r=r, alpha=alpha, target_modules=targets, seed=3)


def randomise_adapters(model, seed=1):
    """Non-zero A and B (B starts at 0, which would hide every merge error)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def ids():
    return torch.tensor([[1, 5, 7, 2, 9, 3, 4], [2, 2, 8, 6, 1, 0, 5]])


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, field", [
    ("model.lora.r=0", "model.lora.r"),
    ("model.lora.r=2.5", "model.lora.r"),
    ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.alpha=-1", "model.lora.alpha"),
    ("model.lora.dropout=1.0", "model.lora.dropout"),
    ("model.lora.dropout=-0.1", "model.lora.dropout"),
    ("model.lora.target_modules=[]", "model.lora.target_modules"),
    ("model.lora.target_modules=attention", "model.lora.target_modules"),
    ("model.lora.target_modules=[q_proj, 3]", "model.lora.target_modules"),
    ("model.lora.target_modules=[q_proj, q_proj]", "model.lora.target_modules"),
    ("model.lora.rank=4", "model.lora.rank"),
])
def test_bad_lora_values_are_refused_in_one_line(override, field):
    with pytest.raises(ValueError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert msg.startswith(field + ":") and "\n" not in msg


def test_good_lora_values_load():
    cfg = load_config(None, ["model.lora.enabled=true", "model.lora.r=1", "model.lora.dropout=0.5",
                             "model.lora.target_modules=all-linear"])
    assert (cfg.model.lora.enabled, cfg.model.lora.r, cfg.model.lora.target_modules) == (True, 1, "all-linear")
    assert LoraConfig().target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_a_saved_config_without_model_lora_compares_equal_to_defaults():
    from finegrain.train.rundir import config_diff

    now = RunConfig()
    saved = to_dict(now)
    del saved["model"]["lora"]  # a run saved before LoRA existed
    filled = with_defaults(saved)
    assert filled["model"]["lora"] == to_dict(LoraConfig())
    assert config_diff(filled, to_dict(now), now) == {}
    lora_run = load_config(None, ["model.lora.r=8"])
    assert config_diff(filled, to_dict(lora_run), lora_run) == {"model.lora.r": (16, 8)}


def test_help_lists_the_nested_fields():
    from finegrain.config import describe

    keys = [line.split(" = ")[0] for line in describe()]
    assert {"model.lora.enabled", "model.lora.r", "model.lora.alpha", "model.lora.dropout",
            "model.lora.target_modules"} <= set(keys)


# ------------------------------------------------------------------------------- the adapted model


def test_only_adapters_train_and_the_initial_model_is_the_base(tok):
    plain, pm = plain_and_lora(tok)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(TARGETS) * plain.config.num_hidden_layers
    assert all(float(p.abs().max()) == 0 for n, p in pm.named_parameters() if ".lora_B." in n)
    # B = 0: exactly the base model's numbers
    assert torch.equal(pm(input_ids=ids()).logits, plain(input_ids=ids()).logits)


def test_adapter_init_is_seeded_and_leaves_the_global_rng(tok):
    torch.manual_seed(11)
    before = torch.random.get_rng_state()
    _, a = plain_and_lora(tok)
    assert torch.equal(torch.random.get_rng_state(), before)
    _, b = plain_and_lora(tok)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_an_optimizer_step_moves_adapters_only(tok):
    plain, pm = plain_and_lora(tok)
    base_before = {n: t.clone() for n, t in pm.state_dict().items() if ".lora_" not in n}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # B moves on the first step, A from the second
        out = pm(input_ids=ids(), labels=ids())
        out.loss.backward()
        assert all((p.grad is None) == (".lora_" not in n) for n, p in pm.named_parameters())  # no base grads
        opt.step()
        opt.zero_grad()
    after = pm.state_dict()
    for n, t in base_before.items():
        assert torch.equal(after[n], t), n
    assert all(float(p.abs().max()) > 0 for n, p in pm.named_parameters() if ".lora_B." in n)
    assert not torch.equal(pm(input_ids=ids()).logits, plain(input_ids=ids()).logits)


# -------------------------------------------------------------------------------------- reference


def test_reference_is_the_base_with_adapters_disabled_and_holds_no_copy(tok):
    from finegrain.train.stages import frozen_copy

    plain, pm = plain_and_lora(tok)
    ref = frozen_copy(pm)
    assert isinstance(ref, lora.FrozenBase)
    want = plain(input_ids=ids()).logits
    assert torch.equal(ref(input_ids=ids()).logits, want)
    randomise_adapters(pm)
    pm.train()
    assert not torch.equal(pm(input_ids=ids()).logits, want)     # the policy moved ...
    assert torch.equal(ref(input_ids=ids()).logits, want)         # ... its reference did not
    assert pm.training                                            # the call restored the policy's mode
    assert ref.eval() is ref and pm.training                      # eval() on the ref leaves the policy alone
    # no second copy: every tensor the ref reads is a base parameter of the policy itself
    policy_ptrs = {p.data_ptr() for n, p in pm.named_parameters() if ".lora_" not in n}
    ref_params = list(ref.parameters())
    assert ref_params and {p.data_ptr() for p in ref_params} == policy_ptrs
    assert not any(p.requires_grad for p in ref_params)
    assert ref.device == plain.device and ref.config.vocab_size == plain.config.vocab_size
    out = ref(input_ids=ids())
    assert out.logits.grad_fn is None
    with pytest.raises(AttributeError, match="adapters disabled"):
        ref.base_model  # would reach the adapted model: refused, not forwarded


def test_reference_generates_like_the_base(tok):
    plain, pm = plain_and_lora(tok)
    randomise_adapters(pm)
    ref = lora.FrozenBase(pm)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(ref.generate(input_ids=ids()[:1], **kw), plain.generate(input_ids=ids()[:1], **kw))


# ------------------------------------------------------------------------------- engine weights


@pytest.mark.parametrize("family, targets", [("qwen2", TARGETS), ("llama", "all-linear")])
def test_engine_weights_are_the_merge_under_base_names(tok, family, targets):
    plain, pm = plain_and_lora(tok, family=family, r=4, alpha=12.0, targets=targets)
    randomise_adapters(pm)
    state_before = {n: t.clone() for n, t in pm.state_dict().items()}
    got = dict(engine_weights(pm))
    assert list(got) == list(plain.state_dict())   # base names: no base_model.model., no base_layer
    params = dict(pm.named_parameters())
    prefix = "base_model.model."
    merged = 0
    for name, w in plain.state_dict().items():
        mod = name.rsplit(".", 1)[0]
        a_name = f"{prefix}{mod}.lora_A.default.weight"
        if name.endswith(".weight") and a_name in params:
            A, B = params[a_name], params[f"{prefix}{mod}.lora_B.default.weight"]   # (r, in), (out, r)
            want = w + (12.0 / 4) * (B @ A)                                         # W + (alpha/r)·B·A
            torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-7)
            assert not torch.equal(got[name], w)
            merged += 1
        else:
            assert torch.equal(got[name], w), name
    n_layers = plain.config.num_hidden_layers
    assert merged == n_layers * (len(targets) if isinstance(targets, list) else 7)  # all-linear: 7 per layer
    assert "lm_head.weight" in got and torch.equal(got["lm_head.weight"], plain.state_dict()["lm_head.weight"])
    for n, t in pm.state_dict().items():  # the trained model was not merged in place
        assert torch.equal(t, state_before[n]), n
    # a plain model loaded with these weights computes what the LoRA model computes
    engine = copy.deepcopy(plain)
    engine.load_state_dict(got)
    pm.eval()
    torch.testing.assert_close(engine(input_ids=ids()).logits, pm(input_ids=ids()).logits, rtol=1e-5, atol=1e-5)


def test_engine_weights_of_a_plain_model_are_its_state_dict(tok):
    plain = tiny_causal_lm(tok, size="micro")
    got = dict(engine_weights(plain))
    assert list(got) == list(plain.state_dict())
    assert all(torch.equal(got[n], t) for n, t in plain.state_dict().items())


# ------------------------------------------------------------------------------------ checkpoints


def test_adapters_save_and_load_back_exactly(tok, tmp_path):
    _, pm = plain_and_lora(tok)
    randomise_adapters(pm)
    lora.save_adapters(pm, tmp_path / "policy")
    assert sorted(os.listdir(tmp_path / "policy")) == ["adapter_config.json", "adapter_model.safetensors"]
    _, other = plain_and_lora(tok)  # same base, zero-B adapters
    lora.load_adapters(other, tmp_path / "policy")
    for (n, p), (_, q) in zip(pm.named_parameters(), other.named_parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(other(input_ids=ids()).logits, pm(input_ids=ids()).logits)
    # load_weights_into, the trainer's resume call, takes the same path for a LoRA model
    from finegrain.models.load import load_weights_into

    _, third = plain_and_lora(tok)
    load_weights_into(third, tmp_path / "policy")
    assert torch.equal(third(input_ids=ids()).logits, pm(input_ids=ids()).logits)


def test_adapters_of_another_shape_are_refused_in_one_line(tok, tmp_path):
    _, pm = plain_and_lora(tok, r=4)
    lora.save_adapters(pm, tmp_path / "a")
    _, r8 = plain_and_lora(tok, r=8)
    with pytest.raises(ValueError) as e:
        lora.load_adapters(r8, tmp_path / "a")
    assert "r 4 (model: 8)" in str(e.value) and "\n" not in str(e.value)
    _, fewer = plain_and_lora(tok, r=4, targets=["q_proj"])
    with pytest.raises(ValueError, match="target_modules"):
        lora.load_adapters(fewer, tmp_path / "a")


def test_adapter_loading_is_safe(tok, tmp_path):
    _, pm = plain_and_lora(tok)
    lora.save_adapters(pm, tmp_path / "ok")
    _, model = plain_and_lora(tok)
    # a weights file that is a symlink out of the checkpoint directory is refused
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((tmp_path / "ok" / "adapter_model.safetensors").read_bytes())
    (evil / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        lora.load_adapters(model, evil)
    # only safetensors: a pickle file (adapter_model.bin) is never read
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    torch.save(dict(pm.state_dict()), binary / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        lora.load_adapters(model, binary)
    # a config that is not JSON, and a full-weight directory, get one line each
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lora.load_adapters(model, bad)
    full = tmp_path / "full"
    tiny_causal_lm(tok, size="micro").save_pretrained(full)
    with pytest.raises(ValueError, match="full model weights, not LoRA adapters"):
        lora.load_adapters(model, full)
    # and an adapter directory into a model without adapters
    from finegrain.models.load import load_weights_into

    with pytest.raises(ValueError, match="holds LoRA adapters"):
        load_weights_into(tiny_causal_lm(tok, size="micro"), tmp_path / "ok")


def test_saving_refuses_a_trained_base(tok, tmp_path):
    _, pm = plain_and_lora(tok)
    next(p for n, p in pm.named_parameters() if "embed_tokens" in n).requires_grad_(True)
    with pytest.raises(ValueError, match="embed_tokens.*trainable"):
        lora.save_adapters(pm, tmp_path / "x")


def test_checkpoint_check_accepts_an_adapter_directory(tok, tmp_path):
    from finegrain.train.checkpoint import check_checkpoint, save_checkpoint

    _, pm = plain_and_lora(tok)
    ck = save_checkpoint(tmp_path, 3, {"policy": (pm, tok)}, {"config": {}})
    assert sorted(os.listdir(ck / "policy")) == ["adapter_config.json", "adapter_model.safetensors",
                                                 "tokenizer.json", "tokenizer_config.json"]
    state, why = check_checkpoint(ck, ("policy",))
    assert why is None and state["step"] == 3
    (ck / "policy" / "adapter_model.safetensors").unlink()
    state, why = check_checkpoint(ck, ("policy",))
    assert state is None and "policy/" in why


# ------------------------------------------------------------------------------- merged, critic


def test_merge_and_unwrap_gives_a_plain_model_with_the_engine_weights(tok):
    _, pm = plain_and_lora(tok)
    randomise_adapters(pm)
    want = {n: t.clone() for n, t in engine_weights(pm)}
    plain = lora.merge_and_unwrap(pm)
    assert not lora.is_lora(plain) and type(plain).__name__ == "Qwen2ForCausalLM"
    sd = plain.state_dict()
    assert list(sd) == list(want) and all(torch.equal(sd[n], t) for n, t in want.items())


def test_the_critic_copies_the_base_without_adapters(tok):
    from finegrain.models.value import ValueModel

    plain, pm = plain_and_lora(tok)
    randomise_adapters(pm)
    vm = ValueModel.from_policy(pm)
    names = [n for n, _ in vm.named_parameters()]
    assert not any("lora_" in n or "base_layer" in n for n in names)
    want = ValueModel.from_policy(plain)
    for (n, p), (_, q) in zip(vm.named_parameters(), want.named_parameters()):
        assert torch.equal(p, q), n
        assert p.requires_grad
    policy_ptrs = {p.data_ptr() for p in pm.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in vm.parameters()}   # shares nothing
    mask = torch.ones_like(ids(), dtype=torch.bool)
    assert torch.equal(vm(ids(), mask, 3), want(ids(), mask, 3))


def test_adapter_config_is_plain_json(tok, tmp_path):
    _, pm = plain_and_lora(tok, r=4, alpha=8.0)
    lora.save_adapters(pm, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (4, 8.0, sorted(TARGETS))


def test_merged_copy_leaves_the_policy_and_shares_nothing(tok):
    _, pm = plain_and_lora(tok)
    randomise_adapters(pm)
    before = {n: t.clone() for n, t in pm.state_dict().items()}
    want = dict(engine_weights(pm))
    plain = lora.merged_copy(pm)
    assert lora.is_lora(pm) and not lora.is_lora(plain)
    assert all(torch.equal(plain.state_dict()[n], t) for n, t in want.items())
    assert all(torch.equal(pm.state_dict()[n], t) for n, t in before.items())
    assert not {p.data_ptr() for p in pm.parameters()} & {p.data_ptr() for p in plain.parameters()}


def test_probes_through_the_reference_are_the_base_models(tok):
    # probe-based rewards (rlpr, r3, ...) score with ctx.initial_policy(): packed and plain paths
    from finegrain.models.probe import packs, probe_logprobs

    plain, pm = plain_and_lora(tok)
    randomise_adapters(pm)
    ref = lora.FrozenBase(pm)
    assert packs(ref) == packs(plain)
    contexts = [[1, 5, 7, 2], [1, 5, 7, 2, 9], [3, 3, 4]]
    conts = [[4, 6], [8], [2, 2, 1]]
    for share in (True, False):
        got = probe_logprobs(ref, contexts, conts, pad_token_id=tok.pad_token_id, share_prefix=share)
        want = probe_logprobs(plain, contexts, conts, pad_token_id=tok.pad_token_id, share_prefix=share)
        moved = probe_logprobs(pm, contexts, conts, pad_token_id=tok.pad_token_id, share_prefix=share)
        for g, w, m in zip(got, want, moved):
            # equal up to float32 rounding: peft's disabled-adapter forward may order the base
            # layer's ops differently from the plain model's (bitwise equality held with older peft)
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        assert any((m - w).abs().max() > 1e-3 for m, w in zip(moved, want))
