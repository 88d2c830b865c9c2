"""Mesh from config, one logical-axis rules table, multi-host init.

Every parameter carries logical axis names (its `axes` metadata, see model.py); activations are
constrained by the same names.  `RULES` maps each logical name to mesh axes, so changing the
parallelism is a config change.  A dimension that a mesh axis does not divide is replicated
instead (e.g. 2 KV heads on tensor=4), which keeps small models runnable on any mesh.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "layers": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "lora_rank": None,
    "norm": None,
    "act_embed": None,      # activations' hidden dim: kept whole between layers
    "act_heads": "tensor",  # activations' head dim inside attention
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "cache_length": None,
}

log = logging.getLogger(__name__)


def parse_mesh(s: str | None) -> dict | None:
    """`--mesh data=1,fsdp=4,tensor=2` (one entry may be -1 = all remaining devices) -> a shape for
    make_mesh; None for an empty string."""
    if not s:
        return None
    out = {}
    for part in s.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in MESH_AXES or not v.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {s!r}: expected e.g. data=1,fsdp=4,tensor=2 (axes {', '.join(MESH_AXES)})")
        out[k.strip()] = int(v)
    return out


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ('data', 'fsdp', 'tensor') mesh; one entry may be -1 = all remaining devices.

    `shape` is a mapping like {"data": 1, "fsdp": -1, "tensor": 1} or a 3-sequence in that order.
    Default: everything on fsdp.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if shape is None:
        shape = {"fsdp": -1}
    if not isinstance(shape, Mapping):
        shape = dict(zip(MESH_AXES, shape))
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)}; axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh: {n} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n // known
    if -1 not in shape.values() and math.prod(sizes) < n:
        devices, n = devices[:math.prod(sizes)], math.prod(sizes)  # an explicit smaller mesh
    if math.prod(sizes) != n:
        raise ValueError(f"mesh: shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {n}")
    try:
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # non-TPU topologies mesh_utils does not know: plain order is fine
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def spec_for(axes: Iterable[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
             rules: Mapping[str, object] | None = None) -> P:
    """PartitionSpec for logical `axes`; drops mesh axes that do not divide the dimension."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        if target is None:
            out.append(None)
            continue
        mesh_axes = (target,) if isinstance(target, str) else tuple(target)
        mesh_axes = tuple(a for a in mesh_axes if a not in used and (mesh is None or mesh.shape[a] > 1))
        if mesh is not None and shape is not None:
            keep = []
            size = 1
            for a in mesh_axes:
                if shape[i] % (size * mesh.shape[a]) == 0:
                    keep.append(a)
                    size *= mesh.shape[a]
            mesh_axes = tuple(keep)
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules: Mapping[str, object] | None = None) -> NamedSharding:
    return NamedSharding(mesh, spec_for(axes, shape, mesh, rules))


def state_shardings(state, mesh: Mesh, rules: Mapping[str, object] | None = None):
    """NamedSharding tree for an nnx State whose Variables carry `axes` metadata."""
    from flax import nnx

    def one(v):
        if isinstance(v, nnx.Variable):
            axes = getattr(v, "axes", None)
            if axes is None:
                axes = (None,) * v.get_value().ndim
            return v.replace(named_sharding(mesh, axes, v.get_value().shape, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x, axes: Sequence[str | None], mesh: Mesh | None, rules: Mapping[str, object] | None = None):
    """with_sharding_constraint by logical names; a no-op without a mesh or on one device."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape, rules))


def to_host(x) -> np.ndarray:
    """A jax.Array as one host numpy array; multi-host, the array is all-gathered first (every
    process must call this for the same arrays, in the same order)."""
    if not x.is_fully_addressable:  # multi-host: gather this tensor only
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, cpu_collectives: bool = False) -> None:
    """Multi-host setup.  On TPU VMs and SLURM/Kubernetes GPU clusters jax finds everything itself
    (call with no arguments on every host).  Elsewhere pass the coordinator address and ids, or set
    LLAMA_JAX_COORDINATOR / LLAMA_JAX_NUM_PROCESSES / LLAMA_JAX_PROCESS_ID.  `cpu_collectives`
    selects gloo so several local CPU processes can run a multi-host job (used by the tests)."""
    coordinator = coordinator or os.environ.get("LLAMA_JAX_COORDINATOR")
    if num_processes is None and "LLAMA_JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["LLAMA_JAX_NUM_PROCESSES"])
    if process_id is None and "LLAMA_JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["LLAMA_JAX_PROCESS_ID"])
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def batch_sharding(mesh: Mesh, ndim: int, accum: bool = False) -> NamedSharding:
    """A batch leaf's sharding: rows over (data, fsdp) ("batch"); with `accum` a leading
    micro-batch axis [accum, rows, ...] stays whole."""
    lead = (None,) if accum else ()
    return NamedSharding(mesh, P(*lead, ("data", "fsdp"), *([None] * (ndim - 1))))


def host_batch_to_global(batch: dict, mesh: Mesh, accum: int = 0) -> dict:
    """This host's rows (numpy) -> global arrays sharded over (data, fsdp), the hosts' rows
    concatenated in process order; [accum, micro, ...] when `accum` > 0."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if accum:
            v = v.reshape((accum, v.shape[0] // accum) + v.shape[1:])
        sh = batch_sharding(mesh, v.ndim - (1 if accum else 0), bool(accum))
        gshape = list(v.shape)
        gshape[1 if accum else 0] *= jax.process_count()
        out[k] = jax.make_array_from_process_local_data(sh, v, tuple(gshape))
    return out
