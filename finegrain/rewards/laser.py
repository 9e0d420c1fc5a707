"""LASER, LASER-D and LASER-DE: length-based step rewards for efficient reasoning (outcome level).

"Learn to Reason Efficiently with Adaptive Length-based Reward Shaping" (2025),
arXiv:2505.15612. Reference code checked: hkust-nlp/Laser @ 78b09ddaa236a7589c5a842cbfed4aa832cd6d0a,
``verl/utils/reward_score/length_penalty.py`` (``compute_length_reward_larse{,_d,_de}``,
``_choose_target_length``), ``count_length_distribution.py`` (``_calculate_length_coverage_statistics``,
``count_accuracy_bands_metrics``), ``constants.py`` (``get_length_threshold``),
``compute_unique_tokens.py`` and ``verl/trainer/ppo/ray_trainer.py`` (when the monitor runs).

The "step" is a step function of the response length L(y) = Σ_t response_mask[t] (real tokens,
EOS included), not a reasoning step. With c(y) = 1 when ``task.verify`` gives 1:

    base(y) = wrong + (correct − wrong) · verify(y)                   (defaults 1.0 / −0.5)
    LASER     reward:  r = base + α·[c ∧ L ≤ L_T]
              penalty: r = base − α·[c ∧ L > L_T]
              hybrid:  r = base + α·[c ∧ L ≤ L_T] − α·[c ∧ L > L_T]
    LASER-D   the same with L_T = L_T(band(y)), the band of y's group from its accuracy
              acc_g = (1/n_g) Σ_{j∈g} c_j:  high if acc_g ≥ 2/3, medium if 1/3 ≤ acc_g < 2/3, low otherwise
    LASER-DE  r = base + α·[c ∧ L ≤ L_T(band)] + α·[¬c ∧ L > L_T(band) ∧ ¬repeated(y)]

Adaptive target per band (``choose_targets``), over the responses R_b of band b in the monitor
statistics and the threshold grid {lower_bound, lower_bound + interval, …} ∩ [·, upper_bound]:

    coverage_b(ℓ) = |{y ∈ R_b : L(y) ≤ ℓ}| / |R_b|
    lower_n = ⌊2G/3⌋ (high), ⌊G/3⌋ (medium), 1 (low)           G = rollouts per prompt
    L_T(b) = min{ℓ in the grid : ℓ < L_max and ⌊coverage_b(ℓ) · lower_n⌋ ≥ expected_correct}, else L_max

(a band whose questions have at least ``lower_n`` of G right should keep ``expected_correct``
of them within the target). L_max is ``rollout.max_new_tokens``.

Departures from the reference code (numbered; the docs page repeats them):
 1. No monitor set. The reference re-samples a fixed 500-prompt monitor set before training and
    every ``monitor_freq`` steps; finegrain has none, so the coverage statistics come from the
    responses this signal scored in its last ``monitor_every`` calls (one call = one batch; with
    refill rounds and LASER-D as ``filters.outcome`` every round is a call). The targets are
    recomputed from that window every ``monitor_every`` calls; the first batch seeds them from
    itself (the analogue of the reference's monitor run before step 1). The window only sees
    rows that reached the signal (after filters, when another signal is the outcome).
 2. Bands use one boundary rule for both the statistics and the reward (acc ≥ 2/3 high,
    ≥ 1/3 medium). The reference's monitor uses acc ≤ 1/3 low, ≤ 2/3 medium; the two agree for
    G = 8 (no k/8 equals 1/3 or 2/3) but not for e.g. G = 3 or 6.
 3. The coverage rule is evaluated in exact integer arithmetic (covered · lower_n ≥
    expected · |R_b|), the reference in floats (``int(ratio * lower_n)``); only ``round_method=floor``
    (the reference default) is implemented.
 4. L_max is ``rollout.max_new_tokens``; the reference falls back to the longest response of the
    current batch. Every response is ≤ both, so the rewards are the same; only the logged target
    differs.
 5. The grid is lower_bound + k·interval up to upper_bound inclusive. The reference's
    ``get_length_threshold`` prepends a lone lower bound under 1024 and can overshoot the upper
    bound when the range is not a multiple of the interval. Defaults scale the reference
    l4096 scripts (4096, 1024, 16384 for 16384 new tokens) to ``max_new_tokens`` M:
    lower ⌊M/4⌋, interval ⌊M/16⌋, upper M (at least 1 each); for arith (M = 48): 12, 3, 48.
    LASER's fixed L_T defaults to ⌊M/2⌋ (the reference runs use M/8, M/4, M/2).
 6. Base score: finegrain's ``verify`` has no format verdict, so there is no −1.0 "no \\boxed"
    score; values between 0 and 1 interpolate between ``wrong`` and ``correct``, and only
    verify = 1 counts as correct for the length terms and the group accuracy.
 7. LASER-DE's exploration bonus goes to wrong responses that are not truncated; the reference
    gives it to wrong responses with a parsed answer (score −0.5, not the −1.0 of a missing
    answer, which covers clipped responses). Repetition is "some token n-gram of the response
    occurs ≥ ``ngram_repeats`` times" (defaults n = 4, 3 times); the reference's
    ``detect_token_ngram_repetition_optimized_reversed`` picks n ∈ {2, 3, 4} and a count of 2 or 3
    from the length and requires the occurrences to be close, which would flag nearly every
    arith response (carried values repeat by design). Like the reference, LASER-DE ignores the
    reward/penalty/hybrid variant (reward only).
 8. The window state (``state_dict``/``load_state_dict``) is saved with every checkpoint
    (registered ``stateful=True``; ``train/loop.py`` stores it under ``reward_state``), so a
    resumed run continues with the same window and targets. The reference keeps its monitor
    metrics in memory and re-runs the monitor on resume.
"""

from __future__ import annotations

from collections import deque

import torch

from finegrain.masked import group_sum
from finegrain.rewards.base import REWARDS, RewardOutput
from finegrain.shapes import check_mask, check_shapes

BANDS = ("low", "medium", "high")
VARIANTS = ("reward", "penalty", "hybrid")


def _fail(field: str, why: str) -> None:
    raise ValueError(f"{field}: {why}")


# ----------------------------------------------------------------------------- pure functions


def laser_bonus(correct: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, *, alpha: float,
                variant: str = "reward") -> torch.Tensor:
    """The LASER length term of each response.

        reward:  +α·[c ∧ L ≤ L_T];  penalty: −α·[c ∧ L > L_T];  hybrid: both

    Args: correct (B,) bool; lengths (B,) long; targets (B,) long, each row's L_T.
    Returns: (B,) float32.

    >>> laser_bonus(torch.tensor([True, True, False]), torch.tensor([3, 9, 2]), torch.tensor([5, 5, 5]),
    ...             alpha=0.5, variant="hybrid").tolist()
    [0.5, -0.5, 0.0]
    """
    check_shapes(correct=(correct, ("B",)), lengths=(lengths, ("B",)), targets=(targets, ("B",)))
    check_mask("laser_bonus.correct", correct)
    if variant not in VARIANTS:
        _fail("laser.variant", f"expected one of {' | '.join(VARIANTS)}, got {variant!r}")
    within = lengths <= targets
    up = (correct & within).float()
    down = (correct & ~within).float()
    if variant == "reward":
        return alpha * up
    if variant == "penalty":
        return -alpha * down
    return alpha * (up - down)


def difficulty_bands(correct: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Each row's difficulty band from its group's accuracy: 2 = high (acc ≥ 2/3), 1 = medium
    (1/3 ≤ acc < 2/3), 0 = low. Compared exactly: 3·k ≥ 2·n, 3·k ≥ n (k right of n in the group).

    Args: correct (B,) bool; group_ids (B,) long (rows of a group need not be contiguous).
    Returns: (B,) long in {0, 1, 2}.

    >>> difficulty_bands(torch.tensor([True, True, False, False, False, True]), torch.tensor([0, 0, 0, 1, 1, 1])).tolist()
    [2, 2, 2, 1, 1, 1]
    """
    check_shapes(correct=(correct, ("B",)), group_ids=(group_ids, ("B",)))
    k, n = group_sum(correct.double(), group_ids)  # exact small integers in float64
    k, n = k.round().long(), n.round().long()
    return (3 * k >= n).long() + (3 * k >= 2 * n).long()


def band_lower_n(group_size: int) -> torch.Tensor:
    """(3,) long: lower_n for (low, medium, high) = (1, ⌊G/3⌋, ⌊2G/3⌋)."""
    return torch.tensor([1, group_size // 3, (2 * group_size) // 3], dtype=torch.long)


def length_grid(lower_bound: int, interval: int, upper_bound: int, *, where: str = "laser_d") -> list[int]:
    """Candidate targets lower_bound, lower_bound + interval, … ≤ upper_bound (errors name ``where``).

    >>> length_grid(12, 3, 24)
    [12, 15, 18, 21, 24]
    """
    if lower_bound < 1:
        _fail(f"{where}.lower_bound", f"expected ≥ 1, got {lower_bound}")
    if interval < 1:
        _fail(f"{where}.interval", f"expected ≥ 1, got {interval}")
    if upper_bound < lower_bound:
        _fail(f"{where}.upper_bound", f"expected ≥ lower_bound ({lower_bound}), got {upper_bound}")
    return list(range(lower_bound, upper_bound + 1, interval))


def choose_targets(lengths: torch.Tensor, bands: torch.Tensor, *, thresholds: list[int], group_size: int,
                   max_length: int, expected_correct: int = 1) -> torch.Tensor:
    """LASER-D's adaptive target per band from the responses' lengths and bands (module docstring):

        L_T(b) = min{ℓ ∈ thresholds : ℓ < L_max, covered_b(ℓ) · lower_n(b) ≥ expected · N_b}, else L_max

    with covered_b(ℓ) = #{band-b responses with L ≤ ℓ} and N_b = #{band-b responses}; an empty
    band gets L_max (the reference's coverage of an empty band is 0).

    Args: lengths (N,) long; bands (N,) long in {0, 1, 2} (any N ≥ 0, e.g. a window of batches).
    Returns: (3,) long targets for (low, medium, high).

    >>> choose_targets(torch.tensor([4, 6, 9, 20]), torch.tensor([2, 2, 2, 2]), thresholds=[5, 10, 15],
    ...                group_size=8, max_length=24).tolist()   # high: lower_n 5, needs coverage ≥ 1/5
    [24, 24, 5]
    """
    check_shapes(lengths=(lengths, ("N",)), bands=(bands, ("N",)))
    thr = torch.as_tensor(thresholds, dtype=torch.long)                       # (K,)
    member = bands.cpu()[:, None] == torch.arange(3)                          # (N, 3)
    within = lengths.cpu()[:, None] <= thr[None]                              # (N, K)
    covered = (member[:, :, None] & within[:, None, :]).sum(0)                # (3, K)
    total = member.sum(0)                                                     # (3,)
    lower_n = band_lower_n(group_size)                                        # (3,)
    ok = (covered * lower_n[:, None] >= expected_correct * total[:, None]) & (total[:, None] > 0) & (thr[None] < max_length)
    cand = torch.where(ok, thr[None].expand(3, -1), torch.full_like(covered, max_length))  # (3, K)
    return cand.min(1).values if thr.numel() else torch.full((3,), max_length, dtype=torch.long)


def has_ngram_repetition(ids: torch.Tensor, mask: torch.Tensor, *, n: int, repeats: int) -> torch.Tensor:
    """True for rows where some n-gram of the real tokens occurs ≥ ``repeats`` times
    (overlapping occurrences count; n-grams are taken over the real tokens in order, so tokens
    under a False mask never take part).

    Args: ids (B, L) long; mask (B, L) bool, True = real token.
    Returns: (B,) bool.

    >>> ids = torch.tensor([[1, 2, 1, 2, 1, 2, 0], [1, 2, 3, 4, 5, 6, 7]])
    >>> has_ngram_repetition(ids, ids > 0, n=2, repeats=3).tolist()   # (1, 2) occurs three times
    [True, False]
    """
    check_shapes(ids=(ids, ("B", "L")), mask=(mask, ("B", "L")))
    check_mask("has_ngram_repetition.mask", mask)
    B, L = ids.shape
    out = torch.zeros(B, dtype=torch.bool, device=ids.device)
    if L < n or B == 0:
        return out
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices   # real tokens first, in order
    packed = ids.gather(1, order)                                             # (B, L)
    windows = packed.unfold(1, n, 1)                                          # (B, W, n), W = L − n + 1
    W = windows.shape[1]
    valid = torch.arange(W, device=ids.device)[None] + n <= mask.sum(1, keepdim=True)  # (B, W)
    if not valid.any():
        return out
    rows = torch.arange(B, device=ids.device)[:, None].expand(B, W)[valid]   # (N,)
    keyed = torch.cat([rows[:, None], windows[valid]], 1)                     # (N, n + 1): (row, n-gram)
    _, inverse, counts = torch.unique(keyed, dim=0, return_inverse=True, return_counts=True)
    most = torch.zeros(B, dtype=torch.long, device=ids.device).scatter_reduce(0, rows, counts[inverse], reduce="amax")
    return most >= repeats


# ----------------------------------------------------------------------------- signals


class _LaserBase:
    """What the three signals share: the verifier, the base score, the output."""

    level = "outcome"

    def __init__(self, task, *, alpha: float, correct: float, wrong: float):
        if not alpha >= 0:
            _fail(f"{self.name}.alpha", f"expected a number ≥ 0, got {alpha}")
        self.task, self.alpha, self.correct, self.wrong = task, alpha, correct, wrong

    def _verify(self, traj) -> torch.Tensor:
        return torch.tensor([self.task.verify(ex, text) for ex, text in zip(traj.examples, traj.response_texts)],
                            dtype=torch.float32, device=traj.response_ids.device)

    def _output(self, acc: torch.Tensor, bonus: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                **extra: torch.Tensor) -> RewardOutput:
        values = self.wrong + (self.correct - self.wrong) * acc + bonus
        comps = {"accuracy": acc, "length": lengths.float(), "target": targets.float(),
                 "within_target": (lengths <= targets).float(), "bonus": bonus, **extra}
        return RewardOutput(values=values, mask=torch.ones_like(values, dtype=torch.bool), level="outcome",
                            components=comps)


_COMMON_BOUNDS = {"alpha": "[0, inf)"}


@REWARDS.register("laser", level="outcome", needs="verify", bounds={**_COMMON_BOUNDS, "target_length": "[1, inf)"},
                  choices={"variant": VARIANTS})
class Laser(_LaserBase):
    """LASER with a fixed target L_T (module docstring). Components: accuracy, length, target,
    within_target (fraction of rows with L ≤ L_T), bonus (the length term)."""

    name = "laser"

    def __init__(self, task, *, target_length: int, alpha: float = 0.5, variant: str = "reward",
                 correct: float = 1.0, wrong: float = -0.5):
        super().__init__(task, alpha=alpha, correct=correct, wrong=wrong)
        if target_length < 1:
            _fail("laser.target_length", f"expected ≥ 1, got {target_length}")
        if variant not in VARIANTS:
            _fail("laser.variant", f"expected one of {' | '.join(VARIANTS)}, got {variant!r}")
        self.target_length, self.variant = target_length, variant

    @classmethod
    def from_context(cls, ctx, *, target_length: int | None = None, alpha: float = 0.5, variant: str = "reward",
                     correct: float = 1.0, wrong: float = -0.5):
        target = target_length if target_length is not None else max(1, ctx.cfg.rollout.max_new_tokens // 2)
        return cls(ctx.task, target_length=target, alpha=alpha, variant=variant, correct=correct, wrong=wrong)

    def __call__(self, traj) -> RewardOutput:
        acc = self._verify(traj)                                              # (B,)
        lengths = traj.response_mask.sum(1)                                   # (B,)
        targets = torch.full_like(lengths, self.target_length)
        bonus = laser_bonus(acc >= 1.0, lengths, targets, alpha=self.alpha, variant=self.variant)
        return self._output(acc, bonus, lengths, targets)


_D_BOUNDS = {**_COMMON_BOUNDS, "lower_bound": "[1, inf)", "interval": "[1, inf)", "upper_bound": "[1, inf)",
             "monitor_every": "[1, inf)", "group_size": "[1, inf)", "expected_correct": "[1, inf)"}


@REWARDS.register("laser_d", level="outcome", needs="verify", stateful=True, bounds=_D_BOUNDS, choices={"variant": VARIANTS})
class LaserD(_LaserBase):
    """LASER-D: LASER with a target per difficulty band, chosen from the lengths of the last
    ``monitor_every`` batches (module docstring, departure 1).

    State (``state_dict``): the call count, the current targets (low, medium, high) and the
    window of (lengths, bands) per batch. Components: accuracy, length, target (each row's
    band target), within_target, bonus, target_low / target_medium / target_high (the band
    targets used for this batch), band_low / band_medium / band_high (fraction of rows per band).
    """

    name = "laser_d"

    def __init__(self, task, *, max_length: int, lower_bound: int, interval: int, upper_bound: int,
                 group_size: int, alpha: float = 0.5, variant: str = "reward", correct: float = 1.0,
                 wrong: float = -0.5, monitor_every: int = 20, expected_correct: int = 1):
        super().__init__(task, alpha=alpha, correct=correct, wrong=wrong)
        if variant not in VARIANTS:
            _fail(f"{self.name}.variant", f"expected one of {' | '.join(VARIANTS)}, got {variant!r}")
        for field, v in (("max_length", max_length), ("monitor_every", monitor_every), ("group_size", group_size),
                         ("expected_correct", expected_correct)):
            if v < 1:
                _fail(f"{self.name}.{field}", f"expected ≥ 1, got {v}")
        self.thresholds = length_grid(lower_bound, interval, upper_bound, where=self.name)
        self.max_length, self.group_size, self.variant = max_length, group_size, variant
        self.monitor_every, self.expected_correct = monitor_every, expected_correct
        self.calls = 0
        self.targets: torch.Tensor | None = None                              # (3,) long, None before the first batch
        self.window: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=monitor_every)

    @classmethod
    def _grid_from_context(cls, ctx, lower_bound, interval, upper_bound) -> dict:
        M = ctx.cfg.rollout.max_new_tokens
        return dict(max_length=M, lower_bound=lower_bound if lower_bound is not None else max(1, M // 4),
                    interval=interval if interval is not None else max(1, M // 16),
                    upper_bound=upper_bound if upper_bound is not None else M)

    @classmethod
    def from_context(cls, ctx, *, alpha: float = 0.5, variant: str = "reward", correct: float = 1.0,
                     wrong: float = -0.5, lower_bound: int | None = None, interval: int | None = None,
                     upper_bound: int | None = None, monitor_every: int = 20, group_size: int | None = None,
                     expected_correct: int = 1):
        return cls(ctx.task, **cls._grid_from_context(ctx, lower_bound, interval, upper_bound),
                   group_size=group_size or ctx.cfg.rollout.group_size, alpha=alpha, variant=variant,
                   correct=correct, wrong=wrong, monitor_every=monitor_every, expected_correct=expected_correct)

    # ---- the monitor window
    def _refresh(self) -> None:
        lengths = torch.cat([w[0] for w in self.window]) if self.window else torch.zeros(0, dtype=torch.long)
        bands = torch.cat([w[1] for w in self.window]) if self.window else torch.zeros(0, dtype=torch.long)
        self.targets = choose_targets(lengths, bands, thresholds=self.thresholds, group_size=self.group_size,
                                      max_length=self.max_length, expected_correct=self.expected_correct)

    def _remember(self, lengths: torch.Tensor, bands: torch.Tensor) -> None:
        self.window.append((lengths.detach().cpu().long().clone(), bands.detach().cpu().long().clone()))
        self.calls += 1
        if self.calls % self.monitor_every == 0:
            self._refresh()

    def state_dict(self) -> dict:
        """Plain values only (ints, lists, CPU tensors): loads with ``torch.load(weights_only=True)``."""
        return {"calls": self.calls, "targets": [] if self.targets is None else self.targets.tolist(),
                "window_lengths": [w[0].clone() for w in self.window], "window_bands": [w[1].clone() for w in self.window]}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output; the window keeps at most ``monitor_every`` batches."""
        want = {"calls", "targets", "window_lengths", "window_bands"}
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        if not isinstance(state, dict) or set(state) != want:
            _fail(f"{self.name}.load_state_dict", f"expected keys {sorted(want)}, got {got}")
        if len(state["targets"]) not in (0, 3) or len(state["window_lengths"]) != len(state["window_bands"]):
            _fail(f"{self.name}.load_state_dict", "targets must hold 0 or 3 values and the window lists match in length")
        self.calls = int(state["calls"])
        self.targets = torch.tensor(state["targets"], dtype=torch.long) if state["targets"] else None
        pairs = zip(state["window_lengths"], state["window_bands"])
        self.window = deque(((torch.as_tensor(a, dtype=torch.long).clone(), torch.as_tensor(b, dtype=torch.long).clone())
                             for a, b in pairs), maxlen=self.monitor_every)

    # ---- scoring
    def _bands_and_targets(self, traj, correct: torch.Tensor, lengths: torch.Tensor):
        bands = difficulty_bands(correct, traj.group_ids)                     # (B,)
        if self.targets is None:  # first batch: seed the targets from its own lengths (departure 1)
            self.targets = choose_targets(lengths, bands, thresholds=self.thresholds, group_size=self.group_size,
                                          max_length=self.max_length, expected_correct=self.expected_correct)
        used = self.targets.clone()                                           # (3,)
        targets = used.to(lengths.device)[bands]                              # (B,)
        return bands, used, targets

    def _band_components(self, bands: torch.Tensor, used: torch.Tensor) -> dict[str, torch.Tensor]:
        B = bands.shape[0]
        out = {f"target_{name}": torch.full((B,), float(used[i]), device=bands.device) for i, name in enumerate(BANDS)}
        out |= {f"band_{name}": (bands == i).float() for i, name in enumerate(BANDS)}
        return out

    def __call__(self, traj) -> RewardOutput:
        acc = self._verify(traj)                                              # (B,)
        correct, lengths = acc >= 1.0, traj.response_mask.sum(1)              # (B,), (B,)
        bands, used, targets = self._bands_and_targets(traj, correct, lengths)
        bonus = laser_bonus(correct, lengths, targets, alpha=self.alpha, variant=self.variant)
        self._remember(lengths, bands)
        return self._output(acc, bonus, lengths, targets, **self._band_components(bands, used))


@REWARDS.register("laser_de", level="outcome", needs="verify", stateful=True,
                  bounds={**_D_BOUNDS, "ngram": "[1, inf)", "ngram_repeats": "[2, inf)"})
class LaserDE(LaserD):
    """LASER-DE: LASER-D (reward variant) plus +α for wrong, untruncated responses longer than
    their band target without token n-gram repetition (module docstring, departure 7).

    Extra components: explore (fraction of rows given the exploration bonus), repeated
    (fraction of rows checked for repetition and found repeating).
    """

    name = "laser_de"

    def __init__(self, task, *, ngram: int = 4, ngram_repeats: int = 3, **kw):
        super().__init__(task, variant="reward", **kw)
        if ngram < 1:
            _fail("laser_de.ngram", f"expected ≥ 1, got {ngram}")
        if ngram_repeats < 2:
            _fail("laser_de.ngram_repeats", f"expected ≥ 2, got {ngram_repeats}")
        self.ngram, self.ngram_repeats = ngram, ngram_repeats

    @classmethod
    def from_context(cls, ctx, *, alpha: float = 0.5, correct: float = 1.0, wrong: float = -0.5,
                     lower_bound: int | None = None, interval: int | None = None, upper_bound: int | None = None,
                     monitor_every: int = 20, group_size: int | None = None, expected_correct: int = 1,
                     ngram: int = 4, ngram_repeats: int = 3):
        return cls(ctx.task, **cls._grid_from_context(ctx, lower_bound, interval, upper_bound),
                   group_size=group_size or ctx.cfg.rollout.group_size, alpha=alpha, correct=correct, wrong=wrong,
                   monitor_every=monitor_every, expected_correct=expected_correct, ngram=ngram,
                   ngram_repeats=ngram_repeats)

    def __call__(self, traj) -> RewardOutput:
        acc = self._verify(traj)                                              # (B,)
        correct, lengths = acc >= 1.0, traj.response_mask.sum(1)              # (B,), (B,)
        bands, used, targets = self._bands_and_targets(traj, correct, lengths)
        bonus = laser_bonus(correct, lengths, targets, alpha=self.alpha, variant="reward")
        check = ~correct & ~traj.truncated & (lengths > targets)              # (B,) rows eligible for exploration
        repeated = torch.zeros_like(check)
        rows = check.nonzero().flatten()
        if rows.numel():
            repeated[rows] = has_ngram_repetition(traj.response_ids[rows], traj.response_mask[rows],
                                                  n=self.ngram, repeats=self.ngram_repeats)
        explore = check & ~repeated
        bonus = bonus + self.alpha * explore.float()
        self._remember(lengths, bands)
        return self._output(acc, bonus, lengths, targets, explore=explore.float(), repeated=repeated.float(),
                            **self._band_components(bands, used))
