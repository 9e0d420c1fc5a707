"""The one trajectory builder: episodes -> a ``Trajectory``, with the invariants by construction.

- observation (tool-output, environment) tokens have ``loss_mask`` False, sampled tokens True;
- every response token carries its turn index (``turn_ids``), −1 on padding;
- behaviour log-probs exist only for sampled tokens (0 elsewhere);
- turn rewards are a (B, T) tensor with a mask (None -> masked out), placed by the combiner on the
  last *trained* token of each turn (``finegrain.rewards.combine``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from finegrain.envs.base import Episode
from finegrain.segment import token_step_ids
from finegrain.trajectory import Trajectory


def build_trajectory(episodes: Sequence[Episode], tokenizer, segmenter: str, device=None) -> Trajectory:
    """Stack episodes into a Trajectory (prompts left-padded, responses right-padded).

    Shapes: B = len(episodes), P = longest prompt, L = longest response (≥ 1), T = most turns (≥ 1).
    """
    if not episodes:
        raise ValueError("build_trajectory: no episodes")
    pad = tokenizer.pad_token_id
    B = len(episodes)
    P = max(len(e.prompt_ids) for e in episodes)
    L = max(max(len(e.response_ids) for e in episodes), 1)
    T = max(max(e.num_turns for e in episodes), 1)
    prompt_ids = torch.full((B, P), pad, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.bool)
    response_ids = torch.full((B, L), pad, dtype=torch.long)
    response_mask = torch.zeros(B, L, dtype=torch.bool)
    loss_mask = torch.zeros(B, L, dtype=torch.bool)
    turn_ids = torch.full((B, L), -1, dtype=torch.long)
    logprobs = torch.zeros(B, L, dtype=torch.float32)
    turn_rewards = torch.zeros(B, T, dtype=torch.float32)
    turn_reward_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, ep in enumerate(episodes):
        p = len(ep.prompt_ids)
        prompt_ids[b, P - p:] = torch.tensor(ep.prompt_ids, dtype=torch.long)
        prompt_mask[b, P - p:] = True
        t = 0
        for seg in ep.segments:
            k = len(seg.token_ids)
            if not k:
                continue
            response_ids[b, t:t + k] = torch.tensor(seg.token_ids, dtype=torch.long)
            response_mask[b, t:t + k] = True
            turn_ids[b, t:t + k] = seg.turn
            if seg.sampled:
                loss_mask[b, t:t + k] = True
                logprobs[b, t:t + k] = torch.tensor(seg.logprobs, dtype=torch.float32)
            t += k
        for k, r in enumerate(ep.turn_rewards):
            if r is not None:
                turn_rewards[b, k], turn_reward_mask[b, k] = float(r), True
    step_ids = token_step_ids(tokenizer, response_ids, response_mask, segmenter)
    traj = Trajectory(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask,
        loss_mask=loss_mask, group_ids=torch.tensor([e.group for e in episodes], dtype=torch.long), step_ids=step_ids,
        behavior_logprobs=logprobs, truncated=torch.tensor([e.truncated for e in episodes], dtype=torch.bool),
        prompt_texts=[e.prompt_text for e in episodes],
        response_texts=tokenizer.batch_decode(response_ids, skip_special_tokens=True),
        examples=[e.example for e in episodes], turn_info=[list(e.turn_metadata) for e in episodes], turn_ids=turn_ids, turn_rewards=turn_rewards,
        turn_reward_mask=turn_reward_mask)
    return traj.to(device) if device is not None else traj
