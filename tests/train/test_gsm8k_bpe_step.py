"""The real-model path: a locally trained byte-level BPE tokenizer, a tiny Qwen2 saved as a Hugging
Face directory, GSM8K prompts and the GSM8K verifier, through the unchanged RL loop."""

import json

from finegrain.config import load_config
from finegrain.models.tiny import tiny_causal_lm
from finegrain.models.tokenizer import train_bpe_tokenizer
from finegrain.tasks import TASKS
from finegrain.train.logging import read_log
from finegrain.train.loop import train


def test_one_rl_step_on_gsm8k_with_bpe_qwen2(tmp_path):
    task = TASKS.get("gsm8k")()
    texts = [e.prompt + "\n" + e.solution for e in task.examples("train", 300)]
    tok = train_bpe_tokenizer(texts, vocab_size=400)
    assert len(tok("Natalia sold 48 clips")["input_ids"]) < len("Natalia sold 48 clips")  # really BPE
    model = tiny_causal_lm(tok, family="qwen2", size="micro", seed=0)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    cfg = load_config(None, [
        f"model.path={tmp_path / 'model'}", "model.device=cpu", "task.name=gsm8k",
        "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=12",
        "rewards=[{name: verifier}, {name: overlong, kwargs: {max_len: 12, cache_len: 10}}]",
        "eval.n_problems=2", "eval.samples=1", "eval.max_new_tokens=12", "eval.greedy_too=false",
        "train.steps=1", "train.eval_every=0", "train.save_every=0", f"train.out_dir={tmp_path / 'run'}",
        "train.tensorboard=false", "train.progress=false"])
    report = train(cfg, log=lambda s: None)
    assert report["eval"]["n_problems"] == 2
    rows = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if "loss/loss" in r]
    assert len(rows) == 1 and rows[0]["rollout/rows"] == 4
    assert "reward/verifier/accuracy" in rows[0]
    samples = [json.loads(l) for l in (tmp_path / "run" / "samples_after.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"] for s in samples)
