"""The turn structure of multi-turn episodes, for ``samples.jsonl`` and the report.

A row of a multi-turn ``Trajectory`` (``finegrain.envs.build_trajectory``) is, turn after turn,
the model's own tokens (``loss_mask`` True) followed by the environment's observation tokens
(``loss_mask`` False), every token carrying its turn (``turn_ids``). :func:`turn_records` cuts
the decoded response at those boundaries and joins each turn with what the environment said about
it (``turn_info``: call, error, result), its own turn reward (``turn_rewards``) and the turn values
of the scorers that give them (turn-level rewards, ``Scores.turn``)::

    response   "<call>add(3, 4)</call>" "\\n<result>7</result>\\n" "A: 7"
    turn 0     model text ──────────────  observation (not trained)
    turn 1                                                        model text

Character spans are positions in the response text (``Trajectory.response_texts``), so the
report can colour them with the token and step scores it already has.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from finegrain.envs.chat import CHAT_CALL_OPEN
from finegrain.segment import token_char_offsets
from finegrain.toolcalls import CALL_OPEN

CALL_OPENINGS = (CALL_OPEN, CHAT_CALL_OPEN)  # the text format's and the chat templates' call tags


@dataclass
class TurnRecord:
    """One turn of a multi-turn episode.

    turn: index k. text: the model's text of the turn (its sampled tokens, decoded); span: its
    (start, end) characters in the response. call_span: the characters of the tool call the turn
    ends with (from its opening tag to the end of the turn), None without one.
    call, error, result: the environment's metadata of the turn (``turn_info[b][k]``; for
    ``tool_use``: the parsed call {name, args} or None, the error kind or None, the tool's output or
    None). observation: the text the environment answered with, as appended to the response (''
    when nothing followed: the final answer, or the episode ended on a limit); observation_span:
    its characters, None when empty. These tokens are never trained on.
    env_reward: the environment's reward of the turn (``Observation.reward``), None = not given.
    scores: scorer name → the turn's value, for every scorer that gives turn-level values
    (−inf / None where the scorer marks the turn not applicable). steps: indices of the step spans
    (the task's segmenter) whose first overlap with a turn's model text is this turn's.
    n_tokens, n_observation_tokens: the turn's sampled and observation tokens.
    """

    turn: int
    text: str
    span: tuple[int, int]
    call: dict | None = None
    call_span: tuple[int, int] | None = None
    error: str | None = None
    result: str | None = None
    observation: str = ""
    observation_span: tuple[int, int] | None = None
    env_reward: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)
    n_tokens: int = 0
    n_observation_tokens: int = 0


def token_runs(turn_ids: Sequence[int], trained: Sequence[bool]) -> list[tuple[int, bool, int, int]]:
    """Maximal runs of response tokens with the same (turn, trained): (turn, trained, start, end)
    token positions, in order.

    >>> token_runs([0, 0, 0, 1, 1], [True, True, False, True, True])
    [(0, True, 0, 2), (0, False, 2, 3), (1, True, 3, 5)]
    """
    runs: list[tuple[int, bool, int, int]] = []
    for t, (k, m) in enumerate(zip(turn_ids, trained)):
        if runs and runs[-1][0] == k and runs[-1][1] == m:
            runs[-1] = (k, m, runs[-1][2], t + 1)
        else:
            runs.append((k, m, t, t + 1))
    return runs


def run_spans(tokenizer, ids: Sequence[int], runs, text: str) -> list[tuple[int, int]]:
    """(start, end) characters of each token run in ``text`` (the decode of ``ids``).

    Decoding each run on its own is exact when the pieces add up to the whole text (character
    tokenizers, most BPE); otherwise every token's offsets come from prefix decoding
    (``segment.token_char_offsets``).
    """
    pieces = [tokenizer.decode(list(ids[a:b]), skip_special_tokens=True) for _, _, a, b in runs]
    if "".join(pieces) == text:
        out, pos = [], 0
        for p in pieces:
            out.append((pos, pos + len(p)))
            pos += len(p)
        return out
    _, offsets = token_char_offsets(tokenizer, ids)
    return [(offsets[a][0], max(offsets[a][0], offsets[b - 1][1])) for _, _, a, b in runs]


def call_start(text: str) -> int | None:
    """Where the tool call at the end of a model turn starts: the last call opening tag.

    >>> call_start("so <call>f(1)</call>"), call_start("A: 7")
    (3, None)
    """
    at = max(text.rfind(tag) for tag in CALL_OPENINGS)
    return at if at >= 0 else None


def _reward(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def turn_records(tokenizer, ids: Sequence[int], turn_ids: Sequence[int], trained: Sequence[bool], response: str, *,
                 turn_info: Sequence[Mapping[str, Any]], env_rewards: Sequence[float | None] = (),
                 turn_scores: Mapping[str, Sequence[float]] | None = None,
                 step_spans: Sequence[tuple[int, int]] = ()) -> list[TurnRecord]:
    """The turns of one episode.

    Args:
        tokenizer: the policy's tokenizer. ids, turn_ids, trained: the row's real response tokens,
            their turns and ``loss_mask`` (n each). response: the row's decoded response.
        turn_info: the environment's metadata of each turn. env_rewards: each turn's environment
            reward (None = not given). turn_scores: scorer → one value per turn (turn-level
            scorers). step_spans: the response's step spans (the task's segmenter).
    Returns:
        one :class:`TurnRecord` per turn, turn k for k = 0 .. T−1 (T = the number of turns the
        environment reported, or of turns seen in ``turn_ids`` if more).
    """
    runs = token_runs(turn_ids, trained)
    spans = run_spans(tokenizer, ids, runs, response) if runs else []
    n_turns = max([len(turn_info)] + [k + 1 for k, _, _, _ in runs])
    recs = []
    end = 0
    for k in range(n_turns):
        model = [(s, r) for s, r in zip(spans, runs) if r[0] == k and r[1]]
        obs = [(s, r) for s, r in zip(spans, runs) if r[0] == k and not r[1]]
        a, b = (model[0][0][0], model[-1][0][1]) if model else (end, end)
        info = dict(turn_info[k]) if k < len(turn_info) else {}
        text = response[a:b]
        rec = TurnRecord(turn=k, text=text, span=(a, b), call=info.get("call"), error=info.get("error"),
                         result=info.get("result"), n_tokens=sum(r[3] - r[2] for _, r in model),
                         n_observation_tokens=sum(r[3] - r[2] for _, r in obs))
        at = call_start(text)
        if at is not None and (rec.call is not None or rec.error is not None):
            rec.call_span = (a + at, b)
        if obs:
            s, e = obs[0][0][0], obs[-1][0][1]
            rec.observation, rec.observation_span = response[s:e], (s, e)
            end = e
        else:
            end = b
        rec.env_reward = _reward(env_rewards[k]) if k < len(env_rewards) else None
        rec.scores = {name: float(v[k]) for name, v in (turn_scores or {}).items() if k < len(v)}
        recs.append(rec)
    for i, (s, e) in enumerate(step_spans):  # each step to the first turn whose model text it overlaps
        rec = next((r for r in recs if max(s, r.span[0]) < min(e, r.span[1])), None)
        if rec is not None:
            rec.steps.append(i)
    return recs


def tool_call_precision_recall(predicted: Sequence[Sequence[tuple]], gold: Sequence[Sequence[tuple]]) -> dict:
    """Tool calls of episodes against their ground-truth call traces, micro-averaged.

    A call is ``(name, args)`` with ``args`` a tuple of strings. Per episode b, matched_b is the
    size of the multiset intersection of predicted_b and gold_b (a call made twice matches at most
    as many gold copies as there are; order is not checked: ``judge_turns`` in the tasks checks
    order). Then, over the B episodes::

        precision = Σ_b matched_b / Σ_b |predicted_b|   (NaN when no call was made)
        recall    = Σ_b matched_b / Σ_b |gold_b|        (NaN when no gold call exists)

    Args: predicted, gold: (B,) lists of calls. Returns {"precision", "recall", "n_predicted", "n_gold"}.

    >>> r = tool_call_precision_recall([[("f", ("a",)), ("f", ("a",)), ("g", ())]], [[("f", ("a",)), ("h", ())]])
    >>> r["precision"], r["recall"]
    (0.3333333333333333, 0.5)
    """
    if len(predicted) != len(gold):
        raise ValueError(f"tool_call_precision_recall: {len(predicted)} predicted episodes but {len(gold)} gold ones")
    matched = sum(sum((Counter(map(_call_key, p)) & Counter(map(_call_key, g))).values())
                  for p, g in zip(predicted, gold))
    n_pred, n_gold = sum(len(p) for p in predicted), sum(len(g) for g in gold)
    return {"precision": matched / n_pred if n_pred else math.nan, "recall": matched / n_gold if n_gold else math.nan,
            "n_predicted": n_pred, "n_gold": n_gold}


def _call_key(call) -> tuple:
    name, args = call
    return str(name), tuple(str(a) for a in args)


def episode_calls(turn_info: Sequence[Mapping[str, Any]]) -> list[tuple]:
    """The well-formed tool calls of one episode (a row of ``Trajectory.turn_info``) as
    ``(name, args)``, in order; malformed calls (``call`` None) are not calls."""
    return [_call_key((t["call"]["name"], t["call"].get("args", ()))) for t in turn_info if t.get("call")]
