"""``finegrain eval`` on tool-use runs: episodes in the run's environment (or ``--env`` /
``--env-kwargs`` / ``--max-turns``), their turns in samples.jsonl and report.html, and one-line
errors. The policy is a micro model overfit in a few seconds on arith_calc traces that call
``calc`` for every operation, so its episodes call the tool; what it computes does not matter."""

from __future__ import annotations

import json
import string

import pytest
import torch

from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.tasks import TASKS
from tests.eval.test_eval_cli import run_cli, save

TASK_KWARGS = {"calc_ops": "+-*", "min_steps": 2, "max_steps": 2}  # every operation is a calc call
TURN_KEYS = {"turn", "text", "span", "call", "call_span", "error", "result", "observation", "observation_span",
             "env_reward", "scores", "steps", "n_tokens", "n_observation_tokens"}
COMMON = ["--n-problems", "3", "--samples", "2", "--max-new-tokens", "24", "--scorers", "verifier,step_labels",
          "--html-problems", "2", "--quiet"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A micro model overfit on 8 gold arith_calc traces (prompt + trace + EOS)."""
    task = TASKS.get("arith_calc")(**TASK_KWARGS)
    tok = char_tokenizer(string.digits + string.ascii_letters + " +-*=:()<>/,.'\n_")
    rows = [tok(ex.prompt + ex.solution)["input_ids"] + [tok.eos_token_id] for ex in task.examples("train", 8)]
    L = max(map(len, rows))
    x = torch.tensor([r + [tok.pad_token_id] * (L - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (L - len(r)) for r in rows])
    model = tiny_causal_lm(tok, size="micro", seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(120):
            loss = model(input_ids=x, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return save(model.eval(), tok, tmp_path_factory.mktemp("tool_use") / "policy")


def make_run(root, policy, rollout: dict):
    """A run directory (as ``finegrain train`` leaves it) whose config names the environment."""
    import shutil

    run = root / "run"
    ck = run / "checkpoints" / "step_000001"
    shutil.copytree(policy, ck / "policy")
    torch.save({"step": 1}, ck / "state.pt")
    (run / "checkpoints" / "latest").write_text("step_000001")
    (run / "config.yaml").write_text(json.dumps({"task": {"name": "arith_calc", "kwargs": TASK_KWARGS},
                                                 "rollout": rollout}))  # JSON is YAML
    return run


def check_turns(rec: dict, max_turns: int) -> None:
    """The structure every multi-turn record has, whatever the model wrote."""
    turns = rec["turns"]
    assert 1 <= len(turns) <= max_turns
    assert "".join(t["text"] + t["observation"] for t in turns) == rec["response"]
    at = 0
    for k, t in enumerate(turns):
        assert set(t) == TURN_KEYS and t["turn"] == k
        assert t["span"] == [at, at + len(t["text"])]
        at = t["span"][1] + len(t["observation"])
        if k < len(turns) - 1:  # a turn that another follows was a call, answered by an observation
            assert t["call"] is not None or t["error"] is not None, t
            assert t["observation"].startswith("\n<result>") and t["n_observation_tokens"] > 0
            assert t["observation_span"] == [t["span"][1], at]
            assert (t["result"] is not None) == (t["error"] is None)
            if t["error"]:
                assert t["observation"].startswith("\n<result>error: ")
            else:
                assert t["observation"] == f"\n<result>{t['result']}</result>\n"
        if t["call"] is not None or t["error"] is not None:
            assert t["call_span"][1] == t["span"][1]
            assert t["text"][t["call_span"][0] - t["span"][0]:].startswith("<call>")
        else:
            assert t["call_span"] is None
        assert t["env_reward"] is None and t["scores"] == {}  # arith_calc gives no turn rewards; no turn-level scorer
    steps = [i for t in turns for i in t["steps"]]
    assert len(steps) == len(set(steps)) and set(steps) <= set(range(len(rec["step_spans"])))
    assert len(rec["step_labels"]) == len(rec["step_spans"])


def test_eval_of_a_tool_use_run_uses_its_environment(policy, tmp_path):
    run = make_run(tmp_path, policy, {"env": "tool_use", "env_kwargs": {"tool_timeout": 2.0}, "max_turns": 4})
    out = tmp_path / "report"
    m = run_cli(["--model", str(run), *COMMON, "--out", str(out)])
    assert m["meta"]["task"] == "arith_calc" and m["meta"]["task_kwargs"] == TASK_KWARGS
    assert (m["meta"]["env"], m["meta"]["env_kwargs"], m["meta"]["max_turns"]) == ("tool_use", {"tool_timeout": 2.0}, 4)
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 6
    for r in recs:
        check_turns(r, 4)
    n_turns = [len(r["turns"]) for r in recs]
    assert max(n_turns) >= 2, "the overfit policy should call the tool"
    assert m["turns"]["episodes"] == 6 and m["turns"]["mean_turns"] == pytest.approx(sum(n_turns) / 6)
    assert m["turns"]["mean_tool_calls"] == pytest.approx(sum(t["call"] is not None for r in recs
                                                               for t in r["turns"]) / 6)
    # the page shows the first 2 problems turn by turn, every observation marked as not trained
    shown = [r for r in recs if r["problem"] < 2]
    page = (out / "report.html").read_text()
    assert page.count('data-turns="') == len(shown) == 4
    assert page.count('<div class="model-text" data-trained="true">') == sum(len(r["turns"]) for r in shown)
    n_obs = sum(bool(t["observation"]) for r in shown for t in r["turns"])
    assert n_obs > 0 and page.count('<div class="observation" data-trained="false"') == n_obs
    assert page.count("tool output — not trained</span><pre>") == n_obs
    assert page.count('class="tool-call') >= n_obs  # every observed turn ended in a (highlighted) call
    assert "Turns (multi-turn episodes)" in page and page.count('class="step"') == 0  # no single-turn step table


def test_flags_override_the_environment_of_a_plain_model(policy, tmp_path):
    out = tmp_path / "report"
    m = run_cli(["--model", policy, "--task", "arith_calc", "--task-kwargs", json.dumps(TASK_KWARGS),
                 "--env", "tool_use", "--env-kwargs", '{"tool_timeout": 3}', "--max-turns", "2", *COMMON,
                 "--out", str(out)])
    assert (m["meta"]["env"], m["meta"]["env_kwargs"], m["meta"]["max_turns"]) == ("tool_use", {"tool_timeout": 3}, 2)
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for r in recs:
        check_turns(r, 2)
    assert any(len(r["turns"]) == 2 for r in recs)


def test_single_turn_override_of_a_tool_use_run_keeps_single_turn_records(policy, tmp_path):
    run = make_run(tmp_path, policy, {"env": "tool_use", "max_turns": 4})
    m = run_cli(["--model", str(run), "--env", "single_turn", *COMMON, "--out", str(tmp_path / "a")])
    plain = run_cli(["--model", policy, "--task", "arith_calc", "--task-kwargs", json.dumps(TASK_KWARGS), *COMMON,
                     "--out", str(tmp_path / "b")])
    for key in ("env", "env_kwargs", "max_turns"):
        assert key not in m["meta"] and key not in plain["meta"]
    assert "turns" not in m and m["accuracy"] == plain["accuracy"] and m["curves"] == plain["curves"]
    for d in ("a", "b"):
        recs = [json.loads(line) for line in (tmp_path / d / "samples.jsonl").read_text().splitlines()]
        assert recs and not any("turns" in r for r in recs)
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (tmp_path / "b" / "samples.jsonl").read_text()


@pytest.fixture
def no_load(monkeypatch):
    """Errors must come before any model is loaded."""
    import finegrain.models.load

    def spy(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(finegrain.models.load, "load_pretrained", spy)


@pytest.mark.parametrize("extra,message", [
    (["--env", "nope"], "--env: unknown environment 'nope'; available: "),
    (["--env", "tool_use", "--task", "arith"], "--env: environment 'tool_use' with task 'arith': "),
    (["--env", "tool_use", "--env-kwargs", '{"bogus": 1}'], "--env-kwargs: environment 'tool_use'"),
    (["--env", "tool_use", "--env-kwargs", '{"format": "yaml"}'], "--env-kwargs: environment 'tool_use'"),
    (["--env", "tool_use", "--env-kwargs", "[1]"], "--env-kwargs: expected a JSON object"),
    (["--env", "tool_use", "--env-kwargs", "{bad"], "--env-kwargs: not valid JSON"),
    (["--env", "tool_use", "--max-turns", "0"], "--max-turns: expected >= 1"),
    (["--env", "tool_use", "--search", "beam", "--scorers", "step_labels"], "--search: step searches"),
])
def test_environment_errors_are_one_line(policy, tmp_path, capsys, no_load, extra, message):
    argv = ["--model", policy, "--task", "arith_calc", "--n-problems", "1", "--samples", "1", "--quiet",
            "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        run_cli(argv + extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"finegrain eval: error: {message}"), err


def test_unknown_environment_in_the_run_config_names_it(policy, tmp_path, capsys, no_load):
    run = make_run(tmp_path, policy, {"env": "gone"})
    with pytest.raises(SystemExit):
        run_cli(["--model", str(run), "--quiet", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rollout.env" in err and "config.yaml" in err
    assert "unknown environment 'gone'; available: " in err and "tool_use" in err, err
