"""Fine-tune a judge: supervised next-token training on (judge prompt, exact verdict) pairs, its
agreement with the exact verdicts on held-out responses, and an atomic save.

Loss (``finegrain.train.sft.run_sft_rows``), over the verdict tokens and the final EOS only::

    ℓ(θ) = − (1/|T|) Σ_{t ∈ T} log p_θ(y_t | x, y_<t)      x = the judge prompt, y = the compact verdict

The prompt ids are ``judge.judge_prompt_ids`` (the chat template when the tokenizer has one), the
ids the ``hf`` judge backend feeds the model at RL time; the verdict ids are the plain encoding of
``judge_data.compact_verdict`` followed by EOS.

Agreement (``agreement``), on the (question, item) pairs of the held-out responses, with the
model's greedy verdicts read by ``parse_verdict`` (ŝ = 1 if its score ≥ ½; an unparsable verdict
or a missing item is a disagreement, counted in ``unparsable`` / ``missing``)::

    agreement = (1/N) Σ_n 1[ŝ_n = s_n]
    tpr       = #{ŝ = 1, s = 1} / #{s = 1}          (right steps judged right)
    tnr       = #{ŝ = 0, s = 0} / #{s = 0}          (wrong steps judged wrong)
    κ         = (p_o − p_e) / (1 − p_e),  p_e = q̂₁ q + q̂₀ (1 − q)      (Cohen 1960)
                q = exact rate of 1; q̂₁, q̂₀ = judged rates of 1 and 0 (a missing verdict is neither)

Choices and departures (no paper trains a judge this way; the pieces are standard):

1. Targets are the exact verdicts of the rule backend, so the judge imitates exact labels; the
   judges of RRM / CM2 / Think-RM are large LMs prompted (or RL-trained) to judge, not imitators.
2. One question per row (every step of every response), the step's prefix in the prompt.
3. Not resumable: the output is written once, at the end, to a temporary directory beside
   ``out_dir`` and renamed onto it, so an interrupted run leaves the previous judge (or none),
   never half a model (as ``prm_discriminative``). Runs are seeded, so a rerun gives the same
   weights.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

from finegrain.progress import Progress
from finegrain.rewards.judge import HFJudge, JudgeRequest, judge_prompt_ids, parse_verdict
from finegrain.rewards.judge_data import VerdictRow
from finegrain.sampling import SamplingParams
from finegrain.train.prm_discriminative import check_replaceable_dir, json_safe, replace_dir, staging_dir
from finegrain.train.sft import run_sft_rows

INFO_FILE = "finegrain_judge.json"
METRICS_FILE = "judge_metrics.json"
RUBRIC_FILE = "rubric.json"  # load_rubric's JSON form: items, template, step_template


def encode_verdict_row(tokenizer, prompt: str, target: str) -> tuple[list[int], list[bool]]:
    """(ids, trained-on mask) of judge prompt + verdict + EOS; only the verdict and EOS are trained on."""
    p = judge_prompt_ids(tokenizer, prompt)
    v = tokenizer(target, add_special_tokens=False)["input_ids"]
    return p + v + [tokenizer.eos_token_id], [False] * len(p) + [True] * (len(v) + 1)


def agreement(predicted: Sequence[float | None], exact: Sequence[int]) -> dict[str, float]:
    """Agreement of predicted item scores (None = unparsable or missing) with exact 0/1 labels
    (module docstring); rates with an empty denominator are NaN.

    >>> m = agreement([1.0, 0.0, 1.0, None], [1, 0, 0, 1])
    >>> m["agreement"], m["tpr"], m["tnr"], m["no_verdict"]
    (0.5, 0.5, 0.5, 0.25)
    >>> round(agreement([1, 1, 0, 0], [1, 1, 0, 0])["kappa"], 6), round(agreement([1, 0, 1, 0], [1, 1, 0, 0])["kappa"], 6)
    (1.0, 0.0)
    """
    if len(predicted) != len(exact):
        raise ValueError(f"agreement: {len(predicted)} predictions for {len(exact)} labels")
    n = len(exact)
    if n == 0:
        nan = float("nan")
        return {"agreement": nan, "tpr": nan, "tnr": nan, "kappa": nan, "no_verdict": nan, "n": 0}
    hat = [None if p is None else int(p >= 0.5) for p in predicted]
    agree = sum(h == y for h, y in zip(hat, exact))
    pos = sum(y == 1 for y in exact)
    tp = sum(h == 1 and y == 1 for h, y in zip(hat, exact))
    tn = sum(h == 0 and y == 0 for h, y in zip(hat, exact))
    p_o = agree / n
    q, q1, q0 = pos / n, sum(h == 1 for h in hat) / n, sum(h == 0 for h in hat) / n  # "no verdict" is neither
    p_e = q1 * q + q0 * (1 - q)
    return {"agreement": p_o, "tpr": tp / pos if pos else float("nan"),
            "tnr": tn / (n - pos) if n - pos else float("nan"),
            "kappa": (p_o - p_e) / (1 - p_e) if p_e < 1 else float("nan"),
            "no_verdict": sum(h is None for h in hat) / n, "n": n}


def judge_agreement(model, tokenizer, rows: Sequence[VerdictRow], *, max_new_tokens: int, batch_size: int = 64,
                    seed: int = 0, progress: bool = False) -> dict[str, float]:
    """``agreement`` of the model's greedy verdicts on ``rows`` with their exact scores, through the
    ``hf`` judge backend and ``parse_verdict`` (the reward's own path), plus ``unparsable`` (the
    fraction of rows whose verdict has no JSON object or no valid item)."""
    judge = HFJudge(model, tokenizer, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, logprobs=False),
                    name="judge_sft", seed=seed)
    predicted, exact, unparsable = [], [], 0
    with Progress("judge agreement", total=len(rows), enabled=progress) as bar:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            texts = judge.generate([JudgeRequest(r.prompt, None, "", ()) for r in chunk])
            for r, text in zip(chunk, texts):
                v = parse_verdict(text, list(r.scores))
                unparsable += not v.parsed
                for j, y in r.scores.items():
                    predicted.append(v.scores.get(j))
                    exact.append(y)
            bar.update(min(s + batch_size, len(rows)))
    return {**agreement(predicted, exact), "unparsable": unparsable / len(rows) if rows else float("nan")}


def is_judge_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a judge saved by ``train_judge`` (its ``finegrain_judge.json``)."""
    return (Path(path) / INFO_FILE).is_file()


def check_judge_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` may not exist, be empty, or hold an earlier fine-tuned judge (which is replaced);
    anything else is refused (ValueError) so that no unrelated directory is ever overwritten."""
    return check_replaceable_dir(out_dir, is_judge_dir, f"a fine-tuned judge (no {INFO_FILE})")


def train_judge(model, tokenizer, rows: Sequence[VerdictRow], *, out_dir: str | Path, rubric: dict,
                eval_rows: Sequence[VerdictRow] = (), epochs: int = 1, batch_size: int = 32, lr: float = 3e-3,
                warmup_steps: int = 20, seed: int = 0, max_new_tokens: int = 32, info: dict | None = None,
                progress: bool = True, log=None) -> dict:
    """Fine-tune ``model`` in place on ``rows`` and save it to ``out_dir`` (module docstring).

    Args:
        model, tokenizer: a causal LM and its tokenizer (both saved).
        rows: training questions with exact verdicts (``judge_data.verdict_rows``).
        out_dir: output directory (``check_judge_out_dir``): the model and tokenizer (an HF
            directory the ``hf`` backend loads as ``model_path``), ``rubric.json`` (the level,
            items and templates the prompts were made with: the judge reward reads them when its
            ``rubric_file`` is empty), ``finegrain_judge.json`` (``info`` + settings) and
            ``judge_metrics.json`` (training loss, held-out agreement before and after).
        rubric: {"items": [...], "template", "step_template"} (``load_rubric``'s keys) as used for
            the prompts; the level goes in ``info``.
        eval_rows: held-out questions (other responses than ``rows``); agreement is measured on
            them before and after training as ``eval/*``.
        epochs, batch_size, lr, warmup_steps, seed: the SFT schedule (``run_sft_rows``).
        max_new_tokens: the verdict budget when measuring agreement (and recorded for RL).
    Returns:
        the metrics written to ``judge_metrics.json``.
    """
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a finite number > 0, got {lr}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if v < 1:
            raise ValueError(f"{name}: expected >= 1, got {v}")
    if not rows:
        raise ValueError("judge train: no rows")
    out_dir = check_judge_out_dir(out_dir)
    say = log or (lambda msg: None)
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps, "seed": seed,
                "max_new_tokens": max_new_tokens, "n_rows": len(rows), "n_eval_rows": len(eval_rows)}
    metrics: dict = {"settings": settings}
    if eval_rows:
        before = judge_agreement(model, tokenizer, eval_rows, max_new_tokens=max_new_tokens, seed=seed)
        metrics["before"] = {f"eval/{k}": v for k, v in before.items()}
        say(f"before training: held-out agreement {before['agreement']:.4f}, unparsable {before['unparsable']:.4f}")
    encoded = [encode_verdict_row(tokenizer, r.prompt, r.target) for r in rows]
    longest = max(len(ids) for ids, _ in encoded)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise ValueError(f"judge train: a prompt and its verdict take {longest} tokens, more than the model's "
                         f"{limit} positions (a shorter step_template, or a backbone with more positions)")
    t0 = time.time()
    with Progress("judge SFT", total=None, enabled=progress) as bar:
        fit = run_sft_rows(model, tokenizer.pad_token_id, encoded, epochs=epochs, batch_size=batch_size, lr=lr,
                           warmup_steps=warmup_steps, seed=seed, group_by_length=True,
                           progress=lambda s, n, l: bar.update(s, n, f"loss {l:.3f}"))
    metrics["train"] = {"train/loss": fit["sft/loss"], "train/steps": fit["sft/steps"],
                        "train/seconds": time.time() - t0, "train/longest_row_tokens": longest}
    say(f"SFT: {fit['sft/steps']} steps in {metrics['train']['train/seconds']:.0f} s, loss {fit['sft/loss']:.4f}")
    if eval_rows:
        after = judge_agreement(model, tokenizer, eval_rows, max_new_tokens=max_new_tokens, seed=seed,
                                progress=progress)
        metrics["final"] = {f"eval/{k}": v for k, v in after.items()}
        say("held-out: " + "  ".join(f"{k} {after[k]:.4f}" for k in ("agreement", "tpr", "tnr", "kappa", "unparsable")))
    tmp = staging_dir(out_dir)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / RUBRIC_FILE).write_text(json.dumps(rubric, indent=2) + "\n")
    (tmp / INFO_FILE).write_text(json.dumps({"kind": "judge", **(info or {}), **settings}, indent=2) + "\n")
    (tmp / METRICS_FILE).write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n")
    replace_dir(tmp, out_dir)
    return metrics
