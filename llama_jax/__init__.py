"""llama_jax: LLaMA-2 -> Chinese LLaMA in JAX/Flax NNX.

The public names below are imported on first use (PEP 562), so `import llama_jax.data...` in a
tokenisation worker does not pull in jax and flax (measured: spawned `data tokenize` workers spent
~17 s each importing them on the contended 2-core VM, which made 2 processes slower than 1).
"""
from __future__ import annotations

import importlib
import sys
import types

_PUBLIC = {
    "LlamaConfig": "config", "UnsupportedConfigError": "config", "preset": "config",
    "Cache": "model", "Llama": "model", "abstract_model": "model", "init_model": "model",
    "CheckpointError": "hf", "load": "hf", "save_hf": "hf",
    "save_checkpoint": "checkpoint",
    "make_mesh": "sharding", "initialize_distributed": "sharding",
    "generate": "generate",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`llama_jax.generate` is the function, as it was with eager imports: importing the submodule
    `llama_jax.generate` must not rebind the package attribute to the module (the import system
    sets it after loading a submodule)."""

    def __setattr__(self, name, value):
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
