"""dapo-megatron: DAPO reinforcement-learning post-training on Megatron-Core."""

__version__ = "0.1.0"
