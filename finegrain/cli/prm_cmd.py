"""``finegrain prm``: train a PRM offline (implicit or discriminative), and score responses.

    finegrain prm train --data FILE.jsonl --model PATH [--ref PATH] --out DIR [--loss ce|dpo]
                        [--beta 0.05] [--lr 1e-6] [--epochs 1] [--batch-size 8] [--grad-clip 1.0]
                        [--seed 0] [--segmenter newline] [--device auto]
    finegrain prm train --kind discriminative (--model PATH | --tiny micro|tiny|small) --out DIR
                        [--labels jsonl|task|mc] [--data FILE.jsonl|MANIFEST.json] [--task arith]
                        [--responses sft|sampled] [--policy PATH] [--mc-rollouts 8] [--mc-mode hard|soft]
                        [--hrm-merge] [--eval-fraction 0.1] [--lr 1e-3] [--epochs 1] ...
                        [--label-kind steps|factuality|relevance|completeness] [--corrupt-fraction 0.5]
    finegrain prm score --data FILE.jsonl --prm PATH [--ref PATH] --out FILE.jsonl [--beta B]
                        [--aggregate min|sum|mean|last] [--segmenter NAME] [--batch-size 8]

Every path is checked before any model is loaded: ``--data`` must be a readable file, model
paths must be model directories (or Hub ids), ``train --out`` a writable directory (existing or
creatable) and ``score --out`` a writable file path (not a directory); the scores are written
atomically (temporary file, then rename), so a failed run never leaves half a file.

File formats and logged metrics: docs/prm_offline.md. ``add_parser(subparsers)`` adds the ``prm``
command to the main parser; ``run(args)`` executes a parsed command; ``main(argv)`` does both on
its own (``python -m finegrain.cli.prm_cmd train ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finegrain.cli.outputs import (atomic_write_text, atomic_writer, check_input_file, check_output_dir,
                                  check_output_file)


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (no usage block): 'PROG: error: MSG (see --help)'."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected > 0, got {text}")
        return v
    return parse


def _segmenter_names() -> list[str]:
    from finegrain.segment import SEGMENTERS

    return SEGMENTERS.names()


def _aggregate_names() -> list[str]:
    from finegrain.rewards.implicit_prm import STEP_SCORE_AGGREGATIONS

    return STEP_SCORE_AGGREGATIONS.names()


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``prm`` (with ``train`` and ``score``) to an argparse subparsers object; returns it."""
    p = subparsers.add_parser("prm", help="PRM offline (implicit or discriminative): train, score responses",
                              description="Implicit process reward model (β·log πφ/πref) trained from "
                                          "outcome labels, or a discriminative step classifier trained on step "
                                          "labels (--kind discriminative); see docs/prm_offline.md")
    sub = p.add_subparsers(dest="prm_cmd", required=True, parser_class=_OneLineParser)
    t = sub.add_parser("train", help="train a PRM: implicit (outcome labels) or discriminative (step labels)")
    t.add_argument("--kind", default="implicit", choices=["implicit", "discriminative"],
                   help="implicit: β·log πφ/πref from outcome labels (default); discriminative: a step classifier "
                        "(causal LM + scalar head) trained with BCE on step labels")
    t.add_argument("--data", default=None, help="implicit: JSONL, one {prompt, response, label[, group]} per line "
                                                "(required); discriminative with --labels jsonl: JSONL of step "
                                                "labels, or a JSON manifest {\"files\": [...]}")
    t.add_argument("--model", default=None, help="initial PRM weights (HF dir or Hub id); also the reference "
                                                 "unless --ref is given (implicit: required; discriminative: the "
                                                 "backbone, or --tiny)")
    t.add_argument("--ref", default=None, help="implicit: reference model π_ref (default: --model)")
    t.add_argument("--out", required=True, help="output directory: trained PRM (HF dir), metrics, "
                                                "checkpoints/ (implicit: an existing run there is resumed)")
    t.add_argument("--loss", default=None, choices=["ce", "dpo"],
                   help="implicit: ce: BCE(σ(z), label) (default); dpo: pairs in a group")
    t.add_argument("--beta", type=_positive(float), default=None, help="implicit: β in z = β Σ log πφ/πref "
                                                                       "(default 0.05)")
    t.add_argument("--lr", type=_positive(float), default=None,
                   help="AdamW learning rate, constant (default 1e-6 implicit, 1e-3 discriminative)")
    t.add_argument("--epochs", type=_positive(int), default=1, help="total epochs (default 1)")
    t.add_argument("--batch-size", type=_positive(int), default=8, help="rows per optimizer step (default 8)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; ≤ 0 turns clipping off")
    t.add_argument("--seed", type=int, default=0, help="shuffling, dropout, sampling and init seed (default 0)")
    t.add_argument("--segmenter", default=None, choices=_segmenter_names(),
                   help="step segmenter, recorded for scoring (default: the task's, else newline)")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = t.add_argument_group("discriminative PRM (--kind discriminative; docs/prm_offline.md)")
    d.add_argument("--labels", default=None, choices=["jsonl", "task", "mc"],
                   help="step label source: jsonl (--data), task (the task's exact label_steps) or mc "
                        "(Monte-Carlo rollouts of --policy); default jsonl with --data, else task")
    d.add_argument("--tiny", default=None, choices=["micro", "tiny", "small"],
                   help="a random tiny backbone of this size instead of --model")
    d.add_argument("--family", default="qwen2", choices=["qwen2", "llama"], help="--tiny family (default qwen2)")
    d.add_argument("--tokenizer", default="char", choices=["char", "bpe"],
                   help="--tiny tokenizer: char (every character of the data) or bpe (byte-level BPE trained on "
                        "the data); default char")
    d.add_argument("--bpe-vocab", type=_positive(int), default=256, help="--tokenizer bpe vocabulary size")
    d.add_argument("--max-positions", type=_positive(int), default=512, help="--tiny position limit (default 512)")
    d.add_argument("--task", default="arith", help="task of --labels task / mc (default arith)")
    d.add_argument("--task-kwargs", default=None, help="JSON object of task constructor arguments")
    d.add_argument("--n-examples", type=_positive(int), default=512, help="task problems (train split) to label")
    d.add_argument("--responses", default="sft", choices=["sft", "sampled"],
                   help="responses to label: sft (the task's SFT corpus) or sampled (from --policy)")
    d.add_argument("--flawed-fraction", type=float, default=0.5, help="sft responses with a slip (default 0.5)")
    d.add_argument("--policy", default=None, help="policy (HF dir) for --responses sampled and --labels mc")
    d.add_argument("--samples", type=_positive(int), default=2, help="sampled responses per problem (default 2)")
    d.add_argument("--temperature", type=float, default=1.0, help="policy sampling temperature (default 1.0)")
    d.add_argument("--max-new-tokens", type=_positive(int), default=64, help="policy response budget (default 64)")
    d.add_argument("--mc-rollouts", type=_positive(int), default=8, help="N rollouts per step prefix (default 8)")
    d.add_argument("--mc-mode", default="hard", choices=["hard", "soft"],
                   help="MC label: hard = any rollout right, soft = fraction right (Math-Shepherd)")
    d.add_argument("--hrm-merge", action="store_true", help="also train on HRM merged-step rows (methods.md §19)")
    d.add_argument("--label-kind", default="steps", choices=["steps", "factuality", "relevance", "completeness"],
                   help="--labels task: what a label says. steps: the task's label_steps (default); factuality, "
                        "relevance (per line) or completeness (per response): one Fine-Grained RLHF error kind, "
                        "exact on arith (finegrain/rewards/fgrlhf_labels.py; docs/algorithms/fine_grained_rlhf.md)")
    d.add_argument("--corrupt-fraction", type=float, default=0.0,
                   help="--labels task with --label-kind other than steps: this fraction of the responses gets one "
                        "corruption (dropped answer, truncation, repeated / restarted / skipped / garbage line), so "
                        "relevance and completeness see both classes (default 0)")
    d.add_argument("--eval-fraction", type=float, default=0.0,
                   help="rows held out for eval/* metrics (default 0: none)")
    s = sub.add_parser("score", help="token, step and sequence implicit rewards (or a discriminative PRM's step "
                                     "probabilities) for a JSONL of responses")
    s.add_argument("--data", required=True, help="JSONL, one {prompt, response[, label, ...]} per line")
    s.add_argument("--prm", required=True, help="trained PRM directory (from `finegrain prm train`)")
    s.add_argument("--ref", default=None, help="reference model (default: the one recorded at training)")
    s.add_argument("--out", required=True, help="output JSONL: the input fields plus the scores")
    s.add_argument("--beta", type=_positive(float), default=None,
                   help="β (default: the one recorded at training, else 0.05)")
    s.add_argument("--aggregate", default="min", choices=_aggregate_names(),
                   help="step rewards -> sequence_score (default min)")
    s.add_argument("--segmenter", default=None, choices=_segmenter_names(),
                   help="step segmenter (default: the one recorded at training, else newline)")
    s.add_argument("--batch-size", type=_positive(int), default=8, help="rows per forward (default 8)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_model_path(flag: str, path: str) -> Path:
    """The cheap checks of a model argument, done before any model is loaded: ``path`` exists and
    holds a config.json, or looks like a Hub id (owner/name). ValueError naming ``flag`` if not."""
    from finegrain.models.load import check_model_path

    try:
        check_model_path(flag, path)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    return Path(path).expanduser()


def _load(flag: str, path: str, device: str, *, tokenizer: bool = True):
    """(model, tokenizer or None) from ``path``; any failure is a one-line ValueError naming ``flag``.

    A path that does not exist and does not look like a Hub id (owner/name) is reported as a
    missing directory without trying the network.
    """
    from finegrain.models.load import load_causal_lm, load_pretrained

    p = _check_model_path(flag, path)
    target = str(p) if p.exists() else path
    try:  # trust_remote_code is False: a model directory's own code never runs
        if tokenizer:
            return load_pretrained(target, "float32", device, where=flag)
        return load_causal_lm(target, "float32", device, where=flag), None
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{flag}: cannot load a model from '{path}': {first}") from None


def _same_vocab(prm, ref, flag: str) -> None:
    a, b = prm.get_input_embeddings().weight.shape[0], ref.get_input_embeddings().weight.shape[0]
    if a != b:
        raise ValueError(f"{flag}: the reference has {b} token embeddings and the PRM {a}; "
                         "both must use the same tokenizer")


def _train(args) -> None:
    if args.kind == "discriminative":
        return _train_discriminative(args)
    disc_only = [f for f, v in (("--labels", args.labels), ("--tiny", args.tiny), ("--policy", args.policy),
                                ("--hrm-merge", args.hrm_merge or None),
                                ("--label-kind", None if args.label_kind == "steps" else args.label_kind),
                                ("--corrupt-fraction", args.corrupt_fraction or None)) if v is not None]
    if disc_only:
        raise ValueError(f"{disc_only[0]}: only with --kind discriminative")
    for flag, value in (("--data", args.data), ("--model", args.model)):
        if value is None:
            raise ValueError(f"{flag}: required for --kind implicit")
    args.loss = args.loss or "ce"
    args.beta = args.beta or 0.05
    args.lr = args.lr or 1e-6
    args.segmenter = args.segmenter or "newline"
    from finegrain.rewards.prm_data import read_prm_jsonl
    from finegrain.train.prm_offline import INFO_FILE, train_prm

    rows = read_prm_jsonl(check_input_file("--data", args.data))
    ref_flag = "--ref" if args.ref else "--model"
    _check_model_path("--model", args.model)                  # every path checked before any model loads
    _check_model_path(ref_flag, args.ref or args.model)
    out = check_output_dir("--out", args.out)
    prm, tok = _load("--model", args.model, args.device)
    ref, _ = _load(ref_flag, args.ref or args.model, args.device, tokenizer=False)
    _same_vocab(prm, ref, "--ref")
    ref.requires_grad_(False)
    metrics = train_prm(prm, ref, tok, rows, loss=args.loss, beta=args.beta, lr=args.lr, epochs=args.epochs,
                        batch_size=args.batch_size, grad_clip=args.grad_clip, seed=args.seed, out_dir=out,
                        segmenter=args.segmenter, progress=not args.no_progress)
    info_path = out / INFO_FILE
    info = json.loads(info_path.read_text())
    ref_path = args.ref or args.model
    info["ref"] = str(Path(ref_path).resolve()) if Path(ref_path).exists() else ref_path
    atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
    keys = [k for k in ("fit/ce_loss", "fit/acc", "fit/pair_acc") if k in metrics]
    print(f"epoch {metrics['epoch']}: " + "  ".join(f"{k} {metrics[k]:.4f}" for k in keys))
    print(f"PRM saved to {out} (metrics: {out / 'prm_metrics.jsonl'})")


def _task(args):
    from finegrain.tasks import TASKS

    if args.task not in TASKS:
        raise ValueError(f"--task: unknown task '{args.task}'; available: {', '.join(TASKS.names())}")
    kwargs = {}
    if args.task_kwargs is not None:
        try:
            kwargs = json.loads(args.task_kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"--task-kwargs: not valid JSON ({e.msg})") from None
        if not isinstance(kwargs, dict):
            raise ValueError("--task-kwargs: expected a JSON object")
    try:
        return TASKS.get(args.task)(**kwargs)
    except TypeError as e:
        raise ValueError(f"--task-kwargs: {e}") from None


def _disc_rows(args, log):
    """(step-labelled rows, the task or None, a description of the label source)."""
    from finegrain.rewards.disc_prm_data import (mc_step_labels, read_step_data, response_rows, sample_responses,
                                                 task_rows)
    from finegrain.sampling import SamplingParams

    if args.labels == "jsonl":
        return read_step_data(check_input_file("--data", args.data)), None, f"jsonl {args.data}"
    task = _task(args)
    sampler = None
    if args.responses == "sampled" or args.labels == "mc":
        from finegrain.sampling.hf import HFSampler

        policy, ptok = _load("--policy", args.policy, args.device)
        sampler = HFSampler(policy, ptok)
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, logprobs=False)
    examples = task.examples("train", args.n_examples)
    if args.responses == "sft":
        if not hasattr(task, "sft_corpus"):
            raise ValueError(f"--responses sft: task '{task.name}' has no SFT corpus; use --responses sampled")
        if not 0.0 <= args.flawed_fraction <= 1.0:
            raise ValueError(f"--flawed-fraction: expected a number in [0, 1], got {args.flawed_fraction}")
        pairs = task.sft_corpus(args.n_examples, flawed_fraction=args.flawed_fraction, seed=args.seed)
    else:
        log(f"sampling {args.samples} responses to each of {len(examples)} problems")
        pairs = sample_responses(sampler, task, examples, n=args.samples, params=params, seed=args.seed)
    if args.labels == "task" and args.label_kind != "steps":
        from finegrain.rewards.fgrlhf_labels import corrupted_pairs, kind_rows

        pairs = corrupted_pairs(pairs, args.corrupt_fraction, args.seed)
        return (kind_rows(task, pairs, args.label_kind), task,
                f"task {task.name} {args.label_kind} ({args.responses} responses, {args.corrupt_fraction:g} corrupted)")
    if args.labels == "task":
        return task_rows(task, pairs), task, f"task {task.name} label_steps ({args.responses} responses)"
    rows = response_rows(task, pairs)
    log(f"MC labels: {args.mc_rollouts} rollouts from each step prefix of {len(rows)} responses")
    rows = mc_step_labels(sampler, task, rows, n_rollouts=args.mc_rollouts, params=params, seed=args.seed,
                          mode=args.mc_mode, progress=not args.no_progress)
    return rows, task, f"mc {args.mc_mode} x{args.mc_rollouts} ({args.responses} responses)"


def _train_discriminative(args) -> None:
    import random

    from finegrain.cli.outputs import check_output_dir
    from finegrain.models.step_classifier import StepClassifier
    from finegrain.rewards.disc_prm_data import hrm_merged_rows
    from finegrain.train.prm_discriminative import check_disc_out_dir, train_disc_prm

    for flag, value in (("--ref", args.ref), ("--loss", args.loss), ("--beta", args.beta)):
        if value is not None:
            raise ValueError(f"{flag}: only with --kind implicit")
    if (args.model is None) == (args.tiny is None):
        raise ValueError("--model / --tiny: give exactly one (a backbone directory, or a tiny random one)")
    args.labels = args.labels or ("jsonl" if args.data else "task")
    if args.labels == "jsonl" and args.data is None:
        raise ValueError("--data: required with --labels jsonl")
    if args.labels != "jsonl" and args.data is not None:
        raise ValueError(f"--data: not read with --labels {args.labels} (the task's problems are labelled)")
    needs_policy = args.labels == "mc" or (args.labels != "jsonl" and args.responses == "sampled")
    if needs_policy and args.policy is None:
        raise ValueError(f"--policy: required with --labels {args.labels} --responses {args.responses}")
    if not 0.0 <= args.eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction: expected a number in [0, 1), got {args.eval_fraction}")
    if args.label_kind != "steps":
        if args.labels != "task":
            raise ValueError(f"--label-kind: '{args.label_kind}' needs --labels task (exact labels), got --labels "
                             f"{args.labels}")
        if args.hrm_merge:
            raise ValueError("--hrm-merge: only with --label-kind steps")
        from finegrain.rewards.fgrlhf_labels import check_task

        check_task(_task(args))
    if not 0.0 <= args.corrupt_fraction <= 1.0:
        raise ValueError(f"--corrupt-fraction: expected a number in [0, 1], got {args.corrupt_fraction}")
    if args.corrupt_fraction > 0 and args.label_kind == "steps":
        raise ValueError("--corrupt-fraction: only with --label-kind factuality | relevance | completeness")
    if args.labels == "jsonl":
        check_input_file("--data", args.data)
    for flag, path in (("--model", args.model), ("--policy", args.policy if needs_policy else None)):
        if path is not None:
            _check_model_path(flag, path)                     # every path checked before any model loads
    out = check_disc_out_dir(check_output_dir("--out", args.out))
    log = (lambda msg: None) if args.no_progress else (lambda msg: print(msg, file=sys.stderr, flush=True))
    lr = args.lr or 1e-3

    rows, task, source = _disc_rows(args, log)
    if not rows:
        raise ValueError("no step-labelled rows (every response was empty)")
    order = list(range(len(rows)))
    random.Random(f"disc_prm-split/{args.seed}").shuffle(order)
    n_eval = round(len(rows) * args.eval_fraction)
    eval_rows = [rows[i] for i in sorted(order[:n_eval])]
    train_rows = [rows[i] for i in sorted(order[n_eval:])]
    if args.hrm_merge:
        merged = hrm_merged_rows(train_rows)
        log(f"HRM: {len(merged)} merged-step rows added")
        train_rows = train_rows + merged
    if args.model is not None:
        lm, tok = _load("--model", args.model, args.device)
        backbone = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    else:
        tok = _tiny_tokenizer(args, train_rows + eval_rows)
        from finegrain.models.load import resolve_device
        from finegrain.models.tiny import tiny_causal_lm

        lm = tiny_causal_lm(tok, family=args.family, size=args.tiny, max_positions=args.max_positions,
                            seed=args.seed).to(resolve_device(args.device))
        backbone = f"tiny {args.family} {args.tiny} ({args.tokenizer} tokenizer)"
    segmenter = args.segmenter or (task.segmenter if task is not None else "newline")
    info = {"segmenter": segmenter, "labels": source, "backbone": backbone, "hrm_merge": args.hrm_merge,
            "reading": "scalar head on the last token of each step", "label_kind": args.label_kind}
    log(f"training a discriminative PRM on {len(train_rows)} rows ({len(eval_rows)} held out); labels: {source}")
    model = StepClassifier(lm)
    metrics = train_disc_prm(model, tok, train_rows, out_dir=out, lr=lr, epochs=args.epochs,
                             batch_size=args.batch_size, grad_clip=args.grad_clip, seed=args.seed,
                             eval_rows=eval_rows, info=info, progress=not args.no_progress, log=log)
    if args.label_kind != "steps":
        from finegrain.rewards.fgrlhf import record_logit_stats

        stats = record_logit_stats(model, tok, train_rows, out)
        log(f"logits over the training rows' labelled steps: mean {stats['logit_mean']:.4f}, "
            f"std {stats['logit_std']:.4f} (recorded in {out / 'finegrain_prm.json'})")
    keys = [k for k in ("fit/bce", "fit/step_acc", "fit/step_auroc", "eval/step_auroc") if k in metrics]
    print(f"epoch {metrics['epoch']}: " + "  ".join(f"{k} {metrics[k]:.4f}" for k in keys))
    print(f"PRM saved to {out} (metrics: {out / 'prm_metrics.json'})")


def _tiny_tokenizer(args, rows):
    """A tokenizer for a --tiny backbone, built from the rows' texts."""
    from finegrain.models.tokenizer import char_tokenizer, train_bpe_tokenizer

    texts = [r.prompt + r.response for r in rows]
    if args.tokenizer == "char":
        return char_tokenizer(sorted(set("".join(texts))))
    return train_bpe_tokenizer(texts, vocab_size=args.bpe_vocab, min_frequency=1)


def _score(args) -> None:
    from finegrain.rewards.prm_data import read_prm_jsonl
    from finegrain.train.prm_offline import INFO_FILE, score_prm

    from finegrain.models.step_classifier import is_disc_prm_dir

    rows = read_prm_jsonl(check_input_file("--data", args.data), require_label=False)
    _check_model_path("--prm", args.prm)                      # every path checked before any model loads
    if is_disc_prm_dir(args.prm):
        return _score_discriminative(args, rows)
    info_path = Path(args.prm) / INFO_FILE
    try:
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise ValueError(f"--prm: cannot read '{info_path}': {str(e).splitlines()[0]}") from None
    if not isinstance(info, dict):
        raise ValueError(f"--prm: '{info_path}' is not a JSON object")
    ref_path = args.ref or info.get("ref")
    if ref_path is None:
        raise ValueError(f"--ref: required ({info_path} does not record the reference model)")
    _check_model_path("--ref", ref_path)
    out = check_output_file("--out", args.out)
    prm, tok = _load("--prm", args.prm, args.device)
    ref, _ = _load("--ref", ref_path, args.device, tokenizer=False)
    _same_vocab(prm, ref, "--ref")
    scores = score_prm(prm, ref, tok, rows, beta=args.beta or info.get("beta", 0.05),
                       segmenter=args.segmenter or info.get("segmenter", "newline"), aggregate=args.aggregate,
                       batch_size=args.batch_size, progress=not args.no_progress)
    with atomic_writer(out) as f:                              # a crash leaves the previous file intact
        for row, sc in zip(rows, scores):
            f.write(json.dumps({**row.to_json(), **sc}, ensure_ascii=False) + "\n")
    print(f"scored {len(rows)} responses -> {out}")


def _score_discriminative(args, rows) -> None:
    """``prm score`` with a discriminative PRM: p_k = σ(s_k) for every step of every response."""
    from finegrain.models.step_classifier import load_step_classifier, step_logits
    from finegrain.rewards.disc_prm import map_step_reward
    from finegrain.segment import SEGMENTERS

    for flag, value in (("--ref", args.ref), ("--beta", args.beta)):
        if value is not None:
            raise ValueError(f"{flag}: only for an implicit PRM ('{args.prm}' is a discriminative one)")
    out = check_output_file("--out", args.out)
    from finegrain.models.load import resolve_device

    model, tok, info = load_step_classifier(args.prm, str(resolve_device(args.device)), where="--prm")
    seg = SEGMENTERS.get(args.segmenter or info.get("segmenter", "newline"))
    spans = [seg(r.response) for r in rows]
    steps = [[r.response[a:b] for a, b in sp] for r, sp in zip(rows, spans)]
    logits = step_logits(model, tok, [r.prompt for r in rows], steps, micro_batch=args.batch_size)
    agg = {"min": min, "sum": sum, "mean": lambda v: sum(v) / len(v), "last": lambda v: v[-1]}[args.aggregate]
    with atomic_writer(out) as f:                              # a crash leaves the previous file intact
        for row, sp, lg in zip(rows, spans, logits):
            probs = [None if s is None else map_step_reward(s, "prob") for s in lg]
            known = [p for p in probs if p is not None]
            f.write(json.dumps({**row.to_json(), "step_spans": [list(x) for x in sp], "step_logits": lg,
                                "step_probs": probs, "sequence_score": agg(known) if known else 0.0},
                               ensure_ascii=False) + "\n")
    print(f"scored {len(rows)} responses -> {out}")


def run_with_one_line_errors(prog: str, fn, args) -> None:
    """``fn(args)``; a ValueError, OSError or KeyError (bad file, flag or model) prints one line
    '<prog>: error: ...' to stderr and exits with status 2."""
    try:
        fn(args)
    except (ValueError, OSError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        lines = str(msg).splitlines()
        print(f"{prog}: error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        raise SystemExit(2) from None


def run(args) -> None:
    """Execute a parsed ``prm`` command; errors are one line 'finegrain prm: error: ...', exit 2."""
    run_with_one_line_errors("finegrain prm", _train if args.prm_cmd == "train" else _score, args)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="finegrain")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(["prm", *(sys.argv[1:] if argv is None else argv)])
    run(args)


if __name__ == "__main__":
    main()
