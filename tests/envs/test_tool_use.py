"""tool_use: calls, every error kind as an observation (counted), time limits, turn limits,
turn rewards, and the chat-template format (parser and renderer)."""

import time

import pytest

from finegrain.envs import ENVIRONMENTS, Rollout
from finegrain.envs.base import example_fields
from finegrain.envs.chat import ChatRenderer, parse_tool_call, tool_schema
from finegrain.envs.runner import run_episodes
from finegrain.envs.tool_use import ERROR_KINDS, ToolUse, bind_arguments, error_counts
from finegrain.toolcalls import format_result
from finegrain.models.tokenizer import char_tokenizer
from finegrain.sampling import SamplingParams
from tests.envs import CALL_TEXT, CalcTask, ScriptedSampler, chat_tokenizer, conversation

KEYS = {"call", "error", "result"}
ALPHABET = "0123456789+-=:QA <>/(),\nabcdeghilmnorstuxyz_"


@pytest.fixture
def task():
    t = CalcTask()
    yield t
    t.release.set()  # let a hung tool's thread finish


def started(task, **kwargs):
    env = ENVIRONMENTS.get("tool_use")(task=task, **kwargs)
    obs = env.reset(seed=0, **example_fields(task.examples("train")[0]))
    assert obs.text == "Q: 3+4\n" and not obs.done
    return env


def test_final_answer_ends_the_episode(task):
    env = started(task)
    obs = env.step("So A: 7")
    assert obs.done and obs.text == "" and obs.reward is None
    assert obs.metadata == {"call": None, "error": None, "result": None}


def test_a_call_runs_the_tool_and_answers_with_its_output(task):
    env = started(task)
    obs = env.step("first <call>add(3, 4)</call>")
    assert not obs.done and obs.text == format_result("7") == "\n<result>7</result>\n"
    assert obs.metadata == {"call": {"name": "add", "args": ["3", "4"]}, "error": None, "result": "7"}
    assert task.tool_calls == ["a"]  # the tools of the example being played


@pytest.mark.parametrize("turn, kind, message, call", [
    ("<call>add(3</call>", "malformed", "malformed call: expected NAME(ARG, ...) or JSON", None),
    ("<call>add(3, 4", "malformed", "malformed call: no closing </call>", None),
    ("<call>mul(3, 4)</call>", "unknown_tool", "unknown tool 'mul'; available: add, boom, hang",
     {"name": "mul", "args": ["3", "4"]}),
    ("<call>add(3)</call>", "bad_arguments", "add: missing a required argument: 'b'", {"name": "add", "args": ["3"]}),
    ("<call>add(3, 4, 5)</call>", "bad_arguments", "add: too many positional arguments",
     {"name": "add", "args": ["3", "4", "5"]}),
    ("<call>boom(fly)</call>", "raised", "boom: RuntimeError: cannot fly", {"name": "boom", "args": ["fly"]}),
])
def test_each_error_comes_back_as_an_observation_and_is_counted(task, turn, kind, message, call):
    env = started(task)
    obs = env.step(turn)
    assert not obs.done
    assert obs.text == format_result(f"error: {message}")
    assert obs.metadata == {"call": call, "error": kind, "result": None}
    assert env.error_counts == {kind: 1}
    # the episode goes on: the next call works
    ok = env.step("<call>add(1, 1)</call>")
    assert ok.metadata == {"call": {"name": "add", "args": ["1", "1"]}, "error": None, "result": "2"}
    assert env.error_counts == {kind: 1}


def test_a_hanging_tool_times_out_within_the_limit_and_the_episode_continues(task):
    env = started(task, tool_timeout=0.2)
    t0 = time.monotonic()
    obs = env.step("<call>hang(x)</call>")
    elapsed = time.monotonic() - t0
    assert 0.2 <= elapsed < 1.0
    assert obs.metadata == {"call": {"name": "hang", "args": ["x"]}, "error": "timeout", "result": None}
    assert obs.text == format_result("error: hang: timed out after 0.2 s")
    assert not obs.done and env.error_counts == {"timeout": 1}
    assert env.step("<call>add(2, 2)</call>").metadata["result"] == "4"
    assert env.step("A: 4").done


def test_error_counts_over_a_whole_episode(task):
    env = started(task, tool_timeout=0.1)
    turns = ["<call>x(</call>", "<call>nope()</call>", "<call>add(1)</call>", "<call>boom(a)</call>",
             "<call>hang(a)</call>", "<call>nope()</call>", "<call>add(1, 2)</call>", "A: 3"]
    metas = [env.step(t).metadata for t in turns]
    assert all(set(m) == KEYS for m in metas)
    assert error_counts(metas) == {"malformed": 1, "unknown_tool": 2, "bad_arguments": 1, "raised": 1, "timeout": 1}
    assert dict(env.error_counts) == {"malformed": 1, "unknown_tool": 2, "bad_arguments": 1, "raised": 1, "timeout": 1}
    assert set(ERROR_KINDS) == {"malformed", "unknown_tool", "bad_arguments", "raised", "timeout"}


def test_reset_starts_a_fresh_episode(task):
    env = started(task)
    env.step("<call>nope()</call>")
    env.reset(seed=1, **example_fields(task.examples("train")[1]))
    assert env.turn == 0 and not env.error_counts and task.tool_calls == ["a", "b"]


def test_turn_rewards_come_from_the_task_when_it_has_them():
    task = CalcTask(turn_rewards=True)
    env = started(task)
    assert env.step("<call>add(1, 2)</call>").reward == 1.0
    assert env.step("<call>nope()</call>").reward == -1.0
    assert env.step("A: 3").reward == 0.5


def test_tool_arguments_are_converted_to_annotated_types():
    def scale(x: int, by: float = 2.0, loud: bool = False) -> str:
        return f"{x * by}{'!' if loud else ''}"

    assert bind_arguments(scale, ["3", "1.5", "true"], {}) == ([3, 1.5, True], {})
    assert bind_arguments(scale, [], {"x": "2", "loud": "no"}) == ([2], {"loud": False})
    with pytest.raises(ValueError, match="argument 'x': expected an integer, got 'three'"):
        bind_arguments(scale, ["three"], {})
    with pytest.raises(TypeError):
        bind_arguments(scale, [], {"y": "1"})


def test_bad_constructor_arguments_raise_one_clear_line(task):
    with pytest.raises(TypeError, match="has no tools"):
        ToolUse(task=object())
    with pytest.raises(ValueError, match="env_kwargs.format"):
        ToolUse(task=task, format="xml")
    with pytest.raises(ValueError, match="env_kwargs.max_turns"):
        ToolUse(task=task, max_turns=0)
    with pytest.raises(ValueError, match="env_kwargs.tool_timeout"):
        ToolUse(task=task, tool_timeout=0)
    with pytest.raises(ValueError, match="env_kwargs.tokenizer"):
        ToolUse(task=task, format="chat")


# ---- through the runner: turn limits and the end of an episode ----------------------------------


def _calls_forever(prefix: str) -> str:
    return "<call>add(1, 2)</call>"


def _call_then_answer(prefix: str) -> str:
    return "<call>add(3, 4)</call>" if "<result>" not in prefix else "A: 7"


def test_max_turns_truncation_is_recorded(task):
    tok = char_tokenizer(ALPHABET)
    rollout = Rollout(ScriptedSampler(tok, _calls_forever), env="tool_use", env_kwargs={"max_turns": 3}, task=task,
                      use_chat_template=False)
    assert rollout.max_turns == 3 and rollout.stop_strings == ("</call>",)
    eps = run_episodes(rollout.sampler, lambda: ToolUse(task=task, max_turns=3), task.examples("train"), 1,
                       SamplingParams(max_new_tokens=40), 0, max_turns=3, stop_strings=rollout.stop_strings)
    for ep in eps:
        assert ep.truncated and not ep.done and ep.num_turns == 3
        assert [m["result"] for m in ep.turn_metadata] == ["3", "3", "3"]
    traj = rollout.generate(task.examples("train"), 2, SamplingParams(max_new_tokens=40), seed=0)
    assert traj.truncated.tolist() == [True] * 4
    assert [len(t) for t in traj.turn_info] == [3] * 4


def test_a_final_answer_ends_the_episode_in_the_runner(task):
    tok = char_tokenizer(ALPHABET)
    rollout = Rollout(ScriptedSampler(tok, _call_then_answer), env="tool_use", task=task, use_chat_template=False)
    assert rollout.max_turns == 6  # the environment's default
    traj = rollout.generate(task.examples("train"), 1, SamplingParams(max_new_tokens=40), seed=0)
    assert traj.truncated.tolist() == [False, False]
    assert traj.response_texts[0] == "<call>add(3, 4)</call>\n<result>7</result>\nA: 7"
    assert traj.response_texts[1] == "<call>add(3, 4)</call>\n<result>7</result>\nA: 7"
    assert traj.turn_info[0] == [{"call": {"name": "add", "args": ["3", "4"]}, "error": None, "result": "7"},
                                 {"call": None, "error": None, "result": None}]


# ---- chat-template format -------------------------------------------------------------------------


def test_chat_call_parser():
    c = parse_tool_call('ok <tool_call>\n{"name": "add", "arguments": {"a": "3", "b": 4}}\n</tool_call>')
    assert (c.name, c.args, c.kwargs, c.error) == ("add", ["3", "4"], {"a": "3", "b": "4"}, None)
    # OpenAI-style arguments as a JSON string; no arguments at all
    c = parse_tool_call('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert c.kwargs == {"a": "1"}
    assert parse_tool_call('<tool_call>{"name": "now"}</tool_call>').kwargs == {}
    assert parse_tool_call("<call>add(1, 2)</call>") is None  # the text format is not a chat call
    for bad in ['<tool_call>{"name": "add"', "<tool_call>add(1)</tool_call>", '<tool_call>{"name": 3}</tool_call>',
                '<tool_call>{"name": "add", "arguments": [1]}</tool_call>', '<tool_call>["add"]</tool_call>']:
        assert parse_tool_call(bad).error and parse_tool_call(bad).name == ""


def test_chat_format_binds_arguments_by_name_and_errors_come_back_as_tool_messages(task):
    tok = chat_tokenizer("char")
    env = started(task, format="chat", tokenizer=tok)
    assert env.stop_strings == ("</tool_call>",) and isinstance(env.renderer, ChatRenderer)
    assert [s["function"]["name"] for s in env.tool_schemas] == ["add", "boom", "hang"]
    obs = env.step('<tool_call>\n{"name": "add", "arguments": {"b": "4", "a": "3"}}\n</tool_call>')
    # the arguments are recorded in the tool's parameter order (a, b), as gold call traces list them
    assert obs.text == "7" and obs.metadata == {"call": {"name": "add", "args": ["3", "4"]}, "error": None, "result": "7"}
    obs = env.step('<tool_call>\n{"name": "add", "arguments": {"a": "3", "c": "4"}}\n</tool_call>')
    assert obs.metadata["error"] == "bad_arguments" and obs.text.startswith("error: add: ")
    obs = env.step("<tool_call>\nadd(3, 4)\n</tool_call>")
    assert obs.metadata == {"call": None, "error": "malformed", "result": None}
    assert env.step("The answer is 7.").done
    assert dict(env.error_counts) == {"bad_arguments": 1, "malformed": 1}


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_chat_renderer_observation_is_what_the_template_puts_between_the_call_and_the_next_turn(kind):
    tok = chat_tokenizer(kind)
    schemas = [tool_schema("add", lambda a, b: a)]
    r = ChatRenderer(tok, system="Be brief.")
    prompt_text, prompt_ids = r.prompt("Q: 3+4\n", tools=schemas)
    obs_ids = r.observation("7")
    full = tok.apply_chat_template(conversation("7"), tools=schemas, tokenize=False, add_generation_prompt=True)
    call_ids = tok(CALL_TEXT, add_special_tokens=False)["input_ids"]
    assert prompt_text + CALL_TEXT + tok.decode(obs_ids) == full
    assert prompt_ids + call_ids + obs_ids == tok(full, add_special_tokens=False)["input_ids"]
    assert tok.decode(obs_ids) == "<|im_end|>\n<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n" \
                                  "<|im_start|>assistant\n"
    assert '"name": "add"' in prompt_text and r.prompt("Q: 3+4\n")[0] == "<|im_start|>system\nBe brief.<|im_end|>\n" \
        "<|im_start|>user\nQ: 3+4\n<|im_end|>\n<|im_start|>assistant\n"


def test_chat_renderer_refuses_templates_it_cannot_split():
    with pytest.raises(ValueError, match="no chat template"):
        ChatRenderer(char_tokenizer(ALPHABET))
    tok = chat_tokenizer("char")
    tok.chat_template = "{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}"  # no tool calls
    with pytest.raises(ValueError, match="does not render tool calls"):
        ChatRenderer(tok).observation("7")
    # a template that marks the last message: the earlier turns change once a tool message follows
    tok.chat_template = ("{% for m in messages %}{% if m.tool_calls %}<tool_call>{}</tool_call>{% endif %}"
                         "{{ m.content }}{% if loop.last %}[last]{% endif %}{% endfor %}")
    assert ChatRenderer(tok).observation("7") == tok("7[last]", add_special_tokens=False)["input_ids"]
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}{% if m.tool_calls %}"
                         "<tool_call>{}</tool_call>{% endif %}{{ m.content }}{% endfor %}")
    with pytest.raises(ValueError, match="renders earlier turns differently"):
        ChatRenderer(tok).observation("7")


@pytest.mark.parametrize("task_name", ["lookup", "arith_calc"])
def test_task_traces_play_through_the_environment(task_name):
    """Gold and flawed SFT traces of the tool tasks, played turn by turn through tool_use: every
    observation in a trace is the one the environment answers, and the final turn ends the episode."""
    from finegrain.envs.base import example_fields
    from finegrain.envs.tool_use import ToolUse
    from finegrain.segment import SEGMENTERS
    from finegrain.tasks import TASKS

    task = TASKS.get(task_name)()
    turns = SEGMENTERS.get("tool_turns")
    for ex, trace in task.sft_corpus(60, 0.5, seed=3):
        env = ToolUse(task=task, tool_timeout=None)
        assert env.reset(seed=0, **example_fields(ex)).text == ex.prompt
        text = ""
        for a, b in turns(trace):
            obs = env.step(trace[a:b])
            assert obs.metadata["error"] is None
            text += trace[a:b] + obs.text
        assert obs.done and text == trace
