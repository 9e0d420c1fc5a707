"""The evaluation report directory: metrics JSON, PNG plots and one self-contained HTML page.

Files written by :func:`write_report` into ``out_dir``:

    metrics.json       every number (see ``docs/eval.md`` for the keys)
    samples.jsonl      one line per sampled response: text, verifier result, step labels, scores
    bon_vs_n.png       best-of-N accuracy against N for each scorer, with majority vote,
                       the random expectation and pass@N
    aggregations.png   best-of-N against N for each step aggregation of each step-level scorer
    vote_vs_n.png      weighted majority vote against N for each scorer
    tokens.png         accuracy against generated tokens: step searches next to best-of-N
                       (only when a search ran)
    report.html        one file, inline CSS, plots inlined as data URIs, no script and no
                       external asset: the metrics tables, then the sampled solutions with each
                       step (or token) coloured by its score and the exact step label beside it;
                       a multi-turn episode turn by turn (model text, its tool call, the
                       observation marked as not trained, errors, turn rewards coloured)

All text from models, tasks and users goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from finegrain.eval.turns import TurnRecord

LABEL_NAMES = {1: "correct", 0: "wrong", -1: "unparseable"}
LABEL_MARKS = {1: "✓", 0: "✗", -1: "?"}


@dataclass
class SampleRecord:
    """One sampled response with everything the report shows.

    problem, sample: indices of the problem and of the sample among its n.
    prompt, reference: the problem text and its reference answer.
    response: decoded response; answer: the answer extracted from it (None if none).
    correct: verifier result ≥ 1. truncated: stopped by max_new_tokens. n_tokens: response tokens.
    step_spans: (start, end) character spans of the steps in ``response``.
    step_labels: exact label per step (1 correct, 0 wrong, −1 unparseable), None if the task
        has no step labels. first_error: index of the first non-correct step, None if none.
    outcome_scores: scorer name → response score. step_scores: scorer name → one per step.
    token_spans: (start, end) characters of each response token, or None (not kept).
    token_scores: scorer name → one score per token of ``token_spans``.
    turns: the episode's turns (:class:`finegrain.eval.turns.TurnRecord`) when it ran in a
        multi-turn environment; None for a single-turn response (and then left out of its JSON).
    """

    problem: int
    sample: int
    prompt: str
    reference: str
    response: str
    correct: bool
    answer: str | None = None
    truncated: bool = False
    n_tokens: int = 0
    step_spans: list[tuple[int, int]] = field(default_factory=list)
    step_labels: list[int] | None = None
    first_error: int | None = None
    outcome_scores: dict[str, float] = field(default_factory=dict)
    step_scores: dict[str, list[float]] = field(default_factory=dict)
    token_spans: list[tuple[int, int]] | None = None
    token_scores: dict[str, list[float]] = field(default_factory=dict)
    turns: list[TurnRecord] | None = None

    def to_json(self, with_tokens: bool = False) -> dict:
        """A JSON-ready dict (token spans and scores only if ``with_tokens``; turns only when the
        record has them)."""
        d = asdict(self)
        if not with_tokens:
            d.pop("token_spans")
            d.pop("token_scores")
        if d["turns"] is None:
            d.pop("turns")
        return d


# ------------------------------------------------------------------------------------ metrics


def json_safe(x: Any) -> Any:
    """Recursively replace NaN/±inf with None and tuples with lists, so the JSON is standard."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:  # numpy / torch scalar
        return json_safe(x.item())
    return x


def write_metrics(metrics: dict, path: Path) -> None:
    """Write ``metrics`` as standard JSON (NaN/inf become null)."""
    Path(path).write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False))


# -------------------------------------------------------------------------------------- plots


def _plt():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _accuracy_axis(ax) -> None:
    """Accuracy axis from 0 to just above the highest plotted value (at least 0.1, at most 1)."""
    top = max([max(line.get_ydata(), default=0.0) for line in ax.get_lines()], default=0.0)
    ax.set_ylim(0.0, min(1.0, max(0.1, float(top) * 1.1 + 0.02)))
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> Path:
    """Lay out, write and close a figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _log2_axis(ax, Ns: Sequence[int]) -> None:
    """x axis: N on a log2 scale with a tick at each N; y axis: accuracy."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(Ns))
    ax.set_xticklabels([str(n) for n in Ns])
    ax.set_xlabel("N (samples per problem)")
    _accuracy_axis(ax)


def write_plots(metrics: dict, out_dir: Path) -> list[Path]:
    """PNG plots from ``metrics["curves"]`` (and ``metrics["search"]`` when present).

    Returns the paths written (a plot whose data is missing is skipped).
    """
    plt = _plt()
    out_dir = Path(out_dir)
    written = []
    curves = metrics.get("curves") or {}
    Ns = curves.get("Ns") or []
    if Ns:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, ys in curves.get("bon", {}).items():
            ax.plot(Ns, ys, marker="o", label=f"best-of-N: {name}")
        if curves.get("majority_vote"):
            ax.plot(Ns, curves["majority_vote"], marker="s", ls="--", label="majority vote")
        if curves.get("random_expected"):
            ax.plot(Ns, curves["random_expected"], ls=":", color="grey", label="random (expected)")
        if curves.get("pass_at"):
            ax.plot(Ns, curves["pass_at"], ls="-.", color="black", alpha=0.5, label="pass@N")
        _log2_axis(ax, Ns)
        ax.set_title("Best-of-N accuracy")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "bon_vs_n.png"))
    by_agg = curves.get("bon_by_aggregation") or {}
    if Ns and by_agg:
        fig, axes = plt.subplots(1, len(by_agg), figsize=(5 * len(by_agg), 3.6), squeeze=False)
        for ax, (name, aggs) in zip(axes[0], by_agg.items()):
            for agg, ys in aggs.items():
                ax.plot(Ns, ys, marker="o", label=agg)
            _log2_axis(ax, Ns)
            ax.set_title(f"best-of-N by step aggregation: {name}")
            ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "aggregations.png"))
    votes = curves.get("weighted_vote") or {}
    if Ns and (votes or curves.get("majority_vote")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, ys in votes.items():
            ax.plot(Ns, ys, marker="o", label=f"weighted vote: {name}")
        if curves.get("majority_vote"):
            ax.plot(Ns, curves["majority_vote"], marker="s", ls="--", label="majority vote")
        _log2_axis(ax, Ns)
        ax.set_title("Weighted majority vote")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "vote_vs_n.png"))
    search = metrics.get("search") or {}
    if search.get("runs"):
        fig, ax = plt.subplots(figsize=(6, 4))
        bon = search.get("bon_tokens") or {}
        if bon.get("tokens"):
            ax.plot(bon["tokens"], bon["accuracy"], marker="o", label=f"best-of-N ({search.get('scorer')})")
            for n, x, y in zip(bon["Ns"], bon["tokens"], bon["accuracy"]):
                ax.annotate(f"N={n}", (x, y), fontsize=6)
        for method in dict.fromkeys(r["method"] for r in search["runs"]):
            runs = [r for r in search["runs"] if r["method"] == method]
            ax.plot([r["tokens_per_problem"] for r in runs], [r["accuracy"] for r in runs], marker="^", label=method)
            for r in runs:
                ax.annotate(f"N={r['n_beams']}", (r["tokens_per_problem"], r["accuracy"]), fontsize=6)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("generated tokens per problem")
        _accuracy_axis(ax)
        ax.set_title("Accuracy against generated tokens")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "tokens.png"))
    return written


# --------------------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em} h3{font-size:1em}
table.metrics{border-collapse:collapse;margin:0.4em 0;font-size:0.9em}
table.metrics th,table.metrics td{border:1px solid #ddd;padding:2px 8px;text-align:right}
table.metrics th:first-child,table.metrics td:first-child{text-align:left}
img.plot{max-width:100%;border:1px solid #eee;margin:0.3em}
.legend span{display:inline-block;padding:0 6px;margin-right:6px;border-radius:3px}
details.problem{border:1px solid #ccc;border-radius:6px;margin:0.8em 0;padding:0.4em 0.8em}
details.problem>summary{cursor:pointer;font-weight:600}
.prompt{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;background:#f7f7f7;padding:4px}
.solution{border-left:5px solid #999;margin:0.7em 0;padding:0.3em 0.7em;background:#fcfcfc}
.solution.verified-correct{border-left-color:#2e7d32}
.solution.verified-wrong{border-left-color:#c62828}
.solution-head{font-size:0.85em;color:#444;margin-bottom:0.3em}
.verdict-correct{color:#2e7d32;font-weight:700} .verdict-wrong{color:#c62828;font-weight:700}
table.steps{border-collapse:collapse;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:0.9em}
table.steps td,table.steps th{padding:1px 6px;vertical-align:top;border-bottom:1px solid #eee}
table.steps th{font-family:system-ui,sans-serif;font-size:0.75em;color:#666;text-align:left}
td.label{white-space:nowrap;font-family:system-ui,sans-serif;font-size:0.8em;border-radius:3px}
.label-correct{color:#1b5e20;background:#e8f5e9} .label-wrong{color:#b71c1c;background:#ffebee}
.label-unparseable{color:#555;background:#eee} .label-none{color:#999}
tr.first-error td.label{outline:2px solid #b71c1c}
td.step-text{white-space:pre-wrap}
td.score{text-align:right;font-size:0.8em;white-space:nowrap}
.tok{border-radius:2px}
pre.raw{white-space:pre-wrap;background:#f7f7f7;padding:4px;font-size:0.85em}
.turns{display:flex;flex-direction:column;gap:0.35em}
.turn{border:1px solid #e3e3e3;border-radius:4px;padding:0.25em 0.5em}
.turn.turn-error{border-color:#e57373}
.turn-head{font-size:0.8em;color:#444;display:flex;flex-wrap:wrap;gap:0.3em 0.8em;align-items:center}
.turn-reward{padding:0 5px;border-radius:3px;border:1px solid #ddd;white-space:nowrap}
.turn-label{padding:0 4px;border-radius:3px;white-space:nowrap}
.error-badge{color:#fff;background:#c62828;padding:0 5px;border-radius:3px;font-weight:600}
.model-text{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:0.9em;margin:0.2em 0}
.model-text .empty{color:#999;font-style:italic}
.tool-call{outline:2px solid #1565c0;border-radius:3px;background:#e3f2fd;color:#0d47a1;font-weight:600}
.tool-call.call-error{outline-color:#c62828;background:#ffebee;color:#b71c1c}
.observation{color:#666;background:#e8e8e8;border-left:4px dashed #9e9e9e;padding:0.15em 0.5em;margin:0.2em 0}
.observation pre{white-space:pre-wrap;margin:0;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:0.85em;
color:#616161}
.untrained{font-family:system-ui,sans-serif;font-size:0.72em;text-transform:uppercase;letter-spacing:0.04em;
color:#757575}
.not-shown{font-size:0.75em;color:#888;font-style:italic}
""".strip()


def _e(x: Any) -> str:
    """HTML-escaped text of ``x`` (quotes too, so it is safe inside attributes)."""
    return html.escape(str(x), quote=True)


def score_colour(x: float, center: float, scale: float) -> str:
    """CSS colour of a score: green above ``center``, red below, opacity ∝ |x − center| / scale
    (capped at 0.6); transparent for a non-finite score or a zero scale.

    >>> score_colour(1.0, 0.5, 0.5), score_colour(0.0, 0.5, 0.5), score_colour(0.5, 0.5, 0.5)
    ('rgba(46,160,67,0.600)', 'rgba(218,54,51,0.600)', 'rgba(46,160,67,0.000)')
    """
    if not (math.isfinite(x) and scale > 0):
        return "transparent"
    v = max(-1.0, min(1.0, (x - center) / scale))
    return f"rgba(46,160,67,{0.6 * v:.3f})" if v >= 0 else f"rgba(218,54,51,{-0.6 * v:.3f})"


def _fmt(x: Any) -> str:
    """Short display text of a number ('–' for None or non-finite)."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else f"{x:.3f}" if abs(x) < 1000 else f"{x:.3g}"
    return str(x)


def _scale(values: list[float], center: float) -> float:
    """The 95th percentile of |x − center| over finite values (the colour saturation point)."""
    dev = sorted(abs(v - center) for v in values if math.isfinite(v))
    if not dev:
        return 0.0
    return dev[min(len(dev) - 1, int(0.95 * (len(dev) - 1) + 0.5))] or dev[-1]


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "metrics") -> str:
    """An HTML table with escaped, formatted cells."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _metrics_html(metrics: dict) -> str:
    """The metric tables of the page: settings, accuracy, curves, process metrics, searches."""
    parts = []
    acc = metrics.get("accuracy") or {}
    meta = metrics.get("meta") or {}
    if meta:
        parts.append(_table(["setting", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                                                   for k, v in meta.items()]))
    if acc:
        parts.append(_table(["metric", "value"], [["accuracy (all samples)", acc.get("mean")],
                                                  ["95% interval", f"[{_fmt(acc.get('lo'))}, {_fmt(acc.get('hi'))}]"],
                                                  ["samples", acc.get("n")]]))
    curves = metrics.get("curves") or {}
    Ns = curves.get("Ns") or []
    if Ns:
        rows = [[f"best-of-N: {k}"] + list(v) for k, v in curves.get("bon", {}).items()]
        rows += [[f"weighted vote: {k}"] + list(v) for k, v in curves.get("weighted_vote", {}).items()]
        for key, name in (("majority_vote", "majority vote"), ("random_expected", "random (expected)"),
                          ("pass_at", "pass@N")):
            if curves.get(key):
                rows.append([name] + list(curves[key]))
        parts.append("<h3>Accuracy against N</h3>" + _table(["selector"] + [f"N={n}" for n in Ns], rows))
        agg_rows = [[f"{name}: {agg}"] + list(ys) for name, aggs in (curves.get("bon_by_aggregation") or {}).items()
                    for agg, ys in aggs.items()]
        if agg_rows:
            parts.append("<h3>Best-of-N by step aggregation</h3>" + _table(["scorer: aggregation"] +
                                                                           [f"N={n}" for n in Ns], agg_rows))
    proc = metrics.get("process") or {}
    if proc.get("scorers"):
        rows = [[name, p.get("step_auroc"), p.get("threshold"), p.get("f1"), p.get("error_acc"), p.get("correct_acc"),
                 p.get("first_error_acc")] for name, p in proc["scorers"].items()]
        parts.append("<h3>Process metrics against the exact step labels</h3>" +
                     _table(["scorer", "step AUROC", "threshold", "ProcessBench F1", "error acc", "correct acc",
                             "first-error acc"], rows))
        msr = proc.get("miracle_step_rate") or {}
        if msr:
            parts.append(_table(["sampled responses", "value"],
                                [["right answer with a non-correct step (among right)", msr.get("among_correct")],
                                 ["error-free responses", proc.get("error_free_frac")]]))
    turns = metrics.get("turns") or {}
    if turns:
        rows = [["episodes", turns.get("episodes")], ["turns per episode", turns.get("mean_turns")],
                ["tool calls per episode", turns.get("mean_tool_calls")],
                ["episodes cut by a limit", turns.get("truncated_frac")]]
        rows += [[f"turns with error: {k}", v] for k, v in (turns.get("error_frac") or {}).items()]
        parts.append("<h3>Turns (multi-turn episodes)</h3>" + _table(["statistic", "value"], rows))
    search = metrics.get("search") or {}
    if search.get("runs"):
        rows = [[r["method"], r["n_beams"], r["beam_width"], r.get("tau"), r["accuracy"], r["tokens_per_problem"],
                 r.get("seconds")] for r in search["runs"]]
        bon = search.get("bon_tokens") or {}
        rows += [["best-of-N", n, "", "", a, t, ""] for n, a, t in
                 zip(bon.get("Ns", []), bon.get("accuracy", []), bon.get("tokens", []))]
        parts.append(f"<h3>Step search ({_e(search.get('scorer'))}, {_e(search.get('n_problems'))} problems)</h3>" +
                     _table(["method", "N", "M", "τ", "accuracy", "tokens / problem", "seconds"], rows))
    return "\n".join(parts)


def _char_owner(n_chars: int, token_spans: list[tuple[int, int]]) -> list[int]:
    """Token index owning each character of the response (−1 where no token covers it)."""
    owner = [-1] * n_chars
    for k, (a, b) in enumerate(token_spans):
        for c in range(max(a, 0), min(b, n_chars)):
            owner[c] = k
    return owner


def _step_text_html(rec: SampleRecord, s: int, e: int, colour_by: str | None, centers: dict, scales: dict,
                    owner: list[int] | None) -> str:
    """The step's text (trailing newlines dropped), coloured per token when token scores exist,
    else as a whole by the step score."""
    text = rec.response[s:e].rstrip("\n")
    return _text_html(rec, s, s + len(text), colour_by, centers, scales, owner)


def _text_html(rec: SampleRecord, s: int, e: int, colour_by: str | None, centers: dict, scales: dict,
               owner: list[int] | None) -> str:
    """``rec.response[s:e]``, escaped, coloured per token when ``colour_by`` has token scores."""
    tok_scores = rec.token_scores.get(colour_by) if colour_by else None
    if tok_scores is not None and owner is not None:
        center, scale = centers.get(colour_by, 0.0), scales.get(("token", colour_by), 0.0)
        out, c = [], s
        while c < e:
            k = owner[c]
            d = c
            while d < e and owner[d] == k:
                d += 1
            piece = _e(rec.response[c:d])
            if k >= 0 and k < len(tok_scores):
                out.append(f'<span class="tok" style="background:{score_colour(tok_scores[k], center, scale)}" '
                           f'title="{_e(colour_by)} token score {tok_scores[k]:.4f}">{piece}</span>')
            else:
                out.append(piece)
            c = d
        return "".join(out)
    return _e(rec.response[s:e])


ENV_REWARD = "environment"  # the source name of the environment's own turn rewards (centre 0)


def _chip(label: str, value: float | None, center: float, scale: float, source: str) -> str:
    """A turn reward: its source and value on the report's colour scale (uncoloured when None)."""
    colour = score_colour(value, center, scale) if value is not None else "transparent"
    shown = _fmt(value) if value is not None else "–"
    return (f'<span class="turn-reward" data-source="{_e(source)}" style="background:{colour}" '
            f'title="{_e(label)} turn reward">{_e(label)} {_e(shown)}</span>')


def _model_text_html(rec: SampleRecord, turn: TurnRecord, colour_by: str | None, centers: dict, scales: dict,
                     owner: list[int] | None, has_tokens: bool) -> str:
    """The model's text of one turn: coloured per token (when ``colour_by`` has token scores) or per
    step by its step score, as single responses are; the tool call it ends with outlined."""
    a, b = turn.span
    if a >= b:
        return '<span class="empty">(no text)</span>'
    cut = turn.call_span[0] if turn.call_span else b
    step_scores = rec.step_scores.get(colour_by, []) if colour_by else []

    def pieces(x: int, y: int) -> str:
        if has_tokens:
            return _text_html(rec, x, y, colour_by, centers, scales, owner)
        bounds = sorted({x, y} | {c for span in rec.step_spans for c in span if x < c < y})
        out = []
        for u, v in zip(bounds, bounds[1:]):
            k = next((i for i, (s, e) in enumerate(rec.step_spans) if s <= u < e), None)
            if k is not None and k < len(step_scores):
                colour = score_colour(step_scores[k], centers.get(colour_by, 0.0), scales.get(("step", colour_by), 0.0))
                out.append(f'<span class="step-piece" data-step="{k}" style="background:{colour}">'
                           f'{_e(rec.response[u:v])}</span>')
            else:
                out.append(_e(rec.response[u:v]))
        return "".join(out)

    html_ = pieces(a, cut)
    if cut < b:
        bad = " call-error" if turn.error else ""
        name = turn.call.get("name", "") if isinstance(turn.call, dict) else ""
        html_ += (f'<span class="tool-call{bad}" data-call="{_e(name)}" title="tool call">'
                  f'{pieces(cut, b)}</span>')
    return html_


def _count(n: int, noun: str) -> str:
    """'1 turn', '3 turns'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _call_text(call) -> str:
    """``name(arg, ...)`` of a call's metadata."""
    if isinstance(call, dict) and "name" in call:
        return f"{call['name']}({', '.join(str(a) for a in call.get('args') or [])})"
    return str(call)


def _turn_html(rec: SampleRecord, turn: TurnRecord, colour_by: str | None, centers: dict, scales: dict,
               owner: list[int] | None, has_tokens: bool) -> str:
    """One turn: its head (index, step labels, turn rewards, call, error), the model's text and the
    environment's observation, marked as not trained."""
    head = [f'<span class="turn-index">turn {turn.turn}</span>']
    for k in turn.steps:
        lab = rec.step_labels[k] if rec.step_labels is not None and k < len(rec.step_labels) else None
        if lab is not None:
            name = LABEL_NAMES.get(lab, "none")
            outline = ' style="outline:2px solid #b71c1c"' if rec.first_error == k else ""
            head.append(f'<span class="turn-label label-{name}" data-label="{name}" data-step="{k}"{outline}>'
                        f'{LABEL_MARKS.get(lab, "")} {name}</span>')
    if turn.env_reward is not None:
        head.append(_chip(ENV_REWARD, turn.env_reward, 0.0, scales.get(("turn", ENV_REWARD), 0.0), ENV_REWARD))
    for name, v in turn.scores.items():
        value = v if v is not None and math.isfinite(v) else None
        head.append(_chip(name, value, centers.get(name, 0.0), scales.get(("turn", name), 0.0), name))
    if turn.call is not None:
        head.append(f'<span class="call-parsed">call {_e(_call_text(turn.call))}</span>')
    if turn.error:
        head.append(f'<span class="error-badge" data-error="{_e(turn.error)}">⚠ {_e(turn.error)}</span>')
    text = _model_text_html(rec, turn, colour_by, centers, scales, owner, has_tokens)
    body = f'<div class="model-text" data-trained="true">{text}</div>'
    label = "tool output" if turn.call is not None or turn.call_span is not None else "environment output"
    if turn.observation:
        body += (f'<div class="observation" data-trained="false" title="{label}: loss_mask False">'
                 f'<span class="untrained">{label} — not trained</span><pre>{_e(turn.observation.strip(chr(10)))}</pre></div>')
    elif turn.result is not None:
        body += (f'<div class="not-shown">{label} not appended (the episode ended here): '
                 f'{_e(turn.result)}</div>')
    cls = "turn turn-error" if turn.error else "turn"
    err = f' data-error="{_e(turn.error)}"' if turn.error else ""
    return (f'<div class="{cls}" data-turn="{turn.turn}"{err}><div class="turn-head">{" ".join(head)}</div>'
            f"{body}</div>")


def _solution_html(rec: SampleRecord, scorer_names: list[str], colour_by: str | None, centers: dict,
                   scales: dict) -> str:
    """One sampled solution: header (verifier, answer, scores) and one table row per step."""
    verdict = "correct" if rec.correct else "wrong"
    head = [f"sample {rec.sample}",
            f'verifier: <span class="verdict verdict-{verdict}" data-verified="{verdict}">'
            f'{"✓" if rec.correct else "✗"} {verdict}</span>',
            f"answer: {_e(rec.answer if rec.answer is not None else '(none)')}",
            f"{rec.n_tokens} tokens" + (" (truncated)" if rec.truncated else "")]
    head += [f"{_e(n)}: {_e(_fmt(rec.outcome_scores.get(n)))}" for n in scorer_names if n in rec.outcome_scores]
    rows = []
    owner = _char_owner(len(rec.response), rec.token_spans) if rec.token_spans is not None else None
    has_tokens = bool(colour_by and colour_by in rec.token_scores and owner is not None)
    if rec.turns is not None:
        errors = sum(t.error is not None for t in rec.turns)
        calls = sum(t.call is not None for t in rec.turns)
        head.append(_count(len(rec.turns), "turn") + ", " + _count(calls, "tool call")
                    + (", " + _count(errors, "error") if errors else ""))
        turns = "".join(_turn_html(rec, t, colour_by, centers, scales, owner, has_tokens) for t in rec.turns)
        note = f"text coloured by {_e(colour_by)} ({'tokens' if has_tokens else 'steps'})" if colour_by else ""
        raw = f'<details><summary>raw text</summary><pre class="raw">{_e(rec.response)}</pre></details>'
        return (f'<div class="solution verified-{verdict}" data-problem="{rec.problem}" data-sample="{rec.sample}" '
                f'data-turns="{len(rec.turns)}"><div class="solution-head">{" · ".join(head)}</div>'
                f'<div class="turns" title="{note}">{turns}</div>{raw}</div>')
    for k, (s, e) in enumerate(rec.step_spans):
        lab = rec.step_labels[k] if rec.step_labels is not None and k < len(rec.step_labels) else None
        name = LABEL_NAMES.get(lab, "none")
        label = (f'<td class="label label-{name}" data-label="{name}">{LABEL_MARKS.get(lab, "")} {name}</td>'
                 if lab is not None else '<td class="label label-none" data-label="none">–</td>')
        colour_scores = rec.step_scores.get(colour_by, []) if colour_by else []
        step_score = colour_scores[k] if k < len(colour_scores) else None
        style = ""
        if step_score is not None and not has_tokens:
            style = f' style="background:{score_colour(step_score, centers.get(colour_by, 0.0), scales.get(("step", colour_by), 0.0))}"'
        text = _step_text_html(rec, s, e, colour_by, centers, scales, owner)
        cells = "".join(
            f'<td class="score" data-scorer="{_e(n)}" style="background:'
            f'{score_colour(rec.step_scores[n][k], centers.get(n, 0.0), scales.get(("step", n), 0.0))}">'
            f"{_e(_fmt(rec.step_scores[n][k]))}</td>"
            for n in scorer_names if n in rec.step_scores and k < len(rec.step_scores[n]))
        cls = ' class="step first-error"' if rec.first_error == k else ' class="step"'
        rows.append(f'<tr{cls} data-step="{k}">{label}<td class="step-text"{style}>{text}</td>{cells}</tr>')
    score_heads = "".join(f"<th>{_e(n)}</th>" for n in scorer_names if n in rec.step_scores)
    colour_note = f"text coloured by {_e(colour_by)} ({'tokens' if has_tokens else 'steps'})" if colour_by else "step"
    table = (f'<table class="steps"><tr><th>label</th><th>{colour_note}</th>{score_heads}</tr>{"".join(rows)}</table>'
             if rows else '<div class="empty">(no step: empty response)</div>')
    raw = f'<details><summary>raw text</summary><pre class="raw">{_e(rec.response)}</pre></details>'
    return (f'<div class="solution verified-{verdict}" data-problem="{rec.problem}" data-sample="{rec.sample}">'
            f'<div class="solution-head">{" · ".join(head)}</div>{table}{raw}</div>')


def render_html(records: Sequence[SampleRecord], metrics: dict | None = None, *, title: str = "finegrain eval",
                colour_by: str | None = None, centers: dict[str, float] | None = None,
                plots: Sequence[Path] = (), max_problems: int | None = None) -> str:
    """The report page as one HTML string (inline CSS, plots inlined as base64 PNG, no script).

    Args:
        records: sampled responses, grouped on the page by ``record.problem`` (first seen first).
        metrics: the metrics dict (tables at the top); None for none.
        colour_by: scorer whose step (or, when the record has them, token) scores colour the
            text; None = the first scorer with token scores, else the first with step scores.
        centers: scorer → "neutral" score (colour midpoint); default: the reward's ``center``
            registry metadata (``scoring.eval_meta``), else 0. Colours saturate at the 95th percentile of |score − center| on the page.
        plots: PNG files to inline. max_problems: show only the first problems.
    """
    metrics = metrics or {}
    problems: dict[int, list[SampleRecord]] = {}
    for r in records:
        if max_problems is not None and r.problem not in problems and len(problems) >= max_problems:
            continue
        problems.setdefault(r.problem, []).append(r)
    shown = [r for rs in problems.values() for r in rs]
    scorer_names = list(dict.fromkeys(n for r in shown for n in list(r.outcome_scores) + list(r.step_scores)))
    if colour_by is None:  # prefer a scorer with token scores
        colour_by = next((n for r in shown for n in r.token_scores), None) or \
            next((n for r in shown for n in r.step_scores), None)
    centers = dict(centers or {})
    from finegrain.eval.scoring import eval_meta, eval_names

    usable = set(eval_names())
    for n in scorer_names:
        if n not in centers:
            centers[n] = eval_meta(n)["center"] if n in usable else 0.0
    scales = {}
    for n in scorer_names:
        scales[("step", n)] = _scale([x for r in shown for x in r.step_scores.get(n, [])], centers[n])
        scales[("token", n)] = _scale([x for r in shown for x in r.token_scores.get(n, [])], centers[n])
    turns = [t for r in shown for t in (r.turns or [])]
    for n in dict.fromkeys(n for t in turns for n in t.scores):
        centers.setdefault(n, eval_meta(n)["center"] if n in usable else 0.0)
        scales[("turn", n)] = _scale([t.scores[n] for t in turns if n in t.scores and t.scores[n] is not None],
                                     centers[n])
    scales[("turn", ENV_REWARD)] = _scale([t.env_reward for t in turns if t.env_reward is not None], 0.0)

    imgs = []
    for p in plots:
        data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
        imgs.append(f'<img class="plot" alt="{_e(Path(p).name)}" src="data:image/png;base64,{data}">')
    legend = ('<p class="legend">Step labels (exact, from the task): '
              '<span class="label-correct">✓ correct</span><span class="label-wrong">✗ wrong</span>'
              '<span class="label-unparseable">? unparseable</span>; the first non-correct step is outlined. '
              f'Text colour: {_e(colour_by or "none")} score, '
              f'<span style="background:{score_colour(1, 0, 1)}">above</span>'
              f'<span style="background:{score_colour(-1, 0, 1)}">below</span> its neutral value '
              f'{_e(_fmt(centers.get(colour_by, 0.0)) if colour_by else "")}. '
              'Hover a token for its score.</p>')
    if turns:
        legend += ('<p class="legend">Multi-turn episodes are shown turn by turn: the model\'s text (trained on), '
                   'the <span class="tool-call">tool call</span> it ends with, then the environment\'s answer '
                   'in grey, marked <span class="untrained">tool output — not trained</span> (loss_mask False). '
                   'Turn rewards (the environment\'s own, neutral value 0, and each scorer that gives turn '
                   'values) use the same colours; <span class="error-badge">⚠ errors</span> name the failure '
                   '(malformed call, unknown tool, bad arguments, raised, timeout).</p>')
    blocks = []
    for i, (p, rs) in enumerate(problems.items()):
        n_ok = sum(r.correct for r in rs)
        sols = "".join(_solution_html(r, scorer_names, colour_by, centers, scales) for r in rs)
        blocks.append(f'<details class="problem" data-problem="{p}"{" open" if i == 0 else ""}>'
                      f"<summary>problem {p} · reference {_e(rs[0].reference)} · {n_ok}/{len(rs)} samples correct"
                      f'</summary><div class="prompt">{_e(rs[0].prompt)}</div>{sols}</details>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><h2>Metrics</h2>{_metrics_html(metrics)}"
            f'<h2>Plots</h2>{"".join(imgs) or "<p>(none)</p>"}'
            f"<h2>Sampled solutions ({len(problems)} problems, {len(shown)} responses)</h2>{legend}"
            f'<div id="solutions">{"".join(blocks)}</div></body></html>\n')


def write_report(out_dir: Path, records: Sequence[SampleRecord], metrics: dict, *, title: str = "finegrain eval",
                 colour_by: str | None = None, html_problems: int = 20) -> dict[str, Path]:
    """Write metrics.json, samples.jsonl, the PNG plots and report.html into ``out_dir``.

    Returns {file kind: path}. ``html_problems`` caps the problems shown on the page (all
    records still go to samples.jsonl).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "samples": out / "samples.jsonl", "html": out / "report.html"}
    write_metrics(metrics, paths["metrics"])
    with open(paths["samples"], "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(json_safe(r.to_json())) + "\n")
    plots = write_plots(metrics, out)
    for p in plots:
        paths[p.stem] = p
    paths["html"].write_text(render_html(records, metrics, title=title, colour_by=colour_by, plots=plots,
                                         max_problems=html_problems), encoding="utf-8")
    return paths
