"""``finegrain judge train``: fine-tune a model to write a judge's verdicts (exact ones, from a task
with step labels), and measure its agreement with them on held-out responses.

    finegrain judge train --out DIR (--tiny micro|tiny|small | --model PATH) [--task arith]
                          [--task-kwargs JSON] [--level step|outcome] [--rubric-file FILE]
                          [--n-examples 2048] [--responses sft|sampled] [--policy PATH]
                          [--flawed-fraction 0.5] [--eval-fraction 0.1] [--max-eval 2000]
                          [--epochs 1] [--batch-size 32] [--lr 3e-3] [--verdict-tokens 24] ...

The questions are the judge reward's own (``Judge.requests``: its rubric, template and level);
the targets are the rule backend's exact verdicts (``finegrain.rewards.judge_data``); the
training and the saved directory are ``finegrain.train.judge_sft``. The saved directory is a
judge for ``rewards: [{name: judge, kwargs: {backend: hf, model_path: DIR, level: ...}}]``: it
brings its rubric and level. Every path is checked before any model is loaded.
"""

from __future__ import annotations

import string
import sys
from pathlib import Path

from finegrain.cli.outputs import check_input_file, check_output_dir
from finegrain.cli.prm_cmd import (_OneLineParser, _check_model_path, _load, _positive, _task,
                                   run_with_one_line_errors)


def add_parser(subparsers):
    """Add ``judge`` (with ``train``) to an argparse subparsers object; returns it."""
    p = subparsers.add_parser("judge", help="fine-tune a model to write a judge's verdicts (docs/algorithms/judge.md)",
                              description="Fine-tune a judge on a task's exact verdicts and measure its agreement "
                                          "with them on held-out responses (docs/algorithms/judge.md)")
    sub = p.add_subparsers(dest="judge_cmd", required=True, parser_class=_OneLineParser)
    t = sub.add_parser("train", help="SFT of a judge on (judge prompt, exact verdict) pairs")
    t.add_argument("--out", required=True, help="output directory: the judge (HF dir), its rubric, metrics "
                                                "(an earlier judge there is replaced)")
    t.add_argument("--tiny", default=None, choices=["micro", "tiny", "small"],
                   help="a random tiny model of this size (character tokenizer) instead of --model")
    t.add_argument("--family", default="qwen2", choices=["qwen2", "llama"], help="--tiny family (default qwen2)")
    t.add_argument("--max-positions", type=_positive(int), default=512, help="--tiny position limit (default 512)")
    t.add_argument("--model", default=None, help="a causal LM to fine-tune (HF dir or Hub id) instead of --tiny")
    t.add_argument("--task", default="arith", help="a task with exact step labels (default arith)")
    t.add_argument("--task-kwargs", default=None, help="JSON object of task constructor arguments")
    t.add_argument("--level", default="step", choices=["step", "outcome"],
                   help="what one verdict is about: one step (default) or the whole response")
    t.add_argument("--rubric-file", default="", help="rubric file (items, templates; docs/algorithms/judge.md); "
                                                     "default: the judge's default item and templates")
    t.add_argument("--n-examples", type=_positive(int), default=2048, help="task problems (train split) (default 2048)")
    t.add_argument("--responses", default="sft", choices=["sft", "sampled"],
                   help="responses to judge: sft (the task's SFT corpus, --flawed-fraction of them with a slip) or "
                        "sampled (from --policy)")
    t.add_argument("--flawed-fraction", type=float, default=0.5, help="sft responses with a slip (default 0.5)")
    t.add_argument("--policy", default=None, help="policy (HF dir) for --responses sampled")
    t.add_argument("--samples", type=_positive(int), default=2, help="sampled responses per problem (default 2)")
    t.add_argument("--temperature", type=float, default=1.0, help="policy sampling temperature (default 1.0)")
    t.add_argument("--max-new-tokens", type=_positive(int), default=96, help="policy response budget (default 96)")
    t.add_argument("--eval-fraction", type=float, default=0.1,
                   help="responses held out to measure agreement (default 0.1; 0: none)")
    t.add_argument("--max-eval", type=_positive(int), default=2000,
                   help="at most this many held-out questions are judged for agreement (default 2000)")
    t.add_argument("--epochs", type=_positive(int), default=1, help="epochs (default 1)")
    t.add_argument("--batch-size", type=_positive(int), default=32, help="rows per optimizer step (default 32)")
    t.add_argument("--lr", type=_positive(float), default=None,
                   help="peak learning rate, warm-up then cosine (default 3e-3 with --tiny, 1e-5 with --model)")
    t.add_argument("--warmup-steps", type=int, default=20, help="linear warm-up steps (default 20)")
    t.add_argument("--verdict-tokens", type=_positive(int), default=24,
                   help="verdict budget (max_new_tokens) when measuring agreement (default 24)")
    t.add_argument("--seed", type=int, default=0, help="corpus, split, init and shuffling seed (default 0)")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _responses(args, task, log):
    """(example, response) pairs to judge."""
    if args.responses == "sft":
        if not hasattr(task, "sft_corpus"):
            raise ValueError(f"--responses sft: task '{task.name}' has no SFT corpus; use --responses sampled")
        return task.sft_corpus(args.n_examples, flawed_fraction=args.flawed_fraction, seed=args.seed)
    from finegrain.rewards.disc_prm_data import sample_responses
    from finegrain.sampling import SamplingParams
    from finegrain.sampling.hf import HFSampler

    policy, ptok = _load("--policy", args.policy, args.device)
    examples = task.examples("train", args.n_examples)
    log(f"sampling {args.samples} responses to each of {len(examples)} problems")
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, logprobs=False)
    return sample_responses(HFSampler(policy, ptok), task, examples, n=args.samples, params=params, seed=args.seed)


def _rubric_dict(judge) -> dict:
    """The judge's items and templates in ``load_rubric``'s JSON form (saved beside the model)."""
    return {"items": [{"id": it.id, "text": it.text, "weight": it.weight, "depends": list(it.depends)}
                      for it in judge.default_items],
            "template": judge.template if judge.level == "outcome" else None,
            "step_template": judge.template if judge.level == "step" else None}


def _train(args) -> None:
    from finegrain.rewards.judge import Judge, RuleJudge, load_rubric, Rubric
    from finegrain.rewards.judge_data import split_by_response, verdict_rows
    from finegrain.train.judge_sft import check_judge_out_dir, train_judge

    if (args.model is None) == (args.tiny is None):
        raise ValueError("--model / --tiny: give exactly one (a model to fine-tune, or a tiny random one)")
    if args.responses == "sampled" and args.policy is None:
        raise ValueError("--policy: required with --responses sampled")
    if args.responses == "sft" and args.policy is not None:
        raise ValueError("--policy: only read with --responses sampled")
    for flag, v, hi in (("--flawed-fraction", args.flawed_fraction, 1.0), ("--eval-fraction", args.eval_fraction, 0.99)):
        if not 0.0 <= v <= hi:
            raise ValueError(f"{flag}: expected a number in [0, {hi:g}], got {v}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps: expected >= 0, got {args.warmup_steps}")
    if args.rubric_file:
        check_input_file("--rubric-file", args.rubric_file)
    for flag, path in (("--model", args.model), ("--policy", args.policy)):
        if path is not None:
            _check_model_path(flag, path)                     # every path checked before any model loads
    out = check_judge_out_dir(check_output_dir("--out", args.out))
    task = _task(args)
    rule = RuleJudge(task)                                     # a task without step labels fails here, in one line
    rubric = load_rubric(args.rubric_file) if args.rubric_file else Rubric()
    judge = Judge(rule, task, level=args.level, rubric=rubric)
    log = (lambda msg: None) if args.no_progress else (lambda msg: print(msg, file=sys.stderr, flush=True))

    pairs = _responses(args, task, log)
    rows = verdict_rows(judge, task, pairs)
    train_rows, eval_rows = split_by_response(rows, len(pairs), args.eval_fraction, args.seed, args.max_eval)
    if not train_rows:
        raise ValueError("--eval-fraction: every response is held out; no question is left to train on")
    n_held = round(len(pairs) * args.eval_fraction)
    positive = sum(all(v == 1 for v in r.scores.values()) for r in train_rows) / len(train_rows)
    log(f"{len(train_rows)} training questions from {len(pairs) - n_held} responses ({positive:.3f} with every "
        f"item satisfied); {len(eval_rows)} held-out questions from {n_held} responses")

    if args.model is not None:
        model, tok = _load("--model", args.model, args.device)
        base = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    else:
        from finegrain.models.load import resolve_device
        from finegrain.models.tiny import tiny_causal_lm
        from finegrain.models.tokenizer import char_tokenizer

        tok = char_tokenizer(sorted(set(string.printable) | set("".join(r.prompt + r.target for r in rows))))
        model = tiny_causal_lm(tok, family=args.family, size=args.tiny, max_positions=args.max_positions,
                               seed=args.seed).to(resolve_device(args.device))
        base = f"tiny {args.family} {args.tiny} (char tokenizer)"
    info = {"level": args.level, "task": task.name, "task_kwargs": args.task_kwargs, "base": base,
            "responses": args.responses, "n_examples": args.n_examples, "flawed_fraction": args.flawed_fraction,
            "rubric_file": args.rubric_file or None, "labels": "rule backend (exact task labels)"}
    metrics = train_judge(model, tok, train_rows, out_dir=out, rubric=_rubric_dict(judge), eval_rows=eval_rows,
                          epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr or (3e-3 if args.tiny else 1e-5), warmup_steps=args.warmup_steps,
                          seed=args.seed, max_new_tokens=args.verdict_tokens, info=info,
                          progress=not args.no_progress, log=log)
    final = metrics.get("final")
    if final:
        print("held-out " + "  ".join(f"{k.split('/')[1]} {final[k]:.4f}" for k in
                                      ("eval/agreement", "eval/tpr", "eval/tnr", "eval/kappa", "eval/unparsable")))
    print(f"judge saved to {out}; use it as rewards: [{{name: judge, kwargs: {{backend: hf, model_path: {out}, "
          f"level: {args.level}}}}}]")


def run(args) -> None:
    """Execute a parsed ``judge`` command; errors print one line 'finegrain judge: error: ...' and exit 2."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Writing model shards" bars drown the command's own progress
    run_with_one_line_errors("finegrain judge", _train, args)


def main(argv: list[str] | None = None) -> None:
    """``python -m finegrain.cli.judge_cmd train ...`` (the same as ``finegrain judge train ...``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="finegrain")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    run(ap.parse_args(["judge", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
