"""End-to-end tests of ``finegrain eval`` (finegrain.cli.eval_cmd) on tiny random models saved to
disk: the arith task with a character tokenizer, GSM8K prompts with a locally trained BPE
tokenizer and a tiny Qwen2, run directories, and one-line errors."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from finegrain.cli import eval_cmd
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer, train_bpe_tokenizer
from finegrain.tasks import TASKS


def run_cli(argv):
    ap = argparse.ArgumentParser(prog="finegrain")
    eval_cmd.add_parser(ap.add_subparsers(dest="cmd"))
    return eval_cmd.run(ap.parse_args(["eval", *argv]))


def save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def arith_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("arith")
    tok = char_tokenizer(sorted(set("0123456789+-*=QA: \n")))
    return (save(tiny_causal_lm(tok, size="micro", seed=0), tok, root / "policy"),
            save(tiny_causal_lm(tok, size="micro", seed=1), tok, root / "ref"))


def close(a, b):
    assert a == pytest.approx(b, rel=1e-6, abs=1e-9)


def test_eval_arith_end_to_end(arith_models, tmp_path):
    policy, ref = arith_models
    out = tmp_path / "report"
    m = run_cli(["--model", policy, "--task", "arith", "--task-kwargs", '{"min_steps": 2, "max_steps": 3}',
                 "--n-problems", "4", "--samples", "4", "--max-new-tokens", "20", "--chunk-problems", "3",
                 "--scorers", "verifier,implicit_prm,random,step_labels", "--prm-ref", ref,
                 "--reward-kwargs", '{"random": {"seed": 7}}',
                 "--search", "beam,early_reject", "--search-beams", "2,4", "--beam-width", "2", "--tau", "3",
                 "--max-steps", "3", "--search-problems", "2", "--html-problems", "2", "--no-chat-template",
                 "--out", str(out), "--quiet"])
    for name in ("metrics.json", "samples.jsonl", "report.html", "bon_vs_n.png", "aggregations.png",
                 "vote_vs_n.png", "tokens.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["curves"]["Ns"] == [1, 2, 4]
    c, acc = m["curves"], m["accuracy"]["mean"]
    # identities that hold for any model: at N = 1 every selector is a uniform pick;
    # best-of-N with the verifier as oracle is pass@N; the random expectation is flat
    for name, ys in c["bon"].items():
        close(ys[0], acc)
    for a, b in zip(c["bon"]["verifier"], c["pass_at"]):
        close(a, b)
    for y in c["random_expected"]:
        close(y, acc)
    assert set(c["bon_by_aggregation"]) == {"implicit_prm", "step_labels"}
    assert set(c["bon_by_aggregation"]["implicit_prm"]) == {"min", "sum", "last", "mean", "product"}
    assert set(c["weighted_vote"]) == {"verifier", "implicit_prm", "random", "step_labels"}
    assert set(m["process"]["scorers"]) == {"verifier", "implicit_prm", "random", "step_labels"}
    assert m["meta"]["prm"] == policy and m["meta"]["prm_ref"] == ref and m["meta"]["beta"] == 0.05
    # each scorer's kwargs: the registry's eval defaults under --reward-kwargs
    assert m["meta"]["reward_kwargs"]["step_labels"] == {"correct": 1.0, "wrong": 0.0}
    assert m["meta"]["reward_kwargs"]["random"] == {"seed": 7}
    assert m["meta"]["reward_kwargs"]["implicit_prm"]["update"] == "none"
    # searches: every (method, N), guided by the first step-level scorer
    s = m["search"]
    assert s["scorer"] == "implicit_prm" and s["n_problems"] == 2
    assert s["aggregation"] == "sum"  # the implicit PRM values a prefix by its Q-value
    assert [(r["method"], r["n_beams"], r["tau"]) for r in s["runs"]] == [
        ("beam", 2, None), ("beam", 4, None), ("early_reject", 2, 3), ("early_reject", 4, 3)]
    assert all(r["tokens_per_problem"] > 0 for r in s["runs"])
    # records: 4 problems x 4 samples, labels aligned with the steps
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted((r["problem"], r["sample"]) for r in recs) == [(p, k) for p in range(4) for k in range(4)]
    for r in recs:
        assert len(r["step_labels"]) == len(r["step_spans"]) == len(r["step_scores"]["implicit_prm"])
    page = (out / "report.html").read_text()
    assert page.count('class="solution verified-') == 8  # 2 problems shown x 4 samples
    assert page.count('class="tok"') > 0  # token-level colouring by the implicit PRM


def test_run_directory_resolves_latest_policy_and_initial_reference(arith_models, tmp_path):
    policy, ref = arith_models
    run = tmp_path / "run"
    ck = run / "checkpoints" / "step_000002"
    shutil.copytree(policy, ck / "policy")
    torch.save({"step": 2}, ck / "state.pt")
    (run / "checkpoints" / "latest").write_text("step_000002")
    (run / "config.yaml").write_text("task:\n  name: arith\n  kwargs: {min_steps: 2, max_steps: 2}\n")
    (run / "report.json").write_text(json.dumps({"init": {"path": ref}}))
    m = run_cli(["--model", str(run), "--n-problems", "2", "--samples", "2", "--max-new-tokens", "12",
                 "--scorers", "implicit_prm", "--no-chat-template", "--out", str(tmp_path / "o"), "--quiet"])
    assert m["meta"]["model"] == str(ck / "policy")
    assert m["meta"]["prm"] == str(ck / "policy") and m["meta"]["prm_ref"] == ref  # no PRM trained: the policy
    assert m["meta"]["task"] == "arith" and m["meta"]["task_kwargs"] == {"min_steps": 2, "max_steps": 2}


@pytest.mark.parametrize("extra,flag", [
    (["--model", "/nonexistent/model"], "--model"),
    (["--scorers", "verifier,nope"], "--scorers"),
    (["--scorers", "overlong"], "--scorers"),
    (["--search", "beam", "--search-scorer", "step_oracle"], "'step_labels'"),
    (["--reward-kwargs", "{bad"], "--reward-kwargs"),
    (["--reward-kwargs", '{"step_labels": {"correct": 1}}'], "--reward-kwargs"),
    (["--reward-kwargs", '{"verifier": {"right": 1}}'], "--reward-kwargs"),
    (["--reward-kwargs", '{"implicit_prm": {"beta": 0.1}}', "--scorers", "implicit_prm", "--beta", "0.2"], "--beta"),
    (["--task-kwargs", "{bad"], "--task-kwargs"),
    (["--task-kwargs", '{"min_steps": 0}'], "min_steps"),
    (["--scorers", "implicit_prm"], "--prm-ref"),
    (["--search", "beam,dfs"], "--search"),
    (["--samples", "0"], "--samples"),
    (["--search", "beam", "--scorers", "verifier"], "--search"),
    (["--task", "chess"], "--task"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--beta", "-1"], "--beta"),
    (["--top-k", "-2"], "--top-k"),
])
def test_errors_are_one_line_naming_the_flag(arith_models, tmp_path, capsys, extra, flag):
    argv = ["--model", arith_models[0], "--n-problems", "1", "--samples", "1", "--out", str(tmp_path), "--quiet"]
    with pytest.raises(SystemExit) as exc:
        run_cli(argv + extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("finegrain eval: error:") and flag in err, err


@pytest.mark.parametrize("old,new", [("oracle", "verifier"), ("step_oracle", "step_labels")])
def test_old_scorer_names_point_to_the_new_reward(arith_models, tmp_path, capsys, old, new):
    with pytest.raises(SystemExit) as exc:
        run_cli(["--model", arith_models[0], "--scorers", f"{old},random", "--out", str(tmp_path), "--quiet"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"finegrain eval: error: --scorers: '{old}' is now the reward '{new}'; use --scorers {new}"]


def test_eval_gsm8k_with_bpe_qwen2(tmp_path):
    task = TASKS.get("gsm8k")()
    train = task.examples("train", 300)
    tok = train_bpe_tokenizer([ex.prompt + "\n" + ex.solution for ex in train], vocab_size=512)
    policy = save(tiny_causal_lm(tok, family="qwen2", size="micro", seed=0), tok, tmp_path / "policy")
    ref = save(tiny_causal_lm(tok, family="qwen2", size="micro", seed=1), tok, tmp_path / "ref")
    out = tmp_path / "report"
    m = run_cli(["--model", policy, "--task", "gsm8k", "--n-problems", "2", "--samples", "2",
                 "--max-new-tokens", "12", "--scorers", "verifier,implicit_prm,random", "--prm-ref", ref,
                 "--search", "beam", "--search-beams", "2", "--beam-width", "2", "--max-steps", "2",
                 "--out", str(out), "--quiet"])
    assert m["meta"]["task"] == "gsm8k" and m["accuracy"]["n"] == 4
    assert m["search"]["runs"][0]["tokens_per_problem"] > 0
    page = (out / "report.html").read_text()
    first = task.examples("test", 1)[0].prompt
    assert first[:40].replace("'", "&#x27;") in page or first[:20] in page
    assert page.count('class="solution verified-') == 4
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(r["step_labels"] is not None and len(r["step_labels"]) == len(r["step_spans"]) for r in recs)


# ------------------------------------------------------------ --out checked before any work


class Loaded(Exception):
    """Raised by the spy loaders: the command got as far as loading a model."""


@pytest.fixture
def loads(monkeypatch):
    """Spy on every way ``finegrain eval`` loads a model or runs the evaluation: record, then stop."""
    import finegrain.eval.experiment
    import finegrain.models.load

    calls = []

    def spy(name):
        def f(*args, **kwargs):
            calls.append((name, args[0] if args else None))
            raise Loaded(name)
        return f
    monkeypatch.setattr(finegrain.models.load, "load_pretrained", spy("load_pretrained"))
    monkeypatch.setattr(eval_cmd, "_load_model_only", spy("_load_model_only"))
    monkeypatch.setattr(finegrain.eval.experiment, "run_eval", spy("run_eval"))
    return calls


def test_good_out_is_created_before_the_model_loads(arith_models, tmp_path, loads, monkeypatch):
    # control: the spy is on the loader the command really uses, and --out exists by then
    import finegrain.models.load

    out = tmp_path / "a" / "b" / "report"
    seen = []

    def spy(path, **kw):
        seen.append((path, out.is_dir()))
        raise Loaded(path)
    monkeypatch.setattr(finegrain.models.load, "load_pretrained", spy)
    with pytest.raises(Loaded):
        run_cli(["--model", arith_models[0], "--n-problems", "1", "--samples", "1", "--out", str(out), "--quiet"])
    assert seen == [(arith_models[0], True)]


def bad_outs(tmp_path):
    """(--out, what the error says after the quoted path) that no process can write, root included."""
    f = tmp_path / "file.txt"
    f.write_text("keep")
    under_file = f": cannot be created, '{f}' is not a directory"
    return [(f, " exists and is not a directory"), (f / "out", under_file), (f / "a" / "b", under_file)]


def test_bad_out_fails_in_one_line_before_any_work(arith_models, tmp_path, capsys, loads):
    policy, ref = arith_models
    for out, problem in bad_outs(tmp_path):
        with pytest.raises(SystemExit) as exc:
            run_cli(["--model", policy, "--n-problems", "1", "--samples", "1", "--scorers", "verifier,implicit_prm",
                     "--prm-ref", ref, "--out", str(out), "--quiet"])
        assert exc.value.code == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert lines == [f"finegrain eval: error: --out: '{out}'{problem}"]
    assert loads == []
    assert (tmp_path / "file.txt").read_text() == "keep"


def test_out_is_not_created_when_another_flag_is_bad(arith_models, tmp_path, capsys, loads):
    out = tmp_path / "new"
    with pytest.raises(SystemExit):
        run_cli(["--model", arith_models[0], "--scorers", "implicit_prm", "--out", str(out), "--quiet"])  # no ref
    assert "--prm-ref" in capsys.readouterr().err
    assert not out.exists() and loads == []
