"""finegrain: reinforcement learning of language models with fine-grained rewards."""

__version__ = "0.1.0"
