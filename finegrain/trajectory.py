"""The one batch type every stage reads: a frozen ``Trajectory``.

Shapes use the notation of :mod:`finegrain.shapes`. Prompts are left-padded (so generation
continues from the last column), responses right-padded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from finegrain.shapes import check_mask, check_shapes


@dataclass(frozen=True)
class Trajectory:
    """A batch of sampled responses with everything credit assignment needs.

    Fields (B rows = prompts x G samples; rows of one group need not be contiguous):
        prompt_ids        (B, P) long   left-padded prompt tokens
        prompt_mask       (B, P) bool   True = real prompt token
        response_ids      (B, L) long   right-padded response tokens (EOS included when produced)
        response_mask     (B, L) bool   True = real response token
        loss_mask         (B, L) bool   True = the policy is trained on this token
                                        (tool / forced tokens and filtered rows are False)
        group_ids         (B,)   long   samples of one prompt share an id
        step_ids          (B, L) long   index of the step each token belongs to, −1 outside any step
        behavior_logprobs (B, L) float  log-prob of each token under the sampling policy (0 on padding)
        truncated         (B,)   bool   True = stopped by max_new_tokens, not by EOS
        prompt_texts      B strings; response_texts: B decoded responses (no special tokens)
        examples          B task examples (reference answer etc.) each row came from
        turn_ids          (B, L) long   turn index of each response token, −1 on padding; None = one
                                        turn (see ``turns``). Observation tokens carry the turn
                                        they answer.
        turn_rewards      (B, T) float  the environment's reward of each turn (0 where masked)
        turn_reward_mask  (B, T) bool   True = the environment gave turn k a reward
        turn_info         B lists, one dict per turn: what the environment reported about it
                          (``Observation.metadata``: tool name and arguments, errors, ...)
    Batches from ``finegrain.envs.build_trajectory`` always carry the turn fields.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    loss_mask: torch.Tensor
    group_ids: torch.Tensor
    step_ids: torch.Tensor
    behavior_logprobs: torch.Tensor
    truncated: torch.Tensor
    prompt_texts: list[str] = field(default_factory=list)
    response_texts: list[str] = field(default_factory=list)
    examples: list[Any] = field(default_factory=list)
    turn_info: list[Any] = field(default_factory=list)
    turn_ids: torch.Tensor | None = None
    turn_rewards: torch.Tensor | None = None
    turn_reward_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_shapes(
            prompt_ids=(self.prompt_ids, ("B", "P")),
            prompt_mask=(self.prompt_mask, ("B", "P")),
            response_ids=(self.response_ids, ("B", "L")),
            response_mask=(self.response_mask, ("B", "L")),
            loss_mask=(self.loss_mask, ("B", "L")),
            group_ids=(self.group_ids, ("B",)),
            step_ids=(self.step_ids, ("B", "L")),
            behavior_logprobs=(self.behavior_logprobs, ("B", "L")),
            truncated=(self.truncated, ("B",)),
            **({"turn_ids": (self.turn_ids, ("B", "L"))} if self.turn_ids is not None else {}),
            **({"turn_rewards": (self.turn_rewards, ("B", "T")), "turn_reward_mask": (self.turn_reward_mask, ("B", "T"))}
               if self.turn_rewards is not None else {}),
        )
        if (self.turn_rewards is None) != (self.turn_reward_mask is None):
            raise ValueError("Trajectory.turn_rewards and turn_reward_mask: give both or neither")
        for name in ("prompt_mask", "response_mask", "loss_mask", "truncated"):
            check_mask(name, getattr(self, name))
        if self.turn_reward_mask is not None:
            check_mask("turn_reward_mask", self.turn_reward_mask)
        B = self.prompt_ids.shape[0]
        for name in ("prompt_texts", "response_texts", "examples", "turn_info"):
            n = len(getattr(self, name))
            if n not in (0, B):
                raise ValueError(f"Trajectory.{name}: expected {B} entries, got {n}")

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt and response side by side, (B, P + L)."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + L) bool."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def replace(self, **changes: Any) -> "Trajectory":
        return dataclasses.replace(self, **changes)

    def select(self, rows: torch.Tensor | Sequence[int]) -> "Trajectory":
        """Rows ``rows`` (indices or a (B,) bool mask) as a new Trajectory."""
        rows = torch.as_tensor(rows)
        if rows.dtype == torch.bool:
            rows = rows.nonzero().flatten()
        idx = rows.tolist()
        tensors = {f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        lists = {f.name: [getattr(self, f.name)[i] for i in idx] if getattr(self, f.name) else []
                 for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), list)}
        return Trajectory(**tensors, **lists)

    def to(self, device: torch.device | str) -> "Trajectory":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    @property
    def turns(self) -> torch.Tensor:
        """(B, L) turn index of each response token (−1 on padding); all 0 for a single-turn batch."""
        if self.turn_ids is not None:
            return self.turn_ids
        return torch.where(self.response_mask, 0, -1)

    @property
    def num_steps(self) -> torch.Tensor:
        """(B,) number of steps in each response (max step id + 1)."""
        return (self.step_ids.max(dim=1).values + 1).clamp(min=0)


def concat(trajs: Sequence[Trajectory], pad_token_id: int) -> Trajectory:
    """Stack trajectories row-wise, re-padding prompts on the left and responses on the right."""
    P = max(t.prompt_ids.shape[1] for t in trajs)
    L = max(t.response_ids.shape[1] for t in trajs)

    def padl(x: torch.Tensor, width: int, value: Any) -> torch.Tensor:
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def padr(x: torch.Tensor, width: int, value: Any) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    return Trajectory(
        prompt_ids=torch.cat([padl(t.prompt_ids, P, pad_token_id) for t in trajs]),
        prompt_mask=torch.cat([padl(t.prompt_mask, P, False) for t in trajs]),
        response_ids=torch.cat([padr(t.response_ids, L, pad_token_id) for t in trajs]),
        response_mask=torch.cat([padr(t.response_mask, L, False) for t in trajs]),
        loss_mask=torch.cat([padr(t.loss_mask, L, False) for t in trajs]),
        group_ids=torch.cat([t.group_ids for t in trajs]),
        step_ids=torch.cat([padr(t.step_ids, L, -1) for t in trajs]),
        behavior_logprobs=torch.cat([padr(t.behavior_logprobs, L, 0.0) for t in trajs]),
        truncated=torch.cat([t.truncated for t in trajs]),
        prompt_texts=[s for t in trajs for s in t.prompt_texts],
        response_texts=[s for t in trajs for s in t.response_texts],
        examples=[e for t in trajs for e in t.examples],
        turn_info=[i for t in trajs for i in (t.turn_info or [[] for _ in range(t.batch_size)])]
        if any(t.turn_info for t in trajs) else [],
        **_concat_turns(trajs, L, padr),
    )


def _concat_turns(trajs: Sequence[Trajectory], L: int, padr) -> dict:
    """The turn fields of a concatenation: kept when any part has them (a part without them is
    one turn with no environment reward)."""
    out = {}
    if any(t.turn_ids is not None for t in trajs):
        out["turn_ids"] = torch.cat([padr(t.turns, L, -1) for t in trajs])
    if any(t.turn_rewards is not None for t in trajs):
        T = max(t.turn_rewards.shape[1] if t.turn_rewards is not None else 1 for t in trajs)
        rew = [t.turn_rewards if t.turn_rewards is not None else torch.zeros(t.batch_size, 1) for t in trajs]
        msk = [t.turn_reward_mask if t.turn_reward_mask is not None else torch.zeros(t.batch_size, 1, dtype=torch.bool)
               for t in trajs]
        out["turn_rewards"] = torch.cat([padr(r, T, 0.0) for r in rew])
        out["turn_reward_mask"] = torch.cat([padr(m, T, False) for m in msk])
    return out


def broadcast_steps_to_tokens(step_values: torch.Tensor, step_ids: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Give every token its step's value: out[b, t] = step_values[b, step_ids[b, t]].

    Args: step_values (B, S); step_ids (B, L) long, −1 outside steps.
    Returns: (B, L); ``fill`` where step_ids is −1 or ≥ S.
    """
    check_shapes(step_values=(step_values, ("B", "S")), step_ids=(step_ids, ("B", "L")))
    S = step_values.shape[1]
    valid = (step_ids >= 0) & (step_ids < S)
    idx = step_ids.clamp(min=0, max=max(S - 1, 0))
    if S == 0:
        return torch.full(step_ids.shape, fill, dtype=step_values.dtype, device=step_ids.device)
    out = torch.gather(step_values, 1, idx)
    return torch.where(valid, out, torch.full_like(out, fill))


def step_end_mask(step_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True on the last token of each step (step id changes at t+1)."""
    nxt = torch.nn.functional.pad(step_ids[:, 1:], (0, 1), value=-1)
    return (step_ids >= 0) & (nxt != step_ids)


def last_trained_positions(segment_ids: torch.Tensor, trained: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Position of the last trained token of each segment (a step or a turn).

    pos[b, s] = max{t : segment_ids[b, t] = s and trained[b, t]}, −1 when segment s of row b has
    no trained token.

    Args: segment_ids (B, L) long, −1 outside segments; trained (B, L) bool; num_segments S.
    Returns: (B, S) long.

    >>> last_trained_positions(torch.tensor([[0, 0, 1, 1, -1]]), torch.tensor([[True, True, True, False, True]]), 2)
    tensor([[1, 2]])
    """
    check_shapes(segment_ids=(segment_ids, ("B", "L")), trained=(trained, ("B", "L")))
    B, L = segment_ids.shape
    ok = trained & (segment_ids >= 0) & (segment_ids < num_segments)
    idx = torch.where(ok, segment_ids, torch.full_like(segment_ids, num_segments))  # overflow bucket
    pos = torch.arange(L, device=segment_ids.device).expand(B, L)
    out = torch.full((B, num_segments + 1), -1, dtype=torch.long, device=segment_ids.device)
    out.scatter_reduce_(1, idx, torch.where(ok, pos, torch.full_like(pos, -1)), reduce="amax")
    return out[:, :num_segments]


def place_at_segment_ends(values: torch.Tensor, mask: torch.Tensor, segment_ids: torch.Tensor,
                          trained: torch.Tensor) -> torch.Tensor:
    """Write each segment's value on the segment's last *trained* token; zero elsewhere.

    A segment whose tokens are all untrained (an observation-only turn, a filtered row) places
    nothing: there is no token the policy could be credited on.

    Args: values (B, S) float; mask (B, S) bool (False = no value); segment_ids (B, L) long;
          trained (B, L) bool (the loss mask).
    Returns: (B, L) float.
    """
    check_shapes(values=(values, ("B", "S")), mask=(mask, ("B", "S")), segment_ids=(segment_ids, ("B", "L")))
    out = torch.zeros(segment_ids.shape, dtype=values.dtype, device=values.device)
    pos = last_trained_positions(segment_ids, trained, values.shape[1])  # (B, S)
    ok = mask & (pos >= 0)
    rows, segs = ok.nonzero(as_tuple=True)
    out[rows, pos[rows, segs]] = values[rows, segs]
    return out


def place_at_step_ends(step_values: torch.Tensor, step_mask: torch.Tensor, step_ids: torch.Tensor) -> torch.Tensor:
    """Write each step's value on the step's last token; zero elsewhere (every step token counts
    as trained: ``place_at_segment_ends`` with ``trained = step_ids ≥ 0``).

    Args: step_values (B, S) float; step_mask (B, S) bool (False = no value for that step);
          step_ids (B, L) long.
    Returns: (B, L) float.
    """
    return place_at_segment_ends(step_values, step_mask, step_ids, step_ids >= 0)


def token_to_step_sum(token_values: torch.Tensor, token_mask: torch.Tensor, step_ids: torch.Tensor, num_steps: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum token values within each step: out[b, s] = Σ_{t: step_ids[b,t]=s, mask} v[b, t].

    Args: token_values (B, L); token_mask (B, L) bool; step_ids (B, L); num_steps S.
    Returns: step_values (B, S), step_mask (B, S) bool (True where the step has ≥1 included token).
    """
    B, L = token_values.shape
    ok = token_mask & (step_ids >= 0) & (step_ids < num_steps)
    idx = torch.where(ok, step_ids, torch.full_like(step_ids, num_steps))  # overflow bucket
    vals = torch.where(ok, token_values, torch.zeros_like(token_values))
    out = torch.zeros(B, num_steps + 1, dtype=token_values.dtype, device=token_values.device)
    out.scatter_add_(1, idx, vals)
    cnt = torch.zeros(B, num_steps + 1, dtype=torch.long, device=token_values.device)
    cnt.scatter_add_(1, idx, ok.long())
    return out[:, :num_steps], cnt[:, :num_steps] > 0
