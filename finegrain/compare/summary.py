"""Aggregation of a comparison's runs: pure functions on parsed ``metrics.jsonl`` rows, then the
table (``summary.md``), the curve plot (``curves.png``) and a self-contained ``summary.html``.

Definitions (the same in the table header, ``results.json`` and the docstrings below):

* **final accuracy**: ``eval/accuracy`` at a run's last evaluation (the one after training), then
  mean ± the half-width of a 95% Student *t* interval over the n seeds (``t_interval``);
* **rollouts** at an evaluation after step s: R(s) = Σ_{t ≤ s} ``filter/generated_prompts``_t ×
  ``rollout.group_size``, i.e. every *generated* response, also those a filter then dropped
  (``eval_curve``);
* **rollouts to target**: on a method's seed-mean curve (mean accuracy and mean R over seeds at
  each evaluation step), R at the *first* evaluation whose mean accuracy is ≥ the target: the
  first crossing, not interpolated, so it is resolved to one evaluation interval
  (``rollouts_to_target``); "not reached" when no evaluation gets there. The default target is
  the lowest final mean accuracy of any method, which the worst method's mean curve reaches at
  its last evaluation by construction;
* **× baseline**: rollouts to target of the method / those of the baseline method (``ratio``);
* **s / step**: median of ``time/step`` over every step of every seed; **peak RSS**: the largest
  ``ru_maxrss`` of the seeds' training processes (``os.wait4``, in MiB; the last launch of each run).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

# Keys read from metrics.jsonl rows
ACCURACY_KEY = "eval/accuracy"
GENERATED_KEY = "filter/generated_prompts"
STEP_TIME_KEY = "time/step"
# Read at a run's last evaluation when a run logs them: the trainer's evaluation logs the miracle-step
# rate for tasks with step labels (finegrain/eval/runner.py::process_metrics); no stage logs a PRM's
# first-wrong-step accuracy yet (`finegrain eval` and benchmarks/process_quality.py compute it into
# their own reports), so that column reads n/a until one does.
MIRACLE_KEY = "eval/miracle_step_rate"
# columns shown only when some run logs them (multi-turn environments): label -> key, read at the
# last evaluation and averaged over seeds
AGENT_COLUMNS = {"turns / episode": "eval/turns", "tool-call precision": "eval/tool_call_precision",
                 "tool-call recall": "eval/tool_call_recall"}
PRM_FIRST_WRONG_KEY = "eval/prm_first_wrong_step_accuracy"

# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (scipy.stats.t.ppf(0.975, df))
_T975 = [12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272]
_Z975 = 1.959963984540054

INTERVAL_NOTE = "mean ± half-width of the 95% Student t interval over seeds (t_{0.975, n−1} · s / √n)"
ROLLOUTS_NOTE = ("generated rollouts Σ filter/generated_prompts × rollout.group_size up to the first evaluation "
                 "where the seed-mean accuracy is ≥ the target (first crossing, not interpolated)")


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}, the 97.5% quantile of Student's t with ``df`` degrees of freedom.

    df ≤ 30: the table above; beyond, the Cornish–Fisher expansion in 1/df around z = 1.95996
    (Abramowitz & Stegun 26.7.5; error < 1e-6 for df > 30).

    >>> t_quantile_975(2), round(t_quantile_975(100), 4)
    (4.302653, 1.984)
    """
    if df < 1:
        raise ValueError(f"t quantile: needs df ≥ 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z975, float(df)
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3)
            + (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / (92160 * v ** 4))


def t_interval(xs: Sequence[float]) -> tuple[float, float, int]:
    """Mean and the half-width of its two-sided 95% Student t interval, and n.

        x̄ = Σ x_i / n,   s = √(Σ (x_i − x̄)² / (n − 1)),   half = t_{0.975, n−1} · s / √n

    The interval is x̄ ± half. With n = 1 the half-width is NaN (no spread to estimate); with
    n = 0 the mean is NaN too.

    >>> m, half, n = t_interval([0.5, 0.6, 0.7])   # s = 0.1, half = 4.302653 · 0.1 / √3
    >>> round(m, 6), round(half, 6), n
    (0.6, 0.248414, 3)
    """
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = statistics.fmean(xs)
    if n == 1:
        return mean, float("nan"), 1
    return mean, t_quantile_975(n - 1) * statistics.stdev(xs) / math.sqrt(n), n


@dataclass
class Curve:
    """Held-out accuracy against generated rollouts at each evaluation of one run.

    ``steps[i]`` is the RL step after which evaluation i ran (0 = before training),
    ``rollouts[i]`` the generated rollouts up to it, ``accuracy[i]`` its ``eval/accuracy``."""

    steps: list[int] = field(default_factory=list)
    rollouts: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


def eval_curve(rows: Sequence[dict], group_size: int) -> Curve:
    """The evaluation points of one run from its metrics rows.

        R(s) = Σ_{rows with step ≤ s} filter/generated_prompts × group_size

    A row without ``filter/generated_prompts`` counts 0. When a step has several rows with
    ``eval/accuracy`` (a periodic and the final evaluation cannot share a step, but a log could
    repeat one), the last one wins.

    >>> c = eval_curve([{"step": 0, "eval/accuracy": 0.2}, {"step": 1, "filter/generated_prompts": 3},
    ...                 {"step": 2, "filter/generated_prompts": 2}, {"step": 2, "eval/accuracy": 0.5}], 4)
    >>> c.steps, c.rollouts, c.accuracy
    ([0, 2], [0.0, 20.0], [0.2, 0.5])
    """
    cum, totals, acc = 0.0, {}, {}
    for r in sorted(rows, key=lambda r: r["step"]):  # stable: rows of one step keep their order
        cum += float(r.get(GENERATED_KEY, 0.0)) * group_size
        totals[int(r["step"])] = cum  # R at the end of the step, whichever of its rows holds the eval
        if ACCURACY_KEY in r:
            acc[int(r["step"])] = float(r[ACCURACY_KEY])
    steps = sorted(acc)
    return Curve(steps, [totals[s] for s in steps], [acc[s] for s in steps])


def last_logged(rows: Sequence[dict], key: str) -> float | None:
    """The value of ``key`` in the last row (highest step, last written) that has it; None if none does."""
    hits = [r for r in sorted(rows, key=lambda r: r["step"]) if key in r]
    return float(hits[-1][key]) if hits else None


def mean_curve(curves: Sequence[Curve]) -> Curve:
    """The seed-mean curve: at every evaluation step that all curves share, the mean accuracy and
    the mean rollouts over the curves.

    >>> m = mean_curve([Curve([0, 2], [0, 20], [0.2, 0.5]), Curve([0, 2], [0, 24], [0.4, 0.7])])
    >>> m.steps, m.rollouts, [round(a, 6) for a in m.accuracy]
    ([0, 2], [0.0, 22.0], [0.3, 0.6])
    """
    if not curves:
        return Curve()
    common = sorted(set(curves[0].steps).intersection(*(c.steps for c in curves[1:])))
    idx = [{s: i for i, s in enumerate(c.steps)} for c in curves]
    return Curve(common, [statistics.fmean(c.rollouts[ix[s]] for c, ix in zip(curves, idx)) for s in common],
                 [statistics.fmean(c.accuracy[ix[s]] for c, ix in zip(curves, idx)) for s in common])


def rollouts_to_target(rollouts: Sequence[float], accuracy: Sequence[float], target: float) -> float | None:
    """Rollouts at the first evaluation whose accuracy is ≥ ``target`` (first crossing, no
    interpolation); None when no evaluation reaches it.

    >>> rollouts_to_target([0, 100, 200, 300], [0.30, 0.45, 0.62, 0.60], 0.6)
    200
    >>> rollouts_to_target([0, 100], [0.3, 0.4], 0.6) is None
    True
    """
    return next((x for x, y in zip(rollouts, accuracy) if y >= target), None)


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline; None when either is missing or the baseline is 0 (it reached the target
    before any rollout, so no ratio is meaningful).

    >>> ratio(300, 200), ratio(None, 200), ratio(300, 0)
    (1.5, None, None)
    """
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


# ---------------------------------------------------------------------------------------------
# one method, then the whole comparison


@dataclass
class RunResult:
    """One finished run: its method label, seed, metrics rows, group size and the launch record
    (``compare_done.json``: wall_seconds, peak_rss_mib, ...)."""

    method: str
    seed: int
    rows: list[dict]
    group_size: int
    info: dict = field(default_factory=dict)


def _mean_or_none(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def method_summary(runs: Sequence[RunResult]) -> dict:
    """Aggregates of one method's seeds (everything but what depends on other methods)."""
    curves = [eval_curve(r.rows, r.group_size) for r in runs]
    finals = [c.accuracy[-1] for c in curves if c.accuracy]
    mean, half, n = t_interval(finals)
    times = [float(row[STEP_TIME_KEY]) for r in runs for row in r.rows if STEP_TIME_KEY in row]
    rss = [r.info["peak_rss_mib"] for r in runs if "peak_rss_mib" in r.info]
    mc = mean_curve(curves)
    return {
        "seeds": [r.seed for r in runs], "n": n,
        "final_accuracy": {"mean": mean, "half_width": half, "per_seed": finals},
        "mean_curve": {"steps": mc.steps, "rollouts": mc.rollouts, "accuracy": mc.accuracy},
        "curves": [{"seed": r.seed, "steps": c.steps, "rollouts": c.rollouts, "accuracy": c.accuracy}
                   for r, c in zip(runs, curves)],
        "total_rollouts_mean": _mean_or_none([c.rollouts[-1] if c.rollouts else None for c in curves]),
        "miracle_step_rate": _mean_or_none([last_logged(r.rows, MIRACLE_KEY) for r in runs]),
        "prm_first_wrong_step_accuracy": _mean_or_none([last_logged(r.rows, PRM_FIRST_WRONG_KEY) for r in runs]),
        "agent": {k: _mean_or_none([last_logged(r.rows, k) for r in runs]) for k in AGENT_COLUMNS.values()},
        "seconds_per_step_median": statistics.median(times) if times else None,
        "peak_rss_mib_max": max(rss) if rss else None,
        "wall_seconds": [r.info.get("wall_seconds") for r in runs],
    }


def summarize(results: Sequence[RunResult], methods: Sequence[str], *, target: float | None = None,
              baseline: str | None = None) -> dict:
    """Every method's aggregates, the target, rollouts to it and the ratio against the baseline.

    ``methods`` fixes the row order; a method without a finished run is left out. ``target``
    None = the lowest final mean accuracy of any method; ``baseline`` None = the first method.
    """
    table: dict[str, dict] = {}
    for m in methods:
        rs = sorted((r for r in results if r.method == m), key=lambda r: r.seed)
        if rs:
            table[m] = method_summary(rs)
    finals = {m: t["final_accuracy"]["mean"] for m, t in table.items() if t["n"]}
    if target is None and finals:
        worst = min(finals, key=finals.get)
        target, target_source = finals[worst], f"lowest final mean accuracy (method {worst})"
    else:
        target_source = "--target"
    baseline = baseline or (methods[0] if methods else None)
    for m, t in table.items():
        mc = t["mean_curve"]
        t["rollouts_to_target"] = (rollouts_to_target(mc["rollouts"], mc["accuracy"], target)
                                   if target is not None else None)
        t["rollouts_to_target_per_seed"] = [rollouts_to_target(c["rollouts"], c["accuracy"], target)
                                            if target is not None else None for c in t["curves"]]
    base = table.get(baseline, {}).get("rollouts_to_target")
    for m, t in table.items():
        t["ratio_to_baseline"] = ratio(t["rollouts_to_target"], base)
    return {"methods": table, "target": target, "target_source": target_source, "baseline": baseline,
            "interval": INTERVAL_NOTE, "rollouts_definition": ROLLOUTS_NOTE,
            "keys": {"accuracy": ACCURACY_KEY, "generated_prompts": GENERATED_KEY, "step_time": STEP_TIME_KEY,
                     "miracle_step_rate": MIRACLE_KEY, "prm_first_wrong_step_accuracy": PRM_FIRST_WRONG_KEY}}


# ---------------------------------------------------------------------------------------------
# presentation


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def table_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The summary table as a header and rows of display strings (markdown and HTML share them)."""
    target, baseline = summary["target"], summary["baseline"]
    header = ["method", "seeds", "final accuracy (mean ± 95% t-interval)",
              f"rollouts to {_num(target)} (first crossing of the seed mean)", f"rollouts × {baseline}",
              "miracle-step rate", "PRM first-wrong-step acc"]
    agent = [(label, key) for label, key in AGENT_COLUMNS.items()
             if any(t.get("agent", {}).get(key) is not None for t in summary["methods"].values())]
    header += [label for label, _ in agent] + ["s / step (median)", "peak RSS MiB (max)"]
    rows = []
    for m, t in summary["methods"].items():
        f = t["final_accuracy"]
        final = (f"{_num(f['mean'])} ± {_num(f['half_width'])}" if t["n"] > 1
                 else f"{_num(f['mean'])} (n=1, no interval)")
        reached = sum(x is not None for x in t["rollouts_to_target_per_seed"])
        r = t["rollouts_to_target"]
        to_target = "not reached" if r is None else f"{r:,.0f}"
        to_target += f" ({reached}/{t['n']} seeds)"
        rt = t["ratio_to_baseline"]
        rss = t["peak_rss_mib_max"]
        rows.append([m, str(t["n"]), final, to_target, "n/a" if rt is None else f"{rt:.2f}×",
                     _num(t["miracle_step_rate"]), _num(t["prm_first_wrong_step_accuracy"]),
                     *[_num(t.get("agent", {}).get(key), 2) for _, key in agent],
                     _num(t["seconds_per_step_median"], 2), "n/a" if rss is None else f"{rss:,.0f}"])
    return header, rows


def _notes(summary: dict) -> list[str]:
    na = [c for c, k in (("miracle-step rate", "miracle_step_rate"),
                         ("PRM first-wrong-step acc", "prm_first_wrong_step_accuracy"))
          if all(t[k] is None for t in summary["methods"].values())]
    notes = [f"Final accuracy: `{ACCURACY_KEY}` at each run's last evaluation; {INTERVAL_NOTE}; n = seeds.",
             f"Rollouts to target: {ROLLOUTS_NOTE}. Target {_num(summary['target'])} "
             f"({summary['target_source']}); (k/n seeds) = seeds whose own curve reaches it.",
             f"Rollouts × {summary['baseline']}: rollouts to target divided by the baseline's; n/a when either "
             f"is not reached or the baseline's is 0.",
             "Turns / episode, tool-call precision and recall (multi-turn runs only): `eval/turns`, "
             "`eval/tool_call_precision`, `eval/tool_call_recall` at the last evaluation, mean over seeds "
             "(calls against the ground-truth trace, docs/metrics.md).",
             "s / step: median of `time/step` over all steps of all seeds (rollout + scoring + update, eval "
             "excluded); peak RSS: the largest `ru_maxrss` of the seeds' training processes."]
    keys = {"miracle-step rate": MIRACLE_KEY, "PRM first-wrong-step acc": PRM_FIRST_WRONG_KEY}
    if na:
        notes.append(f"n/a in {' and '.join(na)}: the runs' metrics.jsonl has no "
                     f"{' / '.join(f'`{keys[c]}`' for c in na)} (the trainer's evaluation does not log it for "
                     f"this task or reward).")
    return notes


def render_markdown(summary: dict, command: str = "", missing: Sequence[str] = ()) -> str:
    header, rows = table_rows(summary)
    lines = [f"Command: `{command}`", ""] if command else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", *[f"- {n}" for n in _notes(summary)]]
    if missing:
        lines.append(f"- Not finished, left out: {', '.join(missing)}.")
    return "\n".join(lines) + "\n"


def plot_curves(summary: dict, path: Path) -> Path:
    """Held-out accuracy against generated rollouts: the seed-mean line of each method and a band
    from the lowest to the highest seed at each evaluation, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (m, t) in enumerate(summary["methods"].items()):
        c = colours[i % len(colours)]
        mc = t["mean_curve"]
        per_step = [[cv["accuracy"][cv["steps"].index(s)] for cv in t["curves"]] for s in mc["steps"]]
        ax.plot(mc["rollouts"], mc["accuracy"], color=c, marker="o", ms=3, lw=1.8, label=f"{m} (n={t['n']})")
        if t["n"] > 1:
            ax.fill_between(mc["rollouts"], [min(v) for v in per_step], [max(v) for v in per_step], color=c, alpha=0.15)
    if summary["target"] is not None:
        ax.axhline(summary["target"], color="grey", ls="--", lw=0.8, label=f"target {summary['target']:.3f}")
    ax.set_xlabel("generated rollouts (cumulative, filtered-out groups included)")
    ax.set_ylabel(f"held-out accuracy ({ACCURACY_KEY})")
    ax.set_title("mean over seeds; band = min–max over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})  # no URL in the page, even encoded
    plt.close(fig)
    return path


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _e_code(text: str) -> str:
    """Escaped text with `backticks` as <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", _e(text))


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
       "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
       "td:first-child,th:first-child{text-align:left}code,pre{background:#f6f6f6;padding:2px 4px}"
       "pre{white-space:pre-wrap;padding:8px}img{max-width:100%}li{margin:0.3em 0}")


RUN_HEADER = ["run", "final accuracy", "wall s (last launch)", "peak RSS MiB (last launch)", "resumed"]


def render_html(summary: dict, png: Path | None, *, command: str, machine: dict, runs: Sequence[dict],
                missing: Sequence[str] = ()) -> str:
    """One HTML page with no external reference: inline CSS, the PNG as a base64 data URI."""
    header, rows = table_rows(summary)
    img = ""
    if png is not None and Path(png).is_file():
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        img = f'<img alt="held-out accuracy against generated rollouts" src="data:image/png;base64,{data}">'
    notes = "".join(f"<li>{_e_code(n)}</li>" for n in _notes(summary))
    if missing:
        notes += f"<li>Not finished, left out: {_e(', '.join(missing))}.</li>"
    run_rows = [[r["name"], _num(r.get("final_accuracy")), _num(r.get("wall_seconds"), 1),
                 _num(r.get("peak_rss_mib"), 0), "yes" if r.get("resumed") else "no"] for r in runs]
    mach = [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in machine.items()]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>finegrain compare</title>"
            f"<style>{CSS}</style></head><body><h1>finegrain compare</h1>"
            f"<h2>Summary</h2>{_html_table(header, rows)}<ul>{notes}</ul>"
            f"<h2>Held-out accuracy against generated rollouts</h2>{img or '<p>(no plot)</p>'}"
            f"<h2>Runs</h2>{_html_table(RUN_HEADER, run_rows)}"
            f"<h2>Command</h2><pre>{_e(command)}</pre>"
            f"<h2>Machine</h2>{_html_table(['', 'value'], mach)}</body></html>\n")
