"""Think-RM: a generative judge reasons, then prefers one of two responses; every pair of a
prompt's samples is judged once and the verdicts become one advantage per response.

Registered in ``REWARDS`` as ``think_rm``, level ``outcome``: values (B,) are the normalised
Think-RM advantages A_i, to be trained with the ``passthrough`` estimator (``advantage.name:
passthrough``, ``whiten: false``, weight 1), which puts A_i on every trained token unchanged.

For each group (``group_ids``, any order) of G rows and every unordered pair i < j (row order,
i as A, j as B, no order swap), the judge gets the question and the two responses, thinks, and
writes ``<answer>…</answer>``. ``parse_preference`` reads the verdict exactly as Think-RM does:

    the LAST <answer>(.*?)</answer> block (DOTALL), stripped; then
    binary:     the last match of (A|B) in it       → score −1 (A) or +1 (B)
    multiclass: the last match of (-3|-2|-1|1|2|3)  → score in {−3, −2, −1, 1, 2, 3}
                (negative = A better: −3 much better, −2 better, −1 slightly better)
    no block or no match → None → score 0, counted in the component ``unparsable``

Then, with ``finegrain.credit.pairwise.pairwise_advantage``::

    d_ij = −score_ij                         (d_ij > 0: i is better; binary A → +1, B → −1)
    D[i, j] = d_ij,  D[j, i] = −d_ij,  D[i, i] = 0
    A_i = ((1/G) Σ_j D[i, j]) / sqrt( Σ_{j,k} D[j, k]² / (2 G (G − 1)) + ε ),   ε = ``eps`` = 1e-6

If D[j, k] = r_j − r_k, A_i = (r_i − mean r) / sqrt(var_unbiased r + ε), GRPO's advantage; the
``rule`` backend below is such a judge on a verified task (binary: d_ij = r_i − r_j exactly).

Why the signal returns A_i rather than a per-row reward for an estimator: the normaliser
Σ_{j,k} D[j, k]² needs the whole matrix, and an estimator receives one reward per row, from which
it cannot be recovered. So the signal does the group maths (a pure function in ``credit/``) and
the estimator passes it through. Filters run before scoring, so the groups are the rows that are
trained.

Backends (``backend``), judge.py's, with its cache (``cached_generate``):

    rule     the task's ``verify`` (exact on ``arith``): the judge writes a short <think> and
             prefers the response that verifies higher; binary <answer>A</answer> / B,
             multiclass ∓max(1, ceil(3·|r_A − r_B|)) (±3 for right vs wrong); equal scores →
             <answer>tie</answer>, which §25d parses as None → 0, counted as ``ties``, not as
             ``unparsable``
    hf       a local model through finegrain's HF sampler (the frozen starting policy, or
             ``model_path``)
    openai   an OpenAI-compatible server (``base_url``, ``model``, ``api_key_env``, ...)

Components (per row, for logging): ``unparsable``, ``ties``, ``cache_hits`` (of the row's G − 1
verdicts, as A or as B: each verdict counts on both its rows), ``wins`` (pairs the row won,
D[i, j] > 0), ``preference`` ((1/G) Σ_j D[i, j], A_i's numerator).

Sources (docs/methods.md §25d): IlgeeHong/Think-RM @2976ace75afac0573cdf38967f733c007f3062be,
PairwiseRLHF/verl/utils/reward_score/call_gen_prm_{binary,multiclass}.py (extract_*_strict: the
parsing; temperature 0.6, max 2048 tokens; unparsable → 0), PairwiseRLHF/verl/workers/
reward_manager/batch_pref.py (pairs i < j per uid, d_ij = −score), PairwiseRLHF/verl/trainer/ppo/
core_algos.py::compute_grpo_difference_advantage (A_i), EvalGenRM/prompt_templates.py
(NaiveReasoning{Binary,Multiclass}PromptTemplate: six criteria, the verdict format).

Departures:
1. Binary verdicts score ∓1. The reference's binary scorer returns ∓1/len(judge_text), so a
   pair's weight depends on how long the judge wrote — a quirk, not kept.
2. G is the group's number of rows in the batch, not the configured group size (the reference
   raises unless every group is full); a group of one gives 0, not a division by zero.
3. One user message holds the instructions and both responses (the reference sends the six
   criteria as a system message), and nothing is pre-filled: Think-RM's chat template pre-fills
   "<think>\\n"; here the prompt asks for the <think> block. Only <answer> is parsed either way.
4. The rule backend's ``tie`` verdict is an addition for exact ties (Think-RM has no tie); its
   score is the one §25d gives it (0), only the counter differs.
5. Verdicts are cached by (backend, prompt) like the judge's; with ``temperature`` > 0 a cached
   verdict is reused rather than drawn again.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from finegrain.credit.pairwise import group_pairs, pairwise_advantage
from finegrain.rewards.base import REWARDS, RewardOutput
from finegrain.rewards.judge import cached_generate, model_backend
from finegrain.sampling import SamplingParams

MODES = ("binary", "multiclass")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_CHOICE = {"binary": re.compile(r"(A|B)"), "multiclass": re.compile(r"(-3|-2|-1|1|2|3)")}

_HEAD = ("You are an impartial judge. Compare the two responses to the question below on helpfulness, "
         "correctness, coherence, complexity, verbosity and safety.\n\n"
         "[Question]\n{prompt}\n\n[Response A]\n{response_a}\n\n[Response B]\n{response_b}\n\n"
         "First reason step by step inside <think></think>. ")
TEMPLATES = {
    "binary": _HEAD + ("Then give your verdict inside <answer></answer>: <answer>A</answer> if response A is "
                       "better, <answer>B</answer> if response B is better."),
    "multiclass": _HEAD + ("Then give your score inside <answer></answer> on this scale: -3 if A is much better "
                           "than B, -2 if A is better, -1 if A is slightly better, 1 if B is slightly better, "
                           "2 if B is better, 3 if B is much better."),
}


def parse_preference(text: str, mode: str) -> int | None:
    """Think-RM's score of a verdict (negative = A better), or None when it cannot be parsed.

    >>> parse_preference("<think>B looks off.</think><answer>A</answer>", "binary")
    -1
    >>> parse_preference("<answer>-2</answer> wait <answer> 3 </answer>", "multiclass")  # the LAST block
    3
    >>> parse_preference("<answer>B is worse than A</answer>", "binary")  # the last (A|B) match in it
    -1
    >>> parse_preference("A is better", "binary") is None  # no <answer> block
    True
    """
    if mode not in MODES:
        raise ValueError(f"think_rm: mode must be 'binary' or 'multiclass', got '{mode}'")
    blocks = _ANSWER.findall(text)
    if not blocks:
        return None
    matches = _CHOICE[mode].findall(blocks[-1].strip())
    if not matches:
        return None
    if mode == "binary":
        return -1 if matches[-1] == "A" else 1
    return int(matches[-1])


def is_tie(text: str) -> bool:
    """The rule backend's tie: the last <answer> block is ``tie`` (for counting only; it parses to None)."""
    blocks = _ANSWER.findall(text)
    return bool(blocks) and blocks[-1].strip().lower() == "tie"


def rule_verdict(r_a: float, r_b: float, mode: str) -> str:
    """The rule judge's text for verifier scores r_A, r_B ∈ [0, 1]: a short <think>, then the verdict.

    >>> rule_verdict(1.0, 0.0, "multiclass")
    '<think>\\nA scores 1 and B scores 0 under the task verifier, so A is better.\\n</think>\\n<answer>-3</answer>'
    """
    if r_a == r_b:
        return (f"<think>\nA and B both score {r_a:g} under the task verifier: neither is better.\n</think>\n"
                "<answer>tie</answer>")
    better = "A" if r_a > r_b else "B"
    think = f"<think>\nA scores {r_a:g} and B scores {r_b:g} under the task verifier, so {better} is better.\n</think>\n"
    if mode == "binary":
        return think + f"<answer>{better}</answer>"
    magnitude = min(3, max(1, math.ceil(3 * abs(r_a - r_b))))
    return think + f"<answer>{-magnitude if better == 'A' else magnitude}</answer>"


@dataclass(frozen=True)
class PairRequest:
    """One comparison: the judge's prompt text, and the fields a rule backend reads."""

    prompt: str
    example: Any
    response_a: str
    response_b: str


class PairRuleJudge:
    """The exact pairwise judge for a task with a rule verifier: ``rule_verdict`` of the two
    responses' ``task.verify`` scores."""

    key = "rule"

    def __init__(self, task, mode: str):
        self.task, self.mode = task, mode

    def generate(self, requests: Sequence[PairRequest]) -> list[str]:
        scores: dict[tuple[int, str], float] = {}  # a response appears in G − 1 pairs

        def score(example, response: str) -> float:
            key = (id(example), response)
            if key not in scores:
                scores[key] = float(self.task.verify(example, response))
            return scores[key]

        return [rule_verdict(score(q.example, q.response_a), score(q.example, q.response_b), self.mode)
                for q in requests]


@REWARDS.register("think_rm", level="outcome", needs_groups=True,
                  bounds={"max_new_tokens": "[1, inf)", "temperature": "[0, inf)", "timeout": "(0, inf)",
                          "max_retries": "[0, 100]", "max_concurrency": "[1, 256]", "batch_size": "[1, inf)",
                          "cache_size": "[0, inf)", "eps": "(0, inf)"},
                  choices={"backend": ("rule", "hf", "openai"), "mode": MODES, "endpoint": ("chat", "completions")})
class ThinkRM:
    """Think-RM's pairwise advantage per response; see the module docstring.

    Keyword args (``rewards[i].kwargs``, defaults in ``from_context``):
        backend: 'rule' | 'hf' | 'openai'.  mode: 'binary' | 'multiclass'.
        model_path (hf): a model directory; "" = the frozen starting policy.
        base_url, model, endpoint, api_key_env, timeout, max_retries, max_concurrency (openai): the
            server, as judge.py's ``openai`` backend takes them.
        temperature, max_new_tokens, seed: how the judge samples (Think-RM: 0.6, 2048).
        batch_size: unique prompts per backend call.  cache_size: cached verdicts (0 = none).
        eps: ε under the square root of the normaliser.
    """

    name = "think_rm"
    level = "outcome"

    def __init__(self, backend, *, mode: str = "binary", eps: float = 1e-6, batch_size: int = 16,
                 cache_size: int = 65_536):
        if mode not in MODES:
            raise ValueError(f"think_rm: mode must be 'binary' or 'multiclass', got '{mode}'")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"think_rm: eps must be a finite number > 0, got {eps!r}")
        self.backend, self.mode, self.eps = backend, mode, float(eps)
        self.batch_size, self.cache_size = int(batch_size), int(cache_size)
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()

    @classmethod
    def from_context(cls, ctx, *, backend: str = "rule", mode: str = "binary", model_path: str = "",
                     base_url: str = "", model: str = "", endpoint: str = "chat", api_key_env: str = "OPENAI_API_KEY",
                     temperature: float = 0.6, max_new_tokens: int = 2048, timeout: float = 60.0,
                     max_retries: int = 2, max_concurrency: int = 4, batch_size: int = 16, cache_size: int = 65_536,
                     eps: float = 1e-6, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"think_rm: mode must be 'binary' or 'multiclass', got '{mode}'")
        if backend == "rule":
            if not getattr(ctx.task, "train_verifier", True):
                raise ValueError(f"think_rm: backend 'rule' compares with task '{ctx.task.name}''s verify, which is "
                                 "for evaluation only (train_verifier = False); use backend hf or openai")
            judge = PairRuleJudge(ctx.task, mode)
        else:
            params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, logprobs=False)
            judge = model_backend(ctx, backend, params, where="think_rm", model_path=model_path, base_url=base_url,
                                  model=model, endpoint=endpoint, api_key_env=api_key_env, timeout=timeout,
                                  max_retries=max_retries, max_concurrency=max_concurrency, seed=seed)
        return cls(judge, mode=mode, eps=eps, batch_size=batch_size, cache_size=cache_size)

    def prompt_for(self, example, response_a: str, response_b: str) -> str:
        """The comparison prompt (``TEMPLATES[mode]``); texts are right-stripped as in Think-RM."""
        return TEMPLATES[self.mode].format(prompt=example.prompt.rstrip(), response_a=response_a.rstrip(),
                                           response_b=response_b.rstrip())

    def __call__(self, traj) -> RewardOutput:
        B = traj.batch_size
        group_ids = traj.group_ids.cpu()                                      # (B,)
        pairs = group_pairs(group_ids)                                        # (P, 2), i < j
        texts_r = traj.response_texts
        requests = [PairRequest(self.prompt_for(traj.examples[i], texts_r[i], texts_r[j]), traj.examples[i],
                                texts_r[i], texts_r[j]) for i, j in pairs.tolist()]
        texts, hits = cached_generate(self.backend, self._cache, requests, batch_size=self.batch_size,
                                      cache_size=self.cache_size)
        scores = [parse_preference(t, self.mode) for t in texts]
        d = torch.tensor([0.0 if s is None else -float(s) for s in scores], dtype=torch.float64)   # (P,) d_ij
        adv = pairwise_advantage(pairs, d, group_ids, eps=self.eps)          # (B,)

        def per_row(flags: torch.Tensor) -> torch.Tensor:                     # (P,) -> (B,), on both rows
            out = torch.zeros(B, dtype=torch.float64)
            return out.index_add_(0, pairs[:, 0], flags).index_add_(0, pairs[:, 1], flags)

        failed = torch.tensor([s is None for s in scores], dtype=torch.float64)              # (P,)
        ties = torch.tensor([s is None and is_tie(t) for s, t in zip(scores, texts)], dtype=torch.float64)
        wins = torch.zeros(B, dtype=torch.float64)
        wins.index_add_(0, pairs[:, 0], (d > 0).double()).index_add_(0, pairs[:, 1], (d < 0).double())
        _, inverse, counts = group_ids.unique(return_inverse=True, return_counts=True)
        row_sum = torch.zeros(B, dtype=torch.float64).index_add_(0, pairs[:, 0], d).index_add_(0, pairs[:, 1], -d)
        dev = traj.response_ids.device
        comps = {"unparsable": per_row(failed - ties), "ties": per_row(ties),
                 "cache_hits": per_row(torch.tensor(hits, dtype=torch.float64)), "wins": wins,
                 "preference": row_sum / counts[inverse].double()}
        return RewardOutput(adv.float().to(dev), torch.ones(B, dtype=torch.bool, device=dev), "outcome",
                            {k: v.float().to(dev) for k, v in comps.items()})
