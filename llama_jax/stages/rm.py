"""`llama-jax rm`: the CLI name of the reward-model stage (implemented in reward.py)."""
from .reward import DEFAULTS, run, run_config

__all__ = ["DEFAULTS", "run", "run_config"]
