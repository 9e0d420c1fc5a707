"""Fuzz-style validation: bad configs generated from the config's own field declarations each stop
with one line naming the field, before any work (here: through the CLI's `finegrain config`)."""

import dataclasses
import math

import pytest

from finegrain.cli.main import main
from finegrain.config import RunConfig, _dataclass_type
from finegrain.ranges import parse_range


def _numeric_fields(cls=RunConfig, prefix=""):
    """(dotted key, python type, range spec or None) for every numeric field, recursively."""
    for f in dataclasses.fields(cls):
        t = f.type if not isinstance(f.type, str) else {"int": int, "float": float}.get(f.type)
        sub = _dataclass_type(f)
        if sub is not None:
            yield from _numeric_fields(sub, f"{prefix}{f.name}.")
        elif t in (int, float):
            yield f"{prefix}{f.name}", t, f.metadata.get("range")


def _bad_values(t, spec):
    """Values outside the declared range (and non-finite ones), formatted as YAML overrides."""
    out = [".nan", ".inf", "-.inf"] if t is float else []
    out.append("'text'")
    if spec is not None:
        lo, hi, lo_in, hi_in = parse_range(spec)
        if math.isfinite(lo):
            out.append(repr(lo if not lo_in else (lo - 1 if t is int else lo - 0.5)))
        if math.isfinite(hi):
            out.append(repr(hi if not hi_in else (hi + 1 if t is int else hi + 0.5)))
    return out


GENERATED = [(key, f"{key}={v}") for key, t, spec in _numeric_fields() for v in _bad_values(t, spec)]
HANDWRITTEN = [
    ("optim.betas", "optim.betas=[0.9]"), ("optim.betas", "optim.betas=[0.9, 1.0]"),
    ("optim.betas", "optim.betas=[.nan, 0.9]"), ("train.resume", "train.resume=sometimes"),
    ("loss.aggregation_constant", "loss.aggregation_constant=-3"),
    ("loss.aggregation_constant", "loss.aggregation_constant=.inf"),
    ("rewards[0].weight", "rewards=[{name: verifier, weight: .nan}]"),
    ("rewards[0].kwargs.correct", "rewards=[{name: verifier, kwargs: {correct: .inf}}]"),
    ("loss.kwargs.clip_low", "loss.kwargs={clip_low: -0.1}"), ("loss.kwargs.clip_low", "loss.kwargs={clip_low: 1.5}"),
    ("loss.kwargs.dual_clip_c", "loss.kwargs={dual_clip_c: 0.5}"),
    ("advantage.kwargs.eps", "advantage.kwargs={eps: 0}"),
    ("advantage.name", "rollout.group_size=1"),
    ("filters.filters[0]", "filters.filters=[{name: zero_variance}] ; rollout.group_size=1"),
    ("filters.filters[0].kwargs.low", "filters.filters=[{name: accuracy_band, kwargs: {low: -1}}]"),
    ("filters.filters[0].kwargs", "filters.filters=[{name: accuracy_band, kwargs: {low: 0.9, high: 0.1}}]"),
    ("train.out_dir", "train.out_dir=''"), ("train.wandb_mode", "train.wandb_mode=loud"),
    ("rollout.temperature", "rollout.temperature=0"),
    ("optim.betas", "optim.betas=[0.9,"),  # not valid YAML
]


def test_enough_generated_cases():
    assert len(GENERATED) + len(HANDWRITTEN) >= 50 and len({k for k, _ in GENERATED}) >= 30


@pytest.mark.parametrize("field,override", GENERATED + HANDWRITTEN)
def test_bad_config_gives_one_line_naming_the_field(field, override, capsys):
    with pytest.raises(SystemExit) as e:
        main(["config", *override.split(" ; ")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"finegrain: error: {field}"), err
