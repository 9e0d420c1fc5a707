"""Tests for finegrain.rewards.agents: worked examples (a), loop references (b), invariances (c),
on Trajectories built directly from turn texts (and one LookupTask episode)."""

from __future__ import annotations

import itertools
import math
import string
from types import SimpleNamespace

import pytest
import torch

from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import char_tokenizer
from finegrain.rewards import REWARDS
from finegrain.models.probe import probe_token_ids
from finegrain.rewards.agents import (Checklist, EntityMatch, EnvTurns, InfoGain, ToolCallMatch, call_similarity,
                                      checklist_satisfaction, entity_fraction, entity_rewards, greedy_assignment,
                                      info_gain_from_logprobs, match_call_rewards, mean_answer_logprobs,
                                      optimal_assignment, probe_prefix_lengths, sinkhorn_plan)
from finegrain.rewards.combine import to_token_rewards
from finegrain.tasks.base import Example
from finegrain.trajectory import Trajectory
from tests.helpers import ATOL, RTOL, close

TOK = char_tokenizer(string.ascii_letters + string.digits + " <>/():,._-\n")
V = len(TOK)


def call_info(name, *args, result="ok", error=None):
    return {"call": {"name": name, "args": list(args)}, "error": error, "result": None if error else result}


ANSWER = {"call": None, "error": None, "result": None}
MALFORMED = {"call": None, "error": "malformed", "result": None}


def build(rows, examples, groups=None, turn_info=None, truncated=None, prompt="Q"):
    """A Trajectory from rows of (text, turn, trained) segments, tokenized with the char tokenizer."""
    B = len(rows)
    prompts = [TOK(prompt)["input_ids"] for _ in rows]
    resp = [[(TOK(text, add_special_tokens=False)["input_ids"], k, trained) for text, k, trained in row] for row in rows]
    P = max(len(p) for p in prompts)
    L = max(sum(len(ids) for ids, _, _ in row) for row in resp)
    prompt_ids = torch.full((B, P), TOK.pad_token_id)
    prompt_mask = torch.zeros(B, P, dtype=torch.bool)
    response_ids = torch.full((B, L), TOK.pad_token_id)
    response_mask = torch.zeros(B, L, dtype=torch.bool)
    loss_mask = torch.zeros(B, L, dtype=torch.bool)
    turn_ids = torch.full((B, L), -1)
    for b in range(B):
        prompt_ids[b, P - len(prompts[b]):] = torch.tensor(prompts[b])
        prompt_mask[b, P - len(prompts[b]):] = True
        t = 0
        for ids, k, trained in resp[b]:
            response_ids[b, t:t + len(ids)] = torch.tensor(ids)
            response_mask[b, t:t + len(ids)] = True
            loss_mask[b, t:t + len(ids)] = trained
            turn_ids[b, t:t + len(ids)] = k
            t += len(ids)
    return Trajectory(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                      response_mask=response_mask, loss_mask=loss_mask,
                      group_ids=torch.tensor(groups if groups is not None else [0] * B),
                      step_ids=torch.where(response_mask, 0, -1), behavior_logprobs=torch.zeros(B, L),
                      truncated=torch.tensor(truncated or [False] * B), prompt_texts=[prompt] * B,
                      response_texts=["".join(text for text, _, _ in row) for row in rows], examples=list(examples),
                      turn_info=turn_info or [], turn_ids=turn_ids)


class AnswerTask:
    """verify = 1 iff the text after the last 'A:' equals the example's answer."""

    def verify(self, example, response):
        return 1.0 if "A:" in response and response.rsplit("A:", 1)[1].strip() == example.answer else 0.0


def ex(answer="7", **meta):
    return Example(id="e", prompt="Q", answer=answer, meta=meta)


def permute(traj, perm):
    return traj.select(perm)


# ================================================================================ env_turns

def test_env_turns_reads_the_environments_turn_rewards():
    traj = build([[("ab", 0, True), ("<>", 0, False), ("c", 1, True)]], [ex()])
    traj = traj.replace(turn_rewards=torch.tensor([[0.5, 7.0]]), turn_reward_mask=torch.tensor([[True, False]]))
    out = EnvTurns.from_context(None)(traj)
    assert out.level == "turn" and out.mask.tolist() == [[True, False]]
    close(out.values, [[0.5, 0.0]])              # a masked reward is not applicable, not 7
    # placed on the last trained token of turn 0 (token 1), nothing on turn 1
    close(to_token_rewards(out, traj), [[0.0, 0.5, 0.0, 0.0, 0.0]])


def test_env_turns_without_turn_rewards_places_nothing():
    traj = build([[("ab", 0, True)], [("c", 0, True)]], [ex(), ex()])
    out = EnvTurns()(traj)
    assert out.values.shape == (2, 1) and not out.mask.any()
    assert torch.equal(to_token_rewards(out, traj), torch.zeros(2, 2))


# ================================================================================ info_gain (IGPO)

class CountingLM(torch.nn.Module):
    """A stub causal LM whose next-token distribution is uniform except for one token ``target``,
    whose logit is β · (number of ``target`` tokens seen so far). With β = ln(V − 1):
    p(target) = 1/V after 0 occurrences, 1/2 after 1, (V − 1)/V after 2."""

    def __init__(self, target: int, beta: float):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))        # gives the module a device
        self.target, self.beta, self.calls = target, beta, []

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
        self.calls.append(tuple(input_ids.shape))
        seen = ((input_ids == self.target) & attention_mask.bool()).cumsum(1).float()
        logits = torch.zeros(*input_ids.shape, V)
        logits[..., self.target] = self.beta * seen
        return SimpleNamespace(logits=logits)


SEVEN = TOK.convert_tokens_to_ids("7")
# turn 0: a call whose result contains the answer; turn 1: a call whose result does not; turn 2: the answer
IG_ROW = [("<call>f(x)</call>", 0, True), ("\n<result>7</result>\n", 0, False),
          ("<call>g(y)</call>", 1, True), ("\n<result>none</result>\n", 1, False), ("A: 7", 2, True)]


def test_info_gain_worked_example():
    # Probes (prefix "A: ", answer "7", one answer token), p = probability of '7':
    #   boundary 0: prompt only               -> no '7' in context -> p0 = 1/V
    #   boundary 1: + turn 0 + "<result>7..." -> one '7'           -> p1 = 1/2
    #   boundary 2: + turn 1 + "<result>none" -> still one '7'     -> p2 = 1/2
    # prob_diff:      IG_0 = 1/2 − 1/V, IG_1 = 0; the answer turn (2) is not applicable
    # log_prob_diff:  IG_0 = ln(1/2) − ln(1/V) = ln(V/2), IG_1 = 0
    model = CountingLM(SEVEN, math.log(V - 1))
    traj = build([IG_ROW], [ex("7")])
    out = InfoGain(model, TOK, kind="prob_diff")(traj)
    assert out.level == "turn" and out.mask.tolist() == [[True, True, False]]
    close(out.values, [[0.5 - 1 / V, 0.0, 0.0]])
    lg = InfoGain(model, TOK, kind="log_prob_diff")(traj)
    close(lg.values, [[math.log(V / 2), 0.0, 0.0]])
    # the combiner puts IG_0 on the last trained token of turn 0 (the '>' closing '</call>')
    placed = to_token_rewards(out, traj)
    first_turn_end = len("<call>f(x)</call>") - 1
    assert placed[0, first_turn_end] == pytest.approx(0.5 - 1 / V, rel=RTOL)
    assert placed[0].abs().sum() == pytest.approx(0.5 - 1 / V, rel=RTOL)


def test_info_gain_probe_cost_one_row_per_turn_boundary():
    # rows with 3, 1 and 2 turns -> 3 + 0 + 2 = 5 probe rows; micro_batch 2 -> ceil(5/2) = 3 forwards
    model = CountingLM(SEVEN, 1.0)
    rows = [IG_ROW, [("A: 7", 0, True)], [("<call>f(x)</call>", 0, True), ("\n<result>7</result>\n", 0, False),
                                          ("A: 7", 1, True)]]
    traj = build(rows, [ex("7")] * 3)
    out = InfoGain(model, TOK, micro_batch=2)(traj)
    assert len(model.calls) == 3 and sum(shape[0] for shape in model.calls) == 5
    assert out.mask.tolist() == [[True, True, False], [False, False, False], [True, False, False]]
    # the probe of boundary 2 of row 0 is the longest: prompt (2) + turns 0-1 with outputs + "A: " + "7"
    longest = 2 + sum(len(t) for t, _, _ in IG_ROW[:4]) + 3 + 1
    assert max(shape[1] for shape in model.calls) == longest


def test_probe_prefix_lengths_include_the_tool_outputs():
    traj = build([IG_ROW], [ex()])
    n = probe_prefix_lengths(traj.turns[0], 3)
    assert n == [0, len(IG_ROW[0][0]) + len(IG_ROW[1][0]), sum(len(t) for t, _, _ in IG_ROW[:4])]


def test_batched_probes_match_one_unpadded_forward_each():
    """Left padding, position ids and micro-batching do not change a probe's log-prob: compare
    against a plain forward of each probe alone on a tiny Qwen2-shaped model."""
    model = tiny_causal_lm(TOK, family="qwen2", size="micro", seed=3).eval()
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(4, V, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (7,), generator=g)]
    answers = [torch.randint(4, V, (int(n),), generator=g).tolist() for n in torch.randint(1, 4, (7,), generator=g)]
    got = mean_answer_logprobs(model, contexts, answers, pad_token_id=TOK.pad_token_id, micro_batch=3)
    for n, (c, a) in enumerate(zip(contexts, answers)):
        ids = torch.tensor([c + a])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        want = sum(float(logp[len(c) - 1 + j, tok]) for j, tok in enumerate(a)) / len(a)
        assert float(got[n]) == pytest.approx(want, rel=RTOL, abs=1e-5)
    again = mean_answer_logprobs(model, contexts, answers, pad_token_id=TOK.pad_token_id, micro_batch=16)
    close(again, got)
    assert torch.isnan(mean_answer_logprobs(model, [[5]], [[]], pad_token_id=0)).all()   # empty answer


def test_info_gain_on_a_tiny_model_matches_the_probes_by_hand():
    model = tiny_causal_lm(TOK, family="llama", size="micro", seed=1).eval()
    rows = [IG_ROW, [("<call>h(z)</call>", 0, True), ("\n<result>12</result>\n", 0, False), ("A: 12", 1, True)]]
    traj = build(rows, [ex("7"), ex("12")], groups=[0, 1])
    lp = InfoGain(model, TOK).boundary_logprobs(traj)
    for b, (row, answer) in enumerate(zip(rows, ["7", "12"])):
        text = ""
        for k in range(len(lp[b])):
            if k >= len({seg[1] for seg in row}):
                assert torch.isnan(lp[b, k])
                continue
            prefix_ids, answer_ids = probe_token_ids(TOK, "A: ", answer)
            ctx = TOK("Q")["input_ids"] + TOK(text, add_special_tokens=False)["input_ids"] + prefix_ids
            want = mean_answer_logprobs(model, [ctx], [answer_ids], pad_token_id=0)
            assert float(lp[b, k]) == pytest.approx(float(want), rel=RTOL, abs=1e-5)
            text += "".join(t for t, kk, _ in row if kk == k)
    out = InfoGain(model, TOK)(traj)
    p = lp.exp()
    close(out.values[0, :2], [p[0, 1] - p[0, 0], p[0, 2] - p[0, 1]])
    # permuting episodes permutes the reward
    perm = [1, 0]
    close(InfoGain(model, TOK)(permute(traj, perm)).values, out.values[perm])


def test_info_gain_from_logprobs_loop_reference():
    g = torch.Generator().manual_seed(5)
    lp = -torch.rand(6, 5, generator=g) * 3
    lp[torch.rand(6, 5, generator=g) < 0.3] = float("nan")
    for kind in ("prob_diff", "log_prob_diff"):
        v, m = info_gain_from_logprobs(lp, kind=kind)
        f = (lambda x: math.exp(x)) if kind == "prob_diff" else (lambda x: x)
        for b in range(6):
            for k in range(5):
                a = float(lp[b, k])
                nxt = float(lp[b, k + 1]) if k + 1 < 5 else float("nan")
                ok = math.isfinite(a) and math.isfinite(nxt)
                assert bool(m[b, k]) == ok
                assert float(v[b, k]) == pytest.approx(f(nxt) - f(a) if ok else 0.0, rel=RTOL, abs=ATOL)


def test_probe_token_ids_split_at_the_answer():
    pre, ans = probe_token_ids(TOK, "A: ", "12")
    assert TOK.decode(pre) == "A: " and TOK.decode(ans) == "12"


def test_info_gain_single_turn_batch_has_no_probe_and_is_finite():
    model = CountingLM(SEVEN, 1.0)
    traj = build([[("A: 7", 0, True)], [("A: 3", 0, True)]], [ex(), ex()])
    out = InfoGain(model, TOK)(traj)
    assert not model.calls and not out.mask.any() and torch.isfinite(out.values).all()


def test_info_gain_kwargs_are_checked():
    with pytest.raises(ValueError, match="kind"):
        InfoGain(None, TOK, kind="ratio")
    with pytest.raises(ValueError, match="micro_batch"):
        REWARDS.check_kwargs("info_gain", {"micro_batch": 0}, "rewards[0].kwargs")
    ctx = SimpleNamespace(policy="p", tokenizer=TOK, task=None)
    s = REWARDS.get("info_gain").from_context(ctx, kind="log_prob_diff", prefix="<answer>")
    assert (s.policy, s.kind, s.prefix) == ("p", "log_prob_diff", "<answer>")


# ================================================================================ tool_call_match (MatchTIR)

def test_call_similarity_worked_values():
    # same name, gold (A, B, C): keys equal (J = 1), 3 equal values -> (1 + 1 + 3)/(2 + 3) = 1
    assert call_similarity("f", ["A", "B", "C"], "f", ["A", "B", "C"]) == 1.0
    # gold (A, B) vs pred (A, B, C): J = 2/3, 2 equal values -> (1 + 2/3 + 2)/4 = 11/12
    assert call_similarity("f", ["A", "B", "C"], "f", ["A", "B"]) == pytest.approx(11 / 12)
    # gold (A, B, C) vs pred (E, B, C): (1 + 1 + 2)/5 = 4/5;  gold (A, B) vs (E, B, C): (1 + 2/3 + 1)/4 = 2/3
    assert call_similarity("f", ["E", "B", "C"], "f", ["A", "B", "C"]) == pytest.approx(0.8)
    assert call_similarity("f", ["E", "B", "C"], "f", ["A", "B"]) == pytest.approx(2 / 3)
    # no arguments on both sides: J = 1 (equal lists) -> (1 + 1)/2 = 1; one side empty: J = 0
    assert call_similarity("F", [], "f", []) == 1.0                       # names: case-insensitive
    assert call_similarity("f", [], "f", ["x"]) == pytest.approx(1 / 3)
    assert call_similarity("g", ["A"], "f", ["A"]) == 0.0


GOLD2 = [["f", ["A", "B", "C"]], ["f", ["A", "B"]]]
# predictions: turn 0 f(A, B, C), turn 1 f(E, B, C); S = [[1, 11/12], [4/5, 2/3]]
MATCH_INFO = [call_info("f", "A", "B", "C"), call_info("f", "E", "B", "C"), ANSWER]
MATCH_ROW = [("<call>f(A, B, C)</call>", 0, True), ("\n<result>ok</result>\n", 0, False),
             ("<call>f(E, B, C)</call>", 1, True), ("\n<result>ok</result>\n", 1, False), ("A: 7", 2, True)]


@pytest.mark.parametrize("assignment,expected", [
    # greedy: highest pair first (p0-g0 = 1), then p1 can only take g1 (2/3): total 5/3
    ("greedy", [1.0, 2 / 3]),
    # optimal: p0-g1 + p1-g0 = 11/12 + 4/5 = 1.7167 > 5/3
    ("optimal", [11 / 12, 0.8]),
])
def test_tool_call_match_greedy_versus_optimal(assignment, expected):
    traj = build([MATCH_ROW], [ex(gold_calls=GOLD2)], turn_info=[MATCH_INFO])
    out = ToolCallMatch(assignment=assignment)(traj)
    assert out.mask.tolist() == [[True, True, False]]             # the answer turn is not scored here
    close(out.values, [expected + [0.0]])


def test_ot_plan_worked_examples():
    # P = 1, G = 2: the only plan with row sum 1 and column sums 1/2 is [[1/2, 1/2]]
    S = [[0.9, 0.3]]
    close(torch.tensor(match_call_rewards([("f", ["a"])] * 1, [("f", ["a"]), ("f", ["b"])], assignment="ot")),
          [0.5 * (1.0 + call_similarity("f", ["a"], "f", ["b"]))])
    plan = sinkhorn_plan(torch.tensor(S))
    close(plan.float(), [[0.5, 0.5]])
    # P = 2, G = 1: [[1/2], [1/2]] -> r_i = S_i0 / 2
    close(sinkhorn_plan(torch.tensor([[0.2], [0.8]])).float(), [[0.5], [0.5]])
    # P = G = 1: T = [[1]], r = S
    assert sinkhorn_plan(torch.tensor([[0.4]])).item() == pytest.approx(1.0)


def _sinkhorn_loop(S, reg=0.1, max_iter=1000, tol=1e-9):
    """POT's sinkhorn_knopp on nested lists (plain Python): u ← a / (K v), v ← b / (Kᵀ u)."""
    P, G = len(S), len(S[0])
    K = [[math.exp(s / reg) for s in row] for row in S]
    u, v = [1.0 / P] * P, [1.0 / G] * G
    for it in range(max_iter):
        v = [(1.0 / G) / sum(K[i][j] * u[i] for i in range(P)) for j in range(G)]
        u = [(1.0 / P) / sum(K[i][j] * v[j] for j in range(G)) for i in range(P)]
        if it % 10 == 0:
            col = [sum(u[i] * K[i][j] * v[j] for i in range(P)) for j in range(G)]
            if math.sqrt(sum((c - 1.0 / G) ** 2 for c in col)) < tol:
                break
    return [[u[i] * K[i][j] * v[j] for j in range(G)] for i in range(P)]


@pytest.mark.parametrize("seed", range(4))
def test_sinkhorn_matches_loop_and_has_the_marginals(seed):
    g = torch.Generator().manual_seed(seed)
    P, G = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
    S = torch.rand(P, G, generator=g)
    plan = sinkhorn_plan(S)
    torch.testing.assert_close(plan, torch.tensor(_sinkhorn_loop(S.double().tolist()), dtype=torch.float64),
                               rtol=RTOL, atol=1e-9)
    torch.testing.assert_close(plan.sum(1), torch.full((P,), 1.0 / P, dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_optimal_assignment_is_the_best_injective_matching(seed):
    """Brute force over every injective partial matching of small random score matrices (with
    zeros, which never count as a match)."""
    g = torch.Generator().manual_seed(seed)
    P, G = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    S = (torch.rand(P, G, generator=g) * (torch.rand(P, G, generator=g) > 0.3)).tolist()

    def total(match):
        return sum(S[i][j] for i, j in enumerate(match) if j is not None)

    best = max(total(p) for p in itertools.product([None] + list(range(G)), repeat=P)
               if len([j for j in p if j is not None]) == len({j for j in p if j is not None}))
    opt = optimal_assignment(S)
    assert total(opt) == pytest.approx(best, abs=1e-9)
    assert all(j is None or S[i][j] > 0 for i, j in enumerate(opt))
    assert total(greedy_assignment(S)) <= best + 1e-9


def test_greedy_assignment_breaks_ties_in_row_major_order():
    # all four pairs score 0.5: the first pair in (pred, gold) order wins, then the next free one
    assert greedy_assignment([[0.5, 0.5], [0.5, 0.5]]) == [0, 1]
    assert greedy_assignment([[0.0, 0.0], [0.3, 0.0]]) == [None, 0]       # score 0 never matches


def test_tool_call_match_failed_unknown_and_no_gold_calls():
    info = [MALFORMED, call_info("nope", "A", error="unknown_tool"), call_info("f", "A", "B"), ANSWER]
    rows = [[("<call>f(</call>", 0, True), ("\n<result>error</result>\n", 0, False),
             ("<call>nope(A)</call>", 1, True), ("\n<result>error</result>\n", 1, False),
             ("<call>f(A, B)</call>", 2, True), ("\n<result>ok</result>\n", 2, False), ("A: 7", 3, True)]]
    traj = build(rows, [ex(gold_calls=GOLD2)], turn_info=[info])
    out = ToolCallMatch(unmatched=-0.5)(traj)
    # malformed -> unmatched; unknown tool: name matches no gold call -> unmatched; f(A, B) -> g1 exactly
    assert out.mask.tolist() == [[True, True, True, False]]
    close(out.values, [[-0.5, -0.5, 1.0, 0.0]])
    none = ToolCallMatch(unmatched=-0.5)(build(rows, [ex(gold_calls=[])], turn_info=[info]))
    close(none.values, [[-0.5, -0.5, -0.5, 0.0]])
    ot = ToolCallMatch(assignment="ot")(build(rows, [ex(gold_calls=[])], turn_info=[info]))
    assert torch.isfinite(ot.values).all()


def test_tool_call_match_permutation_and_kwargs():
    rows = [MATCH_ROW, [("A: 7", 0, True)]]
    traj = build(rows, [ex(gold_calls=GOLD2), ex(gold_calls=GOLD2)], groups=[0, 0], turn_info=[MATCH_INFO, [ANSWER]])
    for assignment in ("greedy", "optimal", "ot"):
        out = ToolCallMatch(assignment=assignment)(traj)
        swapped = ToolCallMatch(assignment=assignment)(permute(traj, [1, 0]))
        close(swapped.values, out.values[[1, 0]])
        assert torch.equal(swapped.mask, out.mask[[1, 0]])
    with pytest.raises(ValueError, match="assignment"):
        ToolCallMatch(assignment="hungarian")
    with pytest.raises(ValueError, match="reg"):
        REWARDS.check_kwargs("tool_call_match", {"reg": 0.0}, "rewards[0].kwargs")


# ================================================================================ checklist (CM2)

ITEMS = [
    {"id": "c1", "weight": 0.4, "depends": [], "check": {"type": "call", "name": "lookup", "args": ["France", "capital"]}},
    {"id": "c2", "weight": 0.4, "depends": ["c1"], "check": {"type": "call", "name": "lookup", "args": ["Paris", "pop"]}},
    {"id": "a", "weight": 0.2, "depends": ["c2"], "check": {"type": "answer", "value": "2100000"}},
]


def checklist_traj():
    seg = lambda text, k: (text, k, True)   # noqa: E731
    obs = lambda k: ("\n<result>x</result>\n", k, False)   # noqa: E731
    rows = [
        [seg("<call>lookup(France, capital)</call>", 0), obs(0), seg("<call>lookup(Paris, pop)</call>", 1), obs(1),
         seg("A: 2100000", 2)],
        [seg("<call>lookup(Paris, pop)</call>", 0), obs(0), seg("<call>lookup(France, capital)</call>", 1), obs(1),
         seg("A: 2100000", 2)],
        [seg("A: 2100000", 0)],
        [seg("<call>lookup(France, capital)</call>", 0), obs(0), seg("<call>lookup(Paris, pop)</call>", 1), obs(1),
         seg("A: 2100000", 2)],
    ]
    info = [
        [call_info("lookup", "France", "capital"), call_info("lookup", "Paris", "pop"), ANSWER],
        [call_info("lookup", "Paris", "pop"), call_info("lookup", "France", "capital"), ANSWER],
        [ANSWER],
        [call_info("lookup", "France", "capital"), call_info("lookup", "Paris", "pop", error="timeout"), ANSWER],
    ]
    return build(rows, [ex("2100000", checklist=ITEMS)] * 4, groups=[0, 0, 0, 0], turn_info=info)


def test_checklist_worked_example():
    # row 0: c1 at turn 0 (0.4), c2 at turn 1 after c1 (0.4), answer at turn 2 after c2 (0.2) -> total 1
    # row 1: c2's call came at turn 0, before c1 counted (turn 1), and never again -> c2 never counts,
    #        so the answer (depends on c2) does not either -> [0, 0.4, 0], total 0.4
    # row 2: answers at once; right answer but c2 never counted -> [0], total 0
    # row 3: the c2 call timed out (error): a failed call does not count -> [0.4, 0, 0], total 0.4
    traj = checklist_traj()
    out = Checklist(AnswerTask())(traj)
    assert out.level == "turn"
    assert out.mask.tolist() == [[True] * 3, [True] * 3, [True, False, False], [True] * 3]
    close(out.values, [[0.4, 0.4, 0.2], [0.0, 0.4, 0.0], [0.0, 0.0, 0.0], [0.4, 0.0, 0.0]])
    total = Checklist(AnswerTask(), level="outcome")(traj)
    assert total.level == "outcome"
    close(total.values, [1.0, 0.4, 0.0, 0.4])
    close(total.components["checklist_total"], out.values.sum(1))


def test_checklist_normalizes_by_the_total_weight():
    # weights 2, 2, 1 (sum 5): normalize -> the same as 0.4, 0.4, 0.2; without -> raw weights
    items = [dict(it, weight=w) for it, w in zip(ITEMS, (2.0, 2.0, 1.0))]
    traj = checklist_traj()
    traj = traj.replace(examples=[ex("2100000", checklist=items)] * 4)
    close(Checklist(AnswerTask())(traj).values[0], [0.4, 0.4, 0.2])
    close(Checklist(AnswerTask(), normalize=False)(traj).values[0], [2.0, 2.0, 1.0])


def test_checklist_wrong_answer_and_answer_turn_without_answer():
    traj = checklist_traj()
    wrong = traj.replace(response_texts=[t.replace("A: 2100000", "A: 5") for t in traj.response_texts])
    close(Checklist(AnswerTask())(wrong).values[0], [0.4, 0.4, 0.0])


def _satisfaction_by_simulation(items, passes, T):
    """Walk the turns in order; at each turn repeat until nothing changes: an item counts at turn k
    when its check passes at k and every dependency already counts (plain Python)."""
    counted = {}
    for k in range(T):
        changed = True
        while changed:
            changed = False
            for it in items:
                j = it["id"]
                if j not in counted and k in passes.get(j, []) and all(d in counted for d in it["depends"]):
                    counted[j] = k
                    changed = True
    return {it["id"]: counted.get(it["id"]) for it in items}


@pytest.mark.parametrize("seed", range(20))
def test_checklist_satisfaction_matches_simulation(seed):
    g = torch.Generator().manual_seed(seed)
    n, T = int(torch.randint(1, 7, (1,), generator=g)), 5
    items = []
    for j in range(n):   # a random DAG: dependencies only on earlier items
        deps = [f"i{d}" for d in range(j) if torch.rand(1, generator=g) < 0.35]
        items.append({"id": f"i{j}", "depends": deps})
    order = torch.randperm(n, generator=g).tolist()
    items = [items[i] for i in order]               # the listed order must not matter
    passes = {it["id"]: sorted(k for k in range(T) if torch.rand(1, generator=g) < 0.3) for it in items}
    assert checklist_satisfaction(items, passes) == _satisfaction_by_simulation(items, passes, T)


def test_checklist_refuses_cycles_unknown_ids_and_kinds():
    with pytest.raises(ValueError, match="cycle"):
        checklist_satisfaction([{"id": "a", "depends": ["b"]}, {"id": "b", "depends": ["a"]}], {})
    traj = checklist_traj()
    bad = [dict(ITEMS[0], depends=["zz"])]
    with pytest.raises(ValueError, match="unknown ids"):
        Checklist(AnswerTask())(traj.replace(examples=[ex(checklist=bad)] * 4))
    odd = [dict(ITEMS[0], check={"type": "judge"})]
    with pytest.raises(ValueError, match="check type"):
        Checklist(AnswerTask())(traj.replace(examples=[ex(checklist=odd)] * 4))
    with pytest.raises(ValueError, match="level"):
        Checklist(AnswerTask(), level="step")


def test_checklist_permutation_and_single_turn_batch():
    traj = checklist_traj()
    out = Checklist(AnswerTask())(traj)
    perm = [2, 0, 3, 1]
    close(Checklist(AnswerTask())(permute(traj, perm)).values, out.values[perm])
    # a batch without turn_info: one turn per row, the whole response is the answer
    single = build([[("A: 2100000", 0, True)]], [ex("2100000", checklist=[dict(ITEMS[2], depends=[])])])
    close(Checklist(AnswerTask())(single).values, [[1.0]])


# ================================================================================ entity_match (E-GRPO)

def test_entity_rewards_worked_example():
    # group 4 = rows 0, 1, 2, 3: γ = 1, 1, 0.5, 0.25 -> max 1;  group 9 = rows 4, 5: γ = 0.5, 0 -> max 0.5
    #   row 0 correct -> 1;  row 1 wrong -> 0.3·1 = 0.3;  row 2 wrong -> 0.3·0.5 = 0.15
    #   row 3 wrong but truncated -> 0
    #   row 4 wrong -> 0.3·(0.5/0.5) = 0.3;  row 5 wrong, γ = 0 -> 0
    acc = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    frac = torch.tensor([1.0, 1.0, 0.5, 0.25, 0.5, 0.0])
    groups = torch.tensor([4, 4, 4, 4, 9, 9])
    trunc = torch.tensor([False, False, False, True, False, False])
    close(entity_rewards(acc, frac, groups, trunc, alpha=0.3), [1.0, 0.3, 0.15, 0.0, 0.3, 0.0])
    close(entity_rewards(acc, frac, groups, trunc, alpha=0.0), [1.0, 0, 0, 0, 0, 0])    # α = 0: GRPO's reward


def _entity_rewards_loop(acc, frac, groups, trunc, alpha):
    out = []
    for i in range(len(acc)):
        gmax = max(frac[j] for j in range(len(acc)) if groups[j] == groups[i])
        norm = frac[i] / gmax if gmax > 0 else 0.0
        out.append(0.0 if trunc[i] else acc[i] + (1 - acc[i]) * alpha * norm)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_entity_rewards_match_loop(seed):
    g = torch.Generator().manual_seed(seed)
    B = 11
    acc = (torch.rand(B, generator=g) < 0.4).float()
    frac = torch.randint(0, 5, (B,), generator=g).float() / 4
    groups = torch.tensor([7, 3, 3, 7, 12, 3, 7, 12, 1, 3, 7])
    trunc = torch.rand(B, generator=g) < 0.2
    got = entity_rewards(acc, frac, groups, trunc, alpha=0.5)
    close(got, _entity_rewards_loop(acc.tolist(), frac.tolist(), groups.tolist(), trunc.tolist(), 0.5))


def test_entity_match_signal_reads_calls_and_results():
    # entities: France, Paris, 2100000 (m = 3)
    #   row 0: answers right -> 1
    #   row 1: lookup(France, capital) -> "Paris", then a wrong answer: touched France, Paris -> γ = 2/3
    #   row 2: lookup(Spain, capital) -> "Madrid": touched nothing -> γ = 0
    #   max γ in the group = 2/3 (row 0 touched nothing: it answered at once)
    #   -> rewards 1, 0.3·(2/3)/(2/3) = 0.3, 0
    ents = ["France", "Paris", "2100000"]
    rows = [[("A: 2100000", 0, True)],
            [("<call>lookup(France, capital)</call>", 0, True), ("\n<result>Paris</result>\n", 0, False), ("A: 3", 1, True)],
            [("<call>lookup(Spain, capital)</call>", 0, True), ("\n<result>Madrid</result>\n", 0, False), ("A: 3", 1, True)]]
    info = [[ANSWER], [call_info("lookup", "France", "capital", result="Paris"), ANSWER],
            [call_info("lookup", "Spain", "capital", result="Madrid"), ANSWER]]
    traj = build(rows, [ex("2100000", entities=ents)] * 3, groups=[5, 5, 5], turn_info=info)
    out = EntityMatch(AnswerTask())(traj)
    assert out.level == "outcome"
    close(out.values, [1.0, 0.3, 0.0])
    close(out.components["entity_fraction"], [0.0, 2 / 3, 0.0])
    close(EntityMatch(AnswerTask())(permute(traj, [2, 0, 1])).values, out.values[[2, 0, 1]])
    alone = EntityMatch(AnswerTask())(traj.replace(group_ids=torch.tensor([1, 2, 3])))   # groups of one
    close(alone.values, [1.0, 0.3, 0.0])
    assert torch.isfinite(alone.values).all()
    with pytest.raises(ValueError, match="alpha"):
        REWARDS.check_kwargs("entity_match", {"alpha": 1.5}, "rewards[0].kwargs")


def test_entity_fraction_case_and_duplicates():
    assert entity_fraction(["Paris", "Paris", "Rome"], ["paris is big"]) == 0.0
    assert entity_fraction(["Paris", "Paris", "Rome"], ["paris is big"], ignore_case=True) == 0.5


# ================================================================================ on a real tool task

def test_signals_on_a_lookup_gold_trace():
    """The gold trace of a LookupTask example scores full marks on every rule-checked signal."""
    from finegrain.tasks.lookup import LookupTask

    task = LookupTask(seed=0)
    example = task.examples("test", 1)[0]
    calls = example.meta["gold_calls"]
    rows, info = [], []
    results = list(example.meta["entities"])
    for k, (name, args) in enumerate(calls):
        rows += [(f"<call>{name}({', '.join(args)})</call>", k, True), (f"\n<result>{results[k]}</result>\n", k, False)]
        info.append(call_info(name, *args, result=results[k]))
    rows.append((f"A: {example.answer}", len(calls), True))
    info.append(ANSWER)
    traj = build([rows], [example], turn_info=[info])
    assert task.verify(example, traj.response_texts[0]) == 1.0
    close(ToolCallMatch()(traj).values[0, :len(calls)], [1.0] * len(calls))
    assert Checklist(task, level="outcome")(traj).values.item() == pytest.approx(1.0)
    assert EntityMatch(task)(traj).values.item() == 1.0
    # a wrong final answer keeps the call items and earns α · γ̂ = 0.3 (every entity was touched)
    wrong = traj.replace(response_texts=[traj.response_texts[0].rsplit("A:", 1)[0] + "A: Nobody"])
    assert Checklist(task, level="outcome")(wrong).values.item() == pytest.approx(len(calls) / (len(calls) + 1))
    assert EntityMatch(task)(wrong).values.item() == pytest.approx(0.3)
