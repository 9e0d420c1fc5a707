"""Time one RL step of the CPU demo (GRPO on arith) in finegrain and in TRL's ``GRPOTrainer``.

    python benchmarks/step_timing.py [--steps 10] [--seed 0] [--out FILE.json] [--init sft|random]
                                     [--size tiny|50m] [--engines hf,vllm] [--threads N]
                                     [--trl-gradient-checkpointing] [--no-filtered]

Both sides get the same workload, the demo config without its group filter (TRL's GRPOTrainer
has no filter-with-oversampling-and-refills to match): the demo's tiny Qwen2 model (a fresh copy
of the same weights each), its character tokenizer, the same 16 prompt strings per step
(finegrain's own prompt pick for that step), 8 samples per prompt, 48 new tokens at most, temperature 1, top-p 1, no
top-k, the arith verifier as the only reward, group-normalised advantages, PPO-clip 0.2 with a
token-mean loss (TRL: ``loss_type='dapo'``), no KL / reference model, AdamW lr 1e-4, grad clip 1,
and exactly one optimizer step on all 128 completions in one micro-batch, without gradient
checkpointing (TRL's default turns it on; ``--trl-gradient-checkpointing`` keeps it).

Each finegrain side (one per ``--engines`` entry: ``hf``, ``vllm``) runs the trainer's own step
body, ``finegrain.train.loop.one_step``: ``collect_batch`` (→ ``Rollout.generate`` + the outcome
pass filters need), every reward signal, ``combine``, ``compute_advantages``, ``policy_update``,
the LR scheduler step and the weight sync into the engine (``sync``, timed apart).
The TRL step is a real ``trainer.train()``: the two sides alternate step by step inside one
process, the finegrain step running from a ``TrainerCallback.on_step_end``. Phases:

    generate  finegrain: Rollout.generate           TRL: GRPOTrainer._generate
    score     finegrain: verifier(s) + combine +     TRL: rest of _generate_and_score_completions
              compute_advantages (+ collect_batch    (padding, rewards, advantages, metrics)
              bookkeeping)
    update    finegrain: policy_update + scheduler   TRL: rest of the step (loss forward/backward,
                                                     clip, optimizer and scheduler step)

A third, finegrain-only side runs the demo config as shipped (accuracy-band filter, 1.5x
oversampling, up to 2 refill rounds) to show what the filter adds; ``--no-filtered`` skips it.

Step 0 of each side is a warm-up and is not counted. TRL's step window is on_step_begin →
on_step_end, so the Trainer's batch fetch and logging hooks between steps are outside it; their
time is reported separately (``summary.trl.outside_window`` in the JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

PHASES = ("generate", "score", "update", "total")


def _load_policy(cfg, task, init: str):
    """(model, tokenizer, description): the demo's SFT warm-started model, or the same
    architecture and tokenizer with random weights."""
    from finegrain.train.sft import warm_started_tiny

    if init == "sft":
        model, tok, info = warm_started_tiny(task, cfg.task.kwargs, cfg.model, cfg.sft,
                                             log=lambda m: print(m, file=sys.stderr))
        return model, tok, f"SFT warm-started ({info.get('path', '?')})"
    from finegrain.models.tiny import tiny_causal_lm
    from finegrain.models.tokenizer import char_tokenizer

    corpus = task.sft_corpus(cfg.sft.n_examples, cfg.sft.flawed_fraction, cfg.sft.seed)
    alphabet = sorted(set("".join(task.format_prompt(ex) + sol for ex, sol in corpus)) | set("0123456789"))
    tok = char_tokenizer(alphabet)
    model = tiny_causal_lm(tok, family=cfg.model.family, size=cfg.model.size, seed=cfg.sft.seed)
    return model, tok, "random init (no SFT)"


class FinegrainSide:
    """The demo's RL step: the trainer's own stages (``finegrain.train.stages``) in the loop's order."""

    def __init__(self, cfg, task, model, tok):
        from finegrain.train.stages import build_run

        self.cfg, self.task, self.policy = cfg, task, model
        self.run = build_run(cfg, task, lambda m: print(m, file=sys.stderr), policy=(model, tok, {}))
        self.engine = self.run.engine
        self.pool = task.examples("train")
        # time Rollout.generate inside collect_batch, and record the prompts it was given
        self._gen_seconds, self._gen_cpu, self._gen_examples = 0.0, 0.0, []
        inner = self.engine.generate

        def timed_generate(examples, *a, **kw):
            t, c = time.perf_counter(), time.process_time()
            out = inner(examples, *a, **kw)
            self._gen_seconds += time.perf_counter() - t
            self._gen_cpu += time.process_time() - c
            self._gen_examples.extend(examples)
            return out

        self.engine.generate = timed_generate

    def prompts_for(self, step: int) -> list:
        """The examples collect_batch draws at ``step`` (first round)."""
        from finegrain.train.stages import pick_prompts

        n = math.ceil(self.cfg.rollout.prompts_per_step * self.cfg.filters.oversample)
        return pick_prompts(self.pool, n, self.cfg.train.seed, step, stream=0)

    def step(self, step: int) -> dict:
        """One step through ``finegrain.train.loop.one_step`` (the trainer's own step body, weight
        sync included); phases from its ``time/*`` metrics and the timed ``Rollout.generate``."""
        from finegrain.train.loop import one_step

        self._gen_seconds, self._gen_cpu, self._gen_examples = 0.0, 0.0, []
        t0, c0 = time.perf_counter(), time.process_time()
        row = one_step(self.cfg, self.run, self.pool, step, lambda m: print(m, file=sys.stderr))
        total, cpu_total = time.perf_counter() - t0, time.process_time() - c0
        gen = self._gen_seconds
        update, sync = float(row.get("time/update", 0.0)), float(row.get("time/sync", 0.0))
        rows = int(row.get("rollout/rows", 0))
        outcome = row.get(f"reward/{self.run.outcome}/mean") if self.run.outcome else None
        return {"generate": gen, "score": total - gen - update - sync, "update": update, "sync": sync,
                "total": total, "cpu_generate": self._gen_cpu, "cpu_total": cpu_total, "rows": rows,
                "response_width": float("nan"), "mean_response_tokens": float(row.get("rollout/response_len", "nan")),
                "reward_mean": float(outcome) if outcome is not None else float("nan"),
                "generated_rows": row.get("filter/generated_prompts", 0) * self.cfg.rollout.group_size,
                # sampler vs trainer log-probs on the sampled tokens (docs/algorithms/rollout_correction.md)
                "mismatch_kl": float(row.get("loss/mismatch_kl", "nan")),
                "mismatch_max": float(row.get("loss/mismatch_max", "nan")),
                "prompts": sorted(e.prompt for e in self._gen_examples)}


def build_trl(cfg, task, model, tok, examples_per_step: list[list], seed: int, workdir: str, on_step,
              gradient_checkpointing: bool = False):
    """A GRPOTrainer on the same workload; ``on_step(step_index, trl_record)`` runs after each step."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    flat = [ex for exs in examples_per_step for ex in exs]
    by_id = {i: ex for i, ex in enumerate(flat)}
    ds = Dataset.from_dict({"prompt": [ex.prompt for ex in flat], "ex_id": list(range(len(flat)))})

    def arith_verifier(prompts, completions, ex_id, **kwargs):
        return [task.verify(by_id[i], c) for i, c in zip(ex_id, completions)]

    G = cfg.rollout.group_size
    args = GRPOConfig(
        output_dir=workdir, use_cpu=True, bf16=False, fp16=False, seed=seed,
        max_steps=len(examples_per_step), per_device_train_batch_size=cfg.rollout.prompts_per_step * G,
        gradient_accumulation_steps=1, num_generations=G, num_iterations=1, shuffle_dataset=False,
        max_completion_length=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, beta=0.0, epsilon=0.2, loss_type="dapo",
        scale_rewards="group", mask_truncated_completions=False, use_vllm=False,
        learning_rate=cfg.optim.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1],
        max_grad_norm=cfg.optim.grad_clip, logging_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, log_completions=False, dataloader_num_workers=0,
        # TRL turns this on by default (finegrain has no recompute): off unless asked, so that both
        # sides do the same forward/backward work
        gradient_checkpointing=gradient_checkpointing,
    )
    state = {"rec": None, "t_begin": None, "t_after": None}

    class Alternate(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            now = time.perf_counter()
            if state["t_after"] is not None:
                state["outside"] = now - state["t_after"]
            state["t_begin"], state["c_begin"] = now, time.process_time()
            state["rec"] = {"generate": 0.0, "gen_and_score": 0.0, "cpu_generate": 0.0, "cpu_gen_and_score": 0.0,
                            "prompts": [], "response_width": 0, "mean_response_tokens": float("nan"),
                            "reward_mean": float("nan")}

        def on_step_end(self, a, s, c, **kw):
            rec = state["rec"]
            rec["total"] = time.perf_counter() - state["t_begin"]
            rec["cpu_total"] = time.process_time() - state["c_begin"]
            for pre in ("", "cpu_"):
                rec[pre + "score"] = rec[pre + "gen_and_score"] - rec[pre + "generate"]
                rec[pre + "update"] = rec[pre + "total"] - rec[pre + "gen_and_score"]
            rec["outside_window"] = state.pop("outside", float("nan"))
            on_step(s.global_step - 1, rec)
            state["t_after"] = time.perf_counter()

    trainer = GRPOTrainer(model=model, reward_funcs=[arith_verifier], args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[Alternate()])

    gen_inner, gs_inner = trainer._generate, trainer._generate_and_score_completions

    def timed_generate(prompts):
        t, c = time.perf_counter(), time.process_time()
        out = gen_inner(prompts)
        state["rec"]["generate"] += time.perf_counter() - t
        state["rec"]["cpu_generate"] += time.process_time() - c
        return out

    def timed_gen_and_score(inputs):
        t, c = time.perf_counter(), time.process_time()
        out = gs_inner(inputs)
        rec = state["rec"]
        rec["gen_and_score"] += time.perf_counter() - t
        rec["cpu_gen_and_score"] += time.process_time() - c
        rec["prompts"] = sorted({x["prompt"] for x in inputs})
        rec["rows"] = out["completion_ids"].shape[0]
        rec["response_width"] = out["completion_ids"].shape[1]
        rec["mean_response_tokens"] = float(out["completion_mask"].sum(1).float().mean())
        rec["reward_mean"] = trainer._metrics["train"]["reward"][-1]
        return out

    trainer._generate = timed_generate
    trainer._generate_and_score_completions = timed_gen_and_score
    return trainer


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side, after one warm-up step each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write every per-step record and the summary here (JSON)")
    ap.add_argument("--init", choices=["sft", "random"], default="sft",
                    help="sft: the demo's warm-started model (cached; trained first if missing); random: same "
                         "architecture, random weights")
    ap.add_argument("--size", default="tiny",
                    help="finegrain.models.tiny preset of the policy (the demo's is tiny; 50m needs --init random)")
    ap.add_argument("--engines", default="hf",
                    help="comma-separated rollout engines, one finegrain side each (hf, vllm); vllm needs the "
                         "vLLM environment (.ci/vllm.sh)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads for every side (0 = torch's default, one per core)")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="keep TRL's default gradient checkpointing (recomputes the forward in backward); "
                         "off by default so both sides do the same work")
    ap.add_argument("--no-filtered", action="store_true",
                    help="skip the finegrain-only side that runs the demo config as shipped, with its filters")
    args = ap.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.size != "tiny" and args.init == "sft":
        raise SystemExit("step_timing: --size other than tiny has no SFT warm start; add --init random")

    import transformers
    import trl

    if args.threads:
        torch.set_num_threads(args.threads)

    from finegrain.cli.main import demo_config
    from finegrain.tasks import TASKS

    demo = demo_config("grpo")
    demo.train.seed = args.seed
    demo.model.size = args.size
    if not (demo.loss.kl_coef == 0 and demo.train.ppo_epochs == 1 and demo.train.minibatches == 1
            and demo.train.grad_accum == 1 and demo.loss.name == "ppo_clip" and demo.loss.aggregation == "token-mean"
            and [r.name for r in demo.rewards] == ["verifier"] and demo.advantage.name == "grpo"
            and not demo.advantage.per_source and not demo.loss.kwargs):
        raise SystemExit("step_timing: the TRL side is set up for the demo's GRPO settings, which have changed")
    # The compared workload: the demo without its filters (TRL's GRPOTrainer has no group filter with
    # oversampling and refills), so both sides train on exactly prompts_per_step x group_size completions.
    cfg = copy.deepcopy(demo)
    cfg.filters.filters, cfg.filters.oversample = [], 1.0
    torch.manual_seed(args.seed)
    task = TASKS.get(cfg.task.name)(**cfg.task.kwargs)
    base, tok, init_desc = _load_policy(cfg, task, args.init)
    base.eval()

    sides = {}
    for e in engines:
        c = copy.deepcopy(cfg)
        c.rollout.engine = e
        sides["finegrain" if e == "hf" else f"finegrain_{e}"] = FinegrainSide(c, task, copy.deepcopy(base),
                                                                              copy.deepcopy(tok))
    if not args.no_filtered and demo.filters.filters:
        sides["finegrain_filtered"] = FinegrainSide(demo, task, copy.deepcopy(base), copy.deepcopy(tok))
    first = next(iter(sides.values()))
    n_total = args.steps + 1  # step 0 = warm-up
    examples_per_step = [first.prompts_for(s) for s in range(n_total)]
    records = {"trl": [], **{name: [] for name in sides}}

    def line(name, r):
        sync = f" sync {r['sync']:.3f}" if "sync" in r else ""
        return (f"{name} {r['total']:.2f}s (gen {r['generate']:.2f} score {r['score']:.3f} upd {r['update']:.2f}"
                f"{sync}, {r['rows']} rows)")

    def after_trl_step(step, rec):
        records["trl"].append({"step": step, **rec})
        msg = [line("TRL", rec)]
        for name, side in sides.items():
            records[name].append({"step": step, **side.step(step)})
            msg.append(line(name, records[name][-1]))
        print(f"step {step}{' (warm-up)' if step == 0 else ''}: " + "  |  ".join(msg), file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    t_run = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        trainer = build_trl(cfg, task, copy.deepcopy(base), copy.deepcopy(tok), examples_per_step, args.seed, workdir,
                            after_trl_step, gradient_checkpointing=args.trl_gradient_checkpointing)
        trainer.train()
    wall = time.perf_counter() - t_run
    load_after = os.getloadavg()

    compared = [n for n in sides if n != "finegrain_filtered"]
    for name in compared:
        for f, t in zip(records[name], records["trl"]):
            if f["prompts"] != t["prompts"]:
                raise RuntimeError(f"step {f['step']}: {name} and TRL saw different prompts")
            if f["rows"] != t["rows"]:
                raise RuntimeError(f"step {f['step']}: {name} trained {f['rows']} completions, TRL {t['rows']}")
    timed = {side: [r for r in recs if r["step"] > 0] for side, recs in records.items()}
    keys = [*PHASES, "sync", "cpu_generate", "cpu_total"]
    summary = {side: {k: _median([r[k] for r in recs if k in r]) for k in keys} for side, recs in timed.items()}
    for side, recs in timed.items():
        for k in ("mean_response_tokens", "reward_mean", "rows"):
            summary[side][k] = _median([r[k] for r in recs if r["rows"]])
        summary[side]["fastest_total"] = min(r["total"] for r in recs)
        if side != "trl":
            summary[side]["sync_share"] = _median([r["sync"] / r["total"] for r in recs])
    summary["trl"]["outside_window"] = _median([r["outside_window"] for r in timed["trl"]])
    ratios = {name: {k: summary[name][k] / summary["trl"][k] for k in (*PHASES, "cpu_total")} for name in compared}
    paired = {name: _median([f["total"] / t["total"] for f, t in zip(timed[name], timed["trl"])]) for name in compared}

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "trl": trl.__version__, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
           "cuda": torch.cuda.is_available(), "load_before": load_before, "load_after": load_after}
    if "vllm" in engines:
        import vllm

        env["vllm"] = vllm.__version__
    workload = {"model": f"{cfg.model.family}/{cfg.model.size}, {sum(p.numel() for p in base.parameters()):,} "
                         f"parameters, {init_desc}", "vocab": len(tok),
                "prompts_per_step": cfg.rollout.prompts_per_step, "group_size": cfg.rollout.group_size,
                "max_new_tokens": cfg.rollout.max_new_tokens, "steps_timed": args.steps, "seed": args.seed,
                "engines": engines, "trl_gradient_checkpointing": args.trl_gradient_checkpointing}

    print()
    print(f"workload: {workload['model']}; {cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size} "
          f"samples, <= {cfg.rollout.max_new_tokens} new tokens; medians of {args.steps} alternating steps; "
          f"TRL gradient checkpointing {'on' if args.trl_gradient_checkpointing else 'off'}")
    print(f"machine: {env['cpus']} cpus, {env['mem_gib']} GiB, torch {env['torch']} ({env['torch_threads']} threads), "
          f"transformers {env['transformers']}, trl {env['trl']}{', vllm ' + env['vllm'] if 'vllm' in env else ''}; "
          f"load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    cols = ["trl", *compared]
    print(f"{'wall s':<10}" + "".join(f"{c:>18}" for c in cols) + "".join(f"{c + '/TRL':>22}" for c in compared))
    for p in (*PHASES[:-1], "sync", "total", "cpu_total"):
        vals = "".join(f"{summary[c].get(p, float('nan')):>18.3f}" for c in cols)
        rs = "".join(f"{(summary[c][p] / summary['trl'][p]) if p in ratios[c] else float('nan'):>22.2f}"
                     for c in compared)
        print(f"{p:<10}{vals}{rs}")
    for name in compared:
        s = summary[name]
        s["mismatch_kl"] = _median([r["mismatch_kl"] for r in timed[name]])
        s["mismatch_max"] = max(r["mismatch_max"] for r in timed[name])
        print(f"{name}: median per-pair total ratio vs TRL {paired[name]:.2f}; weight sync {s['sync']:.4f}s = "
              f"{100 * s['sync_share']:.1f}% of its step; fastest step {s['fastest_total']:.3f}s; sampler/trainer "
              f"log-prob mismatch: KL {s['mismatch_kl']:.2e} (median), max |diff| {s['mismatch_max']:.2e}")
    for side in cols:
        s = summary[side]
        print(f"{side}: mean response tokens {s['mean_response_tokens']:.1f}, mean reward {s['reward_mean']:.3f}")
    if "finegrain_filtered" in sides:
        s = summary["finegrain_filtered"]
        s["generated_rows"] = _median([r["generated_rows"] for r in timed["finegrain_filtered"]])
        names = [f["name"] if isinstance(f, dict) else f.name for f in demo.filters.filters]
        print(f"finegrain, demo as shipped (filters {names}, oversample {demo.filters.oversample}, max_refills "
              f"{demo.filters.max_refills}; no TRL counterpart): generate {s['generate']:.3f}s, score "
              f"{s['score']:.3f}s, update {s['update']:.3f}s, total {s['total']:.3f}s; median "
              f"{s['generated_rows']:.0f} rows generated, {s['rows']:.0f} trained")
    print(f"TRL time between steps outside its step window (batch fetch, hooks): "
          f"{summary['trl']['outside_window']:.3f}s; whole run {wall:.0f}s")

    result = {"summary": summary, "ratio_over_trl": ratios, "paired_total_ratio_median": paired, "env": env,
              "workload": workload, "wall_seconds": wall,
              "records": {side: [{k: v for k, v in r.items() if k != "prompts"} for r in recs]
                          for side, recs in records.items()}}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
