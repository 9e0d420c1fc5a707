import pytest
import torch

from finegrain.models.tokenizer import char_tokenizer
from finegrain.rewards import REWARDS
from finegrain.rewards.combine import to_token_rewards
from finegrain.segment import token_step_ids
from finegrain.tasks import TASKS
from finegrain.tasks.base import Example
from finegrain.trajectory import Trajectory

EX = Example("x", "Q: 7 +5 *3\n", "36", meta={"start": 7, "ops": [["+", 5], ["*", 3]], "values": [12, 36]})
TEXTS = [
    "7+5=12\n12*3=36\nA: 36",   # all correct
    "7+5=13\n13*3=39\nA: 39",   # step 0 wrong, then correctly carried on
    "7+5=12\nxx\nA: 12",        # unparseable middle line, wrong answer line
]


def make_traj(tok, texts):
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), tok.pad_token_id)
    rm = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        rm[i, :len(r)] = True
    B = len(rows)
    return Trajectory(prompt_ids=torch.ones(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                      response_ids=ids, response_mask=rm, loss_mask=rm.clone(), group_ids=torch.zeros(B, dtype=torch.long),
                      step_ids=token_step_ids(tok, ids, rm, "newline"), behavior_logprobs=torch.zeros(B, L),
                      truncated=torch.zeros(B, dtype=torch.bool), prompt_texts=[EX.prompt] * B,
                      response_texts=texts, examples=[EX] * B)


def test_worked_example_and_placement():
    task = TASKS.get("arith")()
    tok = char_tokenizer("0123456789+-*=:QAx \n")
    traj = make_traj(tok, TEXTS)
    out = REWARDS.get("step_labels")(task, correct=0.5, wrong=-1.0)(traj)
    # row 0: three correct steps; row 1: first line wrong, the rest correct locally;
    # row 2: correct, unparseable, wrong (A: 12 after only one computation line)
    assert out.values.tolist() == [[0.5, 0.5, 0.5], [-1.0, 0.5, 0.5], [0.5, -1.0, -1.0]]
    assert out.mask.all() and out.components["wrong_steps"].tolist() == [0, 1, 2]
    placed = to_token_rewards(out, traj)
    # each step's value sits on the step's last token (the newline, or the last answer character)
    assert placed[1].nonzero().flatten().tolist() == [6, 14, 19]
    assert placed[1, [6, 14, 19]].tolist() == [-1.0, 0.5, 0.5]


def test_task_without_labels_is_refused():
    class NoLabels:
        name = "plain"

    with pytest.raises(ValueError, match="task 'plain' cannot label steps"):
        REWARDS.get("step_labels")(NoLabels())
