"""The ``think_rm`` reward (Think-RM, docs/methods.md §25d) and ``finegrain/credit/pairwise.py``:
verdict parsing by hand (binary, multiclass, several <answer> blocks, garbage), D and A_i on a
3-sample group by hand, the GRPO identity, a plain loop against the vectorised maths,
invariances (permutations, non-contiguous groups, a group of one), unparsable verdicts and ties
counted, the cache, the shipped config, and a 2-step run on arith with the rule backend."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import finegrain.rewards.think_rm  # noqa: F401  (registers think_rm until rewards/__init__.py imports it)
from finegrain.config import load_config, validate
from finegrain.credit import ADVANTAGES
from finegrain.credit.outcome import grpo
from finegrain.credit.pairwise import group_pairs, pairwise_advantage
from finegrain.models.tokenizer import char_tokenizer
from finegrain.rewards import REWARDS
from finegrain.rewards.combine import combine
from finegrain.rewards.think_rm import ThinkRM, is_tie, parse_preference, rule_verdict
from finegrain.segment import token_step_ids
from finegrain.tasks import TASKS
from finegrain.tasks.base import Example
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from finegrain.train.stages import compute_advantages
from finegrain.trajectory import Trajectory
from tests.conftest import tiny_run_overrides
from tests.helpers import close, judge_ctx

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TOK = char_tokenizer("0123456789+-*=:QAx \n")
EX = Example("x", "Q: 7 +5 *3\n", "36", meta={"start": 7, "ops": [["+", 5], ["*", 3]], "values": [12, 36]})
RIGHT, RIGHT2 = "7+5=12\n12*3=36\nA: 36", "A: 36"
WRONG, WRONG2 = "7+5=13\n13*3=39\nA: 39", "A: 12"


def make_traj(texts, group_ids, examples=None):
    rows = [TOK(t, add_special_tokens=False)["input_ids"] + [TOK.eos_token_id] for t in texts]
    L, B = max(len(r) for r in rows), len(rows)
    ids = torch.full((B, L), TOK.pad_token_id)
    rm = torch.zeros(B, L, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        rm[i, :len(r)] = True
    examples = examples or [EX] * B
    return Trajectory(prompt_ids=torch.ones(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                      response_ids=ids, response_mask=rm, loss_mask=rm.clone(),
                      group_ids=torch.tensor(group_ids, dtype=torch.long),
                      step_ids=token_step_ids(TOK, ids, rm, "newline"), behavior_logprobs=torch.zeros(B, L),
                      truncated=torch.zeros(B, dtype=torch.bool), prompt_texts=[e.prompt for e in examples],
                      response_texts=list(texts), examples=examples)


def ctx(task=None):
    return judge_ctx(TOK, task)


def rule(mode="binary", **kw):
    return REWARDS.get("think_rm").from_context(ctx(), backend="rule", mode=mode, **kw)


class Scripted:
    """A backend answering ``answer(request)``, recording the (A, B) responses it was asked about."""

    key = "scripted"

    def __init__(self, answer):
        self.answer, self.calls, self.asked = answer, 0, []

    def generate(self, requests):
        self.calls += 1
        self.asked += [(q.response_a, q.response_b) for q in requests]
        return [self.answer(q) for q in requests]


def grpo_like(r: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r_i − mean) / sqrt(var_unbiased + ε) of one group."""
    return (r - r.mean()) / torch.sqrt(r.var(unbiased=True) + eps)


# --------------------------------------------------------------------------------- parsing (§25d, by hand)

@pytest.mark.parametrize("text, want", [
    ("<answer>A</answer>", -1),
    ("<think>\nB has an error.\n</think>\n<answer>B</answer>", 1),
    ("<answer>\nB\n</answer>", 1),                                   # DOTALL, stripped
    ("<answer>Assistant A</answer>", -1),                            # the last (A|B) match: the lone A
    ("<answer>B is better than A</answer>", -1),                     # the last match, even here
    ("<answer>A</answer> on reflection <answer>B</answer>", 1),      # the LAST block
    ("<answer>B</answer> then <answer>none</answer>", None),         # the last block decides, and fails
    ("<answer>B<answer>A</answer>", -1),                             # lazy block 'B<answer>A': last match A
    ("<answer>A</answer> trailing <answer>B", -1),                   # an unclosed block is not a block
])
def test_binary_verdicts(text, want):
    assert parse_preference(text, "binary") == want


@pytest.mark.parametrize("text, want", [
    ("<answer>-3</answer>", -3),
    ("<answer> 2 </answer>", 2),
    ("<answer>-1</answer> hmm <answer>3</answer>", 3),               # the LAST block
    ("<answer>score -2, maybe 1</answer>", 1),                       # the last match in the block
    ("<answer>12</answer>", 2),                                      # '1', '2': the last is 2 (as in the reference)
    ("<think>A is much better: -3</think><answer>-2</answer>", -2),  # text outside the block is ignored
])
def test_multiclass_verdicts(text, want):
    assert parse_preference(text, "multiclass") == want


@pytest.mark.parametrize("mode, text", [
    ("binary", ""), ("binary", "A is better"), ("binary", "<answer></answer>"), ("binary", "<answer>C</answer>"),
    ("binary", "<answer>a</answer>"), ("binary", "<ANSWER>A</ANSWER>"), ("binary", "<answer>A"),
    ("binary", "<answer>tie</answer>"),
    ("multiclass", "<answer>0</answer>"), ("multiclass", "<answer>4</answer>"), ("multiclass", "<answer>-4</answer>"),
    ("multiclass", "<answer>A</answer>"), ("multiclass", "-3"), ("multiclass", "<answer>-3"),
])
def test_garbage_verdicts_are_none(mode, text):
    assert parse_preference(text, mode) is None


def test_ties_are_recognised_for_counting_only():
    assert is_tie("<think>x</think><answer> Tie </answer>") and not is_tie("<answer>A</answer>")
    assert not is_tie("no block") and parse_preference("<answer>tie</answer>", "multiclass") is None


@pytest.mark.parametrize("r_a, r_b, mode, want", [
    (1.0, 0.0, "binary", -1), (0.0, 1.0, "binary", 1), (1.0, 0.0, "multiclass", -3), (0.0, 1.0, "multiclass", 3),
    (0.5, 0.0, "multiclass", -2),   # ceil(3 · 0.5) = 2
    (0.0, 0.2, "multiclass", 1),    # ceil(0.6) = 1
    (1.0, 1.0, "binary", None), (0.0, 0.0, "multiclass", None),
])
def test_rule_verdicts_parse_to_the_better_response(r_a, r_b, mode, want):
    text = rule_verdict(r_a, r_b, mode)
    assert text.startswith("<think>\n") and parse_preference(text, mode) == want and is_tie(text) == (want is None)


# --------------------------------------------------------------------------------- D and A_i by hand

def test_three_sample_group_by_hand_through_the_signal():
    """Group 4 = rows 0, 2, 3 (with a group-9 pair in between); multiclass verdicts:
    (0, 2): −2 → d = 2;  (0, 3): −3 → d = 3;  (2, 3): 1 → d = −1
    D = [[0, 2, 3], [−2, 0, −1], [−3, 1, 0]],  row sums (5, −3, −2), / G = (5/3, −1, −2/3)
    Σ D² = 2 (4 + 9 + 1) = 28;  28 / (2·3·2) = 7/3;  A = (5/3, −1, −2/3) / sqrt(7/3 + 1e-6)
    Group 9 = rows 1, 4: (1, 4) 'A' is garbage in multiclass → unparsable → 0 → A = 0."""
    texts = ["r0", "s1", "r2", "r3", "s4"]
    verdict = {("r0", "r2"): "<answer>-2</answer>", ("r0", "r3"): "<think>clearly</think><answer>-3</answer>",
               ("r2", "r3"): "<answer>1</answer>", ("s1", "s4"): "<answer>A</answer>"}
    backend = Scripted(lambda q: verdict[(q.response_a, q.response_b)])
    out = ThinkRM(backend, mode="multiclass")(make_traj(texts, [4, 9, 4, 4, 9]))
    assert sorted(backend.asked) == sorted(verdict)          # every pair once, the lower row as A
    den = math.sqrt(7 / 3 + 1e-6)
    close(out.values, [5 / 3 / den, 0.0, -1 / den, -2 / 3 / den, 0.0])
    assert out.level == "outcome" and out.mask.all()
    close(out.components["preference"], [5 / 3, 0.0, -1.0, -2 / 3, 0.0])
    close(out.components["wins"], [2, 0, 0, 1, 0])
    close(out.components["unparsable"], [0, 1, 0, 0, 1])      # the one failed verdict, on both its rows


def test_a_preference_cycle_gives_zero():
    # binary: 0 > 1 (A), 2 > 0 (B), 1 > 2 (A): every row wins once and loses once
    d = {(0, 1): 1.0, (0, 2): -1.0, (1, 2): 1.0}
    rows = torch.tensor(list(d))
    close(pairwise_advantage(rows, torch.tensor(list(d.values())), torch.tensor([0, 0, 0])), [0.0, 0.0, 0.0])


def test_group_of_one_and_empty_pairs_are_zero_and_finite():
    out = rule()(make_traj([RIGHT, WRONG, RIGHT2], [1, 2, 2]))
    assert torch.isfinite(out.values).all() and out.values[0] == 0.0
    close(out.values[1:], grpo_like(torch.tensor([0.0, 1.0])))
    alone = rule()(make_traj([WRONG], [3]))
    assert alone.values.tolist() == [0.0] and alone.components["unparsable"].tolist() == [0.0]
    assert pairwise_advantage(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), torch.tensor([5])).tolist() == [0.0]


@pytest.mark.parametrize("rows, match", [
    ([[0, 1]], "different groups"), ([[2, 2]], "paired with itself"), ([[0, 2], [2, 0]], "listed twice"),
    ([[0, 5]], r"must be in \[0, 3\)"),
])
def test_bad_pairs_raise_one_line(rows, match):
    with pytest.raises(ValueError, match=match):
        pairwise_advantage(torch.tensor(rows), torch.ones(len(rows)), torch.tensor([1, 2, 1]))


# --------------------------------------------------------------------------------- the GRPO identity

def test_differences_of_scores_give_grpo_exactly():
    """D[j, k] = r_j − r_k  ⇒  A_i = (r_i − mean) / sqrt(var_unbiased + ε) (§25d), on shuffled
    non-contiguous groups of sizes 1–6, one of them constant."""
    g = torch.Generator().manual_seed(0)
    group_ids = torch.tensor([3, 8, 3, 5, 8, 3, 1, 5, 8, 3, 2, 2, 2, 8, 3, 3])
    r = torch.randn(16, generator=g, dtype=torch.float64)
    r[group_ids == 2] = 0.7                                            # a constant group
    pairs = group_pairs(group_ids)
    adv = pairwise_advantage(pairs, r[pairs[:, 0]] - r[pairs[:, 1]], group_ids)
    want = torch.zeros(16, dtype=torch.float64)
    for gid in group_ids.unique():
        m = group_ids == gid
        if m.sum() > 1:
            want[m] = grpo_like(r[m])
    torch.testing.assert_close(adv, want, rtol=1e-12, atol=1e-12)
    assert (adv[group_ids == 2] == 0).all() and adv[group_ids == 1].item() == 0.0
    # and finegrain's grpo estimator (ε added to the std) agrees when ε is negligible
    L = 3
    token_r = torch.zeros(16, L, dtype=torch.float64)
    token_r[:, -1] = r
    mask = torch.ones(16, L, dtype=torch.bool)
    ref = grpo(token_r, mask, group_ids, torch.zeros(16, L, dtype=torch.long), eps=1e-12)[:, 0]
    torch.testing.assert_close(pairwise_advantage(pairs, r[pairs[:, 0]] - r[pairs[:, 1]], group_ids, eps=1e-24), ref,
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_rule_backend_on_arith_is_grpo_on_the_verifier(mode):
    """The rule judge's binary d_ij = r_i − r_j exactly (r = verify ∈ {0, 1}), so A_i is GRPO's;
    multiclass d_ij = 3 (r_i − r_j), the same up to ε."""
    texts = [WRONG, RIGHT, WRONG2, RIGHT2, WRONG, RIGHT]
    gids = [0, 0, 1, 0, 1, 1]
    out = rule(mode)(make_traj(texts, gids))
    r = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    want = torch.zeros(6)
    for gid in (0, 1):
        m = torch.tensor(gids) == gid
        want[m] = grpo_like(r[m], 1e-6 / (9 if mode == "multiclass" else 1))
    close(out.values, want)
    # ties: rows 1 and 3 are both right (one pair); rows 2 and 4 both wrong (one pair)
    assert out.components["ties"].tolist() == [0, 1, 1, 1, 1, 0] and out.components["unparsable"].sum() == 0


# --------------------------------------------------------------------------------- loop vs vectorised

def loop_advantage(B, pair_list, group_ids, eps=1e-6):
    """Think-RM's computation written plainly: a dense D per group, then the formula."""
    d = {(i, j): v for i, j, v in pair_list}
    out = [0.0] * B
    for gid in sorted(set(group_ids)):
        members = [b for b in range(B) if group_ids[b] == gid]
        G = len(members)
        if G < 2:
            continue
        D = [[0.0] * G for _ in range(G)]
        for a, i in enumerate(members):
            for c, j in enumerate(members):
                if (i, j) in d:
                    D[a][c], D[c][a] = d[(i, j)], -d[(i, j)]
        s2 = sum(x * x for row in D for x in row)
        den = math.sqrt(s2 / (2 * G * (G - 1)) + eps)
        for a, i in enumerate(members):
            out[i] = sum(D[a]) / G / den
    return out


@pytest.mark.parametrize("seed", range(6))
def test_loop_equals_vectorised(seed):
    rng = random.Random(seed)
    B = rng.randint(1, 14)
    group_ids = [rng.choice([4, 11, 2, 7]) for _ in range(B)]           # random, non-contiguous
    pair_list = []
    for i, j in itertools.combinations(range(B), 2):
        if group_ids[i] == group_ids[j] and rng.random() < 0.8:         # a missing pair counts as 0
            v = float(rng.choice([-3, -2, -1, 0, 1, 2, 3])) if seed % 2 else rng.uniform(-2, 2)
            pair_list.append((j, i, -v) if rng.random() < 0.3 else (i, j, v))   # either orientation
    rows = torch.tensor([(i, j) for i, j, _ in pair_list], dtype=torch.long).reshape(-1, 2)
    diffs = torch.tensor([v for _, _, v in pair_list], dtype=torch.float64)
    got = pairwise_advantage(rows, diffs, torch.tensor(group_ids))
    torch.testing.assert_close(got, torch.tensor(loop_advantage(B, pair_list, group_ids), dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def test_group_pairs_lists_every_pair_once():
    gids = torch.tensor([2, 0, 2, 1, 0, 2])
    assert group_pairs(gids).tolist() == [[0, 2], [0, 5], [1, 4], [2, 5]]
    assert group_pairs(torch.tensor([3])).shape == (0, 2)


# --------------------------------------------------------------------------------- invariances

TEXTS8 = [RIGHT, WRONG, WRONG2, RIGHT2, WRONG, RIGHT, WRONG2, RIGHT]
GIDS8 = [6, 1, 6, 1, 6, 1, 1, 9]   # groups of 3, 4 and 1, interleaved


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_permuting_rows_permutes_the_output(mode):
    traj = make_traj(TEXTS8, GIDS8)
    base = rule(mode)(traj)
    for seed in range(3):
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(seed))   # within and between groups
        out = rule(mode)(traj.select(perm))
        close(out.values, base.values[perm])
        for k in ("unparsable", "ties", "wins", "preference"):   # not cache_hits: A/B order may flip
            close(out.components[k], base.components[k][perm])


def test_group_ids_are_labels_not_positions():
    traj = make_traj(TEXTS8, GIDS8)
    relabelled = make_traj(TEXTS8, [100 if g == 6 else -3 if g == 1 else 0 for g in GIDS8])
    close(rule()(relabelled).values, rule()(traj).values)
    # contiguous layout of the same groups: the same per-row values, moved
    order = sorted(range(8), key=lambda b: GIDS8[b])
    close(rule()(traj.select(order)).values, rule()(traj).values[order])


def test_another_group_does_not_change_a_group():
    traj = make_traj(TEXTS8, GIDS8)
    together = rule()(traj)
    rows = [b for b in range(8) if GIDS8[b] == 6]
    close(together.values[rows], rule()(traj.select(rows)).values)
    assert together.values[7] == 0.0   # group 9 has one row


# --------------------------------------------------------------------------------- unparsable, cache, backends

def test_unparsable_verdicts_are_counted_never_raised():
    answers = {(RIGHT, WRONG): "<think>A</think>", (RIGHT, WRONG2): "<answer>A</answer>",
               (WRONG, WRONG2): "<answer>maybe</answer>"}
    out = ThinkRM(Scripted(lambda q: answers[(q.response_a, q.response_b)]))(make_traj([RIGHT, WRONG, WRONG2], [0] * 3))
    # only (0, 2) parses: d_02 = 1; D row sums (1, 0, −1) / 3; Σ D² = 2; 2 / 12 = 1/6
    den = math.sqrt(1 / 6 + 1e-6)
    close(out.values, [1 / 3 / den, 0.0, -1 / 3 / den])
    assert out.components["unparsable"].tolist() == [1, 2, 1] and out.components["ties"].sum() == 0


def test_verdicts_are_cached():
    backend = Scripted(lambda q: "<answer>A</answer>")
    sig = ThinkRM(backend, cache_size=10)
    sig(make_traj([RIGHT, WRONG, RIGHT], [0, 0, 0]))
    assert backend.calls == 1 and len(backend.asked) == 3
    again = sig(make_traj([RIGHT, WRONG], [5, 5]))           # (RIGHT, WRONG) was asked before
    assert backend.calls == 1 and again.components["cache_hits"].tolist() == [1, 1]


def test_rule_backend_refuses_an_evaluation_only_verifier():
    with pytest.raises(ValueError, match="train_verifier = False"):
        REWARDS.get("think_rm").from_context(ctx(TASKS.get("arith_words")()), backend="rule")


def test_hf_backend_on_a_tiny_local_model():
    """A random micro model cannot write a verdict: every pair is unparsable, A = 0, no raise."""
    from finegrain.models.tiny import tiny_causal_lm

    c = ctx()
    c.initial_policy = lambda: tiny_causal_lm(TOK, size="micro", max_positions=2048, seed=0)
    sig = REWARDS.get("think_rm").from_context(c, backend="hf", max_new_tokens=4)
    out = sig(make_traj([RIGHT, WRONG], [0, 0]))
    assert out.values.tolist() == [0.0, 0.0] and out.components["unparsable"].tolist() == [1, 1]
    assert sig.backend.key == "hf:initial_policy"


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "ternary"}, "mode must be 'binary' or 'multiclass'"),
    ({"backend": "vllm"}, "think_rm: backend must be 'rule', 'hf' or 'openai'"),
])
def test_bad_kwargs_in_code(kwargs, match):
    with pytest.raises(ValueError, match=match):
        REWARDS.get("think_rm").from_context(ctx(), **kwargs)


# --------------------------------------------------------------------------------- config and training

def test_config_loads_validates_and_the_trainer_advantage_is_the_signal():
    cfg = load_config(CONFIGS / "arith_think_rm.yaml")
    validate(cfg)
    assert ADVANTAGES.meta(cfg.advantage.name)["consumes"] == "outcome" and not cfg.advantage.whiten
    traj = make_traj(TEXTS8, GIDS8)
    outputs = {"verifier": REWARDS.get("verifier").from_context(SimpleNamespace(task=TASKS.get("arith")()))(traj),
               "think_rm": rule()(traj)}
    adv = compute_advantages(cfg, combine(outputs, {r.name: r.weight for r in cfg.rewards}, traj), traj)
    want = torch.where(traj.loss_mask, outputs["think_rm"].values[:, None], torch.zeros(()))
    assert torch.equal(adv, want)   # exactly A_i on every trained token, 0 elsewhere


@pytest.mark.parametrize("key, value, match", [
    ("mode", "ternary", r"^rewards\[1\]\.kwargs\.mode: expected one of binary \| multiclass, got 'ternary'$"),
    ("backend", "server", r"^rewards\[1\]\.kwargs\.backend: expected one of rule \| hf \| openai, got 'server'$"),
    ("eps", 0.0, r"^rewards\[1\]\.kwargs\.eps: "),
    ("temprature", 0.5, r"^rewards\[1\]\.kwargs: unknown key 'temprature' for reward signal 'think_rm'"),
])
def test_bad_config_values_fail_with_one_line_naming_the_key(key, value, match):
    cfg = load_config(CONFIGS / "arith_think_rm.yaml")
    cfg.rewards[1].kwargs[key] = value
    with pytest.raises(ValueError, match=match) as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_tiny_run_with_the_rule_backend(tmp_path, sft_cache, monkeypatch):
    """configs/arith_think_rm.yaml for 2 steps on a micro model. Such a model is never right, so
    every verdict would be a tie and every advantage 0; a stand-in verifier (even response length
    scores 1) gives the rule judge decisions to make, so the update is not empty."""
    monkeypatch.setattr(TASKS.get("arith"), "verify", lambda self, ex, response: float(len(response) % 2 == 0))
    overrides = tiny_run_overrides(tmp_path / "run", sft_cache, steps=2, **{"train.save_every": 0})
    cfg = load_config(CONFIGS / "arith_think_rm.yaml", overrides)
    validate(cfg)
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss/loss"]) and r["reward/think_rm/unparsable"] == 0
        assert abs(r["reward/think_rm/mean"]) < 1e-6            # Σ_i A_i = 0 in every group (D antisymmetric)
        # each row has G − 1 = 3 verdicts: ties + wins + losses, and mean wins = mean losses
        assert r["reward/think_rm/ties"] + 2 * r["reward/think_rm/wins"] == pytest.approx(3.0, rel=1e-6)
    assert any(r["reward/think_rm/wins"] > 0 and r["adv/abs_mean"] > 0 and r["loss/loss"] != 0 for r in rows)
