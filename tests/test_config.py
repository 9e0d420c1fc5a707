from pathlib import Path

import pytest
import yaml

from finegrain.cli.main import demo_config, main
from finegrain.config import RunConfig, describe, dump_config, from_dict, load_config, to_dict
from finegrain.registry import Registry

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))


def test_registry_duplicate_and_unknown():
    r = Registry("thing")
    r.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="registered twice"):
        r.register("a")(lambda: 2)
    with pytest.raises(KeyError, match="available: a"):
        r.get("b")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_configs_exist():
    assert len(CONFIGS) >= 3


def test_demo_config_matches_shipped_yaml():
    shipped = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml")
    assert to_dict(shipped) == to_dict(demo_config("grpo"))


def test_yaml_roundtrip(tmp_path):
    cfg = load_config(None, ["train.steps=7", "rollout.temperature=0.5", "advantage.kwargs={scale_by_std: false}"])
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg) and again.train.steps == 7 and again.advantage.kwargs == {"scale_by_std": False}


@pytest.mark.parametrize("override,match", [
    ("rollout.temprature=0.5", r"^rollout.temprature: unknown key; allowed: engine, prompts_per_step"),
    ("train.steps=ten", r"^train.steps: expected an integer, got 'ten'"),
    ("advantage.name=gpro", r"^advantage.name: expected one of .*grpo"),
    ("advantage.kwargs={scale_by_sd: false}", r"^advantage.kwargs: unknown key 'scale_by_sd' for advantage estimator 'grpo'; allowed: scale_by_std, eps"),
    ("loss.aggregation=mean", r"^loss.aggregation: expected one of"),
    ("rollout.top_p=1.5", r"^rollout.top_p: expected a number in \(0, 1\], got 1.5"),
    ("train.minibatches=3", r"must divide the batch"),
    ("rewards=[{name: verifier, wieght: 2}]", r"^rewards\[0\].wieght: unknown key"),
    ("advantage.kwargs={scale_by_std: maybe}", r"^advantage.kwargs.scale_by_std: expected bool, got 'maybe'"),
    ("loss.kwargs={clip_high: high}", r"^loss.kwargs.clip_high: expected float, got 'high'"),
    ("loss.kwargs={dual_clip_c: 3}", None),
])
def test_bad_values_fail_with_one_line(override, match):
    if match is None:  # a valid value (an int where a float | None is declared) passes
        load_config(None, [override])
        return
    with pytest.raises(ValueError, match=match) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_cli_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", str(CONFIGS[0]), "train.stepz=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("finegrain: error: train.stepz: unknown key") and "\n" not in err


def test_help_config_documents_every_field(capsys):
    main(["train", "--help-config"])
    out = capsys.readouterr().out
    for key in ("rollout.temperature", "advantage.per_source", "loss.aggregation", "train.ppo_epochs", "filters.outcome"):
        assert key in out
    assert all("\n    " in line and line.split("\n    ")[1].strip() for line in describe())


def test_per_source_needs_an_entry_for_the_kl_penalty_source():
    from finegrain.cli.main import demo_config
    from finegrain.config import validate

    cfg = demo_config("prime")
    cfg.loss.kl_coef, cfg.loss.kl_mode = 0.01, "reward"
    with pytest.raises(ValueError, match=r"no estimator for reward source\(s\) \['kl_penalty'\]"):
        validate(cfg)
    cfg.advantage.per_source["kl_penalty"] = {"name": "prime_rloo", "kwargs": {"reward_at": "token"}}
    validate(cfg)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "{}\n"])
def test_empty_config_file_is_refused_not_a_default_run(tmp_path, capsys, text):
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    with pytest.raises(ValueError, match=r"empty.yaml: empty; start from a file in configs/"):
        load_config(empty)
    with pytest.raises(SystemExit) as e:
        main(["train", str(empty)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "empty; start from" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text,match", [("- a\n- b\n", "expected a mapping of sections"), ("3\n", "expected a mapping")])
def test_config_file_that_is_not_a_mapping_is_refused(tmp_path, text, match):
    bad = tmp_path / "list.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(bad)


def test_the_implicit_prm_is_configured_in_one_place():
    """Its settings are its reward's kwargs, checked like any registry kwargs; the old root
    section is refused with a pointer to the new place."""
    cfg = load_config(None, ["rewards=[{name: implicit_prm, kwargs: {beta: 0.1, lr: 3.0e-5, update: before}}]",
                             "advantage.name=prime_rloo"])
    assert cfg.rewards[0].kwargs == {"beta": 0.1, "lr": 3e-5, "update": "before"}
    with pytest.raises(ValueError, match=r"^prm: the implicit PRM's settings .* moved to the kwargs of its reward"):
        load_config(None, ["prm.beta=0.1"])
    with pytest.raises(ValueError, match=r"^rewards\[0\].kwargs.update: expected one of after \| before \| none, got 'later'"):
        load_config(None, ["rewards=[{name: implicit_prm, kwargs: {update: later}}]", "advantage.name=prime_rloo"])
    with pytest.raises(ValueError, match=r"^rewards\[0\].kwargs.lr: expected a number in \(0, inf\), got 0"):
        load_config(None, ["rewards=[{name: implicit_prm, kwargs: {lr: 0}}]", "advantage.name=prime_rloo"])


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 loads 3e-4 as the string '3e-4'; finegrain reads it as the number in a config
    file, in a key=value override and inside a registry entry's kwargs."""
    from finegrain.config import load_yaml, parse_override

    assert load_yaml("lr: 3e-4\nb: -1E+5\nc: .5e-3\nname: e5\nraw: '3e-4'") == \
        {"lr": 3e-4, "b": -1e5, "c": 5e-4, "name": "e5", "raw": "3e-4"}  # a quoted value stays a string
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 3e-4)
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 3e-4\n")
    assert load_config(p, ["rollout.temperature=7e-1"]).optim.lr == 3e-4
    assert load_config(p, ["rollout.temperature=7e-1"]).rollout.temperature == 0.7
    cfg = load_config(p, ["rewards=[{name: implicit_prm, kwargs: {lr: 2e-5}}]", "advantage.name=prime_rloo"])
    assert cfg.rewards[0].kwargs["lr"] == 2e-5 and isinstance(cfg.rewards[0].kwargs["lr"], float)


@pytest.mark.parametrize("method", sorted(__import__("finegrain.recipes", fromlist=["DEMO_METHODS"]).DEMO_METHODS))
def test_every_demo_recipe_validates(method):
    """Each `finegrain demo --method` config passes validation (registries, ranges, level checks)."""
    from finegrain.config import validate

    validate(demo_config(method))
