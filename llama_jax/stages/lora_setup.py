"""LoRA from a run config: which parameters train."""
from __future__ import annotations

from flax import nnx


def maybe_apply_lora(cfg, model):
    """LoRA per cfg['lora']; then the frozen base in model.frozen_dtype (default: the compute dtype)
    and, with model.quantization (int8 / int4 / nf4), stored quantized (QLoRA).  Returns the filter
    of what trains."""
    lc, mc = cfg["lora"], cfg["model"]
    if not lc["enabled"]:
        if mc.get("quantization"):
            from ..train.config import ConfigError

            raise ConfigError(f"model.quantization={mc['quantization']!r} needs lora.enabled: a quantized base "
                              "is frozen (QLoRA); full fine-tuning trains float weights")
        return nnx.Param
    from .. import lora

    lora.apply(model, rank=int(lc["rank"]), alpha=float(lc["alpha"]), targets=tuple(lc["targets"]),
               dropout=float(lc["dropout"]), trainable_modules=tuple(lc["trainable_modules"]),
               seed=int(cfg["train"]["seed"]))
    lora.prepare_frozen(model, frozen_dtype=mc.get("frozen_dtype"), quantization=mc.get("quantization"),
                        tile=int(mc.get("quant_tile") or 64))
    return lora.trainable_filter(model)
