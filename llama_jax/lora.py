"""LoRA as a transform over a model (factors live on `Linear.lora`)."""
from __future__ import annotations

from flax import nnx


def has_lora(model) -> bool:
    from .model import Linear

    return any(isinstance(m, Linear) and m.lora is not None for _, m in nnx.iter_modules(model))
