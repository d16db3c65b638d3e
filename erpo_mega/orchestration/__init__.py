"""Orchestration: the pieces of the RL loop that call the rooms in order (engines, rollout,
SFT warm start, evaluation). `erpo_mega.trainer` strings them together."""
