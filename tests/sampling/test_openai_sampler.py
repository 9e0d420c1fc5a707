"""The OpenAI-compatible client sampler (``openai``) against real servers on 127.0.0.1.

The model server is the real ``transformers serve`` (FastAPI + uvicorn, from the installed
transformers) on a tiny model built from config (``finegrain.models.tiny``) and saved to a tmp
dir, run in a thread of the test process: its model loads in about a second, and no second
Python has to import torch. Where transformers' serving extras (fastapi, uvicorn) are not
installed, a stdlib ``http.server`` that answers the same two endpoints by running the same tiny
model through the HF sampler stands in (``openai_servers.stdlib_model_server``), so the test runs
on a machine with only the core dependencies too.

Failure servers are stdlib ``http.server``s too: one that sleeps past the client's timeout, one
that answers garbage, one that answers JSON without the expected fields, one that refuses (HTTP
400), and a port nobody listens on. Each gives one line naming the URL and what happened, after
exactly 1 + max_retries attempts (1 for a refusal), counted on the server side.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from finegrain.models.tokenizer import char_tokenizer
from finegrain.sampling import SAMPLERS, SamplingParams
from finegrain.sampling.openai import OpenAIClient, ServerError, request_seed
from tests.sampling.openai_servers import (chat_answer, free_port, save_tiny_model, scripted_server, serving_available,
                                           stdlib_model_server, transformers_serve)

ALPHABET = "0123456789+-*=:QA \n{}\"',."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"), ALPHABET)


@pytest.fixture(scope="module")
def server(tiny):
    """(base_url, model name to send, kind) of a live model server on 127.0.0.1."""
    model_dir, model, tok = tiny
    if serving_available():
        with transformers_serve(model_dir) as (url, name):
            yield url, name, "transformers serve"
    else:
        with stdlib_model_server(model, tok) as (url, _):
            yield url, None, "stdlib"


def local_greedy(model, tok, prompt: str, max_new_tokens: int) -> list[int]:
    """The local HF sampler's greedy continuation of ``prompt`` (the server must agree)."""
    hf = SAMPLERS.get("hf")(model, tok)
    return hf.sample([tok(prompt)["input_ids"]], 1, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                                                                  logprobs=False), seed=0).token_ids[0]


def test_greedy_sample_on_the_real_server_matches_the_local_model(tiny, server):
    model_dir, model, tok = tiny
    url, name, _ = server
    sampler = SAMPLERS.get("openai")(None, tok, base_url=url, model_name=name, timeout=60.0)
    prompts = ["Q: 7 +5\n", "Q: 3 *4 -1\n"]
    sp = SamplingParams(temperature=0.0, max_new_tokens=8, logprobs=False)
    out = sampler.sample([tok(p)["input_ids"] for p in prompts], 2, sp, seed=0)
    assert len(out.token_ids) == 4 and out.logprobs == [None] * 4
    for r, p in enumerate([prompts[0]] * 2 + [prompts[1]] * 2):
        want = local_greedy(model, tok, p, 8)
        assert out.token_ids[r] == want
        assert out.finish[r] == ("stop" if want[-1] == tok.eos_token_id else "length")
    assert sampler.client.stats == {"attempts": 4, "retries": 0, "failures": 0}


def test_chat_endpoint_on_the_real_server(tiny, server):
    _, model, tok = tiny
    url, name, _ = server
    sampler = SAMPLERS.get("openai")(None, None, base_url=url, model_name=name, endpoint="chat")
    [a] = sampler.complete_texts(["Q: 2 +2\n"], SamplingParams(temperature=0.0, max_new_tokens=6), seed=0)
    want = tok.decode(local_greedy(model, tok, "Q: 2 +2\n", 6), skip_special_tokens=True)
    assert a.text == want and a.finish in ("stop", "length")


def test_training_rollouts_need_server_logprobs(tiny, server):
    _, _, tok = tiny
    url, name, kind = server
    prefix = [tok("Q: 1 +1\n")["input_ids"]]
    sp = SamplingParams(temperature=0.0, max_new_tokens=4)  # logprobs=True: what training asks for
    sampler = SAMPLERS.get("openai")(None, tok, base_url=url, model_name=name)
    # neither server returns log-probs (transformers serve ignores the field)
    with pytest.raises(ValueError, match=r"returned no log-probs; .* cannot be a training rollout engine"):
        sampler.sample(prefix, 1, sp, seed=0)
    nan = SAMPLERS.get("openai")(None, tok, base_url=url, model_name=name, logprobs="nan")
    out = nan.sample(prefix, 1, sp, seed=0)
    assert len(out.logprobs[0]) == len(out.token_ids[0]) and all(math.isnan(x) for x in out.logprobs[0])
    with pytest.raises(RuntimeError, match="cannot load the trained policy's weights"):
        nan.sync_weights()


def test_server_logprobs_are_used_when_they_line_up_and_refused_when_not():
    tok = char_tokenizer(ALPHABET)

    def answer(body):
        lp = {"tokens": list("12"), "token_logprobs": [-0.5, -0.25]} if body["prompt"].startswith("Q: 1") else \
            {"tokens": list("12"), "token_logprobs": [-0.5]}
        return {"choices": [{"text": "12", "finish_reason": "length", "logprobs": lp}]}

    with scripted_server(answer) as (url, counter):
        sampler = SAMPLERS.get("openai")(None, tok, base_url=url)
        out = sampler.sample([tok("Q: 1\n")["input_ids"]], 1, SamplingParams(max_new_tokens=2), seed=0)
        assert out.token_ids == [tok("12", add_special_tokens=False)["input_ids"]] and out.logprobs == [[-0.5, -0.25]]
        assert counter.headers.get("Content-Type") == "application/json"
        with pytest.raises(ValueError, match=r"row 0: the server at .* returned 1 log-probs for 2 re-encoded tokens"):
            sampler.sample([tok("Q: 2\n")["input_ids"]], 1, SamplingParams(max_new_tokens=2), seed=0)


def test_stops_the_server_dropped_are_put_back():
    tok = char_tokenizer(ALPHABET)
    answers = iter([
        {"choices": [{"text": "12", "finish_reason": "stop", "stop_reason": "\n"}]},    # named stop string
        {"choices": [{"text": "12\nA: 3", "finish_reason": "stop"}]},                   # left in the text: cut after it
        {"choices": [{"text": "12", "finish_reason": "stop"}]},                         # no reason: EOS
        {"choices": [{"text": "1234567", "finish_reason": "length"}]},                  # longer than max_new_tokens
    ])
    with scripted_server(lambda body: next(answers)) as (url, _):
        sampler = SAMPLERS.get("openai")(None, tok, base_url=url, max_concurrency=1)
        sp = SamplingParams(max_new_tokens=5, stop_strings=("\n",), logprobs=False)
        out = sampler.sample([tok("Q:")["input_ids"]], 4, sp, seed=0)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert out.token_ids == [enc("12\n"), enc("12\n"), enc("12") + [tok.eos_token_id], enc("12345")]
    assert out.finish == ["stop", "stop", "stop", "length"]


def test_server_down_is_one_line_after_bounded_retries():
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = OpenAIClient(url, timeout=1.0, max_retries=2, backoff=0.01)
    with pytest.raises(ServerError) as e:
        client.complete("Q:", SamplingParams(max_new_tokens=2))
    msg = str(e.value)
    assert msg == f"OpenAI-compatible server {url}/completions: connection refused (is the server running?) (after 3 attempts)"
    assert "\n" not in msg and e.value.attempts == 3
    assert client.stats == {"attempts": 3, "retries": 2, "failures": 1}


def test_timeout_is_one_line_after_bounded_retries():
    with scripted_server(lambda body: chat_answer("late"), delay=2.0) as (url, counter):
        client = OpenAIClient(url, timeout=0.3, max_retries=1, backoff=0.01)
        with pytest.raises(ServerError, match=r"^OpenAI-compatible server http://127\.0\.0\.1:\d+/v1/chat/completions: "
                                              r"no answer within the 0\.3 s timeout \(after 2 attempts\)$"):
            client.complete("Q:", SamplingParams(max_new_tokens=2), chat=True)
        assert counter.posts == 2 and client.stats["retries"] == 1


@pytest.mark.parametrize("body, what", [
    (b"<html>oops</html>", r"answered non-JSON: b'<html>oops</html>'"),
    (b"[1, 2]", r"answered JSON that is not an object: \[1, 2\]"),
    ({"choices": []}, r"answered JSON without the expected fields: 'choices' is not a non-empty list of objects"),
    ({"choices": [{"message": {"content": 3}}]}, r"answered JSON without the expected fields: no string at "
                                                 r"choices\[0\]\.message\.content"),
    ({"id": "x"}, r"answered JSON without the expected fields: 'choices'"),
])
def test_garbage_is_one_line_after_bounded_retries(body, what):
    with scripted_server(lambda b: body) as (url, counter):
        client = OpenAIClient(url, max_retries=2, backoff=0.01)
        with pytest.raises(ServerError, match=what + r" \(after 3 attempts\)$") as e:
            client.complete("Q:", SamplingParams(max_new_tokens=2), chat=True)
        assert counter.posts == 3 and "\n" not in str(e.value) and url in str(e.value)


def test_a_refusal_is_not_retried():
    with scripted_server(lambda b: {"error": "unknown field top_k"}, status=400) as (url, counter):
        client = OpenAIClient(url, max_retries=3, backoff=0.01)
        with pytest.raises(ServerError, match=r"answered HTTP 400: \{\"error\": \"unknown field top_k\"\} \(after 1 attempt\)$"):
            client.complete("Q:", SamplingParams(max_new_tokens=2))
        assert counter.posts == 1


def test_the_api_key_comes_from_the_named_variable_and_is_never_shown(monkeypatch):
    monkeypatch.setenv("FG_TEST_KEY", "sk-test-secret")
    with scripted_server(lambda b: {"id": "x"}) as (url, counter):
        sampler = SAMPLERS.get("openai")(None, None, base_url=url, api_key_env="FG_TEST_KEY", endpoint="chat",
                                         max_retries=0)
        with pytest.raises(ServerError) as e:
            sampler.complete_texts(["Q:"], SamplingParams(max_new_tokens=2), seed=0)
        assert counter.headers.get("Authorization") == "Bearer sk-test-secret"
    assert "sk-test-secret" not in str(e.value) + repr(sampler.client) + repr(vars(sampler.client))
    with scripted_server(lambda b: {"error": "bad key sk-test-secret"}, status=401) as (url, _):
        with pytest.raises(ServerError, match=r"answered HTTP 401: \{\"error\": \"bad key \*\*\*\"\}"):
            SAMPLERS.get("openai")(None, None, base_url=url, api_key_env="FG_TEST_KEY").complete_texts(
                ["Q:"], SamplingParams(max_new_tokens=2), seed=0)
    monkeypatch.delenv("FG_TEST_KEY")
    with scripted_server(lambda b: chat_answer("ok")) as (url, counter):
        SAMPLERS.get("openai")(None, None, base_url=url, api_key_env="FG_TEST_KEY", endpoint="chat").complete_texts(
            ["Q:"], SamplingParams(max_new_tokens=2), seed=0)
        assert "Authorization" not in counter.headers


def test_loopback_ignores_proxies_from_the_environment(monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # a proxy that is not there: a proxied request would fail
    monkeypatch.setenv("HTTP_PROXY", dead)
    monkeypatch.setenv("http_proxy", dead)
    with scripted_server(lambda b: chat_answer("ok")) as (url, counter):
        [a] = SAMPLERS.get("openai")(None, None, base_url=url, endpoint="chat").complete_texts(
            ["Q:"], SamplingParams(max_new_tokens=2), seed=0)
        assert a.text == "ok" and counter.posts == 1


def test_request_fields_and_seeds():
    seen = []

    def answer(body):
        seen.append(body)
        return {"choices": [{"text": "1", "finish_reason": "length"}]}

    with scripted_server(answer) as (url, _):
        sampler = SAMPLERS.get("openai")(None, None, base_url=url, model_name="m", max_concurrency=1)
        sampler.complete_texts(["a", "b"], SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=3,
                                                          stop_strings=("\n",)), seed=5)
    assert [b["seed"] for b in seen] == [request_seed(5, 0), request_seed(5, 1)]
    assert seen[0] == {"model": "m", "max_tokens": 3, "temperature": 0.7, "stream": False, "top_p": 0.9, "stop": ["\n"],
                       "seed": request_seed(5, 0), "prompt": "a"}
    assert "top_k" not in seen[0] and "logprobs" not in seen[0]


def test_construction_errors(monkeypatch):
    monkeypatch.delenv("FINEGRAIN_OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="no server: pass base_url or set FINEGRAIN_OPENAI_BASE_URL"):
        SAMPLERS.get("openai")(None, None)
    with pytest.raises(ValueError, match="endpoint must be 'completions' or 'chat'"):
        SAMPLERS.get("openai")(None, None, base_url="http://127.0.0.1:1", endpoint="responses")
    with pytest.raises(ValueError, match="base_url must be an http"):
        OpenAIClient("127.0.0.1:8000")
    monkeypatch.setenv("FINEGRAIN_OPENAI_BASE_URL", "http://127.0.0.1:9")
    assert SAMPLERS.get("openai")(None, None).client.base_url == "http://127.0.0.1:9/v1"


def test_the_trainer_refuses_it_as_a_rollout_engine_without_logprobs(tmp_path, sft_cache, server, monkeypatch):
    """``rollout.engine=openai`` reaches the server (from the environment variables) and stops at
    the first sampling call: the server returns no log-probs to train on."""
    from finegrain.config import load_config, validate
    from finegrain.train.loop import train
    from tests.conftest import tiny_run_overrides

    url, name, _ = server
    monkeypatch.setenv("FINEGRAIN_OPENAI_BASE_URL", url)
    if name:
        monkeypatch.setenv("FINEGRAIN_OPENAI_MODEL", name)
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "arith_grpo.yaml",
                      tiny_run_overrides(tmp_path / "run", sft_cache, steps=1, **{"rollout.engine": "openai"}))
    validate(cfg)
    with pytest.raises(ValueError, match=r"returned no log-probs; without the sampling policy's log-probs it cannot "
                                         r"be a training rollout engine"):
        train(cfg, log=lambda s: None)
