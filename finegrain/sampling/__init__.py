"""The sampling layer (``SAMPLERS``): every generation in finegrain goes through a Sampler."""

from finegrain.sampling.base import SAMPLERS, Completions, Sampler, SamplingParams, sample_seed  # noqa: F401
from finegrain.sampling import hf  # noqa: E402,F401  (registers entries)
from finegrain.sampling import openai  # noqa: E402,F401  (registers the OpenAI-compatible client sampler)
from finegrain.sampling import vllm  # noqa: E402,F401  (registers "vllm"; imports vllm itself only when built)
