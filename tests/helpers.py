"""Shared test helpers: the default tolerances and small tensor constructors."""

import torch

RTOL, ATOL = 1e-5, 1e-6  # style.md: defaults; tests/test_tolerances.py rejects rtol > 1e-2


def close(actual, expected):
    """assert_close at the default tolerances, with ``expected`` cast to ``actual``'s dtype."""
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=RTOL, atol=ATOL)


def T(rows):
    return torch.tensor(rows, dtype=torch.float32)


def M(rows):
    return torch.tensor(rows, dtype=torch.bool)


def judge_ctx(tokenizer, task=None):
    """The slice of a RewardContext that judge-style signals read (task, tokenizer, no policy,
    cfg.model.device); the task defaults to arith."""
    from types import SimpleNamespace

    from finegrain.tasks import TASKS

    return SimpleNamespace(task=task or TASKS.get("arith")(), tokenizer=tokenizer, policy=None,
                           initial_policy=lambda: None, cfg=SimpleNamespace(model=SimpleNamespace(device="cpu")))


def only_error_line(capsys, main, argv) -> str:
    """Run the CLI entry ``main(argv)`` expecting a usage or data error: exit status 2 and exactly
    one non-empty stderr line, returned."""
    import pytest

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]
