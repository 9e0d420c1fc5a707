import torch
import pytest

from finegrain.masked import group_mean_std, last_true_index, masked_mean, masked_reverse_cumsum, masked_whiten
from finegrain.trajectory import (Trajectory, broadcast_steps_to_tokens, concat, place_at_step_ends, step_end_mask,
                                  token_to_step_sum)


def make_traj(B=4, P=3, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    rm = torch.ones(B, L, dtype=torch.bool)
    rm[0, 3:] = False
    return Trajectory(
        prompt_ids=torch.randint(4, 10, (B, P), generator=g), prompt_mask=torch.ones(B, P, dtype=torch.bool),
        response_ids=torch.randint(4, 10, (B, L), generator=g), response_mask=rm, loss_mask=rm.clone(),
        group_ids=torch.tensor([0, 1, 0, 1])[:B], step_ids=torch.zeros(B, L, dtype=torch.long),
        behavior_logprobs=torch.zeros(B, L), truncated=torch.zeros(B, dtype=torch.bool),
        prompt_texts=[f"p{i}" for i in range(B)], response_texts=[f"r{i}" for i in range(B)], examples=list(range(B)))


def test_trajectory_rejects_bad_shapes_and_mask_dtype():
    t = make_traj()
    with pytest.raises(ValueError, match="loss_mask"):
        t.replace(loss_mask=torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="response_mask"):
        t.replace(response_mask=torch.ones(4, 5))
    with pytest.raises(ValueError, match="response_texts"):
        t.replace(response_texts=["a"])


def test_select_and_concat_roundtrip():
    t = make_traj()
    s = t.select([2, 0])
    assert s.response_texts == ["r2", "r0"] and s.examples == [2, 0]
    assert torch.equal(s.response_ids, t.response_ids[[2, 0]])
    c = concat([t.select([0, 1]), t.select([2, 3])], pad_token_id=0)
    assert torch.equal(c.response_ids, t.response_ids) and c.prompt_texts == t.prompt_texts
    # different widths are re-padded: prompts on the left, responses on the right
    a = t.select([0])
    b = Trajectory(**{**{k: getattr(a, k) for k in ("group_ids", "truncated")},
                      "prompt_ids": a.prompt_ids[:, 1:], "prompt_mask": a.prompt_mask[:, 1:],
                      "response_ids": a.response_ids[:, :2], "response_mask": a.response_mask[:, :2],
                      "loss_mask": a.loss_mask[:, :2], "step_ids": a.step_ids[:, :2],
                      "behavior_logprobs": a.behavior_logprobs[:, :2]})
    c = concat([a.replace(prompt_texts=[], response_texts=[], examples=[]), b], pad_token_id=0)
    assert c.prompt_ids.shape == (2, 3) and c.response_ids.shape == (2, 5)
    assert c.prompt_mask[1].tolist() == [False, True, True]
    assert c.response_mask[1].tolist() == [True, True, False, False, False]
    assert c.step_ids[1, 2:].tolist() == [-1, -1, -1]


def test_step_helpers_worked_example():
    step_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 1, 1, 2, -1, -1]])
    # last token of each step: row 0 -> positions 1, 4; row 1 -> 0, 2, 3
    assert step_end_mask(step_ids).nonzero().tolist() == [[0, 1], [0, 4], [1, 0], [1, 2], [1, 3]]
    vals = torch.tensor([[10.0, 20.0, 0.0], [1.0, 2.0, 3.0]])
    smask = torch.tensor([[True, True, False], [True, False, True]])
    placed = place_at_step_ends(vals, smask, step_ids)
    assert placed.tolist() == [[0, 10, 0, 0, 20, 0], [1, 0, 0, 3, 0, 0]]
    b = broadcast_steps_to_tokens(vals, step_ids, fill=-9.0)
    assert b.tolist() == [[10, 10, 20, 20, 20, -9], [1, 2, 2, 3, -9, -9]]
    tok = torch.arange(12.0).view(2, 6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 2] = False
    s, sm = token_to_step_sum(tok, mask, step_ids, 3)
    # row0: step0 = 0+1, step1 = 3+4 (2 masked); row1: 6, 7+8, 9
    assert s.tolist() == [[1, 7, 0], [6, 15, 9]] and sm.tolist() == [[True, True, False], [True, True, True]]


def test_masked_helpers_ignore_garbage():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 4.0]])
    m = torch.tensor([[True, True, False], [True, False, True]])
    assert masked_mean(x, m).item() == pytest.approx(2.5)
    w = masked_whiten(x, m)
    assert torch.isfinite(w).all() and w[~m].eq(0).all()
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)
    assert last_true_index(m).tolist() == [1, 2]
    assert last_true_index(torch.zeros(1, 3, dtype=torch.bool)).tolist() == [-1]


def test_group_mean_std_noncontiguous_and_singleton():
    v = torch.tensor([1.0, 10.0, 3.0, 7.0])
    g = torch.tensor([5, 9, 5, 2])
    mean, std, cnt = group_mean_std(v, g)
    assert mean.tolist() == [2.0, 10.0, 2.0, 7.0]
    assert std[0].item() == pytest.approx(2 ** 0.5) and std[1].item() == 0.0 and cnt.tolist() == [2, 1, 2, 1]


def test_reverse_cumsum_gamma_matches_loop():
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    for gamma in (1.0, 0.9):
        out = masked_reverse_cumsum(x, torch.ones(3, 7, dtype=torch.bool), gamma)
        for b in range(3):
            for t in range(7):
                want = sum(gamma ** (s - t) * x[b, s].item() for s in range(t, 7))
                assert out[b, t].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
