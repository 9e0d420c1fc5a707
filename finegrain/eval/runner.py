"""Evaluate a policy on held-out problems: accuracy (with a confidence interval), pass@k, and
per-sample records for reports. The same seed and decoding are used before and after training."""

from __future__ import annotations

import time

from finegrain.eval.metrics import accuracy_with_ci, pass_at_k
from finegrain.eval.process import first_error_prediction, first_wrong_step_accuracy, miracle_step_rate
from finegrain.eval.turns import episode_calls, tool_call_precision_recall
from finegrain.sampling import SamplingParams


def evaluate(engine, task, examples, *, samples: int, temperature: float, max_new_tokens: int, seed: int,
             greedy_too: bool = False, keep_samples: int = 0, step_scorers: dict | None = None
             ) -> tuple[dict, list[dict]]:
    """Sample ``samples`` responses per example (greedy when temperature is 0) and verify them.

    Returns (metrics, records). metrics: accuracy (mean over all samples), accuracy_lo/hi (95%
    Wilson interval over samples), pass@k for k in 1, 2, 4 ≤ samples, greedy_accuracy when asked,
    n_problems, seconds; and, where the task and environment give what they need (see
    ``process_metrics``): miracle_step_rate, turns, tool_calls, tool_call_precision/recall, and
    prm_first_wrong_step_accuracy for each of ``step_scorers`` (name -> ``fn(traj) -> (B lists of
    step scores, threshold)``, e.g. the online implicit PRM's ``step_scores``).
    records: the first ``keep_samples`` samples as dicts (prompt, response, correct, answer) for
    reports.
    """
    t0 = time.time()
    n = 1 if temperature == 0 else samples
    sp = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    traj = engine.generate(examples, n, sp, seed)
    correct = [task.verify(ex, text) >= 1.0 for ex, text in zip(traj.examples, traj.response_texts)]
    ci = accuracy_with_ci(correct)
    metrics = {"accuracy": ci["mean"], "accuracy_lo": ci["lo"], "accuracy_hi": ci["hi"], "n_problems": len(examples),
               "samples_per_problem": n, "truncated_frac": float(traj.truncated.float().mean())}
    per_problem = [sum(correct[i * n:(i + 1) * n]) for i in range(len(examples))]
    for k in (1, 2, 4, 8):
        if k <= n:
            metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in per_problem) / len(examples)
    if greedy_too and temperature != 0:
        g = engine.generate(examples, 1, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens), seed)
        metrics["greedy_accuracy"] = sum(task.verify(ex, t) >= 1.0 for ex, t in zip(g.examples, g.response_texts)) / len(examples)
    metrics |= process_metrics(task, traj, correct, step_scorers)
    metrics["seconds"] = time.time() - t0
    records = [{"prompt": ex.prompt, "response": text, "correct": c, "answer": ex.answer}
               for ex, text, c in list(zip(traj.examples, traj.response_texts, correct))[:keep_samples]]
    return metrics, records


def process_metrics(task, traj, correct: list[bool], step_scorers: dict | None = None) -> dict[str, float]:
    """How the sampled responses got to their answers (all over samples, not problems):

    - ``miracle_step_rate``: among right answers, the fraction whose exact step labels hold a
      non-correct step (``process.miracle_step_rate``); for tasks with ``label_steps``;
    - ``turns``, ``tool_calls``: turns and well-formed tool calls per episode, for tool
      environments (whose ``Trajectory.turn_info`` reports carry a ``call`` key);
    - ``tool_call_precision``, ``tool_call_recall``: the calls against each example's
      ground-truth trace ``meta["gold_calls"]`` (``turns.tool_call_precision_recall``), when
      every example has one;
    - ``prm_first_wrong_step_accuracy``: for a learned step scorer (``step_scorers``: name ->
      ``fn(traj) -> (step scores, threshold)``), the fraction of responses whose predicted first
      wrong step (the first step scored below the threshold, ``process.first_error_prediction``;
      None = no error) equals the exact labels' (``process.first_wrong_step_accuracy``), for
      tasks with ``label_steps``. With several scorers the key gets ``/<name>``.

    A metric with nothing to count (no right answer, no call made) is left out rather than NaN.
    """
    out: dict[str, float] = {}
    if hasattr(task, "label_steps"):
        first = [task.label_steps(ex, text).first_error for ex, text in zip(traj.examples, traj.response_texts)]
        out["miracle_step_rate"] = miracle_step_rate(correct, first)["among_correct"]
        for name, scorer in (step_scorers or {}).items():
            scores, threshold = scorer(traj)
            pred = [first_error_prediction(row, threshold) for row in scores]
            key = "prm_first_wrong_step_accuracy" + (f"/{name}" if len(step_scorers) > 1 else "")
            out[key] = first_wrong_step_accuracy(pred, first)["mean"]
    if any("call" in t for row in traj.turn_info or [] for t in row):  # a tool environment's turn reports
        calls = [episode_calls(row) for row in traj.turn_info]
        out["turns"] = sum(len(row) for row in traj.turn_info) / len(traj.turn_info)
        out["tool_calls"] = sum(len(c) for c in calls) / len(calls)
        if all(ex.meta and "gold_calls" in ex.meta for ex in traj.examples):
            pr = tool_call_precision_recall(calls, [[(n, tuple(a)) for n, a in ex.meta["gold_calls"]]
                                                    for ex in traj.examples])
            out["tool_call_precision"], out["tool_call_recall"] = pr["precision"], pr["recall"]
    return {k: v for k, v in out.items() if v == v}  # NaN != NaN
