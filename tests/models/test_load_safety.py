"""Model loading never runs a directory's code, never prompts, and never sends a typo to the Hub."""

import builtins
import json

import pytest

from finegrain.models.load import check_model_path, load_causal_lm, load_pretrained


@pytest.fixture
def no_prompt(monkeypatch):
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("an interactive prompt was shown"))


def _remote_code_dir(tmp_path):
    """A model directory whose config asks for its own Python code (auto_map, unknown model_type);
    importing that code would create ``marker``."""
    d, marker = tmp_path / "evil", tmp_path / "code_ran"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "finegrain_evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel",
                     "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (d / name).write_text(payload)
    (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    return d, marker


@pytest.mark.parametrize("loader", [load_causal_lm, load_pretrained])
def test_remote_code_is_refused_without_prompt_or_execution(tmp_path, no_prompt, loader):
    d, marker = _remote_code_dir(tmp_path)
    with pytest.raises(ValueError) as e:
        loader(str(d), device="cpu")
    msg = str(e.value)
    assert msg.startswith(f"model.path: cannot load a ") and "\n" not in msg
    assert "trust_remote_code" in msg
    assert not marker.exists()


def test_trust_remote_code_is_a_config_field_defaulting_to_false():
    from finegrain.config import load_config

    assert load_config(None).model.trust_remote_code is False
    assert load_config(None, ["model.trust_remote_code=true"]).model.trust_remote_code is True


@pytest.mark.parametrize("path", ["./runs/typo", "../nope/model", "/no/such/dir", "~/nope-model", "a/b/c", "model/"])
def test_path_like_values_that_do_not_exist_are_not_hub_ids(path):
    with pytest.raises(FileNotFoundError, match=r"^model.path: .*: no such directory"):
        check_model_path("model.path", path)


def test_existing_parent_makes_a_two_part_name_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'runs/demo-grpo': no such directory \('runs/' is a local directory"):
        check_model_path("model.path", "runs/demo-grpo")
    assert check_model_path("model.path", "Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_hub_offline_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("tried the network"))
    with pytest.raises(ValueError) as e:
        load_pretrained("someone/not-cached", device="cpu")
    assert str(e.value).startswith("model.path: cannot load a tokenizer from 'someone/not-cached'")
    assert "\n" not in str(e.value)


def test_the_payload_is_real_code_that_runs_when_the_user_trusts_it(tmp_path, no_prompt):
    """The control for the refusal above: with trust_remote_code=True the directory's code does run
    (the stub defines no classes, so loading then fails), so the refusal is the flag's doing."""
    d, marker = _remote_code_dir(tmp_path)
    with pytest.raises(Exception):
        load_causal_lm(str(d), device="cpu", trust_remote_code=True)
    assert marker.exists()
