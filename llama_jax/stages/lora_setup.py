"""LoRA from a run config: which parameters train."""
from __future__ import annotations

from flax import nnx


def maybe_apply_lora(cfg, model):
    lc = cfg["lora"]
    if not lc["enabled"]:
        return nnx.Param
    from .. import lora

    lora.apply(model, rank=int(lc["rank"]), alpha=float(lc["alpha"]), targets=tuple(lc["targets"]),
               dropout=float(lc["dropout"]), trainable_modules=tuple(lc["trainable_modules"]),
               seed=int(cfg["train"]["seed"]))
    return lora.trainable_filter(model)
