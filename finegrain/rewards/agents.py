"""Reward signals for tool-using agents: environment turn rewards, information gain (IGPO),
tool-call matching (MatchTIR), rule-checked checklists (CM2) and entity-match partial rewards
(E-GRPO).

Shapes: B rows, T turns, L response tokens. Turn-level signals return values (B, T) with a mask
(False = not applicable); the combiner puts turn k's value on the last *trained* token of turn k.

What they read from a ``Trajectory`` (``finegrain/trajectory.py``):
    turn_info[b][k]  {"call": {"name": str, "args": [str]} or None, "error": str or None,
                      "result": str or None} for turn k of row b. call None and error None = the
                      final-answer turn; call None with an error = a call that could not be parsed.
    examples[b].meta gold data of agent tasks:
        "gold_calls": [[name, [args...]], ...]     the ground-truth call trace, in order
        "entities":   [str, ...]                   entities on the gold path
        "checklist":  [{"id", "weight", "depends": [ids], "check": {"type": "call", "name", "args"}
                        or {"type": "answer", "value"}}, ...]

Registered entries (``REWARDS``):
    env_turns        turn     the environment's own turn rewards (``traj.turn_rewards``)
    info_gain        turn     IGPO: change of the policy's probability of the reference answer
    tool_call_match  turn     MatchTIR: similarity of each call to its matched gold call
    checklist        turn | outcome   CM2: weights of the checklist items each turn first satisfies
    entity_match     outcome  E-GRPO: 1 if correct, else α · (normalised fraction of gold entities touched)

>>> call_similarity("lookup", ["France", "capital"], "lookup", ["France", "population"])
0.75
>>> greedy_assignment([[1.0, 11 / 12], [0.8, 2 / 3]]), optimal_assignment([[1.0, 11 / 12], [0.8, 2 / 3]])
([0, 1], [1, 0])
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from finegrain.masked import group_index
from finegrain.models.probe import answer_probes, mean_logprob, probe_logprobs
from finegrain.rewards.base import REWARDS, RewardOutput


def _num_turns(traj) -> list[int]:
    """Turns of each row: one more than its largest turn id (0 for an empty row), at least the
    number of ``turn_info`` entries."""
    K = (traj.turns.max(dim=1).values + 1).clamp(min=0).tolist()
    if traj.turn_info:
        K = [max(k, len(info)) for k, info in zip(K, traj.turn_info)]
    return K


def _turn_info(traj, b: int) -> list[dict]:
    return list(traj.turn_info[b]) if traj.turn_info else []


def _is_answer_turn(info: dict) -> bool:
    return info.get("call") is None and info.get("error") is None


def _device(traj) -> torch.device:
    return traj.response_ids.device


# --------------------------------------------------------------------------------- env_turns

@REWARDS.register("env_turns", level="turn", vote="sigmoid", center=0.0, search_value="sum")
class EnvTurns:
    """r_{b,k} = the environment's reward of turn k (``Observation.reward``), as the trajectory
    builder stored it in ``traj.turn_rewards`` / ``turn_reward_mask`` (level 'turn'). A batch
    without turn rewards gives a (B, 1) all-masked output: nothing is placed."""

    name = "env_turns"
    level = "turn"

    @classmethod
    def from_context(cls, ctx):
        return cls()

    def __call__(self, traj) -> RewardOutput:
        if traj.turn_rewards is None:
            B = traj.batch_size
            return RewardOutput(torch.zeros(B, 1, device=_device(traj)),
                                torch.zeros(B, 1, dtype=torch.bool, device=_device(traj)), "turn")
        values = torch.where(traj.turn_reward_mask, traj.turn_rewards.float(), torch.zeros_like(traj.turn_rewards.float()))
        return RewardOutput(values, traj.turn_reward_mask.clone(), "turn",
                            components={"turns_rewarded": traj.turn_reward_mask.sum(1).float()})


# --------------------------------------------------------------------------------- info_gain (IGPO)

@torch.no_grad()
def mean_answer_logprobs(model, contexts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], *,
                         pad_token_id: int, micro_batch: int = 16) -> torch.Tensor:
    """Teacher-forced mean log-prob of each answer after its context (``finegrain.models.probe``).

    lp_n = (1/|a_n|) Σ_j log π(a_{n,j} | c_n, a_{n,<j})

    The probes go through ``probe_logprobs``: probes that share a prefix (the turn boundaries of
    one episode) are packed into one row where the model allows it, else each probe is its own
    left-padded row; either way a probe's value does not depend on what it is batched with.

    Args:
        model: causal LM (called under no_grad; its train/eval mode is left as it is).
        contexts: N token-id lists, each non-empty.
        answers: N token-id lists; an empty answer gives NaN.
        pad_token_id: id written on padding positions (never attended to).
        micro_batch: rows per forward pass.
    Returns:
        (N,) float32 on the model's device.
    """
    device = next(model.parameters()).device
    lps = probe_logprobs(model, contexts, answers, pad_token_id=pad_token_id, micro_batch=micro_batch)
    return mean_logprob(lps).to(device)


def probe_prefix_lengths(turn_ids: torch.Tensor, num_turns: int) -> list[int]:
    """For one row: n_k = number of response tokens before turn k, for k = 0..num_turns−1.

    turn_ids (L,) long, −1 on padding; tokens are in turn order. The prefix of boundary k holds
    turns 0..k−1 with their tool outputs: the context after turn k−1's observation.
    """
    real = turn_ids >= 0
    return [int((real & (turn_ids < k)).sum()) for k in range(num_turns)]


def info_gain_from_logprobs(boundary_lp: torch.Tensor, *, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """IGPO turn rewards from the answer log-probs at each turn boundary.

    boundary_lp[b, k] = mean log-prob of the answer on the context before turn k (NaN = not
    probed). With p = exp(lp):
        prob_diff:     IG_{b,k} = p_{b,k+1} − p_{b,k}
        log_prob_diff: IG_{b,k} = lp_{b,k+1} − lp_{b,k}
    Args: boundary_lp (B, T) float. Returns: values (B, T), mask (B, T) bool (both boundaries
    finite); the last column is always masked.

    >>> v, m = info_gain_from_logprobs(torch.log(torch.tensor([[0.25, 0.5, float("nan")]])), kind="prob_diff")
    >>> v.tolist(), m.tolist()
    ([[0.25, 0.0, 0.0]], [[True, False, False]])
    """
    if kind not in ("prob_diff", "log_prob_diff"):
        raise ValueError(f"info_gain: kind must be 'prob_diff' or 'log_prob_diff', got '{kind}'")
    f = boundary_lp.exp() if kind == "prob_diff" else boundary_lp
    nxt = torch.nn.functional.pad(f[:, 1:], (0, 1), value=float("nan"))
    gain = nxt - f
    mask = torch.isfinite(gain)
    return torch.where(mask, gain, torch.zeros_like(gain)), mask


@REWARDS.register("info_gain", level="turn", bounds={"micro_batch": "[1, inf)"}, vote="sigmoid", center=0.0,
                  search_value="sum")
class InfoGain:
    """IGPO's information-gain turn reward (level 'turn').

    For every episode b with K_b ≥ 2 turns and every boundary k = 0..K_b−1 (the context before
    turn k: prompt, turns 0..k−1 and their tool outputs), the policy scores the reference answer
    teacher-forced after a probe prefix (``prefix``, default "A: ", finegrain's answer format;
    IGPO's is "\\nNow there's enough information to answer\\n</think>\\n<answer>\\n"):

        lp_{b,k} = mean_j log π_θ(a*_j | context_{b,k}, prefix, a*_<j)
        IG_{b,k} = exp(lp_{b,k+1}) − exp(lp_{b,k})       kind='prob_diff' (paper; original repo)
                 = lp_{b,k+1} − lp_{b,k}                 kind='log_prob_diff' (updated repo default)

    for k = 0..K_b−2; the final turn gets no IG (its reward is the outcome: pair this signal with
    an outcome signal such as ``verifier`` and the ``igpo`` estimator). Only the answer tokens are
    scored; tokens of the prefix that cover answer characters count as answer tokens.

    Cost per batch: Σ_{b: K_b≥2} K_b probes (one per turn boundary) of the policy under no_grad,
    through ``finegrain.models.probe.probe_logprobs``. The K_b probes of an episode share its
    prefix: packed into one row (Hugging Face Llama / Mistral / Qwen2 / Qwen3 models) they cost
    about P_b + L_b + K_b·(|prefix| + |answer|) tokens, about one forward over the rollout, in
    ceil(rows / micro_batch) forward passes. Without packing (other models) each probe is its own
    row of up to P_b + L_b + |prefix| + |answer| tokens: about K_b/2 forwards over the rollout.

    Sources: IGPO (arXiv:2510.14967); GuoqingWang1/IGPO
    scrl/llm_agent/generation.py @ 49a8c4ec025316a686fb639478a418abc472171c (PREFIX/SUFFIX
    pseudo-response, offset-mapped answer span, mean log-prob, prob_diff / log_prob_diff, first
    probe before turn 0, one IG per later probe).

    Departures from the reference:
    1. The probes run after the rollout, in one batched pass over all boundaries, on the
       policy that sampled (the trainer scores before updating). The reference probes during the
       rollout, before each new turn; the numbers are the same.
    2. No suffix after the answer ("\\n</answer><|im_end|>" in IGPO): a causal LM's log-probs of
       the answer tokens do not depend on anything after them.
    3. Episodes of one turn get no probe at all (they have no IG to give).
    4. An episode cut by a limit after a tool call still gets IG only for turns 0..K_b−2.
    """

    name = "info_gain"
    level = "turn"

    def __init__(self, policy, tokenizer, *, kind: str = "prob_diff", prefix: str = "A: ", micro_batch: int = 16):
        info_gain_from_logprobs(torch.zeros(1, 1), kind=kind)  # validates kind
        self.policy, self.tokenizer, self.kind, self.prefix, self.micro_batch = policy, tokenizer, kind, prefix, micro_batch

    @classmethod
    def from_context(cls, ctx, *, kind: str = "prob_diff", prefix: str = "A: ", micro_batch: int = 16):
        return cls(ctx.policy, ctx.tokenizer, kind=kind, prefix=prefix, micro_batch=micro_batch)

    def boundary_logprobs(self, traj) -> torch.Tensor:
        """lp (B, T): mean answer log-prob at each turn boundary; NaN where not probed."""
        K = _num_turns(traj)
        T = max(max(K, default=1), 1)
        cuts = {b: list(enumerate(probe_prefix_lengths(traj.turns[b], K[b])))
                for b in range(traj.batch_size) if K[b] >= 2}
        contexts, answers, where = answer_probes(traj, self.tokenizer, self.prefix, cuts)
        lp = torch.full((traj.batch_size, T), float("nan"))
        if contexts:
            vals = mean_answer_logprobs(self.policy, contexts, answers, pad_token_id=self.tokenizer.pad_token_id,
                                        micro_batch=self.micro_batch).float().cpu()
            rows, cols = zip(*where)
            lp[list(rows), list(cols)] = vals
        return lp.to(_device(traj))

    def __call__(self, traj) -> RewardOutput:
        values, mask = info_gain_from_logprobs(self.boundary_logprobs(traj), kind=self.kind)
        return RewardOutput(values, mask, "turn",
                            components={"info_gain_total": torch.where(mask, values, torch.zeros_like(values)).sum(1)})


# --------------------------------------------------------------------------------- tool_call_match (MatchTIR)

def _key_score(n_gold: int, n_pred: int) -> float:
    """MatchTIR's multiset Jaccard of the argument keys, with positional keys 0..n−1: equal lists
    (also both empty) 1, one empty 0, else min(n_g, n_p) / max(n_g, n_p)."""
    if n_gold == n_pred:
        return 1.0
    if n_gold == 0 or n_pred == 0:
        return 0.0
    return min(n_gold, n_pred) / max(n_gold, n_pred)


def call_similarity(pred_name: str, pred_args: Sequence[str], gold_name: str, gold_args: Sequence[str]) -> float:
    """MatchTIR tool similarity, for positional arguments.

    s = 0 if the names differ (case-insensitive), else
    s = [1 + J(keys_gold, keys_pred) + #{i : pred_args[i] = gold_args[i]}] / (2 + |gold_args|)

    with keys = argument positions and J the multiset Jaccard (``_key_score``). Values are
    compared as stripped strings. s ∈ [0, 1]; s = 1 iff the names and all arguments agree.

    Source: quchangle1/MatchTIR Code/verl/utils/reward_score/tool.py::tool_similarity (copy
    CyberSculptor96/MatchTIR @ 02ee2a53), where arguments are a dict; finegrain's calls carry a
    list (``finegrain.toolcalls``), so keys are positions.

    >>> call_similarity("add", ["3", "4"], "add", ["3", "4"]), call_similarity("add", ["3"], "mul", ["3"])
    (1.0, 0.0)
    """
    if pred_name.strip().lower() != gold_name.strip().lower():
        return 0.0
    pred = [str(a).strip() for a in pred_args]
    gold = [str(a).strip() for a in gold_args]
    values = sum(1 for i, g in enumerate(gold) if i < len(pred) and pred[i] == g)
    return (1.0 + _key_score(len(gold), len(pred)) + values) / (2.0 + len(gold))


def greedy_assignment(scores: Sequence[Sequence[float]]) -> list[int | None]:
    """Greedy one-to-one matching, as MatchTIR's ``hungarian_assignment`` does it (it is not the
    Hungarian algorithm): visit (pred, gold) pairs by decreasing score (ties in row-major order)
    and match a pair when both are free and its score is > 0.

    Args: scores P × G. Returns: for each prediction the matched gold index, or None.
    """
    P = len(scores)
    pairs = sorted(((scores[i][j], i, j) for i in range(P) for j in range(len(scores[i]))), key=lambda x: -x[0])
    assigned: list[int | None] = [None] * P
    taken: set[int] = set()
    for s, i, j in pairs:
        if s > 0 and assigned[i] is None and j not in taken:
            assigned[i] = j
            taken.add(j)
    return assigned


def optimal_assignment(scores: Sequence[Sequence[float]]) -> list[int | None]:
    """Maximum-weight one-to-one matching (``scipy.optimize.linear_sum_assignment``); pairs of
    score 0 count as unmatched, as in the greedy rule.

    Args: scores P × G. Returns: for each prediction the matched gold index, or None.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - scipy is a declared dependency of this signal
        raise ImportError("tool_call_match with assignment='optimal' needs scipy: pip install scipy") from e
    import numpy as np

    P = len(scores)
    assigned: list[int | None] = [None] * P
    if P == 0 or not len(scores[0]):
        return assigned
    S = np.asarray(scores, dtype=np.float64)
    rows, cols = linear_sum_assignment(S, maximize=True)
    for i, j in zip(rows.tolist(), cols.tolist()):
        if S[i, j] > 0:
            assigned[i] = j
    return assigned


def sinkhorn_plan(scores: torch.Tensor, *, reg: float = 0.1, max_iter: int = 1000, tol: float = 1e-9) -> torch.Tensor:
    """Entropic optimal-transport plan between uniform marginals with cost −S (Sinkhorn–Knopp).

    K = exp(S / reg),  u, v scaled until T = diag(u) K diag(v) has row sums 1/P and column sums
    1/G (checked every 10 iterations: ‖colsum(T) − 1/G‖₂ < tol, or max_iter iterations).
    Same iteration, defaults and stopping rule as POT's ``ot.sinkhorn`` (method 'sinkhorn'),
    which MatchTIR's ``assign_rewards_ot`` calls. Computed in float64.

    Args: scores (P, G) float, P, G ≥ 1. Returns: T (P, G) float64, Σ T = 1.
    """
    S = scores.double()
    P, G = S.shape
    a = torch.full((P,), 1.0 / P, dtype=torch.float64)
    b = torch.full((G,), 1.0 / G, dtype=torch.float64)
    K = torch.exp(S / reg)
    u, v = torch.full_like(a, 1.0 / P), torch.full_like(b, 1.0 / G)
    for it in range(max_iter):
        v = b / (K.T @ u)
        u = a / (K @ v)
        if it % 10 == 0:
            plan = u[:, None] * K * v[None, :]
            if torch.linalg.vector_norm(plan.sum(0) - b) < tol:
                break
    return u[:, None] * K * v[None, :]


_ASSIGNMENTS = ("greedy", "optimal", "ot")


def match_call_rewards(preds: Sequence[tuple[str, Sequence[str]]], golds: Sequence[tuple[str, Sequence[str]]], *,
                       assignment: str = "greedy", unmatched: float = 0.0, reg: float = 0.1) -> list[float]:
    """One reward per predicted call from its similarity to the gold calls.

    S_ij = call_similarity(pred_i, gold_j) over all calls of the episode vs all gold calls.
        greedy / optimal:  r_i = S_{i,σ(i)} for a matched call, ``unmatched`` otherwise
        ot:                r_i = Σ_j T_ij S_ij, T = sinkhorn_plan(S, reg) (``unmatched`` unused)
    With no gold call every prediction is unmatched (OT: 0).

    Source: MatchTIR tool.py::assign_rewards_hungarian (greedy; unmatched_penalty=0 in
    compute_process_KM, −0.5 as the function's default) and ::assign_rewards_ot (reg 0.1).
    """
    if assignment not in _ASSIGNMENTS:
        raise ValueError(f"tool_call_match: assignment must be one of {_ASSIGNMENTS}, got '{assignment}'")
    if not preds:
        return []
    S = [[call_similarity(pn, pa, gn, ga) for gn, ga in golds] for pn, pa in preds]
    if not golds:
        return [0.0 if assignment == "ot" else float(unmatched)] * len(preds)
    if assignment == "ot":
        plan = sinkhorn_plan(torch.tensor(S, dtype=torch.float64), reg=reg)
        return (plan * torch.tensor(S, dtype=torch.float64)).sum(1).tolist()
    match = greedy_assignment(S) if assignment == "greedy" else optimal_assignment(S)
    return [S[i][j] if j is not None else float(unmatched) for i, j in enumerate(match)]


def _gold_calls(example) -> list[tuple[str, list[str]]]:
    return [(str(name), [str(a) for a in args]) for name, args in (example.meta.get("gold_calls") or [])]


@REWARDS.register("tool_call_match", level="turn", bounds={"reg": "(0, inf)", "unmatched": "[-1, 1]"},
                  vote="sigmoid", center=0.0, search_value="sum")
class ToolCallMatch:
    """MatchTIR's turn reward from matching the episode's tool calls to the gold call trace
    (level 'turn').

    Every call the model made (turn_info[b][k]["call"], in turn order) is matched against
    ``meta["gold_calls"]`` with ``match_call_rewards`` (assignment 'greedy' as the reference code,
    'optimal' = maximum-weight matching, or 'ot' = Sinkhorn transport). A turn's reward is the mean
    reward of its calls (finegrain turns hold at most one call). A turn whose call could not be
    parsed (call None, error set) gets ``unmatched``. The final-answer turn is not applicable
    here: pair this signal with an answer reward (``verifier``), as MatchTIR adds the answer F1 on
    that turn, and with the ``matchtir`` estimator.

    Source: arXiv:2601.10712; quchangle1/MatchTIR Code/verl/utils/reward_score/tool.py::
    compute_process_KM / compute_process_ot (copy CyberSculptor96/MatchTIR @ 02ee2a53).
    Departures: calls come from ``turn_info`` (the reference re-parses the decoded text and
    splits turns at "\\n<|im_start|>assistant\\n"); arguments are positional (see
    ``call_similarity``); the answer F1 is a separate signal.
    """

    name = "tool_call_match"
    level = "turn"

    def __init__(self, *, assignment: str = "greedy", unmatched: float = 0.0, reg: float = 0.1):
        if assignment not in _ASSIGNMENTS:
            raise ValueError(f"tool_call_match: assignment must be one of {_ASSIGNMENTS}, got '{assignment}'")
        self.assignment, self.unmatched, self.reg = assignment, unmatched, reg

    @classmethod
    def from_context(cls, ctx, *, assignment: str = "greedy", unmatched: float = 0.0, reg: float = 0.1):
        return cls(assignment=assignment, unmatched=unmatched, reg=reg)

    def __call__(self, traj) -> RewardOutput:
        K = _num_turns(traj)
        B, T = traj.batch_size, max(max(K, default=1), 1)
        values = torch.zeros(B, T)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b in range(B):
            info = _turn_info(traj, b)
            turns = [k for k, d in enumerate(info) if d.get("call") is not None]
            preds = [(str(info[k]["call"]["name"]), list(info[k]["call"].get("args", []))) for k in turns]
            rewards = match_call_rewards(preds, _gold_calls(traj.examples[b]), assignment=self.assignment,
                                         unmatched=self.unmatched, reg=self.reg)
            for k, r in zip(turns, rewards):
                values[b, k], mask[b, k] = r, True
            for k, d in enumerate(info):
                if d.get("call") is None and d.get("error") is not None:
                    values[b, k], mask[b, k] = self.unmatched, True
        dev = _device(traj)
        return RewardOutput(values.to(dev), mask.to(dev), "turn",
                            components={"call_reward_sum": torch.where(mask, values, torch.zeros_like(values)).sum(1).to(dev)})


# --------------------------------------------------------------------------------- checklist (CM2)

def _checklist_items(example) -> list[dict]:
    items = list(example.meta.get("checklist") or [])
    ids = [str(it["id"]) for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"checklist of example '{example.id}': item ids must be unique, got {ids}")
    for it in items:
        unknown = [d for d in it.get("depends", []) if str(d) not in ids]
        if unknown:
            raise ValueError(f"checklist of example '{example.id}': item '{it['id']}' depends on unknown ids {unknown}")
        kind = it.get("check", {}).get("type")
        if kind not in ("call", "answer"):
            raise ValueError(f"checklist of example '{example.id}': item '{it['id']}' has check type {kind!r}; "
                             "expected 'call' or 'answer'")
    return items


def checklist_satisfaction(items: Sequence[dict], passes: dict[str, list[int]]) -> dict[str, int | None]:
    """The turn at which each checklist item first counts, given the turns at which its own check
    passes; an item counts only once all its dependencies count.

    s_j = min{k ∈ passes[j] : k ≥ s_d for every dependency d}   (None if no such k, or a
          dependency never counts)

    Args: items with "id" and "depends"; passes: item id -> sorted turns where its check passes.
    Returns: item id -> first counting turn or None. A dependency cycle raises ValueError.

    >>> items = [{"id": "a", "depends": []}, {"id": "b", "depends": ["a"]}]
    >>> checklist_satisfaction(items, {"a": [2], "b": [1, 3]})
    {'a': 2, 'b': 3}
    """
    by_id = {str(it["id"]): it for it in items}
    done: dict[str, int | None] = {}
    visiting: set[str] = set()

    def first(j: str) -> int | None:
        if j in done:
            return done[j]
        if j in visiting:
            raise ValueError(f"checklist: dependency cycle through item '{j}'")
        visiting.add(j)
        deps = [first(str(d)) for d in by_id[j].get("depends", [])]
        visiting.discard(j)
        if any(d is None for d in deps):
            done[j] = None
        else:
            after = max(deps, default=-1)
            done[j] = next((k for k in sorted(passes.get(j, [])) if k >= after), None)
        return done[j]

    return {j: first(j) for j in by_id}


@REWARDS.register("checklist", level="turn", needs="verify", vote="identity", center=0.0, search_value="sum")
class Checklist:
    """CM2 checklist rewards, checked by rules (level 'turn', or 'outcome' with ``level``).

    Items come from ``meta["checklist"]``. A 'call' item passes at turn k when the model made that
    call (same name, same arguments) in turn k and the call did not fail (no "error": CM2's judge
    counts a tool call whose tool response is an error as not valid). An 'answer' item passes at
    the final-answer turn when the task's verifier accepts the response with the item's value as
    the reference (``task.verify(example with answer=value, response) == 1``). An item counts at
    its first passing turn at or after the turns where all its dependencies count
    (``checklist_satisfaction``).

        turn level:     r_{b,k} = Σ_{j counted at turn k} w_j / W      (mask: every turn of the row)
        outcome level:  R_b     = Σ_{j counted} w_j / W
        W = Σ_j w_j when ``normalize`` (CM2's weights sum to 1 per checklist), else 1.

    Source: CM2 (arXiv:2602.12268); namezhenzhang/CM2-RLCR-Tool-Agent
    verl_v0.6.1_checklist/verl/workers/reward_manager/checklist.py and
    verl/utils/reward_score/checklist_reward.py @ a4e4a81fd62cbcf7f8535259560a7c744cd07416.
    Departures: items are checked by rules, not an LLM judge; one checklist per example (the
    reference averages several annotations); our "turn" is one model turn, which is CM2's "step":
    the dependency rule is that of CM2's step-level variant (an item counts when first satisfied
    after its dependencies) with η = 1, not its turn-level reward (which ignores dependencies and
    divides by the number of user turns). The reference drops rollouts with any failed tool
    call from the reward; here only the failed call does not count.
    """

    name = "checklist"
    level = "turn"

    def __init__(self, task, *, level: str = "turn", normalize: bool = True):
        if level not in ("turn", "outcome"):
            raise ValueError(f"checklist: level must be 'turn' or 'outcome', got '{level}'")
        self.task, self.level, self.normalize = task, level, normalize

    @classmethod
    def from_context(cls, ctx, *, level: str = "turn", normalize: bool = True):
        return cls(ctx.task, level=level, normalize=normalize)

    def _answer_ok(self, example, response: str, value: str) -> bool:
        return float(self.task.verify(dataclasses.replace(example, answer=str(value)), response)) >= 1.0

    def item_turns(self, traj, b: int, num_turns: int) -> tuple[list[dict], dict[str, int | None]]:
        """Row b's checklist items and the turn at which each counts (None = never)."""
        example = traj.examples[b]
        items = _checklist_items(example)
        info = _turn_info(traj, b) or [{"call": None, "error": None, "result": None}] * max(num_turns, 1)
        calls = {k: (str(d["call"]["name"]), [str(a).strip() for a in d["call"].get("args", [])])
                 for k, d in enumerate(info) if d.get("call") is not None and d.get("error") is None}
        answer_turn = len(info) - 1 if info and _is_answer_turn(info[-1]) else None
        response = traj.response_texts[b] if traj.response_texts else ""
        passes: dict[str, list[int]] = {}
        for it in items:
            check, j = it["check"], str(it["id"])
            if check["type"] == "call":
                want = (str(check["name"]), [str(a).strip() for a in check.get("args", [])])
                passes[j] = [k for k, c in sorted(calls.items()) if c == want]
            else:
                ok = answer_turn is not None and self._answer_ok(example, response, check["value"])
                passes[j] = [answer_turn] if ok else []
        return items, checklist_satisfaction(items, passes)

    def __call__(self, traj) -> RewardOutput:
        K = _num_turns(traj)
        B, T = traj.batch_size, max(max(K, default=1), 1)
        per_turn = torch.zeros(B, T)
        for b in range(B):
            items, first = self.item_turns(traj, b, K[b])
            total_w = sum(float(it["weight"]) for it in items)
            W = total_w if (self.normalize and total_w > 0) else 1.0
            for it in items:
                k = first[str(it["id"])]
                if k is not None:
                    per_turn[b, k] += float(it["weight"]) / W
        dev = _device(traj)
        total = per_turn.sum(1)
        if self.level == "outcome":
            return RewardOutput(total.to(dev), torch.ones(B, dtype=torch.bool, device=dev), "outcome",
                                components={"checklist_total": total.to(dev)})
        mask = torch.arange(T)[None, :] < torch.tensor(K)[:, None]
        return RewardOutput(per_turn.to(dev), mask.to(dev), "turn", components={"checklist_total": total.to(dev)})


# --------------------------------------------------------------------------------- entity_match (E-GRPO)

def entity_fraction(entities: Sequence[str], texts: Sequence[str], *, ignore_case: bool = False) -> float:
    """γ = |{e ∈ E : e occurs as a substring of some text}| / |E| (0 for no entity); E deduplicated.

    >>> entity_fraction(["France", "Paris"], ["lookup France capital", "Paris"]), entity_fraction([], ["x"])
    (1.0, 0.0)
    """
    E = list(dict.fromkeys(str(e) for e in entities if str(e)))
    if not E:
        return 0.0
    pool = [t.lower() for t in texts] if ignore_case else list(texts)
    hit = sum(1 for e in E if any((e.lower() if ignore_case else e) in t for t in pool))
    return hit / len(E)


def entity_rewards(accuracy: torch.Tensor, fraction: torch.Tensor, group_ids: torch.Tensor, excluded: torch.Tensor, *,
                   alpha: float) -> torch.Tensor:
    """E-GRPO's reward from correctness and the entity-match rate.

    γ̂_i = γ_i / max_{j∈g(i)} γ_j   (0 when the max is 0)
    R_i = acc_i + (1 − acc_i) · α · γ̂_i       (= 1 if correct, α·γ̂_i if wrong, for a 0/1 verifier)
    R_i = 0 for excluded rows (overlong / truncated).

    Args: accuracy, fraction (B,) float; group_ids (B,) long; excluded (B,) bool; alpha ∈ [0, 1].
    Returns: (B,) float.

    >>> entity_rewards(torch.tensor([1., 0., 0.]), torch.tensor([1., 1., .5]), torch.tensor([0, 0, 0]),
    ...                torch.tensor([False, False, False]), alpha=0.3).tolist()
    [1.0, 0.30000001192092896, 0.15000000596046448]
    """
    idx, k = group_index(group_ids)
    gmax = torch.zeros(k, dtype=fraction.dtype, device=fraction.device).scatter_reduce_(
        0, idx, fraction, reduce="amax", include_self=True)[idx]
    norm = torch.where(gmax > 0, fraction / gmax.clamp(min=1e-12), torch.zeros_like(fraction))
    R = accuracy + (1 - accuracy) * alpha * norm
    return torch.where(excluded, torch.zeros_like(R), R)


@REWARDS.register("entity_match", level="outcome", needs="verify", bounds={"alpha": "[0, 1]"}, vote="identity", center=0.5,
                  search_value="last")
class EntityMatch:
    """E-GRPO's entity-aware outcome reward (level 'outcome').

    γ_i = fraction of the gold entities (``meta["entities"]``) that occur in the episode's tool
    calls (their arguments) or tool results (``turn_info``), then ``entity_rewards``: 1 for a
    correct answer (``task.verify``), α · γ_i / max_{j in the group} γ_j for a wrong one, 0 for a
    truncated episode. α = 0.3 is the paper's best (Fig. 4); α = 0 is GRPO's 0/1 reward.

    Source: "Repurposing Synthetic Data for Fine-grained Search Agent
    Supervision" (arXiv:2510.24694; methods.md §14); no author code was found, so this follows the paper.
    Departures: the paper matches entities in the model's *thoughts* only; here in the calls
    and results, the part of the episode that shows the agent reached the entity (text the model
    merely writes would be rewarded for listing names). Correctness is the task verifier, not an
    LLM judge; a verifier value in (0, 1) interpolates. "Format error → 0" is left to the
    verifier (an unparseable answer is wrong and can still earn α·γ̂).
    """

    name = "entity_match"
    level = "outcome"

    def __init__(self, task, *, alpha: float = 0.3, ignore_case: bool = False):
        self.task, self.alpha, self.ignore_case = task, alpha, ignore_case

    @classmethod
    def from_context(cls, ctx, *, alpha: float = 0.3, ignore_case: bool = False):
        return cls(ctx.task, alpha=alpha, ignore_case=ignore_case)

    @staticmethod
    def touched_texts(info: Sequence[dict]) -> list[str]:
        """Arguments of every call and every tool result of one episode."""
        texts: list[str] = []
        for d in info:
            if d.get("call") is not None:
                texts += [str(a) for a in d["call"].get("args", [])]
            if d.get("result") is not None:
                texts.append(str(d["result"]))
        return texts

    def __call__(self, traj) -> RewardOutput:
        B = traj.batch_size
        acc = torch.tensor([float(self.task.verify(ex, text)) for ex, text in zip(traj.examples, traj.response_texts)],
                           dtype=torch.float32)
        frac = torch.tensor([entity_fraction(traj.examples[b].meta.get("entities") or [],
                                             self.touched_texts(_turn_info(traj, b)), ignore_case=self.ignore_case)
                             for b in range(B)], dtype=torch.float32)
        R = entity_rewards(acc, frac, traj.group_ids.cpu(), traj.truncated.cpu(), alpha=self.alpha)
        dev = _device(traj)
        return RewardOutput(R.to(dev), torch.ones(B, dtype=torch.bool, device=dev), "outcome",
                            components={"accuracy": acc.to(dev), "entity_fraction": frac.to(dev)})

