"""Length filters: responses cut off by max_new_tokens."""

from __future__ import annotations

import torch

from finegrain.filters import FILTERS


@FILTERS.register("truncated")
def truncated(traj, outcome: torch.Tensor, *, mode: str = "mask"):
    """Responses that hit max_new_tokens without EOS.

    mode 'mask': keep the row (it still counts in its group's baseline) but train on none of its
    tokens (DAPO's overlong filtering); 'drop_group': drop every group holding a truncated row
    (PRIME's filter_truncated); 'drop': drop the row.
    """
    if mode not in ("mask", "drop", "drop_group"):
        raise ValueError(f"truncated.mode: expected mask | drop | drop_group, got '{mode}'")
    t = traj.truncated
    keep = torch.ones_like(t)
    loss_mask = traj.loss_mask
    if mode == "mask":
        loss_mask = loss_mask & ~t.unsqueeze(1)
    elif mode == "drop":
        keep = ~t
    else:
        bad_groups = traj.group_ids[t].unique()
        keep = ~torch.isin(traj.group_ids, bad_groups)
    return keep, loss_mask, {"truncated_frac": t.float().mean(), "kept_frac": keep.float().mean()}
