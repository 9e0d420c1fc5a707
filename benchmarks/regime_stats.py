"""Statistics of the arith testbed regimes that need no training (docs/testbed.md).

    python benchmarks/regime_stats.py [--regimes long_chains skill_gap miracle] [--no-exact-splits]

For each regime (and the demo, for comparison) it builds the SFT corpus exactly as the warm start
does (``task.sft_corpus(sft.n_examples, sft.flawed_fraction, sft.seed)`` of the regime's config,
``finegrain.recipes.regimes.regime_config``) and labels every trace with the task's own
``verify`` and ``label_steps``. Printed, as a markdown table:

- flawed: fraction of traces with at least one step that is not CORRECT;
- right answer: fraction of traces that ``verify`` scores 1;
- miracle | right: among the right-answer traces, the fraction with a wrong step (the corpus's
  miracle-step rate, as ``finegrain.eval.process.miracle_step_rate`` defines it);
- gap-op lines wrong: among the computation lines of the skill-gap operation, the fraction
  labelled WRONG (— without a skill gap);
- longest gold / SFT trace: characters of the longest gold solution over every problem
  (``ArithTask.longest_solution``) and of the longest corpus trace, against max_new_tokens;
- SFT tokens: prompt + trace + EOS over the corpus (one token per character);
- problems train / test: distinct problems of each split, exact by enumeration when the
  configuration has at most 5M problems, else ≈ 90% / 10% of ``num_problems()`` (the split is a
  hash of the prompt).
"""

from __future__ import annotations

import argparse
import time

EXACT_SPLIT_LIMIT = 5_000_000


def corpus_stats(task, corpus) -> dict:
    """The per-corpus numbers above, from the task's own ``verify`` and ``label_steps``."""
    from finegrain.tasks.base import STEP_WRONG

    n_flawed = n_right = n_miracle = gap_lines = gap_wrong = 0
    for ex, text in corpus:
        labels = task.label_steps(ex, text)
        right = task.verify(ex, text) == 1.0
        n_flawed += labels.first_error is not None
        n_right += right
        n_miracle += right and labels.first_error is not None
        if task.skill_gap_op is not None:
            for (op, _), lab in zip(ex.meta["ops"], labels.labels):
                if op == task.skill_gap_op:
                    gap_lines += 1
                    gap_wrong += lab == STEP_WRONG
    n = len(corpus)
    return {"n": n, "flawed": n_flawed / n, "right": n_right / n,
            "miracle_among_right": n_miracle / n_right if n_right else float("nan"),
            "gap_wrong": gap_wrong / gap_lines if gap_lines else None,
            "longest_trace": max(len(text) for _, text in corpus),
            "sft_tokens": sum(len(task.format_prompt(ex)) + len(text) + 1 for ex, text in corpus)}


def split_counts(task, cache: dict) -> tuple[int, int, bool]:
    """(train, test, exact) distinct problems of ``task``'s configuration."""
    from finegrain.tasks.arith import format_problem, split_of

    total = task.num_problems()
    key = (task.min_steps, task.max_steps, task.max_start, task.max_value, task.max_operand, task.ops)
    if total > EXACT_SPLIT_LIMIT or cache is None:
        return round(0.9 * total), round(0.1 * total), False
    if key not in cache:
        n_test = sum(split_of(format_problem(*p)) == "test" for p in task._enumerate())
        cache[key] = (total - n_test, n_test)
    return (*cache[key], True)


def regime_rows(regimes, exact_splits: bool = True, log=print) -> list[dict]:
    from finegrain.recipes import demo_grpo
    from finegrain.recipes.regimes import regime_config
    from finegrain.tasks import TASKS

    configs = [("demo (baseline)", demo_grpo())] + [(r, regime_config(r, "grpo")) for r in regimes]
    rows, cache = [], {} if exact_splits else None
    for name, cfg in configs:
        t0 = time.time()
        task = TASKS.get(cfg["task"]["name"])(**cfg["task"]["kwargs"])
        sft = cfg["sft"]
        corpus = task.sft_corpus(sft["n_examples"], sft["flawed_fraction"], sft.get("seed", 0))
        train, test, exact = split_counts(task, cache)
        rows.append({"regime": name, "kwargs": cfg["task"]["kwargs"], "flawed_fraction": sft["flawed_fraction"],
                     **corpus_stats(task, corpus), "longest_gold": task.longest_solution(),
                     "max_new_tokens": cfg["rollout"]["max_new_tokens"], "num_problems": task.num_problems(),
                     "train_problems": train, "test_problems": test, "exact_splits": exact})
        log(f"{name}: {time.time() - t0:.1f} s")
    return rows


def markdown(rows) -> str:
    def count(x, exact):
        return f"{x:,}" if exact else f"≈{x:.2g}"

    head = ["regime", "SFT n (slips)", "flawed", "right answer", "miracle \\| right", "gap-op lines wrong",
            "longest gold / SFT trace / max_new_tokens", "SFT tokens", "problems train / test"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gap = "—" if r["gap_wrong"] is None else f"{r['gap_wrong']:.3f}"
        lines.append(
            f"| {r['regime']} | {r['n']:,} ({r['flawed_fraction']:g}) | {r['flawed']:.3f} | {r['right']:.3f} "
            f"| {r['miracle_among_right']:.3f} | {gap} | {r['longest_gold']} / {r['longest_trace']} / "
            f"{r['max_new_tokens']} | {r['sft_tokens']:,} | {count(r['train_problems'], r['exact_splits'])} / "
            f"{count(r['test_problems'], r['exact_splits'])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from finegrain.tasks.regimes import REGIMES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument("--no-exact-splits", action="store_true",
                   help="estimate the train/test counts (90%%/10%%) instead of enumerating (~13 s per space)")
    args = p.parse_args(argv)
    rows = regime_rows(args.regimes, exact_splits=not args.no_exact_splits)
    print(markdown(rows))


if __name__ == "__main__":
    main()
