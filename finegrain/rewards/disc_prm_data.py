"""Step-labelled data for the discriminative PRM: three label sources, one row type (``StepRow``).

A row is a prompt, its response cut into step texts, and one label per step (a float in [0, 1],
or None = unlabelled, left out of the loss). Sources:

(a) exact labels of a task (``task_rows``): ``task.label_steps`` on any response (SFT-corpus
    traces or sampled ones); CORRECT → 1, WRONG and UNPARSEABLE → 0.
(b) JSONL files (``read_step_data``), one object per line, in either of two formats:

    per-step labels (PRM800K / Math-Shepherd / TRL "stepwise supervision" style)::

        {"prompt": "Q: 7 +5\\n", "steps": ["7+5=12\\n", "A: 12"], "labels": [1, 1]}

      ``labels``: one per step, 0/1, true/false, a number in [0, 1] (soft), or null (unlabelled);
      or ``ratings`` instead: PRM800K's −1 / 0 / +1 → 0 / null (neutral, dropped as HRM does) / 1.

    first wrong step (ProcessBench style, arXiv:2412.06559)::

        {"problem": "...", "steps": ["...", "..."], "label": 1}

      ``label`` = index of the first wrong step, −1 if every step is correct; steps before it get
      1, the step itself 0, later steps are unlabelled (a later step's correctness is undefined
      once an earlier one is wrong; Lightman et al. arXiv:2305.20050 stop at the first error too).

    ``prompt`` or ``problem``: the question text; ``steps`` or ``completions``: the step texts.
    Every step but the last that does not end with a newline gets one, so the steps concatenate
    to the response the ``newline`` segmenter would cut back into the same steps. Other keys are
    kept in ``StepRow.extra``. A bad line stops with one line naming the file and line.
    ``--data`` may also be a JSON manifest ``{"files": ["a.jsonl", "sub/b.jsonl"]}``; its paths
    are relative to the manifest's directory and must stay inside it (absolute paths, ``..`` and
    symlinks that lead out are refused).
(c) Monte-Carlo labels (``mc_step_labels``, Math-Shepherd arXiv:2312.08935 §3.3): from each step
    prefix (prompt + steps 1..k) the policy is rolled out N times through a ``Sampler``;
    hard label = 1 if any rollout reaches the right answer, soft label = the fraction that does.

Optional HRM data (``hrm_merged_rows``, methods.md §19): every pair of consecutive steps is also
given as one merged step carrying the later step's label.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from finegrain.jsonl import parse_json_object
from finegrain.progress import Progress
from finegrain.sampling.base import Sampler, SamplingParams, sample_seed
from finegrain.segment import SEGMENTERS, Spans
from finegrain.tasks.base import STEP_CORRECT

_KNOWN = ("prompt", "problem", "steps", "completions", "labels", "label", "ratings")
MC_MODES = ("hard", "soft")


@dataclass(frozen=True)
class StepRow:
    """One response with step labels.

    prompt: the question text (fed to the PRM as is). steps: K step texts; their concatenation
    is the response. labels: K floats in [0, 1] or None (unlabelled). where: 'FILE:LINE' or a
    description, for errors. example: the task example (for MC labels), or None. extra: other keys.
    """

    prompt: str
    steps: tuple[str, ...]
    labels: tuple[float | None, ...]
    where: str = ""
    example: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def response(self) -> str:
        return "".join(self.steps)


# ----------------------------------------------------------------------------- JSONL

def _step_label(value: Any, where: str, k: int) -> float | None:
    if value is None:
        return None
    ok = isinstance(value, (bool, int, float)) and not (isinstance(value, float) and math.isnan(value))
    if not ok or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{where}: field 'labels'[{k}] expected 0/1, true/false, a number in [0, 1] or null, "
                         f"got {json.dumps(value)[:40]}")
    return float(value)


def _rating(value: Any, where: str, k: int) -> float | None:
    if isinstance(value, bool) or value not in (-1, 0, 1):
        raise ValueError(f"{where}: field 'ratings'[{k}] expected -1, 0 or 1, got {json.dumps(value)[:40]}")
    return None if value == 0 else float(value == 1)


def _with_newlines(steps: list[str]) -> tuple[str, ...]:
    return tuple(s if k == len(steps) - 1 or s.endswith("\n") else s + "\n" for k, s in enumerate(steps))


def parse_step_row(line: str, where: str) -> StepRow:
    """One JSONL line (either format of the module docstring) -> StepRow; errors start with ``where``.

    >>> parse_step_row('{"problem": "Q", "steps": ["a", "b", "c"], "label": 1}', "f.jsonl:1").labels
    (1.0, 0.0, None)
    >>> parse_step_row('{"prompt": "Q", "steps": ["a", "b"], "labels": [1]}', "f.jsonl:2")
    Traceback (most recent call last):
    ...
    ValueError: f.jsonl:2: field 'labels' has 1 entries for 2 steps
    """
    obj = parse_json_object(line, where, ("prompt", "steps", "labels"))
    pk = [k for k in ("prompt", "problem") if k in obj]
    sk = [k for k in ("steps", "completions") if k in obj]
    lk = [k for k in ("labels", "label", "ratings") if k in obj]
    for keys, what in ((pk, "'prompt' (or 'problem')"), (sk, "'steps' (or 'completions')"),
                       (lk, "'labels', 'ratings' or 'label'")):
        if not keys:
            raise ValueError(f"{where}: missing field {what}")
        if len(keys) > 1:
            raise ValueError(f"{where}: fields {' and '.join(map(repr, keys))} both given; give one")
    prompt, steps = obj[pk[0]], obj[sk[0]]
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: field '{pk[0]}' expected a string, got {json.dumps(prompt)[:40]}")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s for s in steps):
        raise ValueError(f"{where}: field '{sk[0]}' expected a non-empty list of non-empty strings")
    key = lk[0]
    if key == "label":
        first = obj["label"]
        if isinstance(first, bool) or not isinstance(first, int) or not -1 <= first < len(steps):
            raise ValueError(f"{where}: field 'label' expected the index of the first wrong step "
                             f"(-1..{len(steps) - 1}, -1 = all correct), got {json.dumps(first)[:40]}")
        labels = [1.0] * len(steps) if first == -1 else \
            [1.0] * first + [0.0] + [None] * (len(steps) - first - 1)
    else:
        raw = obj[key]
        if not isinstance(raw, list):
            raise ValueError(f"{where}: field '{key}' expected a list, got {json.dumps(raw)[:40]}")
        if len(raw) != len(steps):
            raise ValueError(f"{where}: field '{key}' has {len(raw)} entries for {len(steps)} steps")
        conv = _step_label if key == "labels" else _rating
        labels = [conv(v, where, k) for k, v in enumerate(raw)]
    extra = {k: v for k, v in obj.items() if k not in _KNOWN}
    return StepRow(prompt, _with_newlines(steps), tuple(labels), where, None, extra)


def confined_path(base: Path, rel: Any, where: str) -> Path:
    """``base / rel`` if it is a relative path that stays inside ``base`` after resolving ``..``
    and symlinks; ValueError naming ``where`` otherwise."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{where}: expected a relative file path, got {json.dumps(rel)[:60]}")
    if os.path.isabs(rel) or Path(rel).is_absolute():
        raise ValueError(f"{where}: '{rel}' is an absolute path; paths in a data file are relative to its directory")
    root = base.resolve()
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"{where}: '{rel}' leads outside the data file's directory '{base}'; refused")
    return target


def read_step_jsonl(path: str | Path) -> list[StepRow]:
    """All rows of one JSONL file. FileNotFoundError naming the path; ValueError 'FILE:LINE: ...'
    for the first bad line, 'FILE: no rows' for a file without one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                rows.append(parse_step_row(line, f"{path}:{n}"))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def read_step_data(path: str | Path) -> list[StepRow]:
    """Rows of a JSONL file, or of every file a JSON manifest ``{"files": [...]}`` lists (in order).

    The manifest's paths are confined to its directory (``confined_path``).
    """
    path = Path(path)
    if path.suffix != ".json":
        return read_step_jsonl(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON ({str(e).splitlines()[0]})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not files:
        raise ValueError(f"{path}: expected a manifest {{\"files\": [\"a.jsonl\", ...]}} (a non-empty list)")
    rows: list[StepRow] = []
    for i, rel in enumerate(files):
        rows += read_step_jsonl(confined_path(path.parent, rel, f"{path}: files[{i}]"))
    return rows


# ----------------------------------------------------------------------------- (a) exact task labels

def split_steps(text: str, segmenter: str | Callable[[str], Spans]) -> tuple[str, ...]:
    """The step texts of ``text`` under ``segmenter`` (spans include their separators)."""
    seg = SEGMENTERS.get(segmenter) if isinstance(segmenter, str) else segmenter
    return tuple(text[a:b] for a, b in seg(text))


def task_rows(task, pairs: Sequence[tuple[Any, str]]) -> list[StepRow]:
    """Rows labelled by ``task.label_steps`` (CORRECT → 1, WRONG / UNPARSEABLE → 0) for
    (example, response) pairs; responses without a step are skipped. Steps are the label spans."""
    if not hasattr(task, "label_steps"):
        raise ValueError(f"task '{task.name}' has no exact step labels (label_steps); use JSONL or MC labels")
    out = []
    for i, (ex, text) in enumerate(pairs):
        sl = task.label_steps(ex, text)
        if not sl.spans:
            continue
        steps = tuple(text[a:b] for a, b in sl.spans)
        labels = tuple(1.0 if lab == STEP_CORRECT else 0.0 for lab in sl.labels)
        out.append(StepRow(task.format_prompt(ex), steps, labels, f"{task.name} response {i}", ex))
    return out


def response_rows(task, pairs: Sequence[tuple[Any, str]]) -> list[StepRow]:
    """Unlabelled rows (steps from ``task.segmenter``) for (example, response) pairs, for MC labelling;
    responses without a step are skipped."""
    out = []
    for i, (ex, text) in enumerate(pairs):
        steps = split_steps(text, task.segmenter)
        if steps:
            out.append(StepRow(task.format_prompt(ex), steps, (None,) * len(steps), f"{task.name} response {i}", ex))
    return out


def sample_responses(sampler: Sampler, task, examples: Sequence[Any], *, n: int, params: SamplingParams,
                     seed: int) -> list[tuple[Any, str]]:
    """``n`` responses of ``sampler``'s policy to each example's prompt (``task.format_prompt``, fed as
    is with the tokenizer's special tokens), decoded without special tokens; one sampling call with
    seed ``sample_seed(seed, 0, 4)``. Returns (example, response text) pairs, prompt-major."""
    tok = sampler.tokenizer
    prefixes = [list(tok(task.format_prompt(ex), add_special_tokens=True)["input_ids"]) for ex in examples]
    comp = sampler.sample(prefixes, n, params, sample_seed(seed, 0, 4))
    return [(examples[r // n], tok.decode(ids, skip_special_tokens=True)) for r, ids in enumerate(comp.token_ids)]


# ----------------------------------------------------------------------------- (c) Monte-Carlo labels

def mc_label(outcomes: Sequence[bool], mode: str) -> float:
    """Math-Shepherd's estimate from N rollout outcomes: 'hard' = 1 if any is right, 'soft' = the
    fraction that is (arXiv:2312.08935 §3.3).

    >>> mc_label([False, True, False, False], "hard"), mc_label([False, True, False, False], "soft")
    (1.0, 0.25)
    """
    if mode not in MC_MODES:
        raise ValueError(f"mc mode: expected one of {', '.join(MC_MODES)}, got '{mode}'")
    if not outcomes:
        raise ValueError("mc_label: needs at least one rollout")
    return float(any(outcomes)) if mode == "hard" else sum(outcomes) / len(outcomes)


def mc_step_labels(sampler: Sampler, task, rows: Sequence[StepRow], *, n_rollouts: int, params: SamplingParams,
                   seed: int, mode: str = "hard", chunk_prefixes: int = 64, progress: bool = False) -> list[StepRow]:
    """Rows with Monte-Carlo step labels from rollouts of ``sampler``'s policy.

    For row i with steps y_1..y_K and k < K: the prefix x_i + y_1..y_k (prompt tokenized with the
    sampler's tokenizer and its special tokens, then the concatenated step texts without) is
    continued ``n_rollouts`` times; rollout j is right iff ``task.verify(example, y_1..y_k + c_j) ≥ 1``,
    and label_k = ``mc_label`` of those N outcomes. The last step is the complete response: its
    label is ``verify(example, response) ≥ 1``, without rollouts (hard and soft agree there).

    Prefixes are sampled ``chunk_prefixes`` at a time; chunk c uses seed ``sample_seed(seed, c, 3)``,
    so labels depend on (seed, chunk size) and the sampler, not on the machine. Every row needs its
    task ``example``. Labels given in ``rows`` are replaced.

    Returns: new StepRows, same order, prompts and steps.
    """
    if n_rollouts < 1:
        raise ValueError(f"n_rollouts: expected >= 1, got {n_rollouts}")
    mc_label([True], mode)
    tok = sampler.tokenizer
    jobs: list[tuple[int, int, list[int]]] = []                  # (row, step, prefix ids)
    for i, r in enumerate(rows):
        if r.example is None:
            raise ValueError(f"{r.where or f'row {i}'}: MC labels need the task example of the row")
        p_ids = list(tok(r.prompt, add_special_tokens=True)["input_ids"])
        for k in range(len(r.steps) - 1):
            jobs.append((i, k, p_ids + list(tok("".join(r.steps[:k + 1]), add_special_tokens=False)["input_ids"])))
    labels = [[None] * len(r.steps) for r in rows]
    for i, r in enumerate(rows):
        labels[i][-1] = float(task.verify(r.example, r.response) >= 1.0)
    with Progress("MC step labels", total=len(jobs), enabled=progress) as bar:
        for c, s in enumerate(range(0, len(jobs), chunk_prefixes)):
            chunk = jobs[s:s + chunk_prefixes]
            comp = sampler.sample([ids for _, _, ids in chunk], n_rollouts, params, sample_seed(seed, c, 3))
            for j, (i, k, _) in enumerate(chunk):
                prefix = "".join(rows[i].steps[:k + 1])
                outs = [task.verify(rows[i].example, prefix + tok.decode(comp.token_ids[j * n_rollouts + m],
                                                                         skip_special_tokens=True)) >= 1.0
                        for m in range(n_rollouts)]
                labels[i][k] = mc_label(outs, mode)
            bar.update(s + len(chunk), info=f"{n_rollouts} rollouts per prefix")
    return [StepRow(r.prompt, r.steps, tuple(lab), r.where, r.example, r.extra) for r, lab in zip(rows, labels)]


# ----------------------------------------------------------------------------- HRM merged steps

def hrm_merged_rows(rows: Sequence[StepRow]) -> list[StepRow]:
    """HRM's extra samples (methods.md §19): for each row and each step k ≥ 2 whose label is known,
    a row with steps y_1..y_{k−2}, (y_{k−1} + y_k) and labels l_1..l_{k−2}, l_k: the two
    consecutive steps merged into one, labelled as the later one.

    Departure: HRM joins the two steps with "\\n\\n" and trains a 2-class classifier on one label
    per sample; here the texts are concatenated as they are (they already end with their
    separator) and the earlier steps keep their own labels.

    >>> r = StepRow("Q", ("a\\n", "b\\n", "c"), (1.0, 0.0, None))
    >>> [(m.steps, m.labels) for m in hrm_merged_rows([r])]
    [(('a\\nb\\n',), (0.0,))]
    """
    out = []
    for r in rows:
        for k in range(1, len(r.steps)):
            if r.labels[k] is None:
                continue
            steps = r.steps[:k - 1] + (r.steps[k - 1] + r.steps[k],)
            labels = r.labels[:k - 1] + (r.labels[k],)
            out.append(StepRow(r.prompt, steps, labels, f"{r.where} (HRM merge {k - 1}+{k})", r.example, r.extra))
    return out
