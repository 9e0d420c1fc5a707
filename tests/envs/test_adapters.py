"""Adapters: an OpenEnv environment, a TRL environment_factory class and gymnasium-style envs, each
written here, run unchanged as finegrain environments (directly and through ENVIRONMENTS + Rollout)."""

import string

import pytest

from finegrain.envs import ENVIRONMENTS, Rollout
from finegrain.envs.adapters import (GymAdapter, OpenEnvAdapter, TRLEnvironment, openenv_action_type,
                                     register_environment, trl_tools)
from finegrain.envs.base import example_fields
from finegrain.toolcalls import format_result
from finegrain.models.tokenizer import char_tokenizer
from finegrain.sampling import SamplingParams
from finegrain.sampling.base import sample_seed
from finegrain.tasks.base import Example
from tests.envs import ScriptedSampler, chat_tokenizer

ALPHABET = string.printable
EXAMPLES = [Example(id="a", prompt="Q: count to 5.", answer="5"), Example(id="b", prompt="Q: count to 2.", answer="2")]
SP = SamplingParams(max_new_tokens=40)


def register_once(name, factory, **kwargs):
    if name not in ENVIRONMENTS:
        register_environment(name, factory, **kwargs)
    return name


# ---- OpenEnv ------------------------------------------------------------------------------------

try:
    import openenv.core.env_server as openenv
except ImportError:  # the optional dependency is not installed: its tests are skipped
    openenv = None
needs_openenv = pytest.mark.skipif(openenv is None, reason="openenv-core is not installed")

if openenv is not None:

    class GuessAction(openenv.Action):
        guess: int

    class GuessObservation(openenv.Observation):
        message: str = ""

    class GuessEnv(openenv.Environment[GuessAction, GuessObservation, openenv.State]):
        """Guess a number in [0, 9] picked from the seed; the answer says higher / lower / correct."""

        def __init__(self):
            super().__init__()
            self._state = openenv.State()
            self.closed = False

        def reset(self, seed=None, episode_id=None, **kwargs) -> GuessObservation:
            self.target = (seed or 0) % 10 if "target" not in kwargs else kwargs["target"]
            self._state = openenv.State(episode_id=episode_id, step_count=0)
            return GuessObservation(message="Guess a number from 0 to 9.\n")

        def step(self, action: GuessAction, timeout_s=None, **kwargs) -> GuessObservation:
            self._state.step_count += 1
            if action.guess < 0:
                raise ValueError("negative guess")
            if action.guess == self.target:
                return GuessObservation(message="correct\n", done=True, reward=1.0,
                                        metadata={"steps": self._state.step_count})
            hint = "higher\n" if action.guess < self.target else "lower\n"
            return GuessObservation(message=hint, reward=0.0, metadata={"steps": self._state.step_count})

        @property
        def state(self) -> openenv.State:
            return self._state

        def close(self):
            self.closed = True


@needs_openenv
def test_openenv_action_type_comes_from_the_generic_base():
    assert openenv_action_type(GuessEnv) is GuessAction


@needs_openenv
def test_openenv_adapter_plays_an_episode():
    env = OpenEnvAdapter(GuessEnv(), reset_kwargs=lambda ex: {"target": int(ex["answer"])})
    obs = env.reset(seed=3, **example_fields(EXAMPLES[0]))
    assert obs.text == "Guess a number from 0 to 9.\n" and env.env.target == 5
    obs = env.step("2\n")
    assert (obs.text, obs.done, obs.reward) == ("higher\n", False, 0.0)
    assert obs.metadata == {"observation": {"message": "higher\n"}, "metadata": {"steps": 1}, "error": None}
    obs = env.step("seven")  # not an int: the model is told, the episode goes on
    assert obs.text.startswith("error: invalid action: ") and obs.metadata["error"].startswith("invalid action")
    assert not obs.done and obs.reward is None
    obs = env.step("-1")  # the environment raises
    assert obs.text == "error: step raised ValueError: negative guess" and not obs.done
    obs = env.step("5")
    assert (obs.text, obs.done, obs.reward) == ("correct\n", True, 1.0) and env.env.closed


@needs_openenv
def test_openenv_adapter_prompt_modes_and_errors():
    both = OpenEnvAdapter(GuessEnv(), prompt="both")
    assert both.reset(seed=1, **example_fields(EXAMPLES[0])).text == "Q: count to 5.Guess a number from 0 to 9.\n"
    assert OpenEnvAdapter(GuessEnv(), prompt="example").reset(seed=1, **example_fields(EXAMPLES[0])).text == \
        "Q: count to 5."
    with pytest.raises(ValueError, match="env_kwargs.prompt"):
        OpenEnvAdapter(GuessEnv(), prompt="first")

    class Untyped(openenv.Environment):
        def reset(self, seed=None, episode_id=None, **kw):
            return openenv.Observation()

        def step(self, action, timeout_s=None, **kw):
            return openenv.Observation(done=True)

        @property
        def state(self):
            return openenv.State()

    with pytest.raises(TypeError, match="cannot tell the Action type of Untyped"):
        OpenEnvAdapter(Untyped())
    done = OpenEnvAdapter(Untyped(), action=lambda text: openenv.Action()).step("x")
    assert done.done and done.reward is None and done.text == "{}"


@needs_openenv
def test_openenv_environment_runs_through_rollout():
    name = register_once("test_guess_openenv", GuessEnv, kind="openenv", stop_strings=("\n",), max_turns=4,
                         reset_kwargs=lambda ex: {"target": int(ex["answer"])})
    # count up from 1: "1\n", "2\n", ... (the number of answers so far + 1)
    sampler = ScriptedSampler(char_tokenizer(ALPHABET), lambda p: f"{p.count('higher') + p.count('lower') + 1}\n")
    rollout = Rollout(sampler, env=name, use_chat_template=False)
    assert rollout.max_turns == 4 and rollout.stop_strings == ("\n",)
    t = rollout.generate(EXAMPLES, 1, SP, seed=0)
    # the last allowed turn gets no observation: no turn follows it (the environment still answered)
    assert t.response_texts == ["1\nhigher\n2\nhigher\n3\nhigher\n4\n", "1\nhigher\n2\n"]
    assert t.truncated.tolist() == [True, False]
    assert t.turn_rewards.tolist() == [[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    assert t.turn_reward_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert [m["metadata"]["steps"] for m in t.turn_info[0]] == [1, 2, 3, 4]


@needs_openenv
def test_register_environment_refuses_an_instance_and_unknown_kinds():
    with pytest.raises(TypeError, match="one environment per episode"):
        register_environment("test_bad_instance", GuessEnv(), kind="openenv")
    with pytest.raises(ValueError, match="kind must be one of"):
        register_environment("test_bad_kind", GuessEnv, kind="dm_env")
    name = register_once("test_guess_twice", GuessEnv, kind="openenv")
    with pytest.raises(ValueError, match="registered twice"):
        register_environment(name, GuessEnv, kind="openenv")
    assert ENVIRONMENTS.meta(name) == {"multi_turn": True, "adapter": "openenv"}


# ---- TRL environment_factory --------------------------------------------------------------------


class CounterEnv:
    """TRL-style: no-argument constructor, reset(**row), public methods are the tools."""

    def __init__(self):
        self.count, self.target = 0, None

    def reset(self, **row) -> str | None:
        self.count, self.target = 0, int(row["answer"])
        return f" Use increment to reach {self.target}."

    def increment(self, by: int) -> str:
        """Add to the counter.

        Args:
            by: how much to add
        """
        self.count += by
        return str(self.count)

    def give_up(self) -> str:
        """Stop the game."""
        raise ValueError("Game over.")

    def get_reward(self) -> float:
        return float(self.count == self.target)

    def _secret(self):
        return "not a tool"


def test_trl_tools_are_the_public_methods_but_reset_and_get_reward():
    assert sorted(trl_tools(CounterEnv())) == ["give_up", "increment"]


def test_trl_environment_plays_an_episode():
    env = TRLEnvironment(CounterEnv())
    obs = env.reset(seed=0, **example_fields(EXAMPLES[1]))
    assert obs.text == "Q: count to 2. Use increment to reach 2."
    obs = env.step("<call>increment(1)</call>")
    assert obs.text == format_result("1") and obs.reward is None and env.env.count == 1
    assert obs.metadata == {"call": {"name": "increment", "args": ["1"]}, "error": None, "result": "1"}
    obs = env.step("<call>increment(one)</call>")
    assert obs.metadata["error"] == "bad_arguments" and obs.text == \
        format_result("error: increment: argument 'by': expected an integer, got 'one'")
    obs = env.step("<call>give_up()</call>")
    assert obs.metadata["error"] == "raised" and obs.text == format_result("error: give_up: ValueError: Game over.")
    obs = env.step("<call>_secret()</call>")
    assert obs.metadata["error"] == "unknown_tool"
    env.step("<call>increment(1)</call>")
    obs = env.step("A: done")
    assert obs.done and obs.reward == 1.0  # get_reward() at the end


def test_trl_environment_through_rollout_rewards_the_last_turn():
    name = register_once("test_counter_trl", CounterEnv, kind="trl", max_turns=3)
    sampler = ScriptedSampler(char_tokenizer(ALPHABET), lambda p: "<call>increment(1)</call>")  # never answers
    rollout = Rollout(sampler, env=name, use_chat_template=False)
    assert rollout.max_turns == 3
    t = rollout.generate(EXAMPLES, 1, SP, seed=0)
    assert t.truncated.tolist() == [True, True]
    # the third (last allowed) turn carries get_reward(): count 3 != 5, count 3 != 2
    assert t.turn_reward_mask.tolist() == [[False, False, True]] * 2 and t.turn_rewards[:, 2].tolist() == [0.0, 0.0]
    # env_kwargs override the registration's options
    assert Rollout(sampler, env=name, env_kwargs={"max_turns": 5}, use_chat_template=False).max_turns == 5


def test_trl_environment_in_chat_format_uses_the_docstring_schemas():
    tok = chat_tokenizer("char")
    env = TRLEnvironment(CounterEnv(), format="chat", tokenizer=tok)
    env.reset(seed=0, **example_fields(EXAMPLES[0]))
    schemas = {s["function"]["name"]: s["function"] for s in env.tool_schemas}
    assert schemas["increment"]["parameters"]["properties"]["by"] == {"type": "integer", "description": "how much to add"}
    assert schemas["increment"]["description"] == "Add to the counter."
    obs = env.step('<tool_call>{"name": "increment", "arguments": {"by": 4}}</tool_call>')
    assert obs.text == "4" and obs.metadata["call"] == {"name": "increment", "args": ["4"]}


# ---- gymnasium-style ----------------------------------------------------------------------------


class AnimalGuess:
    """Duck-typed gymnasium API (no gymnasium import): guess the animal in three tries."""

    def __init__(self):
        self.closed = False

    def reset(self, seed=None):
        self.secret, self.tries = ["cat", "dog"][(seed or 0) % 2], 0
        return "Guess the animal: ", {"seed": seed}

    def step(self, action):
        self.tries += 1
        if action == self.secret:
            return "yes", 1.0, True, False, {"tries": self.tries}
        return "no ", -0.1, False, self.tries >= 3, {"tries": self.tries}

    def close(self):
        self.closed = True


def test_gym_adapter_plays_an_episode():
    env = GymAdapter(AnimalGuess(), action=lambda text: text.strip(), prompt="both")
    assert env.reset(seed=1, **example_fields(EXAMPLES[0])).text == "Q: count to 5.Guess the animal: "
    obs = env.step("cat\n")
    assert (obs.text, obs.done, obs.reward) == ("no ", False, -0.1)
    assert obs.metadata == {"info": {"tries": 1}, "terminated": False, "truncated": False, "error": None}
    obs = env.step("dog\n")
    assert (obs.text, obs.done, obs.reward) == ("yes", True, 1.0) and env.env.closed
    assert obs.metadata["terminated"] and not obs.metadata["truncated"]


def test_gym_adapter_reports_bad_actions_and_the_envs_own_truncation():
    def strict(text):
        if not text.strip().isalpha():
            raise ValueError(f"not a word: {text!r}")
        return text.strip()

    env = GymAdapter(AnimalGuess(), action=strict)
    env.reset(seed=0)
    obs = env.step("42")
    assert obs.text == "error: invalid action: not a word: '42'" and not obs.done and obs.reward is None
    assert obs.metadata["error"] == "invalid action: not a word: '42'"
    for _ in range(2):
        assert not env.step("owl").done
    obs = env.step("owl")
    assert obs.done and obs.metadata["truncated"] and not obs.metadata["terminated"] and obs.reward == -0.1


def test_gym_env_through_rollout():
    name = register_once("test_animal_gym", AnimalGuess, kind="gym", action=lambda t: t.strip(), stop_strings=("\n",))
    guesses = ["cow\n", "cat\n", "dog\n"]
    sampler = ScriptedSampler(char_tokenizer(ALPHABET), lambda p: guesses[p.count("no ")])
    rollout = Rollout(sampler, env=name, use_chat_template=False)
    t = rollout.generate(EXAMPLES[:1], 2, SP, seed=0)
    assert rollout.max_turns == 6 and not t.truncated.any()
    for b in range(2):
        secret = ["cat", "dog"][sample_seed(0, 0, b) % 2]  # the seed reset got
        turns = 2 if secret == "cat" else 3
        assert t.turn_reward_mask[b].tolist() == [True] * turns + [False] * (3 - turns)
        assert t.turn_rewards[b, :turns].tolist() == pytest.approx([-0.1] * (turns - 1) + [1.0])
        assert t.response_texts[b] == "".join(g + "no " for g in guesses[:turns - 1]) + guesses[turns - 1]
        assert t.turn_info[b][-1] == {"info": {"tries": turns}, "terminated": True, "truncated": False, "error": None}
    assert len({int(t.turn_reward_mask[b].sum()) for b in range(2)}) == 2  # the two seeds pick different animals


def test_a_real_gymnasium_env_with_a_time_limit():
    gym = pytest.importorskip("gymnasium")

    class Echo(gym.Env):
        observation_space = gym.spaces.Text(max_length=64)
        action_space = gym.spaces.Text(max_length=64)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.word = (options or {}).get("word", "hi")
            return f"Say {self.word}: ", {}

        def step(self, action):
            ok = action.strip() == self.word
            return ("good" if ok else "again: "), float(ok), ok, False, {}

    env = GymAdapter(gym.wrappers.TimeLimit(Echo(), max_episode_steps=2), reset_options=lambda ex: {"word": ex["answer"]})
    assert env.reset(seed=0, **example_fields(EXAMPLES[1])).text == "Say 2: "
    assert env.step("3").text == "again: "
    obs = env.step("4")  # TimeLimit truncates the second step
    assert obs.done and obs.metadata["truncated"] and obs.reward == 0.0
    env.reset(seed=0, **example_fields(EXAMPLES[1]))
    assert env.step("2 ").reward == 1.0
