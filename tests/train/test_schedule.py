import math

import pytest
import torch

from finegrain.config import load_config
from finegrain.train.stages import make_schedule, pick_prompts


@pytest.mark.parametrize("schedule,warmup,expected", [
    # steps = 4, base lr 1.0; factor(s) = warm(s) * shape(s / 4), warm(s) = min(1, (s + 1) / warmup)
    ("constant", 0, [1.0, 1.0, 1.0, 1.0]),
    ("linear", 0, [1.0, 0.75, 0.5, 0.25]),
    ("cosine", 0, [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
    ("constant", 2, [0.5, 1.0, 1.0, 1.0]),
])
def test_lr_schedules_worked_values(schedule, warmup, expected):
    cfg = load_config(None, ["train.steps=4", f"optim.schedule={schedule}", f"optim.warmup_steps={warmup}", "optim.lr=1.0"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_schedule(opt, cfg)
    got = []
    for _ in range(4):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx(expected, rel=1e-6)


def test_pick_prompts_is_a_pure_function_of_seed_and_step():
    pool = list(range(100))
    a = pick_prompts(pool, 10, seed=0, step=3, stream=0)
    assert a == pick_prompts(pool, 10, seed=0, step=3, stream=0) and len(set(a)) == 10
    assert a != pick_prompts(pool, 10, seed=0, step=4, stream=0)
    assert a != pick_prompts(pool, 10, seed=1, step=3, stream=0)
    assert a != pick_prompts(pool, 10, seed=0, step=3, stream=2)
