"""TRL-style reward functions as outcome signals: inputs, values and masks, refusals, a short run."""

import sys

import numpy as np
import pytest
import torch

from finegrain.config import RewardSpec, validate
from finegrain.models.tokenizer import char_tokenizer
from finegrain.rewards import REWARDS, register_reward_function
from finegrain.rewards.functions import RewardFunction
from finegrain.tasks.base import Example
from finegrain.train.logging import read_log
from finegrain.train.loop import train
from tests.helpers import close
from tests.rewards.test_step_labels import EX, make_traj
from tests.train.test_loop_e2e import make_cfg

EX2 = Example("y", "Q: 3 *4\n", "12", solution="3*4=12\nA: 12", meta={"start": 3, "ops": [["*", 4]], "values": [12]})
TEXTS = [
    "7+5=12\n12*3=36\nA: 36",  # 20 chars, right for EX
    "A: 39",                   # 5 chars, wrong for EX
    "3*4=12\nA: 12",           # 12 chars, right for EX2
    "7+5=12\nxx",              # 9 chars, no answer line
]


@pytest.fixture(autouse=True)
def clean_rewards():
    """Entries registered by a test are removed afterwards (Registry has no public unregister)."""
    entries, meta = dict(REWARDS._entries), dict(REWARDS._meta)
    yield
    REWARDS._entries.clear()
    REWARDS._entries.update(entries)
    REWARDS._meta.clear()
    REWARDS._meta.update(meta)


@pytest.fixture
def traj():
    tok = char_tokenizer("0123456789+-*=:QAx \n")
    # prompt_texts as a rollout engine renders them; reward functions get the raw Example.prompt
    return make_traj(tok, TEXTS).replace(examples=[EX, EX, EX2, EX], prompt_texts=["<rendered>"] * 4), tok


# ---- functions written exactly in TRL's documented shapes

def reward_len(completions, **kwargs):
    return [-abs(20 - len(c)) for c in completions]


def correct(prompts, completions, answer, **kwargs):
    return [1.0 if c.endswith("A: " + a) else 0.0 for c, a in zip(completions, answer)]


def final_answer(completions, **kwargs):
    """The number on the 'A: ' line; None when the response has none (not applicable)."""
    return [int(c.rsplit("A: ", 1)[1]) if "A: " in c else None for c in completions]


def has_answer_line(completions, **kwargs):
    return [1.0 if c[0]["content"].split("\n")[-1].startswith("A: ") else 0.0 for c in completions]


def test_trl_shaped_functions_give_hand_computed_values_and_masks(traj):
    t, _ = traj
    out = register_reward_function(reward_len)(t)
    assert out.level == "outcome" and out.values.dtype == torch.float32
    close(out.values, [0.0, -15.0, -8.0, -11.0])  # -|20 - len|, lengths 20, 5, 12, 9
    assert out.mask.tolist() == [True] * 4
    out = register_reward_function(correct)(t)
    close(out.values, [1.0, 0.0, 1.0, 0.0])  # row 2 is judged against EX2's answer '12'
    out = register_reward_function(final_answer)(t)
    close(out.values, [36.0, 39.0, 12.0, 0.0])
    assert out.mask.tolist() == [True, True, True, False]  # None: not applicable, not a zero reward
    assert out.components["applicable"].tolist() == [1.0, 1.0, 1.0, 0.0]
    # what the trainer logs as reward/final_answer/mean: applicable rows only, (36 + 39 + 12) / 3
    assert out.values[out.mask].mean().item() == pytest.approx(29.0)
    out = register_reward_function(has_answer_line, conversational=True)(t)
    close(out.values, [1.0, 1.0, 1.0, 0.0])


def test_exact_inputs_standard_and_conversational(traj):
    t, tok = traj
    ex3 = Example("z", "Q: 1 +1\n", "2", meta={"source": "hand"})
    t = t.replace(examples=[EX, EX, EX2, ex3])
    seen = []

    def record(**kwargs):
        seen.append(kwargs)
        return [0.0] * len(kwargs["completions"])

    register_reward_function(record)(t)
    register_reward_function(record, "record_chat", conversational=True)(t)
    std, chat = seen
    assert list(std) == ["prompts", "completions", "completion_ids", "trainer_state", "answer", "solution", "id",
                         "start", "ops", "values", "source"]
    assert std["prompts"] == [EX.prompt, EX.prompt, EX2.prompt, ex3.prompt]  # raw, not the rendered prompt_texts
    assert std["completions"] == TEXTS and std["trainer_state"] is None
    assert std["completion_ids"] == [tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s in TEXTS]
    assert std["answer"] == ["36", "36", "12", "2"] and std["id"] == ["x", "x", "y", "z"]
    assert std["solution"] == ["", "", "3*4=12\nA: 12", ""]
    # meta keys: the union over the batch, None for a row without the key
    assert std["start"] == [7, 7, 3, None] and std["source"] == [None, None, None, "hand"]
    assert chat["prompts"][2] == [{"role": "user", "content": EX2.prompt}]
    assert chat["completions"][1] == [{"role": "assistant", "content": "A: 39"}]
    assert {k: v for k, v in chat.items() if k not in ("prompts", "completions")} == \
        {k: v for k, v in std.items() if k not in ("prompts", "completions")}


def test_arrays_tensors_bools_and_numpy_scalars_are_values(traj):
    t, _ = traj

    def as_tensor(completion_ids, **kwargs):
        return torch.tensor([len(c) for c in completion_ids])

    def as_array(completion_ids, **kwargs):
        return np.array([len(c) for c in completion_ids], dtype=np.float64)

    def mixed(completions, **kwargs):
        return [True, np.float32(0.5), np.int64(3), None]

    lengths = [21.0, 6.0, 13.0, 10.0]  # characters + EOS
    close(RewardFunction(as_tensor, name="t")(t).values, lengths)
    close(RewardFunction(as_array, name="a")(t).values, lengths)
    out = RewardFunction(mixed, name="m")(t)
    close(out.values, [1.0, 0.5, 3.0, 0.0])
    assert out.mask.tolist() == [True, True, True, False]


@pytest.mark.parametrize("returned,message", [
    ([1.0, 2.0, 3.0], "reward function 'bad': returned 3 values for 4 completions"),
    ([1.0, float("nan"), 0.0, 0.0], "reward function 'bad': row 1 is nan; rewards must be finite"),
    ([1.0, 0.0, float("-inf"), 0.0], "reward function 'bad': row 2 is -inf; rewards must be finite"),
    ([1.0, 0.0, 0.0, "1.0"], "reward function 'bad': row 3 is a str \\('1.0'\\); expected a float, int, bool or None"),
    ([[1.0], 0.0, 0.0, 0.0], "reward function 'bad': row 0 is a list"),
    (0.5, "reward function 'bad': expected a list of 4 floats or None, got float"),
    (np.ones((4, 1)), "reward function 'bad': returned an array of shape \\(4, 1\\), expected \\(4,\\)"),
])
def test_bad_returns_raise_one_line(traj, returned, message):
    t, _ = traj
    with pytest.raises(ValueError, match=message) as e:
        RewardFunction(lambda **kwargs: returned, name="bad")(t)
    assert "\n" not in str(e.value)


def test_a_function_that_cannot_take_the_batch_is_named(traj):
    t, _ = traj

    def needs_column(completions, ground_truth, **kwargs):
        return [0.0] * len(completions)

    def no_kwargs(completions):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match="'needs_column': cannot be called .*'ground_truth'.*; it receives: prompts,"):
        register_reward_function(needs_column)(t)
    with pytest.raises(ValueError, match="'no_kwargs': cannot be called .*unexpected keyword argument 'prompts'"):
        register_reward_function(no_kwargs)(t)
    with pytest.raises(ValueError, match="Example.meta key 'answer' clashes"):
        register_reward_function(reward_len)(t.replace(examples=[Example("w", "q", "1", meta={"answer": 1})] * 4))


def test_registration_rules():
    sig = register_reward_function(reward_len)
    assert REWARDS.get("reward_len") is sig and REWARDS.meta("reward_len")["level"] == "outcome"
    assert register_reward_function(reward_len) is sig  # same function, same name: no-op

    def reward_len_v2(completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match="'reward_len' is already registered to another function; pass another name="):
        register_reward_function(reward_len_v2, "reward_len")
    with pytest.raises(ValueError, match="'reward_len' is already registered to another function"):
        register_reward_function(reward_len, conversational=True)
    with pytest.raises(ValueError, match="'verifier' is already registered to another reward signal"):
        register_reward_function(reward_len, "verifier")
    with pytest.raises(ValueError, match="pass name="):
        register_reward_function(lambda completions, **kw: [0.0] * len(completions))
    with pytest.raises(ValueError, match="pass name="):
        register_reward_function(reward_len, "reward/len")  # would break the reward/<name>/ metric keys

    async def slow(completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match="'slow': async functions are not supported"):
        register_reward_function(slow)
    assert "slow" not in REWARDS and "reward_len_v2" not in REWARDS


def test_config_uses_a_registered_name_and_refuses_kwargs(tmp_path, sft_cache):
    cfg = make_cfg("grpo", tmp_path / "unused", sft_cache)
    cfg.rewards.append(RewardSpec(name="reward_len", weight=0.5))
    with pytest.raises(ValueError, match="rewards\\[2\\].name: expected one of .*got 'reward_len'"):
        validate(cfg)
    register_reward_function(reward_len)
    validate(cfg)
    cfg.rewards[2].kwargs = {"target": 20}
    with pytest.raises(ValueError, match="rewards\\[2\\].kwargs: unknown key 'target' for reward signal 'reward_len'"):
        validate(cfg)


def test_registered_function_trains_as_a_weighted_second_reward(tmp_path, sft_cache):
    calls = []

    def n_tokens(completion_ids, answer, **kwargs):
        calls.append(sorted(kwargs))
        return [len(c) for c in completion_ids]

    register_reward_function(n_tokens)
    cfg = make_cfg("grpo", tmp_path / "run", sft_cache, **{"train.steps": 2, "train.save_every": 0})
    cfg.rewards.append(RewardSpec(name="n_tokens", weight=0.5))
    validate(cfg)
    train(cfg, log=lambda s: None)
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert len(rows) == 2 and len(calls) == 2
    assert calls[0] == ["completions", "id", "ops", "prompts", "solution", "start", "trainer_state", "values"]
    for r in rows:
        # the function returns each response's token count, so its mean is the logged response length
        assert r["reward/n_tokens/mean"] == pytest.approx(r["rollout/response_len"], rel=1e-6)
        assert 1 <= r["reward/n_tokens/mean"] <= 24 and r["reward/n_tokens/applicable"] == 1.0


def test_cli_reward_function_flag_imports_and_registers(tmp_path, monkeypatch, capsys):
    """`finegrain train CONFIG --reward-function module:fn` registers fn before the config is
    validated, so the config may name it; a bad spec is one line."""
    from finegrain.cli.main import main

    (tmp_path / "my_rewards_cli.py").write_text("def reward_len(completions, **kwargs):\n"
                                                "    return [-abs(20 - len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    main(["train", "--help-config", "--reward-function", "my_rewards_cli:reward_len"])
    assert "reward_len" in REWARDS and REWARDS.meta("reward_len")["level"] == "outcome"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "--help-config", "--reward-function", "my_rewards_cli"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == ("finegrain: error: --reward-function: expected MODULE:FUNCTION "
                                         "(e.g. my_rewards:reward_len), got 'my_rewards_cli'\n")
