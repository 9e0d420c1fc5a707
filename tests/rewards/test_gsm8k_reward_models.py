"""The judge and discriminative-PRM reward paths on GSM8K with a locally trained BPE tokenizer and a
tiny Qwen2 policy (random init, seconds of SFT so its samples have lines), each inside one real RL
step (``finegrain.train.loop.one_step`` on a run built by ``build_run``): the judge with the HF
backend (a separate tiny Qwen2 judge with its own tokenizer) and the rule backend, at outcome and
step level; a discriminative PRM trained by ``finegrain prm train --kind discriminative`` on GSM8K
step labels (char tokenizer) scoring a BPE policy through text. Nothing is downloaded: the task's
shipped data, models built from configs."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from finegrain.cli.prm_cmd import main as prm_main
from finegrain.config import RunConfig, from_dict, load_config, to_dict, validate
from finegrain.models.step_classifier import load_step_classifier, step_logits
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import train_bpe_tokenizer
from finegrain.rewards import REWARDS
from finegrain.rewards.combine import to_token_rewards
from finegrain.rewards.disc_prm import map_step_reward
from finegrain.rewards.prm_data import PRMRow, to_trajectory
from finegrain.segment import newline
from finegrain.tasks import TASKS
from finegrain.tasks.base import STEP_CORRECT, STEP_WRONG
from finegrain.train.loop import one_step
from finegrain.train.sft import run_sft
from finegrain.train.stages import build_run, task_for

PROMPTS, GROUP, NEW_TOKENS = 2, 2, 24
ROWS = PROMPTS * GROUP
FALLBACK = 0.25  # G of an unparsable verdict in the HF judge runs (a value no parsed 0/1 verdict gives)


def quiet(_):
    pass


_RESULT = re.compile(r"(=\s*\$?)(\d+)")


def corrupt(line: str) -> str | None:
    """``line`` with the first claimed result after '=' off by one, or None when it has none."""
    m = _RESULT.search(line)
    if m is None:
        return None
    return line[:m.start(2)] + str(int(m.group(2)) + 1) + line[m.end(2):]


@pytest.fixture(scope="module")
def gsm8k():
    return TASKS.get("gsm8k")()


@pytest.fixture(scope="module")
def short_pool(gsm8k):
    """Short GSM8K train problems, so every judge / PRM prompt fits the tiny models' positions."""
    pool = [e for e in gsm8k.examples("train") if len(e.prompt) <= 200][:16]
    assert len(pool) >= PROMPTS
    return pool


@pytest.fixture(scope="module")
def models(tmp_path_factory, gsm8k):
    """A BPE policy (tiny Qwen2, micro preset, SFT'd for seconds so it writes lines) and a separate tiny
    Qwen2 judge (random, its own BPE), saved as HF directories."""
    root = tmp_path_factory.mktemp("gsm8k_models")
    texts = [e.prompt + "\n" + e.solution for e in gsm8k.examples("train", 300)]
    policy_tok = train_bpe_tokenizer(texts, vocab_size=400)
    assert len(policy_tok("Natalia sold 48 clips")["input_ids"]) < len("Natalia sold 48 clips")  # really BPE
    policy = tiny_causal_lm(policy_tok, family="qwen2", size="micro", seed=0)
    # a few SFT steps on short GSM8K solutions: samples then hold newlines, i.e. several steps
    pairs = [(e.prompt, e.solution) for e in gsm8k.examples("train") if len(e.prompt) + len(e.solution) < 400][:96]
    sft = run_sft(policy, policy_tok, pairs, epochs=10, batch_size=8, lr=1e-2, warmup_steps=2, seed=0)
    assert sft["sft/loss"] < math.log(len(policy_tok))                 # it learnt something
    policy.save_pretrained(root / "policy")
    policy_tok.save_pretrained(root / "policy")
    judge_tok = train_bpe_tokenizer(texts[:200], vocab_size=320)
    judge = tiny_causal_lm(judge_tok, family="qwen2", size="tiny", max_positions=1024, seed=1)
    assert judge.config.model_type == "qwen2"
    judge.save_pretrained(root / "judge")
    judge_tok.save_pretrained(root / "judge")
    return {"policy": root / "policy", "judge": root / "judge", "policy_tok": policy_tok}


class Recorder:
    """Wraps a reward signal and keeps every (trajectory, output) it was called on."""

    def __init__(self, signal):
        self.signal, self.calls = signal, []

    def __getattr__(self, name):
        return getattr(self.signal, name)

    def __call__(self, traj):
        out = self.signal(traj)
        self.calls.append((traj, out))
        return out


def one_rl_step(policy_dir, out_dir, rewards, pool):
    """Build a GSM8K run on the saved policy, wrap every signal in a Recorder, run one step: (run, logged row)."""
    cfg = load_config(None, [
        f"model.path={policy_dir}", "model.device=cpu", "task.name=gsm8k",
        f"rollout.prompts_per_step={PROMPTS}", f"rollout.group_size={GROUP}",
        f"rollout.max_new_tokens={NEW_TOKENS}", "filters.filters=[]", "advantage.name=prime_rloo",
        "optim.lr=1e-3", "train.steps=1", "train.eval_every=0", "train.save_every=0",
        f"train.out_dir={out_dir}", "train.tensorboard=false", "train.progress=false"])
    d = to_dict(cfg)
    d["rewards"] = rewards
    cfg = from_dict(RunConfig, d)
    validate(cfg)
    torch.manual_seed(0)
    run = build_run(cfg, task_for(cfg), quiet)
    run.signals = {n: Recorder(s) for n, s in run.signals.items()}
    row = one_step(cfg, run, pool, 0, quiet)
    return run, row


def scored(run, name):
    """The (trajectory, output) the step scored ``name`` on: its last call, on the trained batch."""
    traj, out = run.signals[name].calls[-1]
    assert traj.batch_size == ROWS
    return traj, out


def assert_on_step_ends(out, traj):
    """Placed token rewards: step k's value on the last trained token of step k, zero everywhere else."""
    r = to_token_rewards(out, traj)
    trained = traj.loss_mask & traj.response_mask
    want = torch.zeros_like(r)
    n_placed = 0
    for b in range(traj.batch_size):
        for k in range(out.values.shape[1]):
            pos = (trained[b] & (traj.step_ids[b] == k)).nonzero().flatten()
            if out.mask[b, k] and len(pos):
                want[b, pos[-1]] = out.values[b, k]
                n_placed += 1
    assert torch.equal(r, want)
    assert torch.isfinite(r).all()
    return n_placed


def assert_on_step_ends_outcome(out, traj):
    """Outcome placement: each row's value on its last trained token, nothing elsewhere."""
    r = to_token_rewards(out, traj)
    trained = traj.loss_mask & traj.response_mask
    for b in range(traj.batch_size):
        pos = trained[b].nonzero().flatten()
        want = torch.zeros(r.shape[1])
        if len(pos):
            want[pos[-1]] = out.values[b]
        assert torch.equal(r[b], want)


def check_step_common(row, out, name, n_steps=None):
    """What every judge / PRM step shares: the step ran on 4 rows with a finite loss, the output's
    shape ((B,) or (B, n_steps)) and finite values."""
    assert row["rollout/rows"] == ROWS
    assert math.isfinite(row["loss/loss"])
    assert f"reward/{name}/mean" in row and math.isfinite(row[f"reward/{name}/mean"])
    shape = (ROWS,) if out.level == "outcome" else (ROWS, n_steps)
    assert out.values.shape == shape and out.mask.shape == shape and out.mask.dtype == torch.bool
    assert torch.isfinite(out.values[out.mask]).all()


def judged_steps(traj, b):
    """Steps of row b the step-level judge grades: the text's spans, cut to the token step ids."""
    return min(len(newline(traj.response_texts[b])), int(traj.step_ids[b].max()) + 1)


# --------------------------------------------------------------------------------- (a) the judge path

@pytest.mark.parametrize("level", ["outcome", "step"])
def test_hf_judge_on_a_tiny_qwen2_in_one_gsm8k_step(models, short_pool, tmp_path, level):
    """A tiny Qwen2 judge (its own BPE) grades BPE-policy GSM8K samples in one RL step; verdict counts are logged."""
    kwargs = {"backend": "hf", "level": level, "model_path": str(models["judge"]), "max_new_tokens": 8,
              "fallback": FALLBACK}
    run, row = one_rl_step(models["policy"], tmp_path / "run", [{"name": "judge", "weight": 1.0, "kwargs": kwargs}],
                           short_pool)
    traj, out = scored(run, "judge")
    assert out.level == level and run.signals["judge"].backend.key == f"hf:{models['judge']}"
    # the judge has its own tokenizer, not the policy's: requests went through text
    assert len(run.signals["judge"].backend.tokenizer) != len(run.tokenizer)
    check_step_common(row, out, "judge", int(traj.step_ids.max()) + 1)
    unp = out.components["unparsable"]
    assert set(out.components) >= {"unparsable", "missing_items", "cache_hits"} and unp.shape == (ROWS,)
    if level == "outcome":
        assert out.mask.all()
        assert ((unp == 0) | (unp == 1)).all() and 0.0 <= row["reward/judge/unparsable"] <= 1.0
        # an unparsable verdict scores the fallback; a parsed one scores G in [0, 1]
        assert torch.all(torch.where(unp == 1, out.values == FALLBACK, (out.values >= 0) & (out.values <= 1)))
        assert_on_step_ends_outcome(out, traj)
    else:
        for b in range(ROWS):
            k = judged_steps(traj, b)
            assert int(out.mask[b].sum()) == k and out.mask[b, :k].all()     # one verdict per step, then mask False
            assert 0 <= unp[b] <= k
        S = out.values.shape[1]
        assert 0.0 <= row["reward/judge/unparsable"] <= S
        assert assert_on_step_ends(out, traj) >= 1
    assert row["reward/judge/unparsable"] == pytest.approx(float(unp.float().mean()))


@pytest.mark.parametrize("level", ["outcome", "step"])
def test_rule_judge_on_gsm8k_arithmetic_labels_in_one_step(models, short_pool, gsm8k, tmp_path, level):
    """The rule judge on GSM8K (arithmetic label_steps) parses every verdict and agrees with the labels in one step."""
    kwargs = {"backend": "rule", "level": level, "correct": 1.0, "wrong": -1.0}
    run, row = one_rl_step(models["policy"], tmp_path / "run", [{"name": "judge", "weight": 1.0, "kwargs": kwargs}],
                           short_pool)
    traj, out = scored(run, "judge")
    assert out.level == level and run.signals["judge"].backend.key == "rule"
    check_step_common(row, out, "judge", int(traj.step_ids.max()) + 1)
    assert out.components["unparsable"].sum() == 0 and row["reward/judge/unparsable"] == 0
    labels = [gsm8k.label_steps(ex, t).labels for ex, t in zip(traj.examples, traj.response_texts)]
    if level == "outcome":
        assert out.mask.all() and set(out.values.tolist()) <= {1.0, -1.0}
        for lab, v in zip(labels, out.values.tolist()):
            if STEP_WRONG in lab:                   # an arithmetic slip: not correct
                assert v == -1.0
            elif lab and all(x == STEP_CORRECT for x in lab):
                assert v == 1.0
        assert_on_step_ends_outcome(out, traj)
    else:
        exact = REWARDS.get("step_labels")(gsm8k, correct=1.0, wrong=-1.0)(traj)
        for b in range(ROWS):
            k = judged_steps(traj, b)
            assert int(out.mask[b].sum()) == k
            assert out.values[b, :k].tolist() == [1.0 if x == STEP_CORRECT else -1.0 for x in labels[b][:k]]
            kk = int(exact.mask[b].sum())
            assert out.values[b, :min(k, kk)].tolist() == exact.values[b, :min(k, kk)].tolist()
        assert_on_step_ends(out, traj)


def gold_and_slipped(task, tokenizer, n=6):
    """A Trajectory (policy BPE tokens) of n short gold GSM8K solutions, then each with one slipped line."""
    examples = [e for e in task.examples("train") if len(e.prompt) + len(e.solution) <= 420][:n]
    texts = [e.solution for e in examples]
    for e in examples:
        steps = [e.solution[a:b] for a, b in newline(e.solution)]
        k = next(j for j, st in enumerate(steps) if corrupt(st) is not None)
        texts.append("".join(steps[:k] + [corrupt(steps[k])] + steps[k + 1:]))
    rows = [PRMRow(ex.prompt, t, None, ex.prompt) for ex, t in zip(examples + examples, texts)]
    return to_trajectory(tokenizer, rows).replace(examples=examples + examples), texts


def rule_judge(task, **kwargs):
    ctx = SimpleNamespace(task=task, tokenizer=None, policy=None, initial_policy=lambda: None, cfg=None)
    return REWARDS.get("judge").from_context(ctx, backend="rule", **kwargs)


def test_rule_judge_step_verdicts_on_gold_and_slipped_gsm8k_solutions(models, gsm8k):
    """On BPE-tokenized GSM8K solutions the step-level rule judge marks the slipped line wrong, the gold one right."""
    traj, texts = gold_and_slipped(gsm8k, models["policy_tok"])
    out = rule_judge(gsm8k, level="step", correct=1.0, wrong=-1.0)(traj)
    n = len(texts) // 2
    assert out.components["unparsable"].sum() == 0
    for b, (ex, text) in enumerate(zip(traj.examples, texts)):
        labels = gsm8k.label_steps(ex, text)
        assert int(out.mask[b].sum()) == len(labels.labels)          # BPE step ids agree with the text's lines
        want = [1.0 if x == STEP_CORRECT else -1.0 for x in labels.labels]
        assert out.values[b, :len(want)].tolist() == want
        if b >= n:                                                   # the slipped line: right in gold, wrong here
            k = labels.first_error
            assert k is not None and out.values[b, k] == -1.0 and out.values[b - n, k] == 1.0
    assert_on_step_ends(out, traj)


def test_rule_judge_outcome_accepts_gold_gsm8k_solutions(models, gsm8k):
    """The outcome-level rule judge scores gold GSM8K solutions correct and slipped ones wrong."""
    traj, texts = gold_and_slipped(gsm8k, models["policy_tok"])
    out = rule_judge(gsm8k, level="outcome")(traj)
    n = len(texts) // 2
    clean = [gsm8k.label_steps(ex, t).first_error is None for ex, t in zip(traj.examples, texts)]
    assert clean == [True] * n + [False] * n                          # the task's own verdict: no slip in gold
    assert out.values.tolist() == [1.0] * n + [0.0] * n


# --------------------------------------------------------------------------------- (b) the discriminative PRM

def step_rows(task, examples):
    """ProcessBench-style rows from GSM8K: each gold solution and one with a slipped line, labelled by
    ``task.label_steps`` (correct 1, wrong 0, unparseable null)."""
    rows = []
    for ex in examples:
        steps = [ex.solution[a:b] for a, b in newline(ex.solution)]
        variants = [steps]
        k = next((j for j, s in enumerate(steps) if corrupt(s) is not None), None)
        if k is not None:
            variants.append(steps[:k] + [corrupt(steps[k])] + steps[k + 1:])
        for v in variants:
            lab = task.label_steps(ex, "".join(v)).labels
            assert len(lab) == len(v)
            rows.append({"prompt": ex.prompt, "steps": v,
                         "labels": [1 if x == STEP_CORRECT else 0 if x == STEP_WRONG else None for x in lab]})
    return rows


@pytest.fixture(scope="module")
def gsm8k_prm(tmp_path_factory, gsm8k):
    """A micro discriminative PRM (char tokenizer) trained by the CLI on GSM8K step labels for 3 epochs."""
    root = tmp_path_factory.mktemp("gsm8k_prm")
    examples = [e for e in gsm8k.examples("train") if len(e.prompt) + len(e.solution) <= 420][:48]
    rows = step_rows(gsm8k, examples)
    flat = [x for r in rows for x in r["labels"] if x is not None]
    assert 0 in flat and 1 in flat                                # both kinds of steps to learn from
    data = root / "gsm8k_steps.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prm_main(["train", "--kind", "discriminative", "--no-progress", "--tiny", "micro", "--tokenizer", "char",
              "--data", str(data), "--out", str(root / "prm"), "--epochs", "3", "--batch-size", "16",
              "--lr", "3e-3", "--max-positions", "512", "--seed", "0"])
    return root / "prm", data, len(rows), len(flat)


def test_disc_prm_trains_on_gsm8k_step_labels(gsm8k_prm):
    """`prm train --kind discriminative` on GSM8K step labels writes a PRM whose BCE falls below ln 2."""
    prm_dir, data, n_rows, n_steps = gsm8k_prm
    info = json.loads((prm_dir / "finegrain_prm.json").read_text())
    assert info["kind"] == "discriminative" and info["labels"] == f"jsonl {data}" and info["segmenter"] == "newline"
    log = json.loads((prm_dir / "prm_metrics.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [0, 1, 2, 3]
    assert log["settings"]["n_rows"] == n_rows and log["settings"]["n_labelled_steps"] == n_steps
    assert log["epochs"][0]["fit/bce"] == pytest.approx(math.log(2), abs=1e-5)          # zero head: p = ½
    assert all(math.isfinite(r["train/loss"]) for r in log["epochs"][1:])
    assert log["final"]["fit/bce"] < log["epochs"][0]["fit/bce"]


def test_disc_prm_scores_a_bpe_policy_in_one_gsm8k_step(models, short_pool, gsm8k, gsm8k_prm, tmp_path):
    """The char-tokenizer PRM gives a BPE policy's GSM8K samples finite step rewards on step ends in one RL step."""
    prm_dir = gsm8k_prm[0]
    rewards = [{"name": "verifier", "weight": 1.0, "kwargs": {}},
               {"name": "disc_prm", "weight": 0.5, "kwargs": {"path": str(prm_dir), "reward": "centered"}}]
    run, row = one_rl_step(models["policy"], tmp_path / "run", rewards, short_pool)
    traj, out = scored(run, "disc_prm")
    assert out.level == "step"
    check_step_common(row, out, "disc_prm", max(len(newline(t)) for t in traj.response_texts))
    prm, prm_tok, _ = load_step_classifier(prm_dir)
    # a different tokenizer from the policy's: the PRM reads text, not the policy's token ids
    assert len(prm_tok) != len(run.tokenizer)
    assert prm_tok("Natalia sold 48")["input_ids"] != run.tokenizer("Natalia sold 48")["input_ids"]
    for b in range(ROWS):
        steps = [traj.response_texts[b][a:c] for a, c in newline(traj.response_texts[b])]
        assert int(out.mask[b].sum()) == len(steps)                  # short prompts: every step fits
        if steps:
            direct = step_logits(prm, prm_tok, [gsm8k.format_prompt(traj.examples[b])], [steps])[0]
            want = [map_step_reward(s, "centered") for s in direct]
            assert out.values[b, :len(steps)].tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert ((out.values[out.mask] > -0.5) & (out.values[out.mask] < 0.5)).all()   # centered: p − ½
    assert out.mask.any()
    assert assert_on_step_ends(out, traj) >= 1
    assert 0.0 <= row["reward/disc_prm/prob_mean"] <= 1.0 and 0.0 <= row["reward/disc_prm/prob_min"] <= 1.0
    assert row["reward/disc_prm/prob_min"] <= row["reward/disc_prm/prob_mean"] + 1e-6
    assert "reward/verifier/accuracy" in row
