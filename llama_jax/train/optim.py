"""optax AdamW with warmup + cosine/linear decay, global-norm clipping, a weight-decay mask and a
separate learning rate for LoRA factors; where the optimizer state lives on a mesh."""
from __future__ import annotations

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from optax.transforms import MaskedNode


def schedule(tc):
    """tc: a TrainSection (steps, warmup_steps / warmup_ratio, schedule, min_lr_ratio)."""
    steps = tc.steps
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int(round(tc.warmup_ratio * steps))

    def make(peak):
        end = peak * tc.min_lr_ratio
        decay_steps = max(steps - warmup, 1)
        if tc.schedule == "cosine":
            decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=tc.min_lr_ratio)
        elif tc.schedule == "linear":
            decay = optax.linear_schedule(peak, end, decay_steps)
        elif tc.schedule == "constant":
            decay = optax.constant_schedule(peak)
        else:
            raise ValueError(f"train.schedule: {tc.schedule!r} is not one of cosine, linear, constant")
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


def make_optimizer(tc, params) -> tuple[optax.GradientTransformation, callable]:
    """tc: a TrainSection.  Returns (transform, lr_fn); lr_fn(step) is the main learning rate, for logging."""
    make = schedule(tc)
    main_lr = make(tc.lr)

    def adamw(lr):
        return optax.adamw(lr, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, mask=decay_mask)

    labels = jax.tree_util.tree_map_with_path(lambda p, _: "lora" if is_lora_path(p) else "full", params)
    if tc.lora_lr is not None and any(l == "lora" for l in jax.tree.leaves(labels)):
        inner = optax.multi_transform({"lora": adamw(make(tc.lora_lr)), "full": adamw(main_lr)}, labels)
    else:
        inner = adamw(main_lr)
    chain = [inner] if not tc.clip_norm else [optax.clip_by_global_norm(tc.clip_norm), inner]
    return optax.chain(*chain), main_lr


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def on_mesh(x, mesh) -> NamedSharding:
    """The sharding a state leaf keeps: its own NamedSharding on `mesh`, else replicated.  Works on
    arrays and on ShapeDtypeStructs alike (the planner's abstract state carries its shardings)."""
    sh = getattr(x, "sharding", None)
    return sh if isinstance(sh, NamedSharding) and sh.mesh == mesh else NamedSharding(mesh, P())


def opt_state_shardings(tx, params, param_shardings, mesh):
    """Optimizer-state shardings: every per-parameter leaf (Adam moments, ...) follows its
    parameter's sharding, everything else (counts) is replicated.  Explicit on purpose: jit(tx.init)
    alone leaves the moments where XLA puts a constant (one device), which would replicate them."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx, lambda v, sh: v if isinstance(v, MaskedNode) else sh, abstract, param_shardings,
        transform_non_params=lambda _: NamedSharding(mesh, P()),
        is_leaf=lambda x: isinstance(x, (jax.ShapeDtypeStruct, MaskedNode)))


def init_opt_state(tx, params, param_shardings, mesh):
    """tx.init(params), created already sharded (see opt_state_shardings)."""
    params = jax.device_put(params, param_shardings)
    return jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, param_shardings, mesh))(params)
