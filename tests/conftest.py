import os

import pytest

# Tests never touch the user's cache or the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tiny_run_overrides(out_dir, cache_dir, steps=3, **extra):
    """Overrides that make any config a seconds-long CPU run (micro model, few prompts)."""
    base = {
        "model.size": "micro", "model.device": "cpu",
        # flawed_fraction 0.3: the pinned runs (tests/train/test_regression_pin.py) were recorded
        # when the demo's corpus had 30% slips; the demo now starts from the skill-gap corpus
        "sft.n_examples": 256, "sft.flawed_fraction": 0.3, "sft.batch_size": 32, "sft.lr": 3e-3, "sft.warmup_steps": 2, "sft.cache_dir": str(cache_dir),
        "task.kwargs": {"min_steps": 2, "max_steps": 2},
        "rollout.prompts_per_step": 4, "rollout.group_size": 4, "rollout.max_new_tokens": 24,
        "eval.n_problems": 6, "eval.samples": 2, "eval.max_new_tokens": 24, "eval.greedy_too": False,
        "train.steps": steps, "train.eval_every": 0, "train.save_every": 2, "train.out_dir": str(out_dir),
        "train.tensorboard": False, "train.progress": False,
        # a micro model rarely answers right, so an accuracy-band filter would drop every group
        "filters.filters": [],
    }
    base.update(extra)
    return [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def sft_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sft_cache")


def pytest_configure(config):
    # Tiny models on a shared 2-core machine run far faster single-threaded (oversubscription
    # made them ~40x slower); the library itself leaves torch's thread count alone.
    import torch

    torch.set_num_threads(1)
    # CLI calls in tests would otherwise re-pick threads from the machine's load (finegrain/threads.py)
    os.environ.setdefault("FINEGRAIN_THREADS", "1")
