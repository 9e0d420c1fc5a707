"""Best-of-N on the arith task: the verifier as oracle, a trained implicit PRM, and a random selector.

    FINEGRAIN_CACHE=/tmp/fgcache python benchmarks/bon_arith.py [--n-problems 500] [--samples 16] \\
        [--out /tmp/bon_arith] [--search]

1. The demo policy: the tiny Qwen2-shaped model warm-started by SFT with the demo config
   (``finegrain sft`` on ``demo_config('grpo')``; cached, so a second run only loads it).
2. An implicit PRM (methods.md §2): a copy of the SFT model trained with the response-level
   cross-entropy ``finegrain.losses.prm.implicit_prm_ce_loss`` (β = 0.05) on the verifier's labels
   of policy samples of *train* problems; its reference π_ref is the SFT model. Saved to
   ``<out>/prm``.
3. ``finegrain eval`` on the *test* problems, scoring with the rewards verifier (the oracle),
   implicit_prm and random (and, with ``--search``, beam search and early rejection guided by the
   implicit PRM on 100 problems).
4. Prints the markdown tables of docs/benchmarks.md ("Evaluation") and the exact commands.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch


def demo_policy():
    """(model, tokenizer, cached directory) of the demo SFT model, trained on first use."""
    from finegrain.cli.main import demo_config
    from finegrain.train.sft import warm_started_tiny
    from finegrain.tasks import TASKS

    cfg = demo_config("grpo")
    task = TASKS.get(cfg.task.name)(**cfg.task.kwargs)
    model, tok, info = warm_started_tiny(task, cfg.task.kwargs, cfg.model, cfg.sft)
    return model, tok, info["path"], cfg


def train_implicit_prm(policy, tok, task, *, n_problems: int, samples: int, epochs: int, batch_size: int,
                       lr: float, beta: float, max_new_tokens: int, seed: int, log=print):
    """A copy of ``policy`` trained as an implicit PRM against ``policy`` (frozen) as reference.

    Data: ``samples`` responses (temperature 1) to each of the first ``n_problems`` train
    problems, labelled 1/0 by ``task.verify``. Loss: L = BCE(σ(β Σ_t log π_φ/π_ref), label)
    (arXiv:2412.01981, CE objective), AdamW, constant ``lr``. Returns (prm model, stats dict).
    """
    import copy

    from finegrain.losses.prm import implicit_prm_ce_loss
    from finegrain.models.logprobs import response_logprobs
    from finegrain.envs import hf_rollout
    from finegrain.sampling import SamplingParams

    t0 = time.time()
    engine = hf_rollout(policy, tok, segmenter=task.segmenter, use_chat_template=False)
    traj = engine.generate(task.examples("train", n_problems), samples,
                           SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens), seed)
    labels = torch.tensor([task.verify(ex, t) for ex, t in zip(traj.examples, traj.response_texts)])
    log(f"PRM data: {len(labels)} responses, {labels.mean():.3f} correct ({time.time() - t0:.0f}s)")
    L = traj.response_ids.shape[1]
    with torch.no_grad():
        ref_lp = torch.cat([response_logprobs(policy, traj.input_ids[i:i + 256], traj.attention_mask[i:i + 256], L)
                            for i in range(0, len(labels), 256)])  # (B, L)
    prm = copy.deepcopy(policy).train()
    opt = torch.optim.AdamW(prm.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=g)
        accs, losses = [], []
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            lp = response_logprobs(prm, traj.input_ids[idx], traj.attention_mask[idx], L)
            loss, m = implicit_prm_ce_loss(lp, ref_lp[idx], traj.response_mask[idx], labels[idx], beta=beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(prm.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            accs.append(float(m["acc"]))
        log(f"PRM epoch {epoch + 1}: loss {sum(losses) / len(losses):.3f}, train acc {sum(accs) / len(accs):.3f}")
    prm.eval()
    return prm, {"prm_train_responses": len(labels), "prm_train_correct": float(labels.mean()),
                 "prm_final_loss": sum(losses) / len(losses), "prm_seconds": time.time() - t0}


def main(argv=None) -> None:
    """Run the benchmark and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-problems", type=int, default=500)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--out", default="/tmp/bon_arith")
    ap.add_argument("--prm-problems", type=int, default=1024, help="train problems for the PRM data")
    ap.add_argument("--prm-samples", type=int, default=4)
    ap.add_argument("--prm-epochs", type=int, default=4)
    ap.add_argument("--prm-lr", type=float, default=1e-3)
    ap.add_argument("--search", action="store_true", help="also run beam / early_reject search")
    ap.add_argument("--search-aggregation", default=None, help="candidate score in the search (default: the "
                                                               "implicit PRM's Q-value, sum)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from finegrain.cli import eval_cmd
    from finegrain.tasks import TASKS

    out = Path(a.out)
    policy, tok, sft_dir, cfg = demo_policy()
    task = TASKS.get(cfg.task.name)(**cfg.task.kwargs)
    prm_dir = out / "prm"
    if not (prm_dir / "config.json").is_file():
        prm, stats = train_implicit_prm(policy, tok, task, n_problems=a.prm_problems, samples=a.prm_samples,
                                        epochs=a.prm_epochs, batch_size=64, lr=a.prm_lr, beta=0.05,
                                        max_new_tokens=cfg.eval.max_new_tokens, seed=a.seed + 1)
        prm.save_pretrained(prm_dir)
        tok.save_pretrained(prm_dir)
        (prm_dir / "train_stats.json").write_text(json.dumps(stats, indent=2))
    stats = json.loads((prm_dir / "train_stats.json").read_text())

    argv_eval = ["--model", sft_dir, "--task", "arith", "--task-kwargs", json.dumps(cfg.task.kwargs),
                 "--n-problems", str(a.n_problems), "--samples", str(a.samples), "--temperature", "1.0",
                 "--max-new-tokens", str(cfg.eval.max_new_tokens), "--scorers", "verifier,implicit_prm,random",
                 "--prm", str(prm_dir), "--prm-ref", sft_dir, "--out", str(out / "report"), "--seed", str(a.seed)]
    if a.search:
        argv_eval += ["--search", "beam,early_reject", "--search-beams", "4,8,16", "--beam-width", "4",
                      "--tau", "4", "--max-steps", "6", "--search-problems", "100"]
        if a.search_aggregation:
            argv_eval += ["--search-aggregation", a.search_aggregation]
    if a.threads:
        argv_eval += ["--threads", str(a.threads)]
    p = argparse.ArgumentParser(prog="finegrain")
    eval_cmd.add_parser(p.add_subparsers(dest="cmd"))
    t0 = time.time()
    m = eval_cmd.run(p.parse_args(["eval", *argv_eval]))
    wall = time.time() - t0

    c = m["curves"]
    Ns = c["Ns"]
    print("\n## command\n")
    print("FINEGRAIN_CACHE=/tmp/fgcache python benchmarks/bon_arith.py " + " ".join(sys.argv[1:]))
    print("# = finegrain eval " + " ".join(argv_eval))
    print(f"\nmachine: {platform.machine()}, torch threads {torch.get_num_threads()}, {platform.python_version()}; "
          f"eval wall {wall:.0f}s; PRM training {stats['prm_seconds']:.0f}s on {stats['prm_train_responses']} "
          f"responses ({stats['prm_train_correct']:.3f} correct)")
    print(f"\naccuracy of one sample: {m['accuracy']['mean']:.3f} [{m['accuracy']['lo']:.3f}, "
          f"{m['accuracy']['hi']:.3f}] over {m['accuracy']['n']} samples\n")
    print("| selector | " + " | ".join(f"N={n}" for n in Ns) + " |")
    print("|---|" + "---:|" * len(Ns))
    rows = [("oracle verifier (= pass@N)", c["bon"]["verifier"]),
            ("implicit PRM, min over steps", c["bon"]["implicit_prm"])]
    rows += [(f"implicit PRM, {agg}", ys) for agg, ys in c["bon_by_aggregation"]["implicit_prm"].items()
             if agg != "min"]
    rows += [("random selector (one draw)", c["bon"]["random"]), ("random selector (expected)", c["random_expected"]),
             ("majority vote", c["majority_vote"]), ("implicit-PRM weighted vote", c["weighted_vote"]["implicit_prm"])]
    for name, ys in rows:
        print(f"| {name} | " + " | ".join(f"{y:.3f}" for y in ys) + " |")
    ci = c["bon_ci"]["implicit_prm"][-1]
    print(f"\nimplicit PRM best-of-{Ns[-1]} 95% bootstrap interval: [{ci[0]:.3f}, {ci[1]:.3f}]")
    pr = m["process"]["scorers"]["implicit_prm"]
    print(f"implicit PRM process metrics: step AUROC {pr['step_auroc']:.3f}, ProcessBench F1 {pr.get('f1', float('nan')):.3f}"
          f" (threshold tuned on the same responses), first-error accuracy {pr.get('first_error_acc', float('nan')):.3f}")
    if "search" in m:
        s = m["search"]
        print(f"\nstep search guided by {s['scorer']} ({s['aggregation']}), {s['n_problems']} problems\n")
        print("| method | N | M | τ | accuracy | tokens / problem | seconds |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in s["runs"]:
            print(f"| {r['method']} | {r['n_beams']} | {r['beam_width']} | {r['tau'] or '–'} | {r['accuracy']:.3f} | "
                  f"{r['tokens_per_problem']:.0f} | {r['seconds']:.0f} |")
        b = s["bon_tokens"]
        for n, acc, tks in zip(b["Ns"], b["accuracy"], b["tokens"]):
            print(f"| best-of-N (implicit PRM, {m['meta']['aggregation']}) | {n} | | | {acc:.3f} | {tks:.0f} | |")
    print(f"\ntiming (s): {json.dumps({k: v for k, v in m['timing'].items()}, default=str)}")


if __name__ == "__main__":
    main()
