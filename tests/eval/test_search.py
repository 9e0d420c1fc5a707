"""Tests for finegrain.eval.search: the pure helpers (worked examples) and step searches with a
tiny random model, checked through a scorer that records every candidate it is shown."""

from __future__ import annotations

import pytest
import torch

from finegrain.config import RunConfig
from finegrain.eval.scoring import Scores, build_scorers, num_steps, score
from finegrain.eval.search import SEARCHES, keep_top, step_search, stop_token_ids
from finegrain.eval.selection import aggregate_steps
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import train_bpe_tokenizer
from finegrain.sampling import SamplingParams
from finegrain.train.stages import RewardContext


@pytest.fixture(scope="module")
def model(tok):
    return tiny_causal_lm(tok, size="micro", seed=0).eval()


class Spy:
    """A scorer recording every call: step score = number of '1' characters in the step."""

    def __init__(self, task):
        self.task, self.calls = task, []

    def __call__(self, traj) -> Scores:
        steps = []
        for text, n in zip(traj.response_texts, num_steps(self.task, traj.response_texts)):
            from finegrain.segment import newline

            steps.append([float(text[s:e].count("1")) for s, e in newline(text)][:n])
        self.calls.append({"texts": list(traj.response_texts), "steps": steps,
                           "tokens": traj.response_mask.sum(1).tolist(), "problems": traj.group_ids.tolist()})
        return Scores(step=steps, outcome=[0.0] * len(steps))


# ------------------------------------------------------------------------------------ helpers


def test_stop_tokens_char_and_bpe(tok):
    ids = stop_token_ids(tok)
    assert ids == [tok.eos_token_id, tok.convert_tokens_to_ids("\n")]
    bpe = train_bpe_tokenizer(["a b\nc d\n\ne f. g\n"] * 20, vocab_size=300)
    stops = stop_token_ids(bpe)
    assert stops[0] == bpe.eos_token_id and len(stops) > 1
    for i in range(len(bpe)):
        text = bpe.decode([i], skip_special_tokens=True)
        assert (i in stops[1:]) == ("\n" in text and i not in bpe.all_special_ids), (i, text)


def test_keep_top_worked_example():
    problems = [1, 0, 1, 0, 1]
    scores = [0.5, float("-inf"), 0.5, 2.0, 0.7]
    # problem 1: 0.7 (idx 4), then the tie 0.5/0.5 goes to idx 0; problem 0: 2.0 (idx 3)
    assert keep_top(problems, scores, 2) == [0, 1, 3, 4]
    assert keep_top(problems, scores, 1) == [3, 4]


def test_budget_errors(model, tok, task):
    ex = task.examples("test", 1)
    with pytest.raises(ValueError, match="multiple of beam_width"):
        step_search(model, tok, task, ex, Spy(task), n_beams=6, beam_width=4)
    with pytest.raises(ValueError, match="tau must be >= 1"):
        step_search(model, tok, task, ex, Spy(task), n_beams=4, beam_width=2, tau=0)
    with pytest.raises(ValueError, match="needs tau"):
        SEARCHES.get("early_reject")(model, tok, task, ex, Spy(task), n_beams=4, beam_width=2, tau=None)


# --------------------------------------------------------------------------- searches on a model

OPTS = dict(sampling=SamplingParams(temperature=1.0, max_new_tokens=20), max_steps=3, max_step_tokens=8,
            use_chat_template=False)


def test_single_beam_counts_exactly_the_kept_tokens(model, tok, task):
    # N = M = 1: nothing is rejected, so every sampled token is in the final response
    ex = task.examples("test", 3)
    for tau in (None, 3):
        res = step_search(model, tok, task, ex, Spy(task), n_beams=1, beam_width=1, tau=tau, seed=1, **OPTS)
        assert res.generated_tokens == [len(ids) for ids in res.response_ids]
        assert all(len(ids) <= 20 for ids in res.response_ids)
        assert all(t.count("\n") <= 3 for t in res.responses)


def test_early_reject_with_tau_past_the_step_cap_is_beam_search(model, tok, task):
    ex = task.examples("test", 2)
    a = SEARCHES.get("beam")(model, tok, task, ex, Spy(task), n_beams=4, beam_width=2, tau=None, seed=3, **OPTS)
    b = SEARCHES.get("early_reject")(model, tok, task, ex, Spy(task), n_beams=4, beam_width=2, tau=8, seed=3, **OPTS)
    assert (a.responses, a.generated_tokens, a.scores) == (b.responses, b.generated_tokens, b.scores)


def test_same_seed_same_search_and_rng_untouched(model, tok, task):
    ex = task.examples("test", 2)
    state = torch.random.get_rng_state()
    a = step_search(model, tok, task, ex, Spy(task), n_beams=4, beam_width=2, seed=5, **OPTS)
    assert torch.equal(state, torch.random.get_rng_state())
    b = step_search(model, tok, task, ex, Spy(task), n_beams=4, beam_width=2, seed=5, **OPTS)
    c = step_search(model, tok, task, ex, Spy(task), n_beams=4, beam_width=2, seed=6, **OPTS)
    assert (a.responses, a.generated_tokens) == (b.responses, b.generated_tokens)
    assert a.responses != c.responses


def test_beam_keeps_the_best_candidate(model, tok, task):
    # one iteration, N = M = 8 (one kept beam): the answer is the best of the 8 scored candidates
    ex = task.examples("test", 2)
    spy = Spy(task)
    opts = dict(OPTS, max_steps=1)
    res = step_search(model, tok, task, ex, spy, n_beams=8, beam_width=8, aggregation="sum", seed=2, **opts)
    (call,) = spy.calls
    for p in range(2):
        scored = [(aggregate_steps(s, "sum"), t) for s, t, q in zip(call["steps"], call["texts"], call["problems"])
                  if q == p]
        assert len(scored) == 8
        best = max(s for s, _ in scored)
        assert res.scores[p] == best
        assert res.responses[p] == next(t for s, t in scored if s == best)  # first of the tied best
    # every candidate was sampled: tokens = Σ candidate lengths
    assert sum(res.generated_tokens) == sum(call["tokens"])


def test_early_reject_completes_only_the_kept_partial(model, tok, task):
    # one iteration, N = M = 4, τ = 2: 4 partial candidates of ≤ 2 tokens, the best is completed
    ex = task.examples("test", 1)
    spy = Spy(task)
    opts = dict(OPTS, max_steps=1)
    res = step_search(model, tok, task, ex, spy, n_beams=4, beam_width=4, tau=2, aggregation="last", seed=4, **opts)
    partial = spy.calls[0]
    assert all(n <= 2 for n in partial["tokens"]) and len(partial["tokens"]) == 4
    scores = [aggregate_steps(s, "last") for s in partial["steps"]]
    kept = scores.index(max(scores))
    assert res.responses[0].startswith(partial["texts"][kept])
    completed = len(res.response_ids[0]) - partial["tokens"][kept]
    assert res.generated_tokens[0] == sum(partial["tokens"]) + completed


def test_implicit_prm_guided_search_on_bpe_qwen2(task):
    # the real-model path: byte-level BPE, a tiny Qwen2, the implicit-PRM scorer
    texts = [ex.prompt + ex.solution for ex in task.examples("train", 200)]
    bpe = train_bpe_tokenizer(texts, vocab_size=300)
    policy = tiny_causal_lm(bpe, family="qwen2", size="micro", seed=0)
    ref = tiny_causal_lm(bpe, family="qwen2", size="micro", seed=1)
    ctx = RewardContext(RunConfig(), task, bpe, policy, lambda: ref)  # policy = the PRM, initial = its reference
    prm = build_scorers(["implicit_prm"], ctx)["implicit_prm"]
    ex = task.examples("test", 2)
    res = SEARCHES.get("early_reject")(policy, bpe, task, ex, lambda t: score(prm, t, task),
                                       n_beams=4, beam_width=2, tau=2, seed=0, **OPTS)
    assert len(res.responses) == 2 and all(t > 0 for t in res.generated_tokens)
    assert all(isinstance(s, float) for s in res.scores)
