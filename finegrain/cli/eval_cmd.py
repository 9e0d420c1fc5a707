"""``finegrain eval``: evaluate a checkpoint on a task and write a report directory.

    finegrain eval --model PATH_OR_RUN_DIR --task arith|gsm8k [--task-kwargs JSON]
                   [--n-problems 500] [--samples 16] [--temperature 1.0] [--max-new-tokens 48]
                   [--scorers verifier,implicit_prm,random] [--reward-kwargs JSON] [--prm PATH] [--prm-ref PATH]
                   [--search beam,early_reject] [--env tool_use] [--env-kwargs JSON] [--max-turns N]
                   [--out DIR] [--seed 0]

``--model`` is a Hugging Face model directory (or Hub id), or a ``finegrain train`` run
directory, which resolves to its latest checkpoint's ``policy`` directory. ``--out`` must be a
directory that exists or can be created, and writable; it is checked (and created) before any
model is loaded. Scorers are reward signals of ``finegrain.rewards.REWARDS`` (the ones training
uses), built with a ``RewardContext`` whose policy is the PRM (``--prm``) and whose initial policy
is its reference (``--prm-ref``). Episodes run in the run directory's environment
(``rollout.env`` / ``env_kwargs`` / ``max_turns`` of its config.yaml, e.g. ``tool_use``), or in
``--env`` / ``--env-kwargs`` / ``--max-turns``; default ``single_turn``. See docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _csv(text: str) -> list[str]:
    """Non-empty items of a comma-separated flag value."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(flag: str, text: str) -> tuple[int, ...]:
    """Positive integers of a comma-separated flag value; errors name ``flag``."""
    try:
        out = tuple(int(t) for t in _csv(text))
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got '{text}'") from None
    if not out or min(out) < 1:
        raise ValueError(f"{flag}: expected positive integers, got '{text}'")
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on an argparse sub-parsers object; returns the parser."""
    e = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: best-of-N / votes / step search with reward scorers, HTML report",
        description="Sample N responses per problem, score them with reward signals (verifier, exact step "
                    "labels, implicit PRM, random, ...), "
                    "report best-of-N and weighted-vote accuracy against N, process metrics against exact step "
                    "labels, optional PRM-guided step search, and write a report directory.")
    e.add_argument("--model", required=True, help="HF model directory or Hub id, or a run directory "
                                                  "(uses checkpoints/latest → policy)")
    e.add_argument("--task", default=None, help="a task name: arith, gsm8k, lookup, arith_calc, ... (default: the run "
                                               "directory's task, else arith)")
    e.add_argument("--task-kwargs", default=None, help="JSON object of task constructor arguments, "
                                                       "e.g. '{\"min_steps\": 2, \"max_steps\": 4}'")
    e.add_argument("--split", default="test", help="train | test (default test)")
    e.add_argument("--n-problems", type=int, default=500, help="problems to evaluate (first ones of the split)")
    e.add_argument("--samples", type=int, default=16, help="samples per problem (largest N)")
    e.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    e.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0 = off)")
    e.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    e.add_argument("--max-new-tokens", type=int, default=48, help="response budget in tokens")
    e.add_argument("--scorers", default="verifier,random",
                   help="comma-separated rewards (finegrain.rewards.REWARDS) to score with: verifier, step_labels, "
                        "implicit_prm, random")
    e.add_argument("--reward-kwargs", default=None,
                   help="JSON object: reward name → keyword arguments over its eval defaults, e.g. "
                        "'{\"random\": {\"seed\": 3}}'")
    e.add_argument("--aggregation", default="min", help="step aggregation for the scorers that select by steps, in "
                                                        "the main curves: min | sum | last | mean | product")
    e.add_argument("--prm", default=None, help="implicit PRM model directory or run directory (default: the run's "
                                               "trained implicit_prm checkpoint if any, else the policy itself)")
    e.add_argument("--prm-ref", default=None, help="reference model of the implicit PRM (default for a run "
                                                   "directory: the model the run started from)")
    e.add_argument("--beta", type=float, default=None, help="β of the implicit PRM (default 0.05; the same as "
                                                             "--reward-kwargs '{\"implicit_prm\": {\"beta\": B}}')")
    e.add_argument("--search", default="", help="comma-separated step searches: beam, early_reject (default none)")
    e.add_argument("--search-scorer", default=None, help="scorer guiding the search (default: the first of "
                                                         "--scorers that selects by steps)")
    e.add_argument("--search-beams", default="4,8,16", help="values of N for the searches")
    e.add_argument("--beam-width", type=int, default=4, help="M: continuations per kept beam")
    e.add_argument("--tau", type=int, default=4, help="τ: tokens of a partial step before early rejection")
    e.add_argument("--max-steps", type=int, default=8, help="search iterations (steps)")
    e.add_argument("--max-step-tokens", type=int, default=0, help="cap on one step's tokens (0 = none)")
    e.add_argument("--search-aggregation", default=None, help="candidate score in the search: min | sum | last | "
                                                              "mean | product (default: the reward's search_value: "
                                                              "sum = Q-value for implicit_prm, min for step_labels, "
                                                              "else last as ER-PRM)")
    e.add_argument("--search-problems", type=int, default=100, help="search on the first problems only")
    e.add_argument("--html-problems", type=int, default=20, help="problems shown on report.html")
    e.add_argument("--max-batch", type=int, default=256, help="rows per generate call")
    e.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="sampler for the samples and the searches: hf (transformers generate) or vllm (an "
                        "in-process vLLM engine; needs vllm, docs/engines.md)")
    e.add_argument("--chunk-problems", type=int, default=64, help="problems sampled and scored together")
    e.add_argument("--device", default="auto", help="cpu | cuda | auto")
    e.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = automatic: the CPUs other jobs "
                                                          "leave free (finegrain/threads.py; FINEGRAIN_THREADS=torch "
                                                          "keeps torch's default)")
    e.add_argument("--no-chat-template", action="store_true", help="feed raw prompts even if the tokenizer has "
                                                                    "a chat template")
    e.add_argument("--env", default=None, help="environment of the episodes (finegrain.envs.ENVIRONMENTS, e.g. "
                                               "tool_use; default: the run directory's rollout.env, else single_turn)")
    e.add_argument("--env-kwargs", default=None, help="JSON object of environment keyword arguments, e.g. "
                                                      "'{\"tool_timeout\": 2.0}' (default: the run's "
                                                      "rollout.env_kwargs for the same environment, else {})")
    e.add_argument("--max-turns", type=int, default=None, help="model turns per episode (default: the run's "
                                                               "rollout.max_turns, else the environment's own)")
    e.add_argument("--out", default="runs/eval", help="report directory")
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument("--quiet", action="store_true", help="no progress output")
    return e


# ---------------------------------------------------------------------------------- resolution


def resolve_model_dir(path: str, flag: str = "--model", sub: str = "policy") -> tuple[str, Path | None]:
    """(model directory or Hub id, run directory or None) for a ``--model``-like argument.

    A directory with ``config.json`` is a model directory; one with ``checkpoints/latest`` is a
    run directory and resolves to ``<latest checkpoint>/<sub>``, which may be a LoRA adapter
    directory (``adapter_config.json``; ``_load_policy`` merges it into the run's base model). A
    missing path containing one '/' and not starting with '.' or '/' is taken as a Hub id.
    """
    from finegrain.models.lora import has_adapters
    from finegrain.train.checkpoint import latest_checkpoint

    from finegrain.models.load import check_model_path

    p = Path(path)
    if not p.exists():
        return check_model_path(flag, path), None  # a Hub id, or a one-line "no such directory"
    if (p / "config.json").is_file():
        return str(p), None
    if has_adapters(p):
        raise FileNotFoundError(f"{flag}: '{path}' holds LoRA adapters only; pass the run directory, whose config "
                                f"names the base model")
    if (p / "checkpoints" / "latest").is_file():
        ck = latest_checkpoint(p)
        if ck is None:
            raise FileNotFoundError(f"{flag}: run directory '{path}' has no complete checkpoint "
                                    f"(checkpoints/latest names a missing one)")
        if not (ck / sub / "config.json").is_file() and not has_adapters(ck / sub):
            raise FileNotFoundError(f"{flag}: checkpoint '{ck}' has no '{sub}' model directory")
        return str(ck / sub), p
    raise FileNotFoundError(f"{flag}: '{path}' is neither a model directory (config.json) nor a run directory "
                            f"(checkpoints/latest)")


def _run_config(run_dir: Path | None) -> dict:
    """The run directory's config.yaml as a dict ({} if none)."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return {}
    from finegrain.config import load_yaml

    return load_yaml((run_dir / "config.yaml").read_text()) or {}


def _initial_model(run_dir: Path | None) -> str | None:
    """The model a run started from: report.json's init path, else config.yaml's model.path."""
    if run_dir is None:
        return None
    rep = run_dir / "report.json"
    if rep.is_file():
        path = (json.loads(rep.read_text()).get("init") or {}).get("path")
        if path:
            return path
    return (_run_config(run_dir).get("model") or {}).get("path") or None


def _load_policy(model_path: str, run_dir: Path | None, device: str):
    """(model, tokenizer) to evaluate. A LoRA checkpoint (adapter directory) is loaded as the run's
    base model (report.json's init path, else config.yaml's model.path) with the run's
    ``model.lora`` adapters, then merged into a plain model: W + (alpha/r)·B·A, the weights an
    inference engine gets (``finegrain/models/lora.py::merge_and_unwrap``)."""
    from finegrain.config import ModelConfig, from_dict
    from finegrain.models.load import load_pretrained
    from finegrain.models.lora import add_adapters, has_adapters, load_adapters, merge_and_unwrap

    if not has_adapters(model_path):
        return load_pretrained(model_path, device=device, where="--model")
    base = _initial_model(run_dir)
    if base is None:
        raise ValueError(f"--model: {model_path} holds LoRA adapters, but the run's base model is unknown (no init "
                         f"path in report.json, no model.path in config.yaml)")
    mc = from_dict(ModelConfig, _run_config(run_dir).get("model") or {}, "model")
    model, tok = load_pretrained(base, mc.dtype, device, trust_remote_code=mc.trust_remote_code,
                                 where="--model (the LoRA run's base model)")
    lc = mc.lora
    model = add_adapters(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules,
                         seed=lc.seed)
    load_adapters(model, model_path)
    return merge_and_unwrap(model).eval(), tok


def _load_model_only(path: str, flag: str, device):
    """A causal LM without its tokenizer (checkpointed PRMs are saved without one)."""
    from finegrain.models.load import load_causal_lm

    return load_causal_lm(path, "float32", str(device), where=flag).eval()


def _json_object(flag: str, text: str, objects: bool = False) -> dict:
    """A flag's JSON object value; one-line ValueError naming the flag otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag}: not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag}: expected a JSON object" + (" of objects, e.g. "
                         "'{\"step_labels\": {\"correct\": 1, \"wrong\": 0}}'" if objects else ""))
    return value


def _fail(msg: str) -> None:
    """Print one error line and exit with status 2."""
    print(f"finegrain eval: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> dict:
    """Execute ``finegrain eval`` from parsed arguments; returns the metrics dict.

    Any configuration error exits with status 2 and one line naming the flag or file.
    """
    try:
        return _run(args)
    except (ValueError, OSError, KeyError) as err:
        _fail(str(err).strip('"').splitlines()[0] if str(err) else type(err).__name__)


def _run(args: argparse.Namespace) -> dict:
    """Validate flags, resolve and load models, run the evaluation, print a summary."""
    from finegrain.cli.outputs import check_output_dir
    from finegrain.eval.experiment import SearchSpec, run_eval
    from finegrain.eval.scoring import build_scorers, check_scorer, eval_meta, selects_by
    from finegrain.eval.search import SEARCHES
    from finegrain.eval.selection import STEP_AGGREGATIONS
    from finegrain.models.load import resolve_device
    from finegrain.rewards.base import level_of
    from finegrain.sampling import SamplingParams
    from finegrain.tasks import TASKS

    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.time()
    for flag, value in (("--n-problems", args.n_problems), ("--samples", args.samples),
                        ("--max-new-tokens", args.max_new_tokens), ("--beam-width", args.beam_width),
                        ("--tau", args.tau), ("--max-steps", args.max_steps), ("--max-batch", args.max_batch),
                        ("--chunk-problems", args.chunk_problems), ("--search-problems", args.search_problems)):
        if value < 1:
            raise ValueError(f"{flag}: expected >= 1, got {value}")
    if args.split not in ("train", "test"):
        raise ValueError(f"--split: expected 'train' or 'test', got '{args.split}'")
    from finegrain.ranges import check_range

    for flag, value, spec in (("--temperature", args.temperature, "[0, 100]"), ("--top-p", args.top_p, "(0, 1]"),
                              ("--top-k", args.top_k, "[0, inf)"), ("--seed", args.seed, "[0, inf)")):
        check_range(flag, value, spec)
    if args.html_problems < 0 or args.max_step_tokens < 0:
        raise ValueError("--html-problems / --max-step-tokens: expected >= 0")
    if args.beta is not None:
        check_range("--beta", args.beta, "(0, inf)")
    scorers = _csv(args.scorers)
    if not scorers:
        raise ValueError("--scorers: give at least one scorer")
    for name in scorers:
        check_scorer(name, "--scorers")
    for flag, agg in (("--aggregation", args.aggregation), ("--search-aggregation", args.search_aggregation)):
        if agg is not None and agg not in STEP_AGGREGATIONS:
            raise ValueError(f"{flag}: unknown '{agg}'; available: {', '.join(STEP_AGGREGATIONS.names())}")
    methods = tuple(_csv(args.search))
    for m in methods:
        if m not in SEARCHES:
            raise ValueError(f"--search: unknown search '{m}'; available: {', '.join(SEARCHES.names())}")
    budgets = _ints("--search-beams", args.search_beams)
    if methods and args.search_scorer and args.search_scorer not in scorers:
        check_scorer(args.search_scorer, "--search-scorer")
        scorers.append(args.search_scorer)
    reward_kwargs = _reward_kwargs(args, scorers)
    if methods and not args.search_scorer and \
            not any(selects_by(level_of(n, reward_kwargs[n])) == "step" for n in scorers):
        raise ValueError("--search: needs a scorer that selects by steps in --scorers or --search-scorer "
                         "(implicit_prm, step_labels)")
    check_output_dir("--out", args.out)  # a report that cannot be written: fail before any work

    model_path, run_dir = resolve_model_dir(args.model)
    run_cfg = _run_config(run_dir)
    task_name = args.task or (run_cfg.get("task") or {}).get("name") or "arith"
    if task_name not in TASKS:
        raise ValueError(f"--task: unknown task '{task_name}'; available: {', '.join(TASKS.names())}")
    if args.task_kwargs is not None:
        task_kwargs = _json_object("--task-kwargs", args.task_kwargs)
    else:
        same_task = (run_cfg.get("task") or {}).get("name") == task_name
        task_kwargs = (run_cfg.get("task") or {}).get("kwargs") or {} if same_task else {}
    try:
        task = TASKS.get(task_name)(**task_kwargs)
    except TypeError as err:
        raise ValueError(f"--task-kwargs: {err}") from None
    examples = task.examples(args.split, args.n_problems)
    if not examples:
        raise ValueError(f"--n-problems: task '{task_name}' has no '{args.split}' problems")
    env, env_kwargs, max_turns = _environment(args, run_cfg, run_dir)
    if env != "single_turn" and max_turns != 1:
        if methods:
            raise ValueError(f"--search: step searches sample single responses; they cannot run in the "
                             f"environment '{env}' (use --env single_turn or drop --search)")
    chat_tokenizer = env_kwargs.get("format") == "chat" and "tokenizer" not in env_kwargs
    if not chat_tokenizer:  # the chat format needs the policy's tokenizer: checked once it is loaded
        _probe_environment(env, env_kwargs, task, args)

    prm_path = ref_path = None
    needs_prm = [n for n in scorers if eval_meta(n)["eval_needs"] == "prm"]
    if needs_prm:  # resolve every path before loading
        if args.prm:
            prm_path, _ = resolve_model_dir(args.prm, "--prm", sub="implicit_prm" if _has_prm(args.prm) else "policy")
        elif run_dir is not None and _has_prm(str(run_dir)):
            prm_path, _ = resolve_model_dir(str(run_dir), "--model", sub="implicit_prm")
        else:
            prm_path = model_path
            log("implicit_prm: no --prm and no trained PRM in the run; using the policy itself as the PRM")
        ref_arg = args.prm_ref or _initial_model(run_dir)
        if ref_arg is None:
            raise ValueError(f"--prm-ref: scorer {needs_prm[0]} needs a reference model (e.g. the SFT model the "
                             "policy started from)")
        ref_path, _ = resolve_model_dir(ref_arg, "--prm-ref")

    if args.threads < 0:
        raise ValueError(f"--threads: expected >= 0, got {args.threads}")
    check_output_dir("--out", args.out, create=True)  # every flag checked: create it before loading
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    log(f"loading policy {model_path}")
    model, tok = _load_policy(model_path, run_dir, args.device)
    device = resolve_device(args.device)
    _set_threads(args.threads, model, device, log)
    if chat_tokenizer:
        env_kwargs["tokenizer"] = tok
        _probe_environment(env, env_kwargs, task, args)
    meta = {"model": model_path, "task_kwargs": task_kwargs, "split": args.split, "reward_kwargs": reward_kwargs}
    prm_model = ref_model = None
    if prm_path is not None:
        prm_model = model if prm_path == model_path else _load_model_only(prm_path, "--prm", device)
        ref_model = model if ref_path == model_path else _load_model_only(ref_path, "--prm-ref", device)
        if prm_model.config.vocab_size != model.config.vocab_size or \
                ref_model.config.vocab_size != model.config.vocab_size:
            raise ValueError("--prm/--prm-ref: the PRM and its reference must share the policy's tokenizer "
                             f"(vocab sizes {prm_model.config.vocab_size}, {ref_model.config.vocab_size} "
                             f"vs {model.config.vocab_size})")
    ctx = _reward_context(args, task_name, task_kwargs, model_path, task, tok, model, prm_model, ref_model,
                          env, env_kwargs, max_turns)
    signals = build_scorers(scorers, ctx, reward_kwargs)
    if prm_path is not None:
        beta = getattr(signals[needs_prm[0]], "beta", None)
        meta.update(prm=prm_path, prm_ref=ref_path, beta=beta)
        log(f"implicit PRM {prm_path}, reference {ref_path}, beta {beta}")

    spec = SearchSpec(methods=methods, scorer=args.search_scorer, budgets=budgets, beam_width=args.beam_width,
                      tau=args.tau, max_steps=args.max_steps, max_step_tokens=args.max_step_tokens or None,
                      aggregation=args.search_aggregation, n_problems=args.search_problems)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_new_tokens=args.max_new_tokens)
    episodes = "samples" if env == "single_turn" else f"episodes in environment {env}"
    log(f"evaluating {len(examples)} {task_name} problems x {args.samples} {episodes}; scorers {', '.join(scorers)}")
    metrics = run_eval(model, tok, task, examples, out_dir=args.out, scorers=signals, samples=args.samples,
                       sampling=sampling, seed=args.seed, aggregation=args.aggregation, search=spec,
                       html_problems=args.html_problems, chunk_problems=args.chunk_problems,
                       max_batch=args.max_batch, use_chat_template=not args.no_chat_template, meta=meta, log=log,
                       progress=not args.quiet, env=env, env_kwargs=env_kwargs, max_turns=max_turns,
                       engine=args.engine)
    _summary(metrics, Path(args.out), time.time() - t_start, log)
    return metrics


def _environment(args, run_cfg: dict, run_dir: Path | None) -> tuple[str, dict, int | None]:
    """(environment, its keyword arguments, max turns or None for the environment's own).

    ``--env`` / ``--env-kwargs`` / ``--max-turns`` when given; else the run's ``rollout.env``,
    ``rollout.env_kwargs`` (only for that same environment) and ``rollout.max_turns`` (0 = the
    environment's own); else ``single_turn``.
    """
    from finegrain.envs import ENVIRONMENTS

    rollout = run_cfg.get("rollout") or {}
    env = args.env or rollout.get("env") or "single_turn"
    if env not in ENVIRONMENTS:
        where = "--env" if args.env else f"--env: the run's rollout.env ({run_dir / 'config.yaml'})"
        raise ValueError(f"{where}: unknown environment '{env}'; available: {', '.join(ENVIRONMENTS.names())}")
    same = rollout.get("env", "single_turn") == env
    if args.env_kwargs is not None:
        env_kwargs = _json_object("--env-kwargs", args.env_kwargs)
    else:
        env_kwargs = dict(rollout.get("env_kwargs") or {}) if same else {}
    if args.max_turns is not None:
        if args.max_turns < 1:
            raise ValueError(f"--max-turns: expected >= 1, got {args.max_turns}")
        max_turns = args.max_turns
    else:
        max_turns = (rollout.get("max_turns") or None) if same else None
    return env, env_kwargs, max_turns


def _probe_environment(env: str, env_kwargs: dict, task, args) -> None:
    """Build the environment once with the task, as the rollout will, so a wrong keyword argument
    or a task it cannot run (e.g. ``tool_use`` with a task without tools) fails in one line now."""
    from finegrain.envs import ENVIRONMENTS

    try:
        ENVIRONMENTS.get(env)(task=task, **env_kwargs)
    except (TypeError, ValueError) as err:
        where = "--env-kwargs" if env_kwargs and args.env_kwargs is not None else "--env"
        hint = "" if args.env else " (the run's rollout.env; --env single_turn evaluates single responses)"
        raise ValueError(f"{where}: environment '{env}' with task '{task.name}': {err}{hint}") from None


def _reward_kwargs(args, scorers: list[str]) -> dict[str, dict]:
    """Each scorer's keyword arguments: its registry ``eval_kwargs``, then ``--reward-kwargs``, then
    ``--beta`` (for the implicit PRM); every key and value checked against the reward's signature."""
    from finegrain.eval.scoring import check_scorer, scorer_kwargs

    given: dict = {}
    if args.reward_kwargs is not None:
        given = _json_object("--reward-kwargs", args.reward_kwargs, objects=True)
        if not all(isinstance(v, dict) for v in given.values()):
            raise ValueError("--reward-kwargs: expected a JSON object of objects, e.g. "
                             "'{\"step_labels\": {\"correct\": 1, \"wrong\": 0}}'")
    for name in given:
        check_scorer(name, "--reward-kwargs")
        if name not in scorers:
            raise ValueError(f"--reward-kwargs: '{name}' is not one of the scorers ({', '.join(scorers)})")
    given = {name: dict(given.get(name, {})) for name in scorers}
    if args.beta is not None and "implicit_prm" in given:
        if "beta" in given["implicit_prm"] and given["implicit_prm"]["beta"] != args.beta:
            raise ValueError("--beta: also set in --reward-kwargs implicit_prm.beta; give it once")
        given["implicit_prm"]["beta"] = args.beta
    return {name: scorer_kwargs(name, given[name], "--reward-kwargs") for name in scorers}


def _reward_context(args, task_name, task_kwargs, model_path, task, tok, model, prm_model, ref_model,
                    env="single_turn", env_kwargs=None, max_turns=None):
    """The ``RewardContext`` the scorers are built with, as in training: ``cfg`` describes this
    evaluation (task, sampling, environment, ``train.seed`` = ``--seed``, which seeds the random
    reward); ``policy`` is the PRM and ``initial_policy()`` its reference when one is loaded."""
    from finegrain.config import RunConfig
    from finegrain.train.stages import RewardContext

    cfg = RunConfig()
    cfg.model.path = model_path
    cfg.task.name, cfg.task.kwargs = task_name, dict(task_kwargs)
    cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k = args.temperature, args.top_p, args.top_k
    cfg.rollout.max_new_tokens = args.max_new_tokens
    cfg.rollout.env, cfg.rollout.env_kwargs = env, {k: v for k, v in (env_kwargs or {}).items() if k != "tokenizer"}
    cfg.rollout.max_turns = max_turns or 0
    cfg.train.seed = args.seed

    def initial_policy():
        if ref_model is None:
            raise ValueError("--prm-ref: no reference model is loaded (no scorer needs a PRM)")
        return ref_model
    return RewardContext(cfg, task, tok, prm_model if prm_model is not None else model, initial_policy)


def _set_threads(threads: int, model, device, log) -> None:
    """Apply ``--threads`` through ``finegrain.threads.configure_threads`` (0 = automatic: the
    CPUs other jobs leave free; docs/reliability.md has the measurements)."""
    from finegrain.threads import configure_threads

    n = configure_threads(threads or None)
    log(f"torch CPU threads: {n}")


def _has_prm(path: str) -> bool:
    """True if ``path`` is a run directory whose latest checkpoint holds an ``implicit_prm`` model."""
    from finegrain.train.checkpoint import latest_checkpoint

    p = Path(path)
    if not (p / "checkpoints" / "latest").is_file():
        return False
    ck = latest_checkpoint(p)
    return ck is not None and (ck / "implicit_prm" / "config.json").is_file()


def _summary(metrics: dict, out: Path, seconds: float, log) -> None:
    """Accuracy and the accuracy-against-N table, for the terminal."""
    curves = metrics["curves"]
    acc = metrics["accuracy"]
    log(f"accuracy {acc['mean']:.3f} [{acc['lo']:.3f}, {acc['hi']:.3f}] over {acc['n']} samples")
    head = "N".ljust(22) + "".join(f"{n:>8}" for n in curves["Ns"])
    log(head)
    rows = [(f"best-of-N {k}", v) for k, v in curves["bon"].items()]
    rows += [(f"vote {k}", v) for k, v in (curves.get("weighted_vote") or {}).items()]
    if curves.get("majority_vote"):
        rows.append(("majority vote", curves["majority_vote"]))
    for label, ys in rows:
        log(label[:22].ljust(22) + "".join(f"{y:8.3f}" for y in ys))
    log(f"report: {out / 'report.html'}   metrics: {out / 'metrics.json'}   ({seconds:.0f}s)")
