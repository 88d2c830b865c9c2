"""optax AdamW with warmup + cosine/linear decay, global-norm clipping, a weight-decay mask and a
separate learning rate for LoRA factors."""
from __future__ import annotations

import jax
import optax
from flax import nnx


def schedule(tc: dict):
    steps = int(tc["steps"])
    warmup = int(tc["warmup_steps"]) if tc.get("warmup_steps") is not None else int(round(tc["warmup_ratio"] * steps))

    def make(peak):
        end = peak * tc["min_lr_ratio"]
        decay_steps = max(steps - warmup, 1)
        if tc["schedule"] == "cosine":
            decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=tc["min_lr_ratio"])
        elif tc["schedule"] == "linear":
            decay = optax.linear_schedule(peak, end, decay_steps)
        elif tc["schedule"] == "constant":
            decay = optax.constant_schedule(peak)
        else:
            raise ValueError(f"train.schedule: {tc['schedule']!r} is not one of cosine, linear, constant")
        if warmup == 0:
            return decay
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])

    return make


def _path_str(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def decay_mask(params):
    """Decay matrices, not norms (HF Trainer's convention)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: "norm" not in _path_str(p), params)


def is_lora_path(p) -> bool:
    s = _path_str(p)
    return "lora" in s


def make_optimizer(tc: dict, params) -> tuple[optax.GradientTransformation, callable]:
    """Returns (transform, lr_fn); lr_fn(step) is the main learning rate, for logging."""
    make = schedule(tc)
    main_lr = make(float(tc["lr"]))

    def adamw(lr):
        return optax.adamw(lr, b1=tc["b1"], b2=tc["b2"], eps=tc["eps"], weight_decay=tc["weight_decay"],
                           mask=decay_mask)

    labels = jax.tree_util.tree_map_with_path(lambda p, _: "lora" if is_lora_path(p) else "full", params)
    lora_lr = tc.get("lora_lr")
    if lora_lr is not None and any(l == "lora" for l in jax.tree.leaves(labels)):
        inner = optax.multi_transform({"lora": adamw(make(float(lora_lr))), "full": adamw(main_lr)}, labels)
    else:
        inner = adamw(main_lr)
    chain = [inner] if not tc.get("clip_norm") else [optax.clip_by_global_norm(float(tc["clip_norm"])), inner]
    return optax.chain(*chain), main_lr


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


__all__ = ["make_optimizer", "schedule", "decay_mask", "count_params", "nnx"]
