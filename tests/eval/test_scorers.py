"""Tests for finegrain.eval.scorers and the selection/process helpers of finegrain.eval.experiment:
worked examples on hand-made trajectories (arith task, character tokenizer) and fake language
models whose log-probabilities are known in closed form."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from finegrain.eval.experiment import default_Ns, process_metrics, response_scores, selection_curves
from finegrain.eval.report import SampleRecord
from finegrain.eval.scorers import SCORERS, ScorerContext, Scores, score, vote_weights
from finegrain.eval.search import Beam, candidates_trajectory
from finegrain.eval.selection import STEP_AGGREGATIONS
from finegrain.models.tokenizer import char_tokenizer
from finegrain.tasks.base import Example

RTOL, ATOL = 1e-5, 1e-6
EX = Example("x", "Q: 7 +5 *3 -4\n", "32", meta={"start": 7, "ops": [["+", 5], ["*", 3], ["-", 4]]})


def make_traj(tok, texts, example=EX, eos=False):
    """A Trajectory of responses ``texts`` to ``example`` (one problem), via the search helper."""
    prompt = tok(example.prompt)["input_ids"]
    beams = [Beam(0, tok(t, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else []))
             for t in texts]
    return candidates_trajectory(tok, [prompt], beams, [example], "newline")


# ----------------------------------------------------------------------------------- oracles


def test_oracle_worked_example(task, tok):
    texts = ["7+5=12\n12*3=36\n36-4=32\nA: 32",  # right: 4 steps, outcome 1
             "7+5=13\nA: 13",                      # wrong answer: 2 steps, outcome 0
             ""]                                   # empty: no step
    out = score("oracle", make_traj(tok, texts), task, ScorerContext())
    assert out.outcome == [1.0, 0.0, 0.0]
    assert out.step == [[1.0] * 4, [0.0, 0.0], []]
    assert out.token is None


def test_step_oracle_marks_the_compensating_errors(task, tok):
    # labels [wrong, correct, wrong, correct] (two compensating errors; arith module doctest)
    out = score("step_oracle", make_traj(tok, ["7+5=13\n13*3=39\n39-4=32\nA: 32"]), task, ScorerContext())
    assert out.step == [[0.0, 1.0, 0.0, 1.0]]
    assert out.outcome == [1.0]


def test_step_oracle_refuses_a_task_without_labels(tok):
    plain = SimpleNamespace(name="plain", segmenter="newline", verify=lambda ex, t: 0.0)
    with pytest.raises(ValueError, match="no exact step labels"):
        SCORERS.get("step_oracle")(make_traj(tok, ["1\n"]), plain, ScorerContext())


# --------------------------------------------------------------------------------- implicit PRM


class FixedLM(torch.nn.Module):
    """Next-token logits that ignore the context: 0 everywhere, plus ``bonus`` on token ``boost``."""

    def __init__(self, vocab: int, boost: int | None = None, bonus: float = 0.0):
        super().__init__()
        self.vocab, self.boost, self.bonus = vocab, boost, bonus

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        if self.boost is not None:
            logits[..., self.boost] = self.bonus
        return SimpleNamespace(logits=logits)


def test_implicit_prm_worked_example():
    # V = 7 (4 specials + '1', '+', '\n'). PRM: logit ln 2 on '1' → p('1') = 2/8, p(other) = 1/8.
    # Reference: uniform, p = 1/7. Log-ratios: '1' → ln(14/8) = ln 1.75, other → ln(7/8) = ln 0.875.
    # β = 0.5, response "1\n++" + EOS:
    #   tokens   1        \n        +         +         <eos>
    #   r_t      ½ln1.75  ½ln.875   ½ln.875   ½ln.875   ½ln.875
    #   step 0 = "1\n" → ½ ln(1.75·0.875);  step 1 = "++" → ln 0.875;  EOS is outside every step
    #   outcome = Σ_t r_t = ½ ln 1.75 + 2 ln 0.875
    tok = char_tokenizer("1+\n")
    V = len(tok)
    assert V == 7
    one = tok.convert_tokens_to_ids("1")
    ctx = ScorerContext(prm_model=FixedLM(V, one, math.log(2.0)), ref_model=FixedLM(V), beta=0.5)
    task = SimpleNamespace(name="t", segmenter="newline")
    ex = Example("e", "1+1\n", "2")
    out = score("implicit_prm", make_traj(tok, ["1\n++"], example=ex, eos=True), task, ctx)
    a, b = 0.5 * math.log(1.75), 0.5 * math.log(0.875)
    np.testing.assert_allclose(out.step[0], [a + b, 2 * b], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.outcome, [a + 4 * b], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.token[0], [a, b, b, b, b], rtol=RTOL, atol=ATOL)


def test_implicit_prm_matches_response_logprobs_on_real_models(task, tok):
    from finegrain.models.logprobs import response_logprobs
    from finegrain.models.tiny import tiny_causal_lm

    prm, ref = tiny_causal_lm(tok, size="micro", seed=1), tiny_causal_lm(tok, size="micro", seed=2)
    traj = make_traj(tok, ["7+5=12\n12*3=36\nA: 36", "7+5=13\n"], eos=False)
    out = score("implicit_prm", traj, task, ScorerContext(prm_model=prm, ref_model=ref, beta=0.1))
    L = traj.response_ids.shape[1]
    with torch.no_grad():
        q = (response_logprobs(prm, traj.input_ids, traj.attention_mask, L)
             - response_logprobs(ref, traj.input_ids, traj.attention_mask, L))  # (B, L)
    # row 0: steps "7+5=12\n" (7 tokens), "12*3=36\n" (8), "A: 36" (5)
    ends = [0, 7, 15, 20]
    want = [0.1 * float(q[0, s:e].sum()) for s, e in zip(ends[:-1], ends[1:])]
    np.testing.assert_allclose(out.step[0], want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.step[1], [0.1 * float(q[1, :7].sum())], rtol=RTOL, atol=ATOL)
    assert len(out.token[1]) == 7


def test_implicit_prm_needs_both_models(task, tok):
    with pytest.raises(ValueError, match="needs a PRM model and a reference model"):
        score("implicit_prm", make_traj(tok, ["1\n"]), task, ScorerContext(prm_model=object()))


# ------------------------------------------------------------------------------------- random


def test_random_is_seeded_uniform_and_shaped(task, tok):
    traj = make_traj(tok, ["7+5=12\nA: 12", "1\n2\n3\n"])
    a = score("random", traj, task, ScorerContext(rng=np.random.default_rng(3)))
    b = score("random", traj, task, ScorerContext(rng=np.random.default_rng(3)))
    c = score("random", traj, task, ScorerContext(rng=np.random.default_rng(4)))
    assert a == b and a != c
    assert [len(s) for s in a.step] == [2, 3]
    assert all(0.0 <= x < 1.0 for x in a.outcome + [v for s in a.step for v in s])


# ----------------------------------------------------------------------------- registry & weights


def test_every_scorer_declares_level_weight_and_center():
    for name in SCORERS.names():
        m = SCORERS.meta(name)
        assert m["level"] in ("outcome", "step") and m["weight"] in ("identity", "sigmoid"), name
        assert isinstance(m["center"], float), name
        assert m["value"] in STEP_AGGREGATIONS, name
    with pytest.raises(KeyError, match="available: implicit_prm, oracle, random, step_oracle"):
        SCORERS.get("nope")


def test_vote_weights_worked_example():
    np.testing.assert_allclose(vote_weights([0.0, 1.0, float("-inf")], "identity"), [0.0, 1.0, 0.0])
    np.testing.assert_allclose(vote_weights([0.0, math.log(3.0)], "sigmoid"), [0.5, 0.75], rtol=RTOL)  # 1/(1+1/3)
    with pytest.raises(ValueError, match="vote weight 'x'"):
        vote_weights([1.0], "x")


def test_scores_checks_lengths_and_concatenates():
    with pytest.raises(ValueError, match="2 step lists but 1 outcome"):
        Scores(step=[[1.0], []], outcome=[0.0])
    s = Scores.concat([Scores([[1.0]], [0.5], [[0.1]]), Scores([[]], [0.2], None)])
    assert s.step == [[1.0], []] and s.outcome == [0.5, 0.2] and s.token is None


# ------------------------------------------------------------- selection with scorer outputs


def test_response_scores_use_the_level():
    steps = [[[0.9, 0.2], [0.5]]]
    outcome = np.array([[1.0, 0.0]])
    assert response_scores(steps, outcome, "outcome", "min").tolist() == [[1.0, 0.0]]
    assert response_scores(steps, outcome, "step", "min").tolist() == [[0.2, 0.5]]
    np.testing.assert_allclose(response_scores(steps, outcome, "step", "product"), [[0.18, 0.5]], rtol=RTOL)


def test_selection_curves_worked_example():
    # one problem, n = 3 samples: answers 4 (right), 5, 5; PRM-like scores 0.9, 0.1, 0.5
    correct = np.array([[True, False, False]])
    answers = [["4", "5", "5"]]
    scores = {"oracle": np.array([[1.0, 0.0, 0.0]]), "prm": np.array([[0.9, 0.1, 0.5]]),
              "worst": np.array([[0.1, 0.9, 0.5]])}
    weights = {"prm": np.array([[0.9, 0.3, 0.4]])}
    c = selection_curves(correct, scores, weights=weights, answers=answers, Ns=[1, 2, 3])
    # N = 1: every selector is a uniform pick → 1/3
    # oracle: N-subsets containing sample 0: N=2 → 2 of 3 subsets; N=3 → all
    np.testing.assert_allclose(c["bon"]["oracle"], [1 / 3, 2 / 3, 1.0], rtol=RTOL)
    np.testing.assert_allclose(c["pass_at"], [1 / 3, 2 / 3, 1.0], rtol=RTOL)
    # prm ranks sample 0 first: it wins whenever it is in the subset → same as the oracle here
    np.testing.assert_allclose(c["bon"]["prm"], [1 / 3, 2 / 3, 1.0], rtol=RTOL)
    # worst ranks sample 0 last: picked only when alone → N=1: 1/3, then 0
    np.testing.assert_allclose(c["bon"]["worst"], [1 / 3, 0.0, 0.0], atol=ATOL)
    # majority: N=2 subsets {0,1} tie → first ('4', right), {0,2} tie → '4', {1,2} → '5'; N=3: '5' (2 votes)
    np.testing.assert_allclose(c["majority_vote"], [1 / 3, 2 / 3, 0.0], rtol=RTOL)
    # weighted: N=3 totals 4: 0.9, 5: 0.3 + 0.4 = 0.7 → '4'; N=2: {0,1} 0.9>0.3, {0,2} 0.9>0.4, {1,2} '5'
    np.testing.assert_allclose(c["weighted_vote"]["prm"], [1 / 3, 2 / 3, 1.0], rtol=RTOL)
    np.testing.assert_allclose(c["random_expected"], [1 / 3] * 3, rtol=RTOL)


def test_default_Ns_reach_64():
    assert default_Ns(64) == [1, 2, 4, 8, 16, 32, 64]
    assert default_Ns(1) == [1]


def test_process_metrics_worked_example():
    def rec(labels, scores, first, correct):
        return SampleRecord(problem=0, sample=0, prompt="", reference="", response="", correct=correct,
                            step_labels=labels, first_error=first, step_scores={"prm": scores})

    rs = [rec([1, 0], [0.9, 0.2], 1, False), rec([1, 1], [0.8, 0.7], None, True),
          rec([1, -1], [0.6, 0.95], 1, True)]
    m = process_metrics(rs, ["prm"])
    # labels 1,0 | 1,1 | 1,−1 → correct 4/6, wrong 1/6, unparseable 1/6
    np.testing.assert_allclose(list(m["step_label_frac"].values()), [4 / 6, 1 / 6, 1 / 6], rtol=RTOL)
    assert m["error_free_frac"] == pytest.approx(1 / 3)
    # miracle: response 3 is right but has a non-correct step → 1 of the 2 right ones
    assert m["miracle_step_rate"]["among_correct"] == pytest.approx(0.5)
    p = m["scorers"]["prm"]
    # AUROC: correct steps 0.9, 0.8, 0.7, 0.6 all above the one wrong step 0.2 (the −1 step is left out)
    assert p["step_auroc"] == pytest.approx(1.0)
    # candidates 0.2 0.6 0.7 0.8 0.9 0.95 inf; F1 at 0.2 = 0 (no error found); at 0.6 and 0.7:
    # r1 → first error 1 ✓, r2 → none ✓, r3 ✗ (0.6: none; 0.7: step 0; true 1) → error acc ½,
    # correct acc 1, F1 = 2·½·1/(3/2) = 2/3; at 0.8 r2 fails. Ties go to the smallest: 0.6.
    assert p["threshold"] == pytest.approx(0.6)
    assert p["f1"] == pytest.approx(2 / 3)
    assert p["first_error_acc"] == pytest.approx(2 / 3)
    assert process_metrics([rec(None, [], None, True)], ["prm"]) == {}
