"""``finegrain prm``: train an implicit PRM offline from outcome-labelled responses, and score responses.

    finegrain prm train --data FILE.jsonl --model PATH [--ref PATH] --out DIR [--loss ce|dpo]
                        [--beta 0.05] [--lr 1e-6] [--epochs 1] [--batch-size 8] [--grad-clip 1.0]
                        [--seed 0] [--segmenter newline] [--device auto]
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
    p = subparsers.add_parser("prm", help="implicit PRM offline: train from labelled responses, score responses",
                              description="Implicit process reward model (β·log πφ/πref) trained from "
                                          "outcome labels; see docs/prm_offline.md")
    sub = p.add_subparsers(dest="prm_cmd", required=True, parser_class=_OneLineParser)
    t = sub.add_parser("train", help="train an implicit PRM on a JSONL of (prompt, response, label)")
    t.add_argument("--data", required=True, help="JSONL, one {prompt, response, label[, group]} per line")
    t.add_argument("--model", required=True, help="initial PRM weights (HF dir or Hub id); also the reference "
                                                  "unless --ref is given")
    t.add_argument("--ref", default=None, help="reference model π_ref (default: --model)")
    t.add_argument("--out", required=True, help="output directory: trained PRM (HF dir), prm_metrics.jsonl, "
                                                "checkpoints/ (an existing run there is resumed)")
    t.add_argument("--loss", default="ce", choices=["ce", "dpo"], help="ce: BCE(σ(z), label); dpo: pairs in a group")
    t.add_argument("--beta", type=_positive(float), default=0.05, help="β in z = β Σ log πφ/πref (default 0.05)")
    t.add_argument("--lr", type=_positive(float), default=1e-6, help="AdamW learning rate, constant (default 1e-6)")
    t.add_argument("--epochs", type=_positive(int), default=1, help="total epochs (default 1)")
    t.add_argument("--batch-size", type=_positive(int), default=8, help="rows per optimizer step (default 8)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; ≤ 0 turns clipping off")
    t.add_argument("--seed", type=int, default=0, help="shuffling and dropout seed (default 0)")
    t.add_argument("--segmenter", default="newline", choices=_segmenter_names(),
                   help="step segmenter, recorded for `score` (default newline)")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser("score", help="token, step and sequence implicit rewards for a JSONL of responses")
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


def _score(args) -> None:
    from finegrain.rewards.prm_data import read_prm_jsonl
    from finegrain.train.prm_offline import INFO_FILE, score_prm

    rows = read_prm_jsonl(check_input_file("--data", args.data), require_label=False)
    _check_model_path("--prm", args.prm)                      # every path checked before any model loads
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


def run(args) -> None:
    """Execute a parsed ``prm`` command. Errors (bad file, flag or model) print one line
    'finegrain prm: error: ...' to stderr and exit with status 2."""
    try:
        (_train if args.prm_cmd == "train" else _score)(args)
    except (ValueError, OSError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        lines = str(msg).splitlines()
        print(f"finegrain prm: error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="finegrain")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(["prm", *(sys.argv[1:] if argv is None else argv)])
    run(args)


if __name__ == "__main__":
    main()
