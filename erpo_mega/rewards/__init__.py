"""Rewards: math-verify equivalence, the built-in task checker, and user functions by name."""

from erpo_mega.rewards.math_verify_reward import math_verify_reward
from erpo_mega.rewards.registry import RewardStats, SafeReward, get_reward_fn

__all__ = ["RewardStats", "SafeReward", "get_reward_fn", "math_verify_reward"]
