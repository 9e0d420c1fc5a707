"""Tests for finegrain.eval.scoring (REWARDS entries as eval scorers, the RewardOutput → Scores
adapter) and the selection/process helpers of finegrain.eval.experiment: worked examples on
hand-made trajectories (arith task, character tokenizer) and fake language models whose
log-probabilities are known in closed form."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from finegrain.config import RunConfig
from finegrain.eval.experiment import default_Ns, process_metrics, response_scores, selection_curves
from finegrain.eval.report import SampleRecord
from finegrain.eval.scoring import (EVAL_DEFAULTS, RENAMED, VOTES, Scores, build_scorers, check_scorer, eval_meta,
                                    eval_names, score, scores_from_output, vote_weights)
from finegrain.eval.search import Beam, candidates_trajectory
from finegrain.eval.selection import STEP_AGGREGATIONS
from finegrain.models.tokenizer import char_tokenizer
from finegrain.rewards import REWARDS
from finegrain.rewards.base import RewardOutput
from finegrain.tasks.base import Example
from finegrain.train.stages import RewardContext
from tests.reference.loops import token_scores_reference

RTOL, ATOL = 1e-5, 1e-6
EX = Example("x", "Q: 7 +5 *3 -4\n", "32", meta={"start": 7, "ops": [["+", 5], ["*", 3], ["-", 4]]})
EVAL_KEYS = ("vote", "center", "search_value", "eval_kwargs", "eval_needs")


def make_traj(tok, texts, example=EX, eos=False):
    """A Trajectory of responses ``texts`` to ``example`` (one problem), via the search helper."""
    prompt = tok(example.prompt)["input_ids"]
    beams = [Beam(0, tok(t, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else []))
             for t in texts]
    return candidates_trajectory(tok, [prompt], beams, [example], "newline")


def context(task, tok=None, prm=None, ref=None, seed=0):
    """The RewardContext ``finegrain eval`` builds: policy = the PRM, initial_policy() = its reference."""
    cfg = RunConfig()
    cfg.train.seed = seed
    return RewardContext(cfg, task, tok, prm, lambda: ref)


def scorer(name, task, reward_kwargs=None, **ctx_kw):
    return build_scorers([name], context(task, **ctx_kw), {name: reward_kwargs} if reward_kwargs else None)[name]


# ----------------------------------------------------------------------------- the exact rewards


def test_verifier_worked_example(task, tok):
    texts = ["7+5=12\n12*3=36\n36-4=32\nA: 32",  # right: 4 steps, outcome 1
             "7+5=13\nA: 13",                      # wrong answer: 2 steps, outcome 0
             ""]                                   # empty: no step
    out = score(scorer("verifier", task), make_traj(tok, texts), task)
    assert out.outcome == [1.0, 0.0, 0.0]
    assert out.step == [[1.0] * 4, [0.0, 0.0], []]  # an outcome-level signal: its outcome on every step
    assert out.token is None and out.turn is None


def test_step_labels_with_eval_kwargs_mark_the_compensating_errors(task, tok):
    # labels [wrong, correct, wrong, correct] (two compensating errors; arith module doctest);
    # eval_kwargs put them on the 1 = correct, 0 = wrong scale (training's default is 0 / −1)
    signal = scorer("step_labels", task)
    assert (signal.correct, signal.wrong) == (1.0, 0.0)
    out = score(signal, make_traj(tok, ["7+5=13\n13*3=39\n39-4=32\nA: 32"]), task)
    assert out.step == [[0.0, 1.0, 0.0, 1.0]]
    assert out.outcome == [2.0]  # a step-level signal's response total: Σ_k r_k


def test_reward_kwargs_override_the_eval_defaults(task, tok):
    signal = scorer("step_labels", task, {"wrong": -1.0})
    assert (signal.correct, signal.wrong) == (1.0, -1.0)
    out = score(signal, make_traj(tok, ["7+5=13\n13*3=39\n39-4=32\nA: 32"]), task)
    assert out.step == [[-1.0, 1.0, -1.0, 1.0]]


def test_step_labels_refuses_a_task_without_labels(tok):
    plain = SimpleNamespace(name="plain", segmenter="newline", verify=lambda ex, t: 0.0)
    with pytest.raises(ValueError, match="cannot label steps"):
        scorer("step_labels", plain)


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
    task = SimpleNamespace(name="t", segmenter="newline")
    signal = scorer("implicit_prm", task, {"beta": 0.5}, prm=FixedLM(V, one, math.log(2.0)), ref=FixedLM(V))
    out = score(signal, make_traj(tok, ["1\n++"], example=Example("e", "1+1\n", "2"), eos=True), task)
    a, b = 0.5 * math.log(1.75), 0.5 * math.log(0.875)
    np.testing.assert_allclose(out.step[0], [a + b, 2 * b], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.outcome, [a + 4 * b], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.token[0], [a, b, b, b, b], rtol=RTOL, atol=ATOL)


def test_implicit_prm_matches_response_logprobs_on_real_models(task, tok):
    from finegrain.models.logprobs import response_logprobs
    from finegrain.models.tiny import tiny_causal_lm

    prm, ref = tiny_causal_lm(tok, size="micro", seed=1).eval(), tiny_causal_lm(tok, size="micro", seed=2)
    traj = make_traj(tok, ["7+5=12\n12*3=36\nA: 36", "7+5=13\n"], eos=False)
    signal = scorer("implicit_prm", task, {"beta": 0.1}, prm=prm, ref=ref)
    out = score(signal, traj, task)
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
    assert not prm.training  # the eval PRM is used as it is: no copy, no train() toggling


def test_implicit_prm_in_eval_is_the_training_entry_without_a_copy(task, tok):
    from finegrain.models.tiny import tiny_causal_lm

    prm, ref = tiny_causal_lm(tok, size="micro", seed=1), tiny_causal_lm(tok, size="micro", seed=2)
    signal = scorer("implicit_prm", task, prm=prm, ref=ref)
    assert type(signal) is REWARDS.get("implicit_prm")
    assert signal.prm_model is prm and signal.ref_model is ref and signal.optimizer is None
    assert (signal.update_mode, signal.temperature, signal.micro_batch, signal.beta) == ("none", 1.0, 64, 0.05)
    with pytest.raises(ValueError, match="copy_policy: false .* needs update: none"):
        scorer("implicit_prm", task, {"update": "after"}, prm=prm, ref=ref)


def test_implicit_prm_needs_a_reference(task, tok):
    with pytest.raises(ValueError, match="'initial' needs a reference model"):
        scorer("implicit_prm", task, prm=FixedLM(len(tok)), ref=None)


# ------------------------------------------------------------------------------------- random


def test_random_is_seeded_uniform_and_shaped(task, tok):
    traj = make_traj(tok, ["7+5=12\nA: 12", "1\n2\n3\n"])
    a = score(scorer("random", task, {"seed": 3}), traj, task)
    b = score(scorer("random", task, {"seed": 3}), traj, task)
    c = score(scorer("random", task, {"seed": 4}), traj, task)
    assert a == b and a != c
    assert [len(s) for s in a.step] == [2, 3]
    assert all(0.0 <= x < 1.0 for x in a.outcome + [v for s in a.step for v in s])
    # the seed defaults to the run's (in finegrain eval, --seed): the first draws of default_rng(seed)
    d = score(scorer("random", task, seed=3), traj, task)
    assert d == a
    np.testing.assert_allclose(d.outcome, np.random.default_rng(3).random(2), rtol=1e-6)


def test_random_is_a_training_reward_too(task, tok):
    from finegrain.config import from_dict, validate
    from finegrain.rewards.combine import to_token_rewards

    cfg = RunConfig()
    cfg.rewards = [from_dict(type(cfg.rewards[0]), {"name": "random", "weight": 1.0, "kwargs": {"seed": 5}})]
    validate(cfg)  # an outcome-level signal: any estimator takes it
    traj = make_traj(tok, ["7+5=12\nA: 12", "1\n"])
    out = REWARDS.get("random").from_context(context(task), seed=5)(traj)
    placed = to_token_rewards(out, traj)  # (B, L): the value on each row's last trained token
    assert placed.dtype == torch.float32
    np.testing.assert_allclose(placed.sum(1), out.values, rtol=RTOL)


# ---------------------------------------------------------------------- registry metadata & names


def test_every_reward_usable_in_eval_declares_its_eval_metadata():
    usable = eval_names()
    assert {"verifier", "step_labels", "implicit_prm", "random"} <= set(usable)
    for name in REWARDS.names():
        meta = REWARDS.meta(name)
        if not any(k in meta for k in EVAL_KEYS):
            assert name not in usable, name
            continue
        # usable: vote (the opt-in), center and search_value declared on the registration itself
        assert name in usable and meta["vote"] in VOTES, name
        assert isinstance(meta["center"], float), name
        assert meta["search_value"] in STEP_AGGREGATIONS, name
        assert meta.get("eval_needs") in (None, "prm"), name
        REWARDS.check_kwargs(name, meta.get("eval_kwargs", {}), f"{name}.eval_kwargs")
        assert set(eval_meta(name)) == {"vote", *EVAL_DEFAULTS}, name
    assert all(old not in REWARDS for old in RENAMED)


def test_eval_metadata_of_the_four_scorers():
    got = {n: (eval_meta(n)["vote"], eval_meta(n)["center"], eval_meta(n)["search_value"])
           for n in ("verifier", "step_labels", "implicit_prm", "random")}
    assert got == {"verifier": ("identity", 0.5, "last"), "step_labels": ("identity", 0.5, "min"),
                   "implicit_prm": ("sigmoid", 0.0, "sum"), "random": ("identity", 0.5, "last")}
    assert eval_meta("implicit_prm")["eval_needs"] == "prm" and eval_meta("verifier")["eval_needs"] is None


def test_old_and_unknown_names_raise_one_line():
    with pytest.raises(ValueError, match=r"^--scorers: 'oracle' is now the reward 'verifier'; use --scorers verifier$"):
        check_scorer("oracle", "--scorers")
    with pytest.raises(ValueError, match=r"^scorers: 'step_oracle' is now the reward 'step_labels'; "
                                         r"use 'step_labels'$"):
        check_scorer("step_oracle")
    with pytest.raises(ValueError, match="unknown reward 'nope'; usable in evaluation: .*verifier"):
        check_scorer("nope")
    with pytest.raises(ValueError, match="reward 'overlong' declares no eval metadata"):
        check_scorer("overlong")
    with pytest.raises(ValueError, match=r"reward_kwargs.step_labels: unknown key 'right'"):
        build_scorers(["step_labels"], context(None), {"step_labels": {"right": 1.0}})
    with pytest.raises(ValueError, match="'random' is not one of the scorers"):
        build_scorers(["verifier"], context(None), {"random": {"seed": 1}})


def test_vote_weights_worked_example():
    np.testing.assert_allclose(vote_weights([0.0, 1.0, float("-inf")], "identity"), [0.0, 1.0, 0.0])
    np.testing.assert_allclose(vote_weights([0.0, math.log(3.0)], "sigmoid"), [0.5, 0.75], rtol=RTOL)  # 1/(1+1/3)
    with pytest.raises(ValueError, match="vote weight 'x'"):
        vote_weights([1.0], "x")
    with pytest.raises(ValueError, match="'identity': scores must be >= 0, got -1.0"):
        vote_weights([0.5, -1.0], "identity")


def test_scores_checks_lengths_and_concatenates():
    with pytest.raises(ValueError, match="2 step lists but 1 outcome"):
        Scores(step=[[1.0], []], outcome=[0.0])
    s = Scores.concat([Scores([[1.0]], [0.5], [[0.1]]), Scores([[]], [0.2], None)])
    assert s.step == [[1.0], []] and s.outcome == [0.5, 0.2] and s.token is None and s.turn is None


# --------------------------------------------------------------------------------- the adapter

def test_adapter_outcome_not_applicable_is_minus_inf(task, tok):
    traj = make_traj(tok, ["1\n2\n", "3\n"])
    out = RewardOutput(torch.tensor([0.7, 0.2]), torch.tensor([True, False]), "outcome")
    s = scores_from_output(out, traj, task)
    assert s.outcome == [pytest.approx(0.7), float("-inf")] and s.step == [[pytest.approx(0.7)] * 2, [float("-inf")]]


def test_adapter_step_level_worked_example(task, tok):
    traj = make_traj(tok, ["1\n2\n3\n", "4\n"])  # 3 steps and 1 step
    values = torch.tensor([[0.5, 0.25, 2.0], [1.0, 9.0, 9.0]])
    mask = torch.tensor([[True, False, True], [True, False, False]])
    s = scores_from_output(RewardOutput(values, mask, "step"), traj, task)
    # the unscored step 1 of row 0 is −inf and left out of the total; row 1 has one step
    assert s.step == [[0.5, float("-inf"), 2.0], [1.0]] and s.outcome == [2.5, 1.0]
    with pytest.raises(ValueError, match="response 1 has 1 steps but the signal scores step 1"):
        scores_from_output(RewardOutput(values, torch.ones(2, 3, dtype=torch.bool), "step"), traj, task)


def test_adapter_token_level_with_a_partial_mask(task, tok):
    traj = make_traj(tok, ["12\n3\n"])  # tokens 1 2 \n 3 \n; steps "12\n" (3 tokens), "3\n" (2)
    values = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0]])
    mask = torch.tensor([[True, False, True, True, True]])  # token 1 not applicable
    s = scores_from_output(RewardOutput(values, mask, "token"), traj, task)
    assert s.step == [[5.0, 24.0]] and s.outcome == [29.0]
    assert s.token[0][:1] + s.token[0][2:] == [1.0, 4.0, 8.0, 16.0] and math.isnan(s.token[0][1])


def test_adapter_turn_level_worked_example(task, tok):
    traj = make_traj(tok, ["1\n2\n3\n"]).replace(turn_ids=torch.tensor([[0, 0, 0, 0, 1, 1]]))  # turn 1 = "3\n"
    out = RewardOutput(torch.tensor([[0.25, 0.5]]), torch.tensor([[True, True]]), "turn")
    s = scores_from_output(out, traj, task)
    assert s.turn == [[0.25, 0.5]] and s.step == [[0.25, 0.25, 0.5]] and s.outcome == [0.75]
    masked = scores_from_output(RewardOutput(out.values, torch.tensor([[False, True]]), "turn"), traj, task)
    assert masked.turn == [[float("-inf"), 0.5]] and masked.step == [[float("-inf")] * 2 + [0.5]]
    assert masked.outcome == [0.5]


@pytest.mark.parametrize("seed", range(5))
def test_adapter_token_level_matches_a_loop(task, tok, seed):
    rng = random.Random(seed)
    texts = ["".join(rng.choice("12\n") for _ in range(rng.randint(0, 9))) for _ in range(4)]
    traj = make_traj(tok, texts)
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(traj.response_ids.shape, generator=g)
    mask = traj.response_mask & (torch.rand(traj.response_ids.shape, generator=g) < 0.8)
    s = scores_from_output(RewardOutput(values, mask, "token"), traj, task)
    steps, outcome = token_scores_reference(values.tolist(), mask.tolist(), traj.step_ids.tolist(),
                                            [len(r) for r in s.step])
    for got, want in zip(s.step, steps):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(s.outcome, outcome, rtol=RTOL, atol=ATOL)


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
    scores = {"verifier": np.array([[1.0, 0.0, 0.0]]), "prm": np.array([[0.9, 0.1, 0.5]]),
              "worst": np.array([[0.1, 0.9, 0.5]])}
    weights = {"prm": np.array([[0.9, 0.3, 0.4]])}
    c = selection_curves(correct, scores, weights=weights, answers=answers, Ns=[1, 2, 3])
    # N = 1: every selector is a uniform pick → 1/3
    # verifier: N-subsets containing sample 0: N=2 → 2 of 3 subsets; N=3 → all
    np.testing.assert_allclose(c["bon"]["verifier"], [1 / 3, 2 / 3, 1.0], rtol=RTOL)
    np.testing.assert_allclose(c["pass_at"], [1 / 3, 2 / 3, 1.0], rtol=RTOL)
    # prm ranks sample 0 first: it wins whenever it is in the subset → same as the verifier here
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
