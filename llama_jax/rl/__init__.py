"""Reinforcement learning from feedback: PPO math (`ppo_math`) and rollouts (`rollout`).

The stage that runs PPO end to end is `llama_jax.stages.ppo` (`llama-jax ppo CONFIG.yaml`)."""
from . import ppo_math
from .rollout import REWARDS, get_reward_fn, reference_state, sample_responses

__all__ = ["ppo_math", "REWARDS", "get_reward_fn", "reference_state", "sample_responses"]
