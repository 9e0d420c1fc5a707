"""Process quality of one RL run (or of the SFT start), against the arith task's exact step labels.

    python benchmarks/process_quality.py --run-dir RUN [--sft] --out-json PQ.json \\
        [--eval-problems 200] [--pq-problems 150] [--pq-samples 2] [--seed 4321]

Held-out problems: test problems ``[E, E + Q)`` (tune split) and ``[E + Q, E + 2Q)`` (report
split), E = ``--eval-problems`` (the run's own eval set is the first E test problems, so these
are disjoint from it), Q = ``--pq-problems``. Every policy samples ``--pq-samples`` responses per
problem at T = 1 with the same sampling seed.

Outputs (JSON):

* ``policy``: the final policy of RUN (``--sft``: the SFT policy): accuracy, fraction of responses
  whose every step is correct, miracle-step rate (right final answer, at least one step not
  correct; ``finegrain.eval.process.miracle_step_rate``), over tune + report samples;
* ``prm_after`` (runs with a checkpointed ``implicit_prm``, i.e. PRIME): the trained implicit PRM
  with π_ref = the SFT model and PRIME's β, step score = the sum of the step's token rewards
  (``ImplicitPRM(level='step')``), on the SFT policy's samples and on the run's own samples:
  step AUROC (correct vs wrong steps, unparseable left out), first-wrong-step accuracy and
  ProcessBench F1 with the threshold picked by ``best_threshold`` on the tune split and applied
  to the report split, and the accuracy of the best *constant* first-error guess (picked on the
  tune split) as the floor a useful scorer has to beat;
* ``--sft`` adds ``prm_before``: the implicit PRM as PRIME initialises it (PRM = ref = SFT, so
  every step reward is exactly 0: AUROC 0.5 by ties, the threshold predicts one constant), and
  ``sft_loglik``: the SFT model's mean token log-prob per step, a likelihood baseline that is
  not a PRM.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def sample(model, tok, task, cfg, examples, n: int, seed: int):
    from finegrain.envs import hf_rollout
    from finegrain.sampling import SamplingParams

    engine = hf_rollout(model, tok, segmenter=task.segmenter, max_batch=cfg.rollout.max_batch,
                        use_chat_template=cfg.model.use_chat_template)
    return engine.generate(examples, n, SamplingParams(1.0, 1.0, 0, cfg.eval.max_new_tokens), seed)


def label(task, traj):
    labs = [task.label_steps(ex, t) for ex, t in zip(traj.examples, traj.response_texts)]
    correct = [task.verify(ex, t) >= 1.0 for ex, t in zip(traj.examples, traj.response_texts)]
    return labs, correct


def per_row_steps(values: torch.Tensor, mask: torch.Tensor, labs) -> tuple[list, int]:
    """Step scores of each row aligned with its labels; counts rows whose step counts disagree."""
    out, mismatched = [], 0
    for b, sl in enumerate(labs):
        s = values[b][mask[b]].tolist()
        if len(s) != len(sl.labels):
            mismatched += 1
            k = min(len(s), len(sl.labels))
            s = s[:k] + [0.0] * (len(sl.labels) - k)
        out.append(s)
    return out, mismatched


def policy_stats(labs, correct, traj) -> dict:
    from finegrain.eval.process import miracle_step_rate

    firsts = [sl.first_error for sl in labs]
    return {"n": len(labs), "accuracy": sum(correct) / len(correct),
            "all_steps_correct": sum(sl.first_error is None and len(sl.labels) > 0 for sl in labs) / len(labs),
            "miracle": miracle_step_rate(correct, firsts),
            "truncated_frac": float(traj.truncated.float().mean()),
            "mean_steps": sum(len(sl.labels) for sl in labs) / len(labs)}


def scorer_quality(scores: list, labs, tune_rows: list[int], report_rows: list[int]) -> dict:
    """AUROC on the report split; first-wrong-step accuracy with the tune split's threshold."""
    from finegrain.eval.process import (best_threshold, first_error_prediction, first_wrong_step_accuracy,
                                        processbench_f1, step_auroc)

    def keep(rows):  # responses with at least one step
        return [r for r in rows if labs[r].labels]

    tune, rep = keep(tune_rows), keep(report_rows)
    auroc = step_auroc([scores[r] for r in rep], [labs[r].labels for r in rep])
    bt = best_threshold([scores[r] for r in tune], [labs[r].first_error for r in tune])
    thr = bt["threshold"]
    pred = [first_error_prediction(scores[r], thr) for r in rep]
    true = [labs[r].first_error for r in rep]
    acc = first_wrong_step_accuracy(pred, true)
    pb = processbench_f1(pred, true)
    const = Counter(labs[r].first_error for r in tune).most_common(1)[0][0]
    trivial = sum(t == const for t in true) / len(true)
    n_pos = sum(l == 1 for r in rep for l in labs[r].labels)
    n_neg = sum(l == 0 for r in rep for l in labs[r].labels)
    return {"auroc": auroc, "first_wrong_acc": acc["mean"], "first_wrong_acc_lo": acc["lo"],
            "first_wrong_acc_hi": acc["hi"], "f1": pb["f1"], "error_acc": pb["error_acc"],
            "correct_acc": pb["correct_acc"], "threshold": thr if math.isfinite(thr) else str(thr),
            "first_wrong_acc_trivial": trivial, "trivial_guess": const, "n_report": len(rep), "n_tune": len(tune),
            "n_correct_steps": n_pos, "n_wrong_steps": n_neg,
            "n_error_free_report": sum(t is None for t in true)}


def prm_step_scores(prm_model, ref_model, beta: float, traj, labs) -> tuple[list, int]:
    from finegrain.rewards.implicit_prm import ImplicitPRM

    prm = ImplicitPRM(prm_model, ref_model, beta=beta, level="step", micro_batch=64, temperature=1.0)
    with torch.no_grad():
        out = prm(traj)
    return per_row_steps(out.values, out.mask, labs)


def loglik_step_scores(model, traj, labs) -> tuple[list, int]:
    from finegrain.models.logprobs import response_logprobs
    from finegrain.trajectory import token_to_step_sum

    L = traj.response_ids.shape[1]
    with torch.no_grad():
        lp = response_logprobs(model, traj.input_ids, traj.attention_mask, L, 1.0, 64)  # (B, L)
    S = int(traj.step_ids.max().clamp(min=0)) + 1
    m = traj.response_mask
    sums, smask = token_to_step_sum(torch.where(m, lp, torch.zeros_like(lp)), m, traj.step_ids, S)
    cnt, _ = token_to_step_sum(m.float(), m, traj.step_ids, S)
    return per_row_steps(sums / cnt.clamp(min=1), smask, labs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="a run directory (config.yaml, checkpoints/)")
    ap.add_argument("--sft", action="store_true", help="evaluate the SFT start instead of the run's final policy")
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--eval-problems", type=int, default=200)
    ap.add_argument("--pq-problems", type=int, default=150)
    ap.add_argument("--pq-samples", type=int, default=2)
    ap.add_argument("--seed", type=int, default=4321)
    a = ap.parse_args(argv)

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from finegrain.config import load_config
    from finegrain.models.load import load_tokenizer
    from finegrain.train.sft import warm_started_tiny
    from finegrain.tasks import TASKS
    from finegrain.train.checkpoint import latest_checkpoint

    run = Path(a.run_dir)
    cfg = load_config(run / "config.yaml")
    task = TASKS.get(cfg.task.name)(**cfg.task.kwargs)
    sft, sft_tok, _ = warm_started_tiny(task, cfg.task.kwargs, cfg.model, cfg.sft, log=lambda m: None)
    sft.eval()
    prm_kwargs = next((r.kwargs for r in cfg.rewards if r.name == "implicit_prm"), {})
    beta = prm_kwargs.get("beta", 0.05)  # the implicit_prm reward's default
    E, Q, n = a.eval_problems, a.pq_problems, a.pq_samples
    exs = task.examples("test", E + 2 * Q)[E:]
    tune_rows = list(range(0, Q * n))
    report_rows = list(range(Q * n, 2 * Q * n))
    res: dict = {"run_dir": str(run), "problems": {"first_test_index": E, "per_split": Q, "samples": n,
                                                     "seed": a.seed}}

    if a.sft:
        traj = sample(sft, sft_tok, task, cfg, exs, n, a.seed)
        labs, correct = label(task, traj)
        res["policy"] = {"name": "sft", **policy_stats(labs, correct, traj)}
        scores, mm = prm_step_scores(sft, sft, beta, traj, labs)
        res["prm_before"] = {**scorer_quality(scores, labs, tune_rows, report_rows), "step_count_mismatches": mm,
                             "max_abs_score": max((abs(x) for r in scores for x in r), default=0.0)}
        scores, mm = loglik_step_scores(sft, traj, labs)
        res["sft_loglik"] = {**scorer_quality(scores, labs, tune_rows, report_rows), "step_count_mismatches": mm}
    else:
        ck = latest_checkpoint(run)
        if ck is None:
            raise SystemExit(f"{run}: no checkpoint")
        res["checkpoint"] = str(ck)
        tok = load_tokenizer(ck / "policy")
        policy = AutoModelForCausalLM.from_pretrained(ck / "policy").eval()
        traj = sample(policy, tok, task, cfg, exs, n, a.seed)
        labs, correct = label(task, traj)
        res["policy"] = {"name": str(run.name), **policy_stats(labs, correct, traj)}
        if (ck / "implicit_prm").exists():
            prm = AutoModelForCausalLM.from_pretrained(ck / "implicit_prm").eval()
            res["prm_after"] = {}
            sft_traj = sample(sft, sft_tok, task, cfg, exs, n, a.seed)
            sft_labs, _ = label(task, sft_traj)
            for key, (tj, lb) in {"sft_samples": (sft_traj, sft_labs), "own_samples": (traj, labs)}.items():
                scores, mm = prm_step_scores(prm, sft, beta, tj, lb)
                res["prm_after"][key] = {**scorer_quality(scores, lb, tune_rows, report_rows),
                                         "step_count_mismatches": mm}
    Path(a.out_json).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
