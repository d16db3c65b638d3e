"""erpo-mega: Megatron-style RL post-training for reasoning models with ERPO."""

__version__ = "0.1.0"
