"""``run_eval``: does a reward help at test time? Sample, score, select, search, report.

Pipeline (each stage one call into an existing part):

    Rollout.generate (n episodes per problem, through the sampling layer and an environment:
                      single_turn by default, or a multi-turn one such as tool_use)
      → verifier + exact step labels (``task.verify``, ``task.label_steps``)
      → reward signals (REWARDS: verifier, implicit_prm, ...) finegrain.eval.scoring
      → best-of-N / weighted-vote / majority curves          finegrain.eval.selection
      → process metrics against the exact labels             finegrain.eval.process
      → optional PRM-guided step search (beam, ER-PRM)       finegrain.eval.search
      → report directory                                     finegrain.eval.report
        (multi-turn episodes: turn by turn, finegrain.eval.turns)

Sampling runs in chunks of ``chunk_problems`` problems; chunk c is sampled with seed
``sample_seed(seed, c, stream=1)``, so results depend on (seed, chunk size), not on the
machine. Best-of-N and vote accuracies at N < n are exact expectations over N-subsets of the n
samples (``selection.bon_curve``), not one draw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from finegrain.eval.metrics import accuracy_with_ci, bootstrap_ci, mean_pass_at_k
from finegrain.eval.process import (best_threshold, first_error_prediction, first_wrong_step_accuracy,
                                    miracle_step_rate, step_auroc)
from finegrain.eval.report import SampleRecord, write_metrics, write_report
from finegrain.eval.scoring import Scores, check_scorer, eval_meta, score, selects_by, step_spans, vote_weights
from finegrain.eval.search import SEARCHES
from finegrain.eval.selection import (STEP_AGGREGATIONS, aggregate_steps, bon_curve, majority_curve, random_curve,
                                      weighted_vote_curve)
from finegrain.eval.turns import turn_records
from finegrain.registry import Registry
from finegrain.rewards.base import RewardSignal
from finegrain.envs.rollout import Rollout
from finegrain.sampling import SAMPLERS, SamplingParams, sample_seed
from finegrain.segment import token_char_offsets

ANSWERS = Registry("answer extractor")
"""task name -> fn(response text) -> normalised final answer or None (what votes compare)."""


@ANSWERS.register("arith")
def arith_answer(text: str) -> str | None:
    """The last ``A: <int>`` of an arith response, as text."""
    from finegrain.tasks.arith import parse_answer

    a = parse_answer(text)
    return None if a is None else str(a)


@ANSWERS.register("gsm8k")
def gsm8k_answer(text: str) -> str | None:
    """GSM8K's normalised final number (``finegrain.tasks.gsm8k.extract_answer``)."""
    from finegrain.tasks.gsm8k import extract_answer

    return extract_answer(text)


@ANSWERS.register("lookup")
def lookup_answer(text: str) -> str | None:
    """The entity on the last ``A: <name>`` line of a lookup episode (``tasks.lookup.parse_entity_answer``)."""
    from finegrain.tasks.lookup import parse_entity_answer

    return parse_entity_answer(text)


@ANSWERS.register("arith_calc")
def arith_calc_answer(text: str) -> str | None:
    """The last ``A: <int>`` of an arith_calc episode, as text (the rule of its verifier)."""
    return arith_answer(text)


@dataclass(frozen=True)
class SearchSpec:
    """Which step searches to run and with what budget.

    methods: names in ``search.SEARCHES`` ('beam', 'early_reject'); empty = no search.
    scorer: name of the evaluated scorer (a REWARDS entry) guiding the search; None = the first
    scorer that selects by steps.
    budgets: values of N (candidates per problem per iteration); beam_width: M (min(M, N) is used).
    tau: tokens of a partial step before scoring (early_reject). max_steps: iterations.
    max_step_tokens: cap on one step (None = the response budget). aggregation: candidate score
    (``aggregate_steps`` name); None = the scorer's ``search_value`` metadata ('sum' for the
    implicit PRM, i.e. its Q-value, 'min' for exact step labels, 'last' as in ER-PRM otherwise).
    n_problems: search on the first problems only (None = all).
    """

    methods: tuple[str, ...] = ()
    scorer: str | None = None
    budgets: tuple[int, ...] = (4, 8, 16)
    beam_width: int = 4
    tau: int = 4
    max_steps: int = 8
    max_step_tokens: int | None = None
    aggregation: str | None = None
    n_problems: int | None = 100


def env_meta(env: str, env_kwargs: Mapping | None, max_turns: int) -> dict:
    """The environment settings recorded in ``metrics["meta"]``; an option that is not plain data
    (e.g. the chat format's tokenizer) is recorded by its type name.

    >>> env_meta("tool_use", {"tool_timeout": 1.0, "tokenizer": object()}, 4)
    {'env': 'tool_use', 'env_kwargs': {'tool_timeout': 1.0, 'tokenizer': '<object>'}, 'max_turns': 4}
    """
    plain = (str, int, float, bool, type(None), list, dict, tuple)
    kwargs = {k: v if isinstance(v, plain) else f"<{type(v).__name__}>" for k, v in (env_kwargs or {}).items()}
    return {"env": env, "env_kwargs": kwargs, "max_turns": max_turns}


def default_Ns(n: int) -> list[int]:
    """1, 2, 4, ... ≤ n, plus n itself.

    >>> default_Ns(16), default_Ns(6)
    ([1, 2, 4, 8, 16], [1, 2, 4, 6])
    """
    Ns = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return Ns if Ns[-1] == n else Ns + [n]


def response_scores(step_scores: Sequence[Sequence[Sequence[float]]], outcome: np.ndarray, level: str,
                    aggregation: str) -> np.ndarray:
    """One score per response for selection: the outcome score (level 'outcome') or the step
    scores reduced by ``aggregate_steps(·, aggregation)`` (level 'step'; −inf without steps).

    Args: step_scores P lists of n lists of S floats; outcome (P, n). Returns (P, n).

    >>> response_scores([[[0.2, 0.9], []]], np.zeros((1, 2)), "step", "min").tolist()
    [[0.2, -inf]]
    """
    if level == "outcome":
        return np.asarray(outcome, dtype=float)
    return np.array([[aggregate_steps(s, aggregation) for s in row] for row in step_scores], dtype=float)


def selection_curves(correct: np.ndarray, scores: dict[str, np.ndarray], *, weights: dict[str, np.ndarray],
                     answers: list[list[str | None]] | None, Ns: Sequence[int], seed: int = 0) -> dict:
    """Accuracy against N for every selector.

    bon[name][j]           = best-of-N accuracy of scorer ``name`` at N = Ns[j] (``bon_curve``, random ties)
    bon_ci[name][j]        = 95% bootstrap interval over problems of that value
    weighted_vote[name][j] = weighted majority vote with weights[name] (``weighted_vote_curve``)
    majority_vote[j]       = plain majority vote (self-consistency)
    random_expected[j]     = mean accuracy (a uniform pick; ``random_curve``)
    pass_at[j]             = unbiased pass@N (Chen et al. 2021)
    Votes are left out when ``answers`` is None.

    Args: correct (P, n) bool; scores name → (P, n) float; weights name → (P, n) ≥ 0;
    answers P lists of n answers.
    """
    P, n = correct.shape
    out: dict = {"Ns": list(Ns), "bon": {}, "bon_ci": {}}
    for name, s in scores.items():
        curve = bon_curve(s, correct, Ns)
        out["bon"][name] = curve.mean.tolist()
        out["bon_ci"][name] = [list(bootstrap_ci(curve.per_problem[:, j], seed=seed)) for j in range(len(Ns))]
    out["random_expected"] = random_curve(correct, Ns).mean.tolist()
    counts = correct.sum(axis=1)
    out["pass_at"] = [mean_pass_at_k([n] * P, counts.tolist(), N) for N in Ns]
    if answers is not None:
        out["majority_vote"] = majority_curve(answers, correct, Ns, seed=seed).mean.tolist()
        out["weighted_vote"] = {name: weighted_vote_curve(answers, w, correct, Ns, seed=seed).mean.tolist()
                                for name, w in weights.items()}
    return out


def process_metrics(records: Sequence[SampleRecord], scorer_names: Sequence[str]) -> dict:
    """Process metrics of each scorer's step scores against the exact step labels.

    Per scorer: step AUROC (correct vs wrong steps, ``process.step_auroc``); the threshold that
    maximises the ProcessBench F1 of the predicted first error (``process.best_threshold``,
    tuned on these same responses, so optimistic) with its error/correct accuracies and the
    first-error accuracy at it. Also, scorer-free: the fraction of steps with each label, the
    fraction of error-free responses and the miracle-step rate (right answer, a non-correct step).
    Records without labels are skipped; {} when none has labels.
    """
    rs = [r for r in records if r.step_labels is not None]
    if not rs:
        return {}
    labels = [r.step_labels for r in rs]
    firsts = [r.first_error for r in rs]
    flat = [lab for row in labels for lab in row]
    out = {"n_responses": len(rs), "n_steps": len(flat),
           "step_label_frac": {name: (flat.count(v) / len(flat) if flat else float("nan"))
                               for v, name in ((1, "correct"), (0, "wrong"), (-1, "unparseable"))},
           "error_free_frac": sum(f is None for f in firsts) / len(rs),
           "miracle_step_rate": miracle_step_rate([r.correct for r in rs], firsts), "scorers": {}}
    both = any(f is None for f in firsts) and any(f is not None for f in firsts)
    for name in scorer_names:
        ss = [r.step_scores[name] for r in rs]
        p = {"step_auroc": step_auroc(ss, labels)}
        if both:
            bt = best_threshold(ss, firsts)
            pred = [first_error_prediction(s, bt["threshold"]) for s in ss]
            p.update(threshold=bt["threshold"], f1=bt["f1"], error_acc=bt["error_acc"], correct_acc=bt["correct_acc"],
                     first_error_acc=first_wrong_step_accuracy(pred, firsts)["mean"])
        out["scorers"][name] = p
    return out


def _records(traj, scores: dict[str, Scores], task, tokenizer, answer_fn, sample_counter: dict, keep_tokens: int,
             multi_turn: bool = False) -> list[SampleRecord]:
    """One SampleRecord per row of ``traj``; token spans and scores only for problems < keep_tokens;
    the turns of every episode when ``multi_turn``."""
    out = []
    lengths = traj.response_mask.sum(dim=1).tolist()
    if multi_turn:
        turn_ids, trained = traj.turns.cpu(), traj.loss_mask.cpu()
        env_rewards = [[float(v) if m else None for v, m in zip(vs, ms)]
                       for vs, ms in zip(traj.turn_rewards.cpu().tolist(), traj.turn_reward_mask.cpu().tolist())] \
            if traj.turn_rewards is not None else [[] for _ in range(traj.batch_size)]
    for b, (ex, text) in enumerate(zip(traj.examples, traj.response_texts)):
        p = int(traj.group_ids[b])
        k = sample_counter.get(p, 0)
        sample_counter[p] = k + 1
        spans = step_spans(task, text)
        labels, first = None, None
        if hasattr(task, "label_steps"):
            sl = task.label_steps(ex, text)
            if len(sl.labels) != len(spans):
                raise ValueError(f"task '{task.name}': label_steps gives {len(sl.labels)} labels but segmenter "
                                 f"'{task.segmenter}' gives {len(spans)} steps")
            labels, first = list(sl.labels), sl.first_error
        rec = SampleRecord(problem=p, sample=k, prompt=ex.prompt, reference=ex.answer, response=text,
                           correct=task.verify(ex, text) >= 1.0, answer=answer_fn(text) if answer_fn else None,
                           truncated=bool(traj.truncated[b]), n_tokens=int(lengths[b]), step_spans=spans,
                           step_labels=labels, first_error=first,
                           outcome_scores={n: float(s.outcome[b]) for n, s in scores.items()},
                           step_scores={n: list(s.step[b]) for n, s in scores.items()})
        if p < keep_tokens:
            ids = traj.response_ids[b, :lengths[b]].tolist()
            rec.token_spans = token_char_offsets(tokenizer, ids)[1]
            rec.token_scores = {n: list(s.token[b]) for n, s in scores.items() if s.token is not None}
        if multi_turn:
            n = lengths[b]
            rec.turns = turn_records(tokenizer, traj.response_ids[b, :n].tolist(), turn_ids[b, :n].tolist(),
                                     trained[b, :n].tolist(), text, step_spans=spans, env_rewards=env_rewards[b],
                                     turn_info=traj.turn_info[b] if traj.turn_info else [],
                                     turn_scores={name: s.turn[b] for name, s in scores.items() if s.turn is not None})
        out.append(rec)
    return out


def turn_metrics(records: Sequence[SampleRecord]) -> dict:
    """Turn statistics of multi-turn episodes: mean turns and tool calls per episode, the fraction
    of episodes that ended on a limit, and per error kind the fraction of turns that had it
    ({} when no record has turns).

    >>> from finegrain.eval.turns import TurnRecord
    >>> r = SampleRecord(0, 0, "", "", "", False, turns=[TurnRecord(0, "", (0, 0), call={"name": "f", "args": []}),
    ...                                                  TurnRecord(1, "", (0, 0), error="malformed")])
    >>> turn_metrics([r])
    {'episodes': 1, 'mean_turns': 2.0, 'mean_tool_calls': 1.0, 'truncated_frac': 0.0, 'error_frac': {'malformed': 0.5}}
    """
    rs = [r for r in records if r.turns is not None]
    if not rs:
        return {}
    turns = [t for r in rs for t in r.turns]
    kinds = sorted({str(t.error) for t in turns if t.error is not None})
    return {"episodes": len(rs), "mean_turns": len(turns) / len(rs),
            "mean_tool_calls": sum(t.call is not None for t in turns) / len(rs),
            "truncated_frac": sum(r.truncated for r in rs) / len(rs),
            "error_frac": {k: sum(str(t.error) == k for t in turns if t.error is not None) / len(turns) for k in kinds}}


def run_eval(model, tokenizer, task, examples, *, out_dir: str | Path, scorers: Mapping[str, RewardSignal],
             samples: int = 16, sampling: SamplingParams = SamplingParams(),
             seed: int = 0, aggregation: str = "min", Ns: Sequence[int] | None = None,
             search: SearchSpec = SearchSpec(), html_problems: int = 20, chunk_problems: int = 64,
             max_batch: int = 256, use_chat_template: bool = True, meta: dict | None = None,
             log: Callable[[str], None] = print, progress: bool = True, env: str = "single_turn",
             env_kwargs: Mapping | None = None, max_turns: int | None = None, engine: str = "hf") -> dict:
    """Sample ``samples`` responses per problem, score them with every scorer, measure selection
    and process metrics, optionally run step searches, and write the report into ``out_dir``.

    Args:
        model, tokenizer: the policy (any HF causal LM) and its tokenizer.
        task: a task (``verify``; ``label_steps`` when it has exact step labels); examples: problems.
        scorers: name → reward signal, each a REWARDS entry usable in evaluation, built with
            ``scoring.build_scorers`` (the eval kwargs of its registry metadata applied). A signal
            keeps its own state across chunks and the search (e.g. the random reward's generator,
            seeded when it is built, not by ``seed``).
        sampling: temperature / top-p / top-k / max_new_tokens.
        aggregation: step aggregation (``selection.STEP_AGGREGATIONS``) for step-level scorers in
            the main best-of-N and vote curves; every aggregation is also reported separately.
        Ns: values of N; default 1, 2, 4, ... ≤ samples, plus samples.
        search: step searches to run (:class:`SearchSpec`).
        html_problems: problems shown on the HTML page (with token-level scores).
        meta: extra settings recorded in metrics["meta"] (e.g. the model path).
        env, env_kwargs, max_turns: the environment episodes run in (``finegrain.envs.ENVIRONMENTS``,
            built with ``task`` and ``env_kwargs``; ``max_turns`` None = the environment's own), as
            ``rollout.env`` / ``env_kwargs`` / ``max_turns`` in training. With more than one turn,
            every record carries its turns (``SampleRecord.turns``), ``metrics["turns"]`` their
            statistics, and step searches are refused (they sample single responses).
        engine: the sampler that generates the samples and continues the searches' beams
            (``finegrain.sampling.SAMPLERS``: ``hf``, or ``vllm``, an engine started from ``model``'s
            weights and closed at the end), as ``rollout.engine`` in training.
    Returns:
        the metrics dict (also in ``out_dir/metrics.json``).
    """
    t_start = time.time()
    scorers = dict(scorers)
    if not scorers:
        raise ValueError("run_eval: needs at least one scorer")
    for name in scorers:
        check_scorer(name)
    STEP_AGGREGATIONS.get(aggregation)
    for m in search.methods:
        SEARCHES.get(m)
    if search.methods and search.scorer is not None and search.scorer not in scorers:
        raise ValueError(f"search.scorer: '{search.scorer}' must be one of the evaluated scorers ({', '.join(scorers)})")
    if samples < 1 or not examples:
        raise ValueError(f"run_eval: needs samples >= 1 and at least one problem, got {samples} and {len(examples)}")
    Ns = list(Ns) if Ns is not None else default_Ns(samples)
    answer_fn = ANSWERS.get(task.name) if task.name in ANSWERS else getattr(task, "extract_answer", None)
    if engine not in EVAL_ENGINES:
        raise ValueError(f"--engine: expected one of {', '.join(EVAL_ENGINES)}, got '{engine}'")
    sampler = SAMPLERS.get(engine)(model, tokenizer, max_batch=max_batch)
    try:
        return _run_eval(model, tokenizer, task, examples, sampler, out_dir=out_dir, scorers=scorers, samples=samples,
                         sampling=sampling, seed=seed, aggregation=aggregation, Ns=Ns, search=search,
                         html_problems=html_problems, chunk_problems=chunk_problems, max_batch=max_batch,
                         use_chat_template=use_chat_template, meta=meta, log=log, progress=progress, env=env,
                         env_kwargs=env_kwargs, max_turns=max_turns, t_start=t_start, answer_fn=answer_fn)
    finally:
        getattr(sampler, "close", lambda: None)()  # a vLLM engine frees its memory


# the samplers run_eval can build from a model and tokenizer (the OpenAI-compatible client samples
# from a server, not from ``model``)
EVAL_ENGINES = ("hf", "vllm")


def _run_eval(model, tokenizer, task, examples, sampler, *, out_dir, scorers, samples, sampling, seed, aggregation,
              Ns, search, html_problems, chunk_problems, max_batch, use_chat_template, meta, log, progress, env,
              env_kwargs, max_turns, t_start, answer_fn) -> dict:
    engine = Rollout(sampler, segmenter=task.segmenter, env=env, env_kwargs=dict(env_kwargs or {}), task=task,
                     max_turns=max_turns, use_chat_template=use_chat_template)
    multi_turn = engine.max_turns > 1
    if multi_turn and search.methods:
        raise ValueError(f"search: step searches sample single responses; they cannot run in the multi-turn "
                         f"environment '{env}'")
    timing = {"generate_s": 0.0, "score_s": {n: 0.0 for n in scorers}, "records_s": 0.0}
    records: list[SampleRecord] = []
    counter: dict[int, int] = {}
    from finegrain.progress import Progress

    with Progress("sample + score", total=len(examples), enabled=progress) as bar:
        for c, start in enumerate(range(0, len(examples), chunk_problems)):
            chunk = examples[start:start + chunk_problems]
            t0 = time.time()
            traj = engine.generate(chunk, samples, sampling, sample_seed(seed, c, stream=1), group_offset=start)
            timing["generate_s"] += time.time() - t0
            out = {}
            for name in scorers:
                t0 = time.time()
                out[name] = score(scorers[name], traj, task)
                timing["score_s"][name] += time.time() - t0
            t0 = time.time()
            records += _records(traj, out, task, tokenizer, answer_fn, counter, html_problems, multi_turn)
            timing["records_s"] += time.time() - t0
            bar.update(start + len(chunk), info=f"{len(records)} responses")

    t0 = time.time()
    P = len(examples)
    grid = sorted(records, key=lambda r: (r.problem, r.sample))
    correct = np.array([r.correct for r in grid], dtype=bool).reshape(P, samples)  # (P, n)
    answers = [[r.answer for r in grid[p * samples:(p + 1) * samples]] for p in range(P)] if answer_fn else None
    sel_scores, weights, by_agg = {}, {}, {}
    for name, signal in scorers.items():
        by = selects_by(signal.level)
        steps = [[r.step_scores[name] for r in grid[p * samples:(p + 1) * samples]] for p in range(P)]
        outcome = np.array([r.outcome_scores[name] for r in grid]).reshape(P, samples)
        sel_scores[name] = response_scores(steps, outcome, by, aggregation)  # (P, n)
        try:
            weights[name] = vote_weights(sel_scores[name], eval_meta(name)["vote"])
        except ValueError as err:
            raise ValueError(f"scorer '{name}': {err}") from None
        if by == "step":
            by_agg[name] = {agg: bon_curve(response_scores(steps, outcome, "step", agg), correct, Ns).mean.tolist()
                            for agg in STEP_AGGREGATIONS.names()}
    try:
        curves = selection_curves(correct, sel_scores, weights=weights, answers=answers, Ns=Ns, seed=seed)
    except ValueError as err:  # an answer string marked both right and wrong: votes are ill-defined
        log(f"votes skipped: {err}")
        curves = selection_curves(correct, sel_scores, weights=weights, answers=None, Ns=Ns, seed=seed)
    curves["bon_by_aggregation"] = by_agg
    lengths = np.array([r.n_tokens for r in grid], dtype=float).reshape(P, samples)
    metrics = {
        "meta": {"task": task.name, "n_problems": P, "samples": samples, "temperature": sampling.temperature,
                 "top_p": sampling.top_p, "top_k": sampling.top_k, "max_new_tokens": sampling.max_new_tokens,
                 "seed": seed, "scorers": list(scorers), "aggregation": aggregation,
                 **(env_meta(env, env_kwargs, engine.max_turns) if engine.env_name != "single_turn" or env_kwargs
                    or max_turns is not None else {}), **(meta or {})},
        "accuracy": accuracy_with_ci(correct.ravel().tolist()),
        "truncated_frac": float(np.mean([r.truncated for r in grid])),
        "mean_response_tokens": float(lengths.mean()),
        "curves": curves,
        "process": process_metrics(grid, scorers),
    }
    if multi_turn:
        metrics["turns"] = turn_metrics(grid)
    timing["metrics_s"] = time.time() - t0

    if search.methods:
        t0 = time.time()
        metrics["search"] = _run_search(model, tokenizer, sampler, task, examples, search, scorers, correct, sel_scores,
                                        lengths, sampling, seed, max_batch, use_chat_template, Ns, log)
        timing["search_s"] = time.time() - t0
    t0 = time.time()
    colour_by = next((n for n, sig in scorers.items() if selects_by(sig.level) == "step"), next(iter(scorers)))
    metrics["timing"] = timing
    title = f"finegrain eval · {task.name} · {meta.get('model', '') if meta else ''}".rstrip(" ·")
    write_report(out_dir, grid, metrics, title=title, colour_by=colour_by, html_problems=html_problems)
    timing["report_s"] = time.time() - t0
    timing["total_s"] = time.time() - t_start
    write_metrics(metrics, Path(out_dir) / "metrics.json")  # again, now with the final timings
    return metrics


def _run_search(model, tokenizer, sampler, task, examples, spec: SearchSpec, scorers, correct, sel_scores, lengths,
                sampling, seed, max_batch, use_chat_template, Ns, log) -> dict:
    """Run every (method, N) of ``spec`` and the matching best-of-N points on the same problems."""
    name = spec.scorer or next((n for n, sig in scorers.items() if selects_by(sig.level) == "step"), None)
    if name is None:
        raise ValueError("search: needs a scorer that selects by steps (--search-scorer, e.g. implicit_prm or "
                         "step_labels)")
    aggregation = spec.aggregation or eval_meta(name)["search_value"]
    signal = scorers[name]
    sub = examples[:spec.n_problems] if spec.n_problems else examples
    k = len(sub)
    runs = []
    for method in spec.methods:
        for N in spec.budgets:
            M = min(spec.beam_width, N)
            if N % M:
                raise ValueError(f"--search-beams: N={N} is not a multiple of --beam-width {M}")
            t0 = time.time()
            res = SEARCHES.get(method)(
                model, tokenizer, task, sub, lambda traj: score(signal, traj, task), n_beams=N, beam_width=M,
                tau=spec.tau, aggregation=aggregation, sampling=sampling, max_steps=spec.max_steps,
                max_step_tokens=spec.max_step_tokens, seed=sample_seed(seed, 0, stream=2), max_batch=max_batch,
                use_chat_template=use_chat_template, sampler=sampler)
            ci = accuracy_with_ci(res.correct)
            runs.append({"method": method, "n_beams": N, "beam_width": M,
                         "tau": spec.tau if SEARCHES.meta(method)["partial"] else None,
                         "accuracy": ci["mean"], "lo": ci["lo"], "hi": ci["hi"],
                         "tokens_per_problem": res.tokens_per_problem, "seconds": time.time() - t0})
            log(f"search {method} N={N} M={M}: accuracy {ci['mean']:.3f}, "
                f"{res.tokens_per_problem:.0f} tokens/problem ({time.time() - t0:.0f}s)")
    # best-of-N with the same scorer on the same problems: N samples cost N × mean length tokens
    bon = bon_curve(sel_scores[name][:k], correct[:k], Ns).mean.tolist()
    per_sample = float(lengths[:k].mean())
    return {"scorer": name, "aggregation": aggregation, "n_problems": k, "runs": runs,
            "bon_tokens": {"Ns": list(Ns), "accuracy": bon, "tokens": [N * per_sample for N in Ns]}}
