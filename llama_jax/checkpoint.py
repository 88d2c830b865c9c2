"""llama_jax checkpoint directories: config.json + llama_jax.json + an orbax parameter tree.

Restored straight onto the target shardings (orbax reads only each device's shard)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
from flax import nnx

from .config import LlamaConfig
from .fsutil import atomic_output_dir
from .model import Llama, abstract_model, platform_compute_dtype
from .sharding import state_shardings

FORMAT = 1


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_checkpoint(model: Llama, out_dir: str | os.PathLike) -> Path:
    """Parameters (LoRA factors included) of `model`, written atomically."""
    out_dir = Path(out_dir).absolute()
    with atomic_output_dir(out_dir, replace=True) as tmp:
        state = nnx.state(model, nnx.Param)
        ckptr = _checkpointer()
        ckptr.save(tmp / "params", nnx.to_pure_dict(state))
        ckptr.wait_until_finished()
        (tmp / "config.json").write_text(model.config.to_json_string())
        (tmp / "llama_jax.json").write_text(json.dumps({"format": FORMAT, "head": model.head,
                                                        "param_dtype": model.config.param_dtype}) + "\n")
    return out_dir


def load_checkpoint(path: str | os.PathLike, dtype=None, mesh=None, **runtime) -> Llama:
    path = Path(path).absolute()
    meta = json.loads((path / "llama_jax.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}/llama_jax.json: unsupported format {meta.get('format')!r}")
    if dtype is not None:
        runtime.setdefault("dtype", str(jax.numpy.dtype(dtype)))
        runtime.setdefault("param_dtype", str(jax.numpy.dtype(dtype)))
    runtime.setdefault("param_dtype", meta.get("param_dtype", "float32"))
    runtime.setdefault("dtype", runtime["param_dtype"])
    runtime["dtype"] = platform_compute_dtype(runtime["dtype"], source=path)
    cfg = LlamaConfig.from_json_file(path / "config.json", **runtime)
    model = abstract_model(cfg, head=meta.get("head", "lm"), mesh=mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=dev), params)
    else:
        sh = state_shardings(params, mesh)
        target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), params, sh)
    restored = _checkpointer().restore(path / "params", nnx.to_pure_dict(target))
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)
