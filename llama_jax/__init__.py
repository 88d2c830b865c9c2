"""llama_jax: LLaMA-2 -> Chinese LLaMA in JAX/Flax NNX."""
from .config import LlamaConfig, UnsupportedConfigError, preset
from .model import Cache, Llama, abstract_model, init_model
from .hf import CheckpointError, load, save_hf
from .checkpoint import save_checkpoint
from .sharding import make_mesh, initialize_distributed
from .generate import generate

__all__ = ["LlamaConfig", "UnsupportedConfigError", "preset", "Llama", "Cache", "init_model", "abstract_model",
           "load", "save_hf", "save_checkpoint", "CheckpointError", "make_mesh", "initialize_distributed",
           "generate"]
__version__ = "0.1.0"
