"""Servers on 127.0.0.1 for the OpenAI-compatible client tests (loopback only; each stops itself).

* ``transformers_serve(model_dir)``: the real ``transformers serve`` (FastAPI + uvicorn) on a
  tiny local model, run as a child process on a free loopback port (stopped on exit).
* ``stdlib_model_server(model, tokenizer)``: the fallback when transformers' serving extras
  (fastapi, uvicorn) are missing: ``http.server`` answering ``/v1/completions`` and
  ``/v1/chat/completions`` by running the model through finegrain's HF sampler.
* ``scripted_server(answer)``: answers every POST with ``answer(body)`` (a fixed verdict,
  garbage bytes, JSON without the expected fields), optionally after sleeping.

Every server counts the POSTs it received (``server.posts``), so tests can count retries.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def free_port() -> int:
    """A port nothing listens on right now (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_model(tmp_dir: Path, alphabet: str, *, size: str = "micro", seed: int = 0) -> tuple[Path, object, object]:
    """A tiny model built from config (``finegrain.models.tiny``), saved with its char tokenizer
    (and a plain chat template: BOS, then the messages' contents) to ``tmp_dir``.

    Llama-shaped: for a Qwen2 config, ``AutoTokenizer`` (which ``transformers serve`` uses) loads
    the saved char tokenizer as ``Qwen2Tokenizer``, which re-splits text and drops spaces and
    newlines; for Llama it keeps the saved tokenizer, so the server and the test agree on tokens."""
    from finegrain.models.tiny import tiny_causal_lm
    from finegrain.models.tokenizer import char_tokenizer

    tok = char_tokenizer(alphabet)
    tok.chat_template = CHAT_TEMPLATE
    model = tiny_causal_lm(tok, family="llama", size=size, seed=seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp_dir)
    tok.save_pretrained(tmp_dir)
    return tmp_dir, model, tok


def serving_available() -> bool:
    from transformers.utils.import_utils import is_serve_available

    return is_serve_available()


class _Counting:
    def __init__(self):
        self.posts = 0
        self.headers: dict = {}
        self._lock = threading.Lock()

    def hit(self) -> None:
        with self._lock:
            self.posts += 1


@contextlib.contextmanager
def _http_server(respond, *, delay: float = 0.0):
    """``respond(path, body) -> (status, bytes)`` served on 127.0.0.1; yields (base_url, counter).
    ``counter.headers`` holds the headers of the last POST."""
    counter = _Counting()
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            counter.hit()
            counter.headers = dict(self.headers)
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if delay:
                stop.wait(delay)  # sleeps past the client's timeout, but never past the test
            status, payload = respond(self.path, json.loads(raw or b"{}"))
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", counter
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def scripted_server(answer, *, delay: float = 0.0, status: int = 200):
    """Every POST gets ``answer(body)``: bytes as they are, anything else as JSON."""
    def respond(path, body):
        out = answer(body)
        return status, out if isinstance(out, bytes) else json.dumps(out).encode()

    return _http_server(respond, delay=delay)


def chat_answer(text: str, finish: str = "stop") -> dict:
    return {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}


def stdlib_model_server(model, tokenizer):
    """``/v1/completions`` and ``/v1/chat/completions`` answered by ``model`` (greedy at
    temperature 0, else sampled with the request's seed); EOS and stop strings end an answer and
    are left out of its text, as the OpenAI API does."""
    from finegrain.sampling import SAMPLERS, SamplingParams

    sampler = SAMPLERS.get("hf")(model, tokenizer)
    lock = threading.Lock()  # one generate at a time on the shared model

    def respond(path, body):
        chat = path.endswith("/chat/completions")
        prompt = "".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        stops = tuple(body.get("stop") or ())
        sp = SamplingParams(temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                            max_new_tokens=int(body.get("max_tokens", 16)), stop_strings=stops, logprobs=False)
        ids = tokenizer(prompt)["input_ids"]
        with lock:
            out = sampler.sample([ids], 1, sp, seed=int(body.get("seed", 0)))
        text = tokenizer.decode(out.token_ids[0], skip_special_tokens=True)
        for s in stops:
            text = text.split(s)[0]
        choice = {"index": 0, "finish_reason": out.finish[0]}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return 200, json.dumps({"id": "x", "object": "chat.completion" if chat else "text_completion",
                                "choices": [choice]}).encode()

    return _http_server(respond)


@contextlib.contextmanager
def transformers_serve(model_dir: Path, *, startup_timeout: float = 180.0):
    """``transformers serve <model_dir>`` on 127.0.0.1 as a child process; yields its base URL and
    the model name to send. Waits (bounded) for ``/health`` and stops the child afterwards.

    A child process rather than a thread of this one: transformers 5.25 dropped ``Serve``'s
    ``non_blocking`` mode (its constructor now blocks in uvicorn until the server stops), and the
    command line is the interface that stays the same across releases. A child also cannot touch
    this process's torch RNG."""
    import os
    import subprocess
    import sys
    import tempfile

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
           "--log-level", "error"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    log = tempfile.TemporaryFile()
    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            try:
                with opener.open(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if child.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"transformers serve did not come up on {base} within {startup_timeout} s "
                                   f"(exit code {child.poll()}):\n{tail}")
            time.sleep(0.3)
        yield base + "/v1", str(model_dir)
    finally:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        log.close()
