"""Test doubles shared by the environment tests: a scripted sampler and a tiny tool task."""

from __future__ import annotations

import threading

from finegrain.sampling.base import FINISH_LENGTH, FINISH_STOP, Completions
from finegrain.tasks.base import Example


class ScriptedSampler:
    """A Sampler whose continuation of a prefix is ``respond(prefix_text)`` (decoded without
    special tokens), so tests choose every turn. A reply that does not end with a stop string gets
    EOS; one longer than ``max_new_tokens`` is cut and finishes "length". Log-probs are
    -0.01·(number of calls so far) - 0.001·(token index), distinct per call and token."""

    def __init__(self, tokenizer, respond, context_length: int | None = None):
        self.tokenizer, self.respond, self._context = tokenizer, respond, context_length
        self.calls: list[list[str]] = []  # the decoded prefixes of each sample() call

    @property
    def context_length(self) -> int | None:
        return self._context

    def sync_weights(self) -> None:
        pass

    def sample(self, prefixes, n, params, seed) -> Completions:
        tok = self.tokenizer
        out = Completions()
        texts = [tok.decode(list(p), skip_special_tokens=True) for p in prefixes]
        self.calls.append(texts)
        for text in texts:
            for _ in range(n):
                reply = self.respond(text)
                ids = tok(reply, add_special_tokens=False)["input_ids"]
                if not any(reply.endswith(s) for s in params.stop_strings):
                    ids = ids + [tok.eos_token_id]
                finish = FINISH_STOP
                if len(ids) > params.max_new_tokens:
                    ids, finish = ids[:params.max_new_tokens], FINISH_LENGTH
                k = len(self.calls)
                out.token_ids.append(ids)
                out.logprobs.append([-0.01 * k - 0.001 * i for i in range(len(ids))])
                out.finish.append(finish)
        return out


def add(a, b):
    return str(int(a) + int(b))


def boom(x):
    raise RuntimeError(f"cannot {x}")


class CalcTask:
    """Two examples; tools add / boom / hang (hang waits on ``release``, set it when done) and an
    optional turn reward (1 for a call that returned, -1 for an error, 0.5 for the final answer)."""

    name, segmenter = "calc", "newline"

    def __init__(self, turn_rewards: bool = False):
        self.release = threading.Event()
        self.tool_calls: list[str] = []
        if turn_rewards:
            self.turn_reward = self._turn_reward

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        exs = [Example(id="a", prompt="Q: 3+4\n", answer="7"), Example(id="b", prompt="Q: 2+5\n", answer="7")]
        return exs[:n]

    def verify(self, example, response: str) -> float:
        return float(response.strip().endswith(f"A: {example.answer}"))

    def tools(self, example):
        def hang(x):
            self.release.wait(30)
            return "late"

        self.tool_calls.append(example.id)
        return {"add": add, "boom": boom, "hang": hang}

    def _turn_reward(self, example, turn, call, result):
        if call is None:
            return 0.5
        return 1.0 if result is not None else -1.0


# A chat template shaped like Qwen2.5's tool-calling one (tools in the system turn, calls as
# <tool_call> JSON in the assistant turn, results as "tool" messages inside a user turn).
QWEN_LIKE_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def chat_tokenizer(kind: str = "bpe"):
    """A local tokenizer with QWEN_LIKE_TEMPLATE: byte-level BPE trained on a few rendered
    conversations with <|im_start|>/<|im_end|> as special tokens (kind="bpe"), or one token per
    printable character (kind="char")."""
    import string

    from finegrain.models.tokenizer import char_tokenizer, train_bpe_tokenizer

    if kind == "char":
        tok = char_tokenizer(string.printable)
    else:
        corpus = ['<tool_call>\n{"name": "add", "arguments": {"a": "3", "b": "4"}}\n</tool_call>',
                  "<tool_response>\n7\n</tool_response>", "# Tools\n<tools>\n</tools>", "user\nQ: 3+4\nassistant\n",
                  '{"type": "function", "function": {"name": "add", "description": "Add two integers.", '
                  '"parameters": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}']
        tok = train_bpe_tokenizer(corpus * 20, vocab_size=300)
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_LIKE_TEMPLATE
    return tok


CALL_TEXT = '<tool_call>\n{"name": "add", "arguments": {"a": "3", "b": "4"}}\n</tool_call>'


def conversation(result: str) -> list[dict]:
    """system, user "Q: 3+4", the assistant's call add(a=3, b=4) and the tool's ``result``."""
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": "3", "b": "4"}}}
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 3+4\n"},
            {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": result}]
