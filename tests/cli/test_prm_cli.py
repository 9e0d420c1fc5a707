"""`finegrain prm train|score` end to end on a micro model, and its one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finegrain.cli import prm_cmd
from finegrain.cli.prm_cmd import main
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from tests import helpers

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "prm_arith_sample.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = char_tokenizer("0123456789+-*=:AQ \n")
    d = tmp_path_factory.mktemp("micro")
    tiny_causal_lm(tok, size="micro", seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def error_line(capsys, argv):
    """Run the CLI expecting a usage/data error: exit status 2 and one stderr line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "it/s" not in ln]
    return lines[-1]


def test_train_then_score_the_example_file(tmp_path, model_dir, capsys):
    out = tmp_path / "prm"
    main(["train", "--data", str(SAMPLE), "--model", str(model_dir), "--out", str(out), "--loss", "dpo",
          "--beta", "0.5", "--lr", "1e-3", "--epochs", "2", "--batch-size", "8", "--no-progress"])
    assert "PRM saved to" in capsys.readouterr().out
    log = [json.loads(ln) for ln in (out / "prm_metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2] and log[0]["fit/n_pairs"] == 20
    info = json.loads((out / "finegrain_prm.json").read_text())
    assert info["ref"] == str(model_dir.resolve()) and info["beta"] == 0.5 and info["loss"] == "dpo"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()

    scored = tmp_path / "scores" / "s.jsonl"                           # --ref and --beta from finegrain_prm.json
    main(["score", "--data", str(SAMPLE), "--prm", str(out), "--out", str(scored), "--aggregate", "sum",
          "--no-progress"])
    rows_in = [json.loads(ln) for ln in SAMPLE.read_text().splitlines()]
    rows_out = [json.loads(ln) for ln in scored.read_text().splitlines()]
    assert len(rows_out) == len(rows_in) == 40
    for a, b in zip(rows_in, rows_out):
        assert {k: b[k] for k in a} == a                                # input fields (id, step_labels...) kept
        assert len(b["tokens"]) == len(b["token_rewards"]) == len(b["response"]) + 1  # chars + EOS
        assert "".join(b["tokens"][:-1]) == b["response"]
        assert len(b["step_rewards"]) == len(b["step_spans"]) == len(a["step_labels"])  # one line = one step
        assert b["sequence_score"] == pytest.approx(sum(b["step_rewards"]), abs=1e-5)
        # seq_sum also counts the EOS, which is in no step
        assert b["seq_sum"] == pytest.approx(b["sequence_score"] + b["token_rewards"][-1], abs=1e-5)
    assert any(abs(r) > 0 for b in rows_out for r in b["token_rewards"])


def test_score_with_explicit_ref_equal_to_prm_gives_zeros(tmp_path, model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 1+1\n", "response": "1+1=2\nA: 2"}) + "\n")  # no label needed
    out = tmp_path / "s.jsonl"
    main(["score", "--data", str(data), "--prm", str(model_dir), "--ref", str(model_dir), "--out", str(out),
          "--no-progress"])
    row = json.loads(out.read_text())
    assert set(row["token_rewards"]) == {0.0} and row["step_rewards"] == [0.0, 0.0] and "label" not in row


def test_errors_are_one_line_naming_the_flag_or_file(tmp_path, model_dir, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "Q: 1\n", "response": "A: 1", "label": 1}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps({"prompt": "Q: 1\n", "response": "A: 2", "label": "no"}) + "\n")
    base = ["--model", str(model_dir), "--out", str(tmp_path / "o")]

    line = error_line(capsys, ["train", "--data", str(tmp_path / "missing.jsonl"), *base])
    assert "missing.jsonl" in line and line.startswith("finegrain prm: error:")
    line = error_line(capsys, ["train", "--data", str(bad), *base])
    assert f"{bad}:2: field 'label' expected 0/1" in line
    assert "--model" in error_line(capsys, ["train", "--data", str(good), "--model", str(tmp_path / "nomodel"),
                                            "--out", str(tmp_path / "o")])
    assert "--ref" in error_line(capsys, ["train", "--data", str(good), *base, "--ref", str(tmp_path / "noref")])
    # a directory without config.json
    assert "--ref" in error_line(capsys, ["train", "--data", str(good), *base, "--ref", str(tmp_path)])
    assert "--beta" in error_line(capsys, ["train", "--data", str(good), *base, "--beta", "-1"])
    assert "--loss" in error_line(capsys, ["train", "--data", str(good), *base, "--loss", "kto"])
    assert "--segmenter" in error_line(capsys, ["train", "--data", str(good), *base, "--segmenter", "words"])
    # a directory with no finegrain_prm.json does not say which reference to use
    line = error_line(capsys, ["score", "--data", str(good), "--prm", str(model_dir), "--out", str(tmp_path / "s")])
    assert line.startswith("finegrain prm: error: --ref: required")
    assert "--aggregate" in error_line(capsys, ["score", "--data", str(good), "--prm", str(model_dir),
                                                "--ref", str(model_dir), "--out", str(tmp_path / "s"),
                                                "--aggregate", "max"])


def test_module_entry_point_reports_missing_file(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "finegrain.cli.prm_cmd", "score", "--data", str(tmp_path / "x.jsonl"),
                        "--prm", "p", "--ref", "r", "--out", str(tmp_path / "s.jsonl")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"finegrain prm: error: --data: '{tmp_path / 'x.jsonl'}': no such file"]


# ------------------------------------------------------------------ paths checked before the work


class Loaded(Exception):
    """Raised by the spy loader: the command got as far as loading a model."""


@pytest.fixture
def loads(monkeypatch):
    """Replace the command's model loader (prm_cmd._load) with a spy that records and stops."""
    calls = []

    def spy(flag, path, device, **kw):
        calls.append((flag, path))
        raise Loaded(flag)
    monkeypatch.setattr(prm_cmd, "_load", spy)
    return calls


def only_error_line(capsys, argv):
    return helpers.only_error_line(capsys, main, argv)


def test_spy_sees_the_loader_when_the_paths_are_good(tmp_path, model_dir, loads):
    # control for the tests below: with good paths the spy is reached, so "never called" means something
    with pytest.raises(Loaded):
        main(["score", "--data", str(SAMPLE), "--prm", str(model_dir), "--ref", str(model_dir),
              "--out", str(tmp_path / "new" / "s.jsonl"), "--no-progress"])
    with pytest.raises(Loaded):
        main(["train", "--data", str(SAMPLE), "--model", str(model_dir), "--out", str(tmp_path / "new" / "prm"),
              "--no-progress"])
    assert loads == [("--prm", str(model_dir)), ("--model", str(model_dir))]
    assert not (tmp_path / "new").exists()                       # checked, not created, before the work


def bad_outputs(tmp_path):
    """(command, --out, what the error says after the quoted path) that no process can write, root included."""
    f = tmp_path / "file.txt"
    f.write_text("keep")
    d = tmp_path / "existing_dir"
    d.mkdir()
    under_file = f": cannot be created, '{f}' is not a directory"
    return [("score", d, " is a directory; expected a file path"),
            ("score", f / "s.jsonl", under_file),
            ("score", f / "sub" / "s.jsonl", under_file),
            ("train", f, " exists and is not a directory"),
            ("train", f / "out", under_file)]


def test_bad_out_fails_in_one_line_before_any_model_loads(tmp_path, model_dir, loads, capsys):
    for cmd, out, problem in bad_outputs(tmp_path):
        model = ["--prm", str(model_dir), "--ref", str(model_dir)] if cmd == "score" else ["--model", str(model_dir)]
        line = only_error_line(capsys, [cmd, "--data", str(SAMPLE), *model, "--out", str(out), "--no-progress"])
        assert line == f"finegrain prm: error: --out: '{out}'{problem}", (cmd, line)
    assert loads == []
    assert (tmp_path / "file.txt").read_text() == "keep"


def test_bad_inputs_fail_before_any_model_loads(tmp_path, model_dir, loads, capsys):
    out = ["--out", str(tmp_path / "s.jsonl")]
    line = only_error_line(capsys, ["score", "--data", str(tmp_path), "--prm", str(model_dir), *out])
    assert line == f"finegrain prm: error: --data: '{tmp_path}' is a directory; expected a file"
    # the reference is checked before the PRM is loaded, both when given and when recorded at training
    line = only_error_line(capsys, ["score", "--data", str(SAMPLE), "--prm", str(model_dir),
                                    "--ref", str(tmp_path / "noref"), *out])
    assert line.startswith(f"finegrain prm: error: --ref: '{tmp_path / 'noref'}': no such directory")
    prm = tmp_path / "prm"
    prm.mkdir()
    (prm / "config.json").write_text("{}")
    (prm / "finegrain_prm.json").write_text(json.dumps({"ref": str(tmp_path / "gone")}))
    line = only_error_line(capsys, ["score", "--data", str(SAMPLE), "--prm", str(prm), *out])
    assert line.startswith(f"finegrain prm: error: --ref: '{tmp_path / 'gone'}': no such directory")
    (prm / "finegrain_prm.json").write_text("{not json")
    line = only_error_line(capsys, ["score", "--data", str(SAMPLE), "--prm", str(prm), *out])
    assert line.startswith(f"finegrain prm: error: --prm: cannot read '{prm / 'finegrain_prm.json'}'")
    line = only_error_line(capsys, ["score", "--data", str(SAMPLE), "--prm", str(SAMPLE), "--ref", str(model_dir),
                                    *out])
    assert line.startswith(f"finegrain prm: error: --prm: '{SAMPLE}' is not a directory")
    line = only_error_line(capsys, ["train", "--data", str(SAMPLE), "--model", str(model_dir),
                                    "--ref", str(tmp_path / "noref"), "--out", str(tmp_path / "o")])
    assert line.startswith(f"finegrain prm: error: --ref: '{tmp_path / 'noref'}': no such directory")
    assert loads == [] and not (tmp_path / "s.jsonl").exists() and not (tmp_path / "o").exists()


def test_score_crash_mid_write_keeps_the_previous_output(tmp_path, model_dir, monkeypatch):
    from finegrain.rewards.prm_data import PRMRow

    out = tmp_path / "s.jsonl"
    argv = ["score", "--data", str(SAMPLE), "--prm", str(model_dir), "--ref", str(model_dir), "--out", str(out),
            "--no-progress"]
    main(argv)
    good = out.read_text()
    assert len(good.splitlines()) == 40
    real, seen = PRMRow.to_json, []

    def dies_on_the_third_row(self):
        seen.append(1)
        if len(seen) == 3:
            raise RuntimeError("killed mid-write")
        return real(self)
    monkeypatch.setattr(PRMRow, "to_json", dies_on_the_third_row)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        main(argv)
    assert len(seen) == 3                                         # two rows were written, then the crash
    assert out.read_text() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]  # no temporary file left behind
