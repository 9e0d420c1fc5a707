"""A client for OpenAI-compatible servers (``/v1/completions``, ``/v1/chat/completions``): for
evaluation and model judges, not for training rollouts unless the server returns log-probs.

Two parts:

* ``OpenAIClient``: one POST with a timeout, bounded retries with exponential backoff, and ONE
  clear error (``ServerError``: the URL and what happened) when the server is down, times out,
  or answers garbage (non-JSON, missing fields). Python's standard library only (``urllib``).
* ``OpenAISampler`` (``SAMPLERS`` entry ``openai``): the ``Sampler`` contract on top of it. A
  token prefix is decoded to text, sent as a prompt (or as one user message with
  ``endpoint="chat"``), and the answer is re-encoded with the local tokenizer, which must be the
  server model's. ``complete_texts`` is the text-level call that judges use (no tokenizer needed).

The API key is read from the environment variable named by ``api_key_env`` (default
``OPENAI_API_KEY``) when a request is sent; it is never a config value, never stored on the
object, and never part of an error message. Loopback hosts (127.0.0.0/8, localhost, ::1) are
reached directly, never through a proxy from the environment.

Contract departures from the HF sampler, all explicit:
1. Behaviour log-probs. With ``SamplingParams.logprobs`` True and ``logprobs="server"`` (the
   default) the server is asked for per-token log-probs, and the sampler raises unless it returns
   exactly one per re-encoded token: a training rollout engine without the sampling policy's
   log-probs would train on made-up ratios. ``logprobs="nan"`` never asks and fills NaN, for
   evaluation only (a NaN ratio fails the trainer's finite checks instead of training silently).
   ``sync_weights`` raises: a remote server cannot follow the policy being trained.
2. Seeds. Row r of a call is sent with seed (seed·1 000 003 + r·7 919) mod (2³¹ − 1), one
   request per row (``n`` is not sent: not every server supports it). The same seed gives the
   same tokens only if the server honours ``seed`` (or decodes greedily).
3. Stops. A stop string the server left in the text cuts the continuation after it; one the
   server dropped (as the OpenAI API does) is put back from ``stop_reason`` when the server
   names it (a stop token id named there is appended); a "stop" without a named reason is read
   as the model's EOS, which is appended.
   ``stop_token_ids`` and ``top_k`` > 0 are sent as the non-standard fields of those names
   (vLLM's), only when set; a server that does not know them refuses the request.
4. Lengths. The re-encoded continuation is cut at ``max_new_tokens`` (then its finish is
   "length") in case the local tokenizer splits the text into more tokens than the server did.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from finegrain.sampling.base import FINISH_LENGTH, FINISH_STOP, SAMPLERS, Completions, SamplingParams

ENV_BASE_URL, ENV_MODEL = "FINEGRAIN_OPENAI_BASE_URL", "FINEGRAIN_OPENAI_MODEL"
MAX_ANSWER_BYTES = 32 * 2**20  # an answer larger than this is garbage, not a completion
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class ServerError(RuntimeError):
    """One line: which URL, what went wrong, how many attempts were made (``attempts``)."""

    def __init__(self, url: str, what: str, attempts: int):
        super().__init__(f"OpenAI-compatible server {url}: {what} (after {attempts} attempt{'s' * (attempts != 1)})")
        self.url, self.what, self.attempts = url, what, attempts


class _Retryable(Exception):
    """An attempt failed in a way a later attempt may not (down, timeout, 5xx, garbage)."""


class _Final(Exception):
    """An attempt failed in a way no retry fixes (a 4xx answer other than 408/409/425/429)."""


def is_loopback(url: str) -> bool:
    """True when the URL's host is a loopback address or ``localhost``.

    >>> is_loopback("http://127.0.0.1:8000/v1"), is_loopback("http://[::1]:80"), is_loopback("http://example.org")
    (True, True, False)
    """
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _one_line(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class TextCompletion:
    """One answer: its text, why it ended ("stop" | "length"), the stop string or stop token id
    the server names (``stop_reason``, if any), and the per-token log-probs the server returned
    (None if none)."""

    text: str
    finish: str
    stop_reason: str | int | None = None
    logprobs: list[float] | None = None


class OpenAIClient:
    """POST JSON to an OpenAI-compatible server, with timeouts and bounded retries.

    Args:
        base_url: the server's API root, e.g. ``http://127.0.0.1:8000/v1`` (a trailing ``/v1``
            is added when missing).
        model: the ``model`` field of every request (None: not sent; servers started with one
            forced model accept that).
        api_key_env: name of the environment variable holding the key ("" = never send one); no
            header is sent when the variable is unset or empty.
        timeout: seconds for connecting and for each read of one attempt (socket timeout).
        max_retries: retries after the first attempt (so at most 1 + max_retries attempts).
        backoff: the wait before retry i (i = 1, 2, ...) is min(backoff · 2^(i−1), max_backoff) s.

    ``stats`` counts attempts, retries and failed calls (read by tests and logs); it is guarded
    by a lock, as calls may come from several threads.
    """

    def __init__(self, base_url: str, *, model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 2, backoff: float = 0.5, max_backoff: float = 8.0):
        if not base_url or urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
            raise ValueError(f"openai: base_url must be an http(s) URL, got {base_url!r}")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"openai: timeout must be a finite number of seconds > 0, got {timeout!r}")
        if int(max_retries) != max_retries or max_retries < 0:
            raise ValueError(f"openai: max_retries must be an integer >= 0, got {max_retries!r}")
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else root + "/v1"
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.max_retries, self.backoff, self.max_backoff = float(timeout), int(max_retries), backoff, max_backoff
        # loopback servers are reached directly: a proxy from the environment would take the request elsewhere
        handlers = [urllib.request.ProxyHandler({})] if is_loopback(self.base_url) else []
        self._opener = urllib.request.build_opener(*handlers)
        self._lock = threading.Lock()
        self.stats = {"attempts": 0, "retries": 0, "failures": 0}

    def __repr__(self) -> str:  # never shows the key (it is not stored anyway)
        return f"OpenAIClient({self.base_url!r}, model={self.model!r}, timeout={self.timeout}, max_retries={self.max_retries})"

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def post(self, path: str, body: dict, check=None) -> dict:
        """The JSON object the server answers to ``body`` at ``base_url + path``.

        ``check(answer)`` raises ``ValueError`` (with what is missing) for an answer that is JSON
        but not the expected shape; that counts as garbage, like non-JSON, and is retried.
        Raises ``ServerError`` after the last failed attempt, or at once for a 4xx refusal.
        """
        url = self.base_url + path
        data = json.dumps(body if self.model is None else {"model": self.model, **body}).encode()
        attempts = 0
        while True:
            attempts += 1
            self._count("attempts")
            try:
                answer = self._attempt(url, data)
                if check is not None:
                    try:
                        check(answer)
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        raise _Retryable(f"answered JSON without the expected fields: {e}") from None
                return answer
            except _Final as e:
                self._count("failures")
                raise ServerError(url, str(e), attempts) from None
            except _Retryable as e:
                if attempts > self.max_retries:
                    self._count("failures")
                    raise ServerError(url, str(e), attempts) from None
                self._count("retries")
                time.sleep(min(self.backoff * 2 ** (attempts - 1), self.max_backoff))

    def _attempt(self, url: str, data: bytes) -> dict:
        req = urllib.request.Request(url, data=data, headers=self._headers(), method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as e:
            detail = _one_line(e.read(2000).decode("utf-8", "replace")) if e.fp is not None else ""
            key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
            if key:  # a server may echo the key it refused
                detail = detail.replace(key, "***")
            what = f"answered HTTP {e.code}" + (f": {detail}" if detail else "")
            raise (_Retryable if e.code in _RETRY_STATUS else _Final)(what) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no answer within the {self.timeout:g} s timeout") from None
            if isinstance(reason, ConnectionRefusedError):
                raise _Retryable("connection refused (is the server running?)") from None
            raise _Retryable(f"cannot connect: {_one_line(reason)}") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"no answer within the {self.timeout:g} s timeout") from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retryable(f"connection failed: {type(e).__name__}: {_one_line(e) or 'no details'}") from None
        if len(raw) > MAX_ANSWER_BYTES:
            raise _Retryable(f"answered more than {MAX_ANSWER_BYTES} bytes")
        try:
            answer = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _Retryable(f"answered non-JSON: {_one_line(repr(raw[:80]))}") from None
        if not isinstance(answer, dict):
            raise _Retryable(f"answered JSON that is not an object: {_one_line(repr(answer), 80)}")
        return answer

    # ---------------------------------------------------------------- the two endpoints

    def complete(self, prompt: str, params: SamplingParams, *, seed: int | None = None, chat: bool = False,
                 logprobs: bool = False) -> TextCompletion:
        """One continuation of ``prompt``: ``/completions`` with the prompt as it is, or with
        ``chat`` ``/chat/completions`` with the prompt as one user message."""
        body: dict = {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "stream": False}
        if params.temperature > 0 and params.top_p < 1.0:
            body["top_p"] = params.top_p
        if params.temperature > 0 and params.top_k > 0:
            body["top_k"] = params.top_k
        if params.stop_strings:
            body["stop"] = list(params.stop_strings)
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        if seed is not None:
            body["seed"] = int(seed)
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
            if logprobs:
                body["logprobs"] = True
            answer = self.post("/chat/completions", body, check=_check_chat)
        else:
            body["prompt"] = prompt
            if logprobs:
                body["logprobs"] = 1
            answer = self.post("/completions", body, check=_check_completion)
        return _text_completion(answer, chat)


def _choice(answer: dict) -> dict:
    choices = answer["choices"]
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("'choices' is not a non-empty list of objects")
    return choices[0]


def _check_chat(answer: dict) -> None:
    message = _choice(answer)["message"]
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise ValueError("no string at choices[0].message.content")


def _check_completion(answer: dict) -> None:
    if not isinstance(_choice(answer).get("text"), str):
        raise ValueError("no string at choices[0].text")


def _server_logprobs(choice: dict, chat: bool) -> list[float] | None:
    """The sampled tokens' log-probs as the server reports them, or None if it sent none."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    values = [t.get("logprob") for t in lp.get("content") or []] if chat else lp.get("token_logprobs")
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        return None
    return [float(v) for v in values]


def _text_completion(answer: dict, chat: bool) -> TextCompletion:
    choice = _choice(answer)
    text = choice["message"]["content"] if chat else choice["text"]
    finish = FINISH_LENGTH if choice.get("finish_reason") == "length" else FINISH_STOP
    reason = choice.get("stop_reason")
    reason = reason if isinstance(reason, (str, int)) and not isinstance(reason, bool) else None
    return TextCompletion(text, finish, reason, _server_logprobs(choice, chat))


def request_seed(seed: int, row: int) -> int:
    """The seed sent with row ``row`` of a call made with ``seed``.

    >>> request_seed(0, 0), request_seed(3, 1) != request_seed(3, 2)
    (0, True)
    """
    return (seed * 1_000_003 + row * 7_919) % (2**31 - 1)


@SAMPLERS.register("openai")
class OpenAISampler:
    """The ``Sampler`` contract through an OpenAI-compatible server (see the module docstring).

    Args:
        model: unused (the server holds the model); accepted so ``SAMPLERS.get(name)(model,
            tokenizer, **options)`` builds every sampler alike.
        tokenizer: the server model's tokenizer, for ``sample`` (token ids in and out); None is
            enough for ``complete_texts``.
        base_url: the server's API root; None = the ``FINEGRAIN_OPENAI_BASE_URL`` variable.
        model_name: the ``model`` field; None = the ``FINEGRAIN_OPENAI_MODEL`` variable, else
            not sent.
        endpoint: "completions" (a prefix is sent as raw text) or "chat" (as one user message).
        logprobs: "server" (ask for them; raise if the server does not give one per token) or
            "nan" (never ask; NaN per token: evaluation only).
        max_concurrency: requests in flight at once (a thread each).
        max_batch: accepted for the common constructor call; rows are sent ``max_concurrency`` at a time.
        context_length: the server model's context, if known (None = unknown, no check).
        api_key_env, timeout, max_retries, backoff: as ``OpenAIClient``.
    """

    def __init__(self, model=None, tokenizer=None, *, base_url: str | None = None, model_name: str | None = None,
                 endpoint: str = "completions", logprobs: str = "server", api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 2, backoff: float = 0.5, max_concurrency: int = 4,
                 max_batch: int | None = None, context_length: int | None = None):
        if endpoint not in ("completions", "chat"):
            raise ValueError(f"openai sampler: endpoint must be 'completions' or 'chat', got {endpoint!r}")
        if logprobs not in ("server", "nan"):
            raise ValueError(f"openai sampler: logprobs must be 'server' or 'nan', got {logprobs!r}")
        if int(max_concurrency) != max_concurrency or max_concurrency < 1:
            raise ValueError(f"openai sampler: max_concurrency must be an integer >= 1, got {max_concurrency!r}")
        base_url = base_url or os.environ.get(ENV_BASE_URL, "")
        if not base_url:
            raise ValueError(f"openai sampler: no server: pass base_url or set {ENV_BASE_URL}")
        self.client = OpenAIClient(base_url, model=model_name or os.environ.get(ENV_MODEL) or None,
                                   api_key_env=api_key_env, timeout=timeout, max_retries=max_retries, backoff=backoff)
        self.tokenizer, self.endpoint, self.logprobs_mode = tokenizer, endpoint, logprobs
        self.max_concurrency, self._context_length = int(max_concurrency), context_length

    @property
    def context_length(self) -> int | None:
        return self._context_length

    def sync_weights(self) -> None:
        raise RuntimeError(f"openai sampler: cannot load the trained policy's weights into the server at "
                           f"{self.client.base_url}; it samples from the server's own model (evaluation, judges)")

    def complete_texts(self, prompts: Sequence[str], params: SamplingParams, seed: int,
                       logprobs: bool = False) -> list[TextCompletion]:
        """One continuation of each prompt text, in order; rows sent ``max_concurrency`` at a time."""
        chat = self.endpoint == "chat"

        def one(r: int) -> TextCompletion:
            return self.client.complete(prompts[r], params, seed=request_seed(seed, r), chat=chat, logprobs=logprobs)

        if self.max_concurrency == 1 or len(prompts) <= 1:
            return [one(r) for r in range(len(prompts))]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(one, range(len(prompts))))

    def sample(self, prefixes: Sequence[Sequence[int]], n: int, params: SamplingParams, seed: int) -> Completions:
        tok = self.tokenizer
        if tok is None:
            raise ValueError("openai sampler: sample() works on token ids and needs the server model's tokenizer")
        rows = [list(p) for p in prefixes for _ in range(n)]
        ctx = self.context_length
        longest = max((len(r) for r in rows), default=0)
        if ctx is not None and longest + params.max_new_tokens > ctx:
            worst = max(range(len(rows)), key=lambda i: len(rows[i])) // max(n, 1)
            raise ValueError(f"prefix {worst}: {longest} tokens plus max_new_tokens={params.max_new_tokens} exceeds "
                             f"the model's context of {ctx} tokens")
        want_lp = params.logprobs and self.logprobs_mode == "server"
        texts = [self._prefix_text(r) for r in rows]
        answers = self.complete_texts(texts, params, seed, logprobs=want_lp)
        out = Completions()
        for r, a in enumerate(answers):
            ids, finish = self._tokens(a, params)
            if not params.logprobs:
                lps = None
            elif not want_lp:
                lps = [math.nan] * len(ids)
            else:
                lps = self._behaviour_logprobs(a, ids, r)
            out.token_ids.append(ids)
            out.logprobs.append(lps)
            out.finish.append(finish)
        return out

    def _prefix_text(self, row: list[int]) -> str:
        """The prefix as text; a leading BOS is dropped (the server's tokenizer adds its own)."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if row and bos is not None and row[0] == bos:
            row = row[1:]
        return self.tokenizer.decode(row, skip_special_tokens=False)

    def _tokens(self, a: TextCompletion, sp: SamplingParams) -> tuple[list[int], str]:
        tok, text, finish = self.tokenizer, a.text, a.finish
        hits = [text.find(s) + len(s) for s in sp.stop_strings if s in text]
        end: list[int] = []
        if hits:
            text, finish = text[:min(hits)], FINISH_STOP
        elif finish == FINISH_STOP:
            if isinstance(a.stop_reason, str) and a.stop_reason in sp.stop_strings:
                text += a.stop_reason
            elif isinstance(a.stop_reason, int) and a.stop_reason in sp.stop_token_ids:
                end = [a.stop_reason]
            else:
                end = [tok.eos_token_id]
        ids = tok(text, add_special_tokens=False)["input_ids"] + end
        if len(ids) > sp.max_new_tokens:
            ids, finish = ids[:sp.max_new_tokens], FINISH_LENGTH
        return ids, finish

    def _behaviour_logprobs(self, a: TextCompletion, ids: list[int], row: int) -> list[float]:
        url = self.client.base_url
        if a.logprobs is None:
            raise ValueError(f"openai sampler: the server at {url} returned no log-probs; without the sampling "
                             "policy's log-probs it cannot be a training rollout engine (logprobs='nan' samples "
                             "for evaluation only)")
        if len(a.logprobs) != len(ids):
            raise ValueError(f"openai sampler: row {row}: the server at {url} returned {len(a.logprobs)} log-probs for "
                             f"{len(ids)} re-encoded tokens (is the local tokenizer the server model's?)")
        return list(a.logprobs)
