"""A judge reward: a model grades each response (or each step) against a rubric / checklist and
answers a JSON verdict; the per-item scores are combined with weights and dependencies.

Registered in ``REWARDS`` as ``judge``, level ``outcome`` (one verdict per response) or ``step``
(``kwargs: {level: step}``: one verdict per step, values (B, S)). Backends (``backend``):

    rule     the exact verdict for a task with step labels (``arith``), from ``label_steps`` (and
             ``verify`` for an ``answer`` item): the judge path with a perfect judge, so that a model
             judge can be compared against exact labels (``step_labels``)
    hf       a local transformers model through finegrain's HF sampler (the frozen starting policy
             by default, or ``model_path``)
    openai   an OpenAI-compatible server through the ``openai`` sampler (``base_url``, ``model``,
             the API key from the variable named by ``api_key_env``)

Items (a rubric or a CM2-style checklist): ``{"id", "text", "weight" (≥ 0, default 1),
"depends" ([ids], default [])}``, taken from ``Example.meta[meta_key]`` when the example has them,
else from ``rubric_file`` (YAML or JSON, see ``load_rubric``), else one default item ``correct``.

Verdict → score (``parse_verdict``, ``checklist_score``): s_j ∈ [0, 1] per item from the LAST JSON
object in the judge's text; an item's dependencies gate it:

    e_j = s_j · 1[e_d ≥ τ for every dependency d of j]            (τ = ``pass_threshold``)
    G   = Σ_j w_j e_j / Σ_j w_j                                   ∈ [0, 1]
    r   = wrong + (correct − wrong) · G                           (defaults: correct 1, wrong 0)

Unparsable verdicts (the stated policy, never a crash): a verdict with no JSON object, or with no
valid score for any item, is *unparsable*: G = ``fallback`` (default 0.0, Think-RM's "unparsable
→ 0"; null = not applicable, mask False) and it is counted in the component ``unparsable``. A
parsed verdict that lacks some items (or gives one an invalid value) is *partially valid*: each
such item scores ``missing_item_score`` (default 0: not confirmed = not satisfied) and is counted
in ``missing_items``. A server that is down or times out is not a verdict: the ``openai`` sampler
raises its one-line ``ServerError`` after its bounded retries.

Cache: identical requests (the same exact prompt text to the same model) are judged once per
signal object: a bounded LRU of ``cache_size`` verdict texts keyed by (model key, prompt); hits
(from earlier batches, or repeats within a batch) are counted in ``cache_hits``. With
``temperature`` > 0 a cached verdict is reused rather than drawn again.

Sources (docs/methods.md): §18b CM2 (weighted checklist items with dependencies, a JSON judge;
an item counts once its dependencies count), §25a RubiCap (G = Σ_m w_m ŷ_m / Σ_m w_m over binary
rules), §18a RRM (a rubric judge's score in [0, 1] as the reward), §25b CaRR (judge verdicts as
JSON), §25d Think-RM (parse the LAST answer block; unparsable → 0).

Departures:
1. One verdict per request; CaRR re-asks the judge until its JSON is valid (here: one ask, then
   the fallback policy).
2. Dependencies gate an item within one verdict (e_d ≥ τ), not across steps as CM2's step-level
   variant (η = 1) does; the ``checklist`` reward (``agents.py``) has that rule, checked by rules.
3. The judge sees the reference answer (``{answer}`` in the default templates); a template
   without it judges reference-free.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from finegrain.rewards.base import REWARDS, RewardOutput
from finegrain.sampling import SAMPLERS, SamplingParams
from finegrain.segment import SEGMENTERS
from finegrain.tasks.base import STEP_CORRECT

MAX_VERDICT_CHARS = 20_000  # only the end of a longer judge text is searched for the verdict

OUTCOME_TEMPLATE = """Grade the response to the problem against each checklist item.

Problem:
{prompt}
Reference answer: {answer}

Response:
{response}

Checklist:
{items}

Reply with one JSON object and nothing after it, scoring each item 1 (satisfied) or 0 (not): {example}
"""

STEP_TEMPLATE = """Grade one step of a solution against each checklist item.

Problem:
{prompt}
Reference answer: {answer}

Steps so far:
{previous}

Step to grade:
{step}

Checklist:
{items}

Reply with one JSON object and nothing after it, scoring each item 1 (satisfied) or 0 (not): {example}
"""

DEFAULT_ITEMS = {
    "outcome": [{"id": "correct", "text": "The response solves the problem: every step and the final answer are right."}],
    "step": [{"id": "correct", "text": "The step is right, given the problem and the steps before it."}],
}


# --------------------------------------------------------------------------------- items and rubric files

@dataclass(frozen=True)
class Item:
    """One rubric / checklist item: ``id``, the criterion ``text``, weight w ≥ 0, dependencies."""

    id: str
    text: str
    weight: float = 1.0
    depends: tuple[str, ...] = ()


def make_items(raw: Sequence[dict], where: str) -> tuple[Item, ...]:
    """Checked items from dicts: unique ids, text (or CM2's ``question``), finite weights ≥ 0 with
    Σ w > 0, known dependency ids, no dependency cycle. Errors are one line naming ``where``."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError(f"{where}: expected a non-empty list of items, got {raw!r:.80}")
    items = []
    for k, it in enumerate(raw):
        if not isinstance(it, dict) or "id" not in it:
            raise ValueError(f"{where}: item {k} must be a mapping with an 'id', got {it!r:.80}")
        text = it.get("text", it.get("question"))
        weight = it.get("weight", 1.0)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: item '{it['id']}' needs a 'text' (the criterion)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{where}: item '{it['id']}' weight must be a finite number >= 0, got {weight!r}")
        depends = it.get("depends", it.get("depends_on", [])) or []
        items.append(Item(str(it["id"]), text.strip(), float(weight), tuple(str(d) for d in depends)))
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: item ids must be unique, got {ids}")
    for it in items:
        unknown = [d for d in it.depends if d not in ids]
        if unknown:
            raise ValueError(f"{where}: item '{it.id}' depends on unknown ids {unknown}")
    if sum(it.weight for it in items) <= 0:
        raise ValueError(f"{where}: the item weights sum to 0")
    _order(items, where)
    return tuple(items)


def _order(items: Sequence[Item], where: str) -> list[Item]:
    """Items with every dependency before its dependants; a cycle raises."""
    by_id = {it.id: it for it in items}
    done: dict[str, bool] = {}
    order: list[Item] = []

    def visit(j: str, path: tuple[str, ...]) -> None:
        if done.get(j):
            return
        if j in path:
            raise ValueError(f"{where}: dependency cycle {' -> '.join(path + (j,))}")
        for d in by_id[j].depends:
            visit(d, path + (j,))
        done[j] = True
        order.append(by_id[j])

    for it in items:
        visit(it.id, ())
    return order


def confined(base: Path, relative: str, where: str) -> Path:
    """``base / relative`` if it stays inside ``base`` (symlinks resolved), else ValueError.

    >>> confined(Path("/r"), "prompts/a.txt", "x").as_posix()
    '/r/prompts/a.txt'
    >>> confined(Path("/r"), "../etc/passwd", "x")
    Traceback (most recent call last):
    ...
    ValueError: x: '../etc/passwd' is outside the rubric file's directory /r
    """
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{where}: expected a relative path, got {relative!r}")
    root = base.resolve()
    path = (root / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(root):
        raise ValueError(f"{where}: '{relative}' is outside the rubric file's directory {root}")
    return path


def _read_structured(path: Path, where: str) -> Any:
    """A ``.json`` file as JSON, any other as YAML; a syntax error is one line naming ``where``."""
    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{where}: cannot parse {path.name}: {first}") from None


@dataclass(frozen=True)
class Rubric:
    """Items and prompt templates (None = the defaults) from a rubric file."""

    items: tuple[Item, ...] | None = None
    template: str | None = None
    step_template: str | None = None


_RUBRIC_KEYS = {"items", "items_file", "template", "template_file", "step_template", "step_template_file"}


def load_rubric(path: str | Path) -> Rubric:
    """A rubric file (``.json``, else YAML), e.g.::

        items:                    # or  items_file: items.yaml  (a list, in a file beside this one)
          - {id: steps, text: "Every computation line is right.", weight: 2}
          - {id: answer, text: "The final answer is right.", weight: 1, depends: [steps]}
        template_file: prompts/outcome.txt     # or template: "...", with {prompt} {answer} {response} {items} {example}
        step_template: "..."                   # or step_template_file; adds {previous} {step}

    Every ``*_file`` is relative to the rubric file's directory and must stay inside it
    (``confined``): a config cannot make the judge read an arbitrary file into a prompt.
    """
    where = f"judge.rubric_file '{path}'"
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{where}: no such file")
    data = _read_structured(path, where)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping with keys {sorted(_RUBRIC_KEYS)}")
    unknown = set(data) - _RUBRIC_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_RUBRIC_KEYS)}")
    for key in ("items", "template", "step_template"):
        if key in data and f"{key}_file" in data:
            raise ValueError(f"{where}: give '{key}' or '{key}_file', not both")
    base = path.parent
    raw_items = data.get("items")
    if "items_file" in data:
        raw_items = _read_structured(confined(base, data["items_file"], where), where)
    texts = {}
    for key in ("template", "step_template"):
        texts[key] = data.get(key)
        if f"{key}_file" in data:
            texts[key] = confined(base, data[f"{key}_file"], where).read_text(encoding="utf-8")
        if texts[key] is not None and not isinstance(texts[key], str):
            raise ValueError(f"{where}: '{key}' must be text")
    items = make_items(raw_items, where) if raw_items is not None else None
    return Rubric(items, texts["template"], texts["step_template"])


# --------------------------------------------------------------------------------- verdicts

@dataclass(frozen=True)
class Verdict:
    """A parsed verdict: scores s_j ∈ [0, 1] of the items it validly scored, the ids it did not,
    and whether it is parsed at all (False = unparsable: no JSON object or no valid item)."""

    scores: dict[str, float]
    missing: tuple[str, ...]
    parsed: bool


_YES = {"1", "yes", "true", "pass", "passed", "satisfied", "y"}
_NO = {"0", "no", "false", "fail", "failed", "not satisfied", "n"}


def _as_score(value: Any) -> float | None:
    """An item value as s ∈ [0, 1], or None if invalid: a bool, a number in [0, 1], yes/no-like
    text, or an object with an ``answer`` / ``score`` field (CM2's judge answers {"answer": bool})."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) and 0.0 <= value <= 1.0 else None
    if isinstance(value, str):
        v = value.strip().lower()
        return 1.0 if v in _YES else 0.0 if v in _NO else None
    if isinstance(value, dict):
        for key in ("answer", "score", "passed", "satisfied"):
            if key in value and not isinstance(value[key], dict):
                return _as_score(value[key])
    return None


def _json_objects(text: str) -> list[dict]:
    """Every top-level JSON object in ``text``, in order (nested objects are part of theirs)."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return found
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = end


def parse_verdict(text: str, item_ids: Sequence[str]) -> Verdict:
    """The verdict in a judge's answer: the LAST top-level JSON object of the text (reasoning or a
    code fence before it is skipped), its ``scores`` mapping if it has one, else the object
    itself; each item id mapped to a score by ``_as_score``.

    >>> parse_verdict('I think... {"scores": {"a": 1, "b": "no"}}', ["a", "b"])
    Verdict(scores={'a': 1.0, 'b': 0.0}, missing=(), parsed=True)
    >>> parse_verdict('{"a": true, "b": 7}', ["a", "b"])  # partially valid: b is out of range
    Verdict(scores={'a': 1.0}, missing=('b',), parsed=True)
    >>> parse_verdict("the answer is good", ["a"])  # garbage
    Verdict(scores={}, missing=('a',), parsed=False)
    """
    objects = _json_objects(text[-MAX_VERDICT_CHARS:])
    if not objects:
        return Verdict({}, tuple(item_ids), False)
    obj = objects[-1]
    table = obj["scores"] if isinstance(obj.get("scores"), dict) else obj
    scores, missing = {}, []
    for j in item_ids:
        s = _as_score(table.get(j)) if j in table else None
        if s is None:
            missing.append(j)
        else:
            scores[j] = s
    return Verdict(scores, tuple(missing), bool(scores))


def checklist_score(items: Sequence[Item], scores: dict[str, float], *, pass_threshold: float = 0.5,
                    missing_item_score: float = 0.0) -> float:
    """G = Σ_j w_j e_j / Σ_j w_j with e_j = s_j · 1[e_d ≥ τ for every dependency d of j].

    Items absent from ``scores`` score ``missing_item_score``. Dependencies are gated by their
    *effective* score, so a chain a ← b ← c gives c nothing once a fails.

    >>> its = [Item("a", "x", 1.0), Item("b", "y", 3.0, ("a",))]
    >>> checklist_score(its, {"a": 1.0, "b": 1.0}), checklist_score(its, {"a": 0.0, "b": 1.0})
    (1.0, 0.0)
    >>> checklist_score(its, {"a": 1.0})  # b missing: 1·1 / 4
    0.25
    """
    effective: dict[str, float] = {}
    for it in _order(items, "judge items"):
        s = scores.get(it.id, missing_item_score)
        gated = all(effective[d] >= pass_threshold for d in it.depends)
        effective[it.id] = s if gated else 0.0
    total = sum(it.weight for it in items)
    return sum(it.weight * effective[it.id] for it in items) / total


def verdict_example(items: Sequence[Item]) -> str:
    """The JSON shape the judge is asked for, e.g. {"scores": {"correct": 1}}."""
    return json.dumps({"scores": {it.id: 1 for it in items}})


def _fill(template: str, **fields: str) -> str:
    """Replace ``{name}`` for the known field names only (a template may hold other braces, e.g. JSON)."""
    return re.sub(r"\{(" + "|".join(map(re.escape, fields)) + r")\}", lambda m: fields[m.group(1)], template)


# --------------------------------------------------------------------------------- backends

@dataclass(frozen=True)
class JudgeRequest:
    """One question to the judge: the prompt text, and the structured fields a rule backend reads
    (``step`` None = the whole response)."""

    prompt: str
    example: Any
    response: str
    items: tuple[Item, ...]
    step: int | None = None


class RuleJudge:
    """The exact verdict for a task that labels steps: item ``correct`` = the step's label is
    correct (outcome level: every step is), item ``answer`` = ``task.verify`` accepts the response
    (outcome level only); other item ids are left out of the verdict (they count as missing)."""

    key = "rule"

    def __init__(self, task):
        if not hasattr(task, "label_steps"):
            raise ValueError(f"judge backend 'rule': task '{task.name}' cannot label steps (no label_steps)")
        self.task = task

    def generate(self, requests: Sequence[JudgeRequest]) -> list[str]:
        out, labelled = [], {}
        for q in requests:
            key = (id(q.example), q.response)  # the steps of one response share its labels
            if key not in labelled:
                labelled[key] = self.task.label_steps(q.example, q.response)
            labels, first_error = labelled[key].labels, labelled[key].first_error
            ids = {it.id for it in q.items}
            scores: dict[str, int] = {}
            if "correct" in ids:
                if q.step is None:
                    # the task's own rule for "no step is wrong" (GSM8K: a line without arithmetic
                    # is not an error; arith: it is), not "every label is CORRECT"
                    scores["correct"] = int(bool(labels) and first_error is None)
                elif q.step < len(labels):
                    scores["correct"] = int(labels[q.step] == STEP_CORRECT)
            if "answer" in ids and q.step is None:
                scores["answer"] = int(float(self.task.verify(q.example, q.response)) >= 1.0)
            out.append(json.dumps({"scores": scores}))
        return out


def judge_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids an HF judge reads for ``prompt``: the tokenizer's chat template (one user turn
    and the generation prompt) when it has one, else the plain encoding with its special tokens.
    A fine-tuned judge is trained on exactly these ids (``finegrain.train.judge_sft``)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    return tokenizer(prompt)["input_ids"]


class HFJudge:
    """A local causal LM as the judge, through finegrain's HF sampler (one batched ``generate``
    per call). The prompt is wrapped in the tokenizer's chat template when it has one."""

    def __init__(self, model, tokenizer, params: SamplingParams, *, name: str, seed: int = 0):
        self.sampler = SAMPLERS.get("hf")(model, tokenizer)
        self.tokenizer, self.params, self.seed = tokenizer, params, seed
        self.key = f"hf:{name}"

    def generate(self, requests: Sequence[JudgeRequest]) -> list[str]:
        out = self.sampler.sample([judge_prompt_ids(self.tokenizer, q.prompt) for q in requests], 1, self.params,
                                  self.seed)
        return self.tokenizer.batch_decode(out.token_ids, skip_special_tokens=True)


class ServerJudge:
    """A model behind an OpenAI-compatible server, through the ``openai`` sampler's text call
    (its timeouts, bounded retries and one-line ``ServerError``)."""

    def __init__(self, sampler, params: SamplingParams, *, seed: int = 0):
        self.sampler, self.params, self.seed = sampler, params, seed
        self.key = f"openai:{sampler.client.base_url}:{sampler.client.model}"

    def generate(self, requests: Sequence[JudgeRequest]) -> list[str]:
        return [a.text for a in self.sampler.complete_texts([q.prompt for q in requests], self.params, self.seed)]


def model_backend(ctx, backend: str, params: SamplingParams, *, where: str, model_path: str = "",
                  base_url: str = "", model: str = "", endpoint: str = "chat", api_key_env: str = "OPENAI_API_KEY",
                  timeout: float = 60.0, max_retries: int = 2, max_concurrency: int = 4, seed: int = 0):
    """An ``hf`` (``model_path``, "" = the frozen starting policy) or ``openai`` judge backend;
    ``where`` names the signal in errors. Shared by every judge-style signal (``think_rm`` too)."""
    if backend == "hf":
        if model_path:
            from finegrain.models.load import load_pretrained

            jm, jt = load_pretrained(model_path, device=ctx.cfg.model.device, where=f"{where}.model_path")
        else:  # the frozen starting policy: a judge that does not drift with the policy it grades
            jm, jt = ctx.initial_policy(), ctx.tokenizer
        return HFJudge(jm, jt, params, name=model_path or "initial_policy", seed=seed)
    if backend == "openai":
        sampler = SAMPLERS.get("openai")(None, None, base_url=base_url or None, model_name=model or None,
                                         endpoint=endpoint, api_key_env=api_key_env, timeout=timeout,
                                         max_retries=max_retries, max_concurrency=max_concurrency)
        return ServerJudge(sampler, params, seed=seed)
    raise ValueError(f"{where}: backend must be 'rule', 'hf' or 'openai', got '{backend}'")


def cached_generate(backend, cache: OrderedDict, requests: Sequence, *, batch_size: int,
                    cache_size: int) -> tuple[list[str], list[bool]]:
    """The backend's texts for ``requests`` (anything with a ``.prompt``) and whether each came
    from ``cache``: an LRU of at most ``cache_size`` texts keyed by (backend key, prompt), updated
    in place; unique uncached prompts go to the backend ``batch_size`` at a time."""
    keys = [(backend.key, q.prompt) for q in requests]
    hit = [False] * len(requests)
    todo: dict[tuple[str, str], Any] = {}
    for i, (k, q) in enumerate(zip(keys, requests)):
        if k in cache or k in todo:
            hit[i] = True
        else:
            todo[k] = q
    pending = list(todo.items())
    fresh: dict[tuple[str, str], str] = {}
    for s in range(0, len(pending), batch_size):
        chunk = pending[s:s + batch_size]
        for (k, _), text in zip(chunk, backend.generate([q for _, q in chunk])):
            fresh[k] = text
    texts = []
    for k in keys:
        if k in fresh:
            text = fresh[k]
        else:
            text = cache[k]
            cache.move_to_end(k)
        texts.append(text)
    for k, text in fresh.items():
        if cache_size > 0:
            cache[k] = text
            while len(cache) > cache_size:
                cache.popitem(last=False)
    return texts, hit


def _fine_tuned_rubric(model_path: str, level: str, rubric_file: str) -> str:
    """The rubric file to use with ``model_path``: a judge fine-tuned by ``finegrain judge train``
    records the level and the rubric its prompts were made with (``finegrain_judge.json``,
    ``rubric.json``); with no ``rubric_file`` given that rubric is used, and a level other than
    the one it was trained for is refused (its prompts would be ones it never saw)."""
    info_path = Path(model_path) / "finegrain_judge.json"
    if not info_path.is_file():
        return rubric_file
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"judge.model_path: cannot read {info_path}: {str(e).splitlines()[0]}") from None
    trained = info.get("level") if isinstance(info, dict) else None
    if trained is not None and trained != level:
        raise ValueError(f"judge.level: '{model_path}' was fine-tuned to judge at level '{trained}', "
                         f"the reward asks for '{level}'")
    own = Path(model_path) / "rubric.json"
    return rubric_file or (str(own) if own.is_file() else "")


# --------------------------------------------------------------------------------- the reward

@REWARDS.register("judge", level="outcome", levels=("outcome", "step"),
                  bounds={"max_new_tokens": "[1, inf)", "temperature": "[0, inf)", "timeout": "(0, inf)",
                          "max_retries": "[0, 100]", "max_concurrency": "[1, 256]", "batch_size": "[1, inf)",
                          "cache_size": "[0, inf)", "pass_threshold": "[0, 1]", "missing_item_score": "[0, 1]"},
                  choices={"backend": ("rule", "hf", "openai"), "level": ("outcome", "step"),
                           "endpoint": ("chat", "completions")},
                  vote="identity", center=0.5, search_value="min")
class Judge:
    """A judge's rubric / checklist score per response (outcome) or per step (step); see the
    module docstring for the formula, the backends and the unparsable-verdict policy.

    Step level: the steps are the task segmenter's spans of the response text (the spans of
    ``label_steps`` and of ``Trajectory.step_ids``); step k is judged with steps 0..k−1 as context,
    and row b gets values for its first min(#spans, #steps in step_ids) steps (mask False after).

    Keyword args (``rewards[i].kwargs``, defaults in ``from_context``):
        backend: 'rule' | 'hf' | 'openai'.  level: 'outcome' | 'step'.
        rubric_file: a rubric file (``load_rubric``); "" = none.  meta_key: the example meta key
            holding per-example items ('rubric').
        model_path (hf): a model directory; "" = the frozen starting policy. A judge made by
            ``finegrain judge train`` brings its rubric (used when ``rubric_file`` is "") and level.
        base_url, model, endpoint, api_key_env, timeout, max_retries, max_concurrency (openai): the
            server, as the ``openai`` sampler takes them ("" = its environment variables).
        temperature (0 = greedy), max_new_tokens, seed: how the judge samples its verdict.
        batch_size: unique prompts per backend call.  cache_size: cached verdicts (0 = no cache).
        fallback: G of an unparsable verdict (None = not applicable).  missing_item_score: s_j of
            an item a parsed verdict lacks.  pass_threshold: τ.  correct, wrong: the value range.
    """

    name = "judge"
    level = "outcome"  # the instance's own level (``level`` kwarg) replaces it

    def __init__(self, backend, task, *, level: str = "outcome", rubric: Rubric = Rubric(), meta_key: str = "rubric",
                 fallback: float | None = 0.0, missing_item_score: float = 0.0, pass_threshold: float = 0.5,
                 correct: float = 1.0, wrong: float = 0.0, batch_size: int = 16, cache_size: int = 65_536):
        if level not in ("outcome", "step"):
            raise ValueError(f"judge: level must be 'outcome' or 'step', got '{level}'")
        if fallback is not None and not (isinstance(fallback, (int, float)) and 0.0 <= fallback <= 1.0):
            raise ValueError(f"judge: fallback must be null or a score in [0, 1], got {fallback!r}")
        self.backend, self.task, self.level, self.rubric, self.meta_key = backend, task, level, rubric, meta_key
        self.fallback, self.missing_item_score, self.pass_threshold = fallback, missing_item_score, pass_threshold
        self.correct, self.wrong, self.batch_size, self.cache_size = correct, wrong, int(batch_size), int(cache_size)
        self.segment = SEGMENTERS.get(task.segmenter)
        self.template = (rubric.step_template if level == "step" else rubric.template) or \
            (STEP_TEMPLATE if level == "step" else OUTCOME_TEMPLATE)
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.default_items = rubric.items or make_items(DEFAULT_ITEMS[level], "judge default items")

    @classmethod
    def from_context(cls, ctx, *, backend: str = "rule", level: str = "outcome", rubric_file: str = "",
                     meta_key: str = "rubric", model_path: str = "", base_url: str = "", model: str = "",
                     endpoint: str = "chat", api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.0,
                     max_new_tokens: int = 256, timeout: float = 60.0, max_retries: int = 2, max_concurrency: int = 4,
                     batch_size: int = 16, cache_size: int = 65_536, fallback: float | None = 0.0,
                     missing_item_score: float = 0.0, pass_threshold: float = 0.5, correct: float = 1.0,
                     wrong: float = 0.0, seed: int = 0):
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, logprobs=False)
        if backend == "rule":
            judge = RuleJudge(ctx.task)
        else:
            judge = model_backend(ctx, backend, params, where="judge", model_path=model_path, base_url=base_url,
                                  model=model, endpoint=endpoint, api_key_env=api_key_env, timeout=timeout,
                                  max_retries=max_retries, max_concurrency=max_concurrency, seed=seed)
        if backend == "hf" and model_path:
            rubric_file = _fine_tuned_rubric(model_path, level, rubric_file)
        rubric = load_rubric(rubric_file) if rubric_file else Rubric()
        return cls(judge, ctx.task, level=level, rubric=rubric, meta_key=meta_key, fallback=fallback,
                   missing_item_score=missing_item_score, pass_threshold=pass_threshold, correct=correct, wrong=wrong,
                   batch_size=batch_size, cache_size=cache_size)

    def items_for(self, example) -> tuple[Item, ...]:
        """The example's own items (``meta[meta_key]``) if it has them, else the rubric's / default."""
        raw = (getattr(example, "meta", None) or {}).get(self.meta_key)
        return make_items(raw, f"judge: {self.meta_key} of example '{example.id}'") if raw else self.default_items

    def prompt_for(self, example, response: str, items: Sequence[Item], steps: Sequence[str] | None = None,
                   step: int | None = None) -> str:
        fields = dict(prompt=example.prompt.rstrip("\n"), answer=str(example.answer), response=response,
                      items="\n".join(f"- {it.id}: {it.text}" for it in items), example=verdict_example(items))
        if step is not None:
            fields.update(previous="".join(steps[:step]).rstrip("\n") or "(none)", step=steps[step].rstrip("\n"))
        return _fill(self.template, **fields)

    def requests(self, example, response: str, max_steps: int | None = None) -> list[JudgeRequest]:
        """The questions this judge asks about one response: one (outcome level), or one per step of
        the task segmenter's spans, the first ``max_steps`` of them (step level; None = all). The
        reward and ``judge_data.verdict_rows`` (a fine-tuned judge's training data) both ask these."""
        items = self.items_for(example)
        if self.level == "outcome":
            return [JudgeRequest(self.prompt_for(example, response, items), example, response, items)]
        steps = [response[s:e] for s, e in self.segment(response)]
        k = len(steps) if max_steps is None else min(len(steps), max_steps)
        return [JudgeRequest(self.prompt_for(example, response, items, steps, s), example, response, items, s)
                for s in range(k)]

    def judge(self, requests: Sequence[JudgeRequest]) -> tuple[list[str], list[bool]]:
        """Verdict texts of ``requests`` and whether each came from the cache (``cached_generate``)."""
        return cached_generate(self.backend, self._cache, requests, batch_size=self.batch_size,
                               cache_size=self.cache_size)

    def __call__(self, traj) -> RewardOutput:
        B = traj.batch_size
        S = int(traj.step_ids.max().clamp(min=-1)) + 1 if self.level == "step" else 1
        requests, where = [], []  # where[i] = (row, step or None)
        for b, (ex, text) in enumerate(zip(traj.examples, traj.response_texts)):
            asked = self.requests(ex, text, None if self.level == "outcome" else int(traj.step_ids[b].max()) + 1)
            requests += asked
            where += [(b, q.step) for q in asked]
        texts, hits = self.judge(requests)
        values = torch.zeros(B, S)
        mask = torch.zeros(B, S, dtype=torch.bool)
        unparsable, missing, cached = torch.zeros(B), torch.zeros(B), torch.zeros(B)
        for q, text, hit, (b, s) in zip(requests, texts, hits, where):
            verdict = parse_verdict(text, [it.id for it in q.items])
            cached[b] += hit
            if verdict.parsed:
                g = checklist_score(q.items, verdict.scores, pass_threshold=self.pass_threshold,
                                    missing_item_score=self.missing_item_score)
                missing[b] += len(verdict.missing)
            else:
                unparsable[b] += 1
                g = self.fallback
            if g is not None:
                col = 0 if s is None else s
                values[b, col] = self.wrong + (self.correct - self.wrong) * g
                mask[b, col] = True
        dev = traj.response_ids.device
        comps = {"unparsable": unparsable.to(dev), "missing_items": missing.to(dev), "cache_hits": cached.to(dev)}
        if self.level == "outcome":
            return RewardOutput(values[:, 0].to(dev), mask[:, 0].to(dev), "outcome", comps)
        return RewardOutput(values.to(dev), mask.to(dev), "step", comps)
