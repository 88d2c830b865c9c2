"""Weight-only quantization of Linear kernels: the frozen base of QLoRA, int8 weights for generation.

Contract: `quantize_model(model, fmt, tile, skip=...)` replaces the kernel of every `Linear` that is
not trained (LoRA targets keep their float32 factors beside the quantized kernel; modules trained
in full are skipped by the caller) by its codes (an `nnx.Param`, so the frozen split and sharding
by logical axes treat it like the kernel it replaces) plus a `QuantScale` variable, and sets the
Linear's static `quant` spec; `Linear.__call__` then dequantises the codes to the compute dtype
right before its matmul (on TPU XLA fuses the decode into the dot's operand: only one layer's
dequantised weight exists at a time inside the scan).  `dequantize_model` turns them back into
float kernels (export merges LoRA into that dequantised base).  Works on concrete models and on
abstract ones (ShapeDtypeStruct leaves, for the planner).

Formats (kernel [..., din, dout], as stored by model.Linear):
* int8: symmetric per output channel: scale[o] = max_i |W[i, o]| / 127, codes int8.
  Storage [..., din, dout] int8 + [..., 1, dout] float32.
* int4: symmetric per tile of `tile` input rows: scale = absmax / 7, codes -7..7.
* nf4: the 16-value NormalFloat code book of QLoRA (Dettmers et al. 2023; the values bitsandbytes
  ships), scaled by each tile's absmax, nearest code.
  int4 / nf4 store two 4-bit codes per byte along din: [..., din / 2, dout] uint8 +
  [..., din / tile, dout] float32 scales, i.e. 0.5 + 4 / tile bytes per weight (0.5625 at tile 64,
  28% of bf16).

Why not qwix (installed): its providers intercept `dot_general` calls and pair them with the
module's own parameters when the model's `__call__` runs under `qwix.quantize_model`; our layers
run under `lax.scan` on a split-and-merged stacked state, LoRA is our own transform (PEFT I/O,
trainable filters, stacked factors), and the planner needs the quantized base as ordinary
sharded leaves of the frozen state.  The storage and the dequantise-in-the-matmul here are ~100
lines with tests; qwix's would have to be re-plumbed around all three.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .sharding import named_sharding

FORMATS = ("int8", "int4", "nf4")
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


class QuantScale(nnx.Variable):
    """Dequantisation scales of a quantized kernel (frozen; not an HF weight, so not an nnx.Param)."""


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    fmt: str
    tile: int
    din: int  # the kernel's input dim (packed codes have din / 2 rows)


def check(fmt: str | None, tile: int = 64, din: int | None = None) -> None:
    if fmt is None:
        return
    if fmt not in FORMATS:
        raise ValueError(f"quantization {fmt!r}: expected one of {FORMATS}")
    if fmt != "int8" and (tile < 2 or tile % 2):
        raise ValueError(f"quantization tile {tile}: expected an even size >= 2")
    if din is not None and fmt != "int8" and din % tile:
        raise ValueError(f"quantization {fmt}: tile {tile} does not divide the input size {din}")


def shapes(kshape, fmt: str, tile: int):
    """(codes shape, codes dtype, scale shape) for a kernel of shape kshape."""
    *lead, din, dout = kshape
    if fmt == "int8":
        return tuple(lead) + (din, dout), jnp.int8, tuple(lead) + (1, dout)
    return tuple(lead) + (din // 2, dout), jnp.uint8, tuple(lead) + (din // tile, dout)


def _tiles(w, tile):
    *lead, din, dout = w.shape
    return w.reshape(*lead, din // tile, tile, dout)


@functools.partial(jax.jit, static_argnames=("fmt", "tile"))
def quantize(w, fmt: str, tile: int = 64):
    """Float kernel [..., din, dout] -> (codes, scales) in the format's storage layout."""
    w = w.astype(jnp.float32)
    if fmt == "int8":
        scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127.0
        q = jnp.round(w / jnp.where(scale > 0, scale, 1.0))
        return jnp.clip(q, -127, 127).astype(jnp.int8), scale
    t = _tiles(w, tile)
    absmax = jnp.max(jnp.abs(t), axis=-2, keepdims=True)
    if fmt == "int4":
        scale = absmax / 7.0
        codes = jnp.clip(jnp.round(t / jnp.where(scale > 0, scale, 1.0)), -7, 7) + 8
    else:  # nf4: nearest code book entry of w / absmax
        scale = absmax
        x = t / jnp.where(scale > 0, scale, 1.0)
        mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
        codes = jnp.sum(x[..., None] > mids, axis=-1)
    codes = codes.reshape(w.shape).astype(jnp.uint8)
    packed = codes[..., 0::2, :] | (codes[..., 1::2, :] << 4)
    return packed, scale[..., 0, :]


def dequantize(codes, scale, spec: QuantSpec, dtype=jnp.float32):
    """(codes, scales) -> kernel [..., din, dout] in `dtype`."""
    if spec.fmt == "int8":
        return codes.astype(dtype) * scale.astype(dtype)
    lo, hi = codes & 15, codes >> 4
    c = jnp.stack([lo, hi], axis=-2).reshape(*codes.shape[:-2], spec.din, codes.shape[-1])
    vals = (c.astype(jnp.int32) - 8).astype(dtype) if spec.fmt == "int4" else jnp.asarray(NF4, dtype)[c]
    *lead, din, dout = vals.shape
    vals = vals.reshape(*lead, din // spec.tile, spec.tile, dout) * scale.astype(dtype)[..., :, None, :]
    return vals.reshape(*lead, din, dout)


_dequantize_jit = jax.jit(dequantize, static_argnums=(2, 3))


# ----------------------------------------------------------------------------- models
def _linears(model):
    """model.Linear modules (recognised by their `quant` slot: model.py imports this module)."""
    return [(tuple(str(p) for p in path), m) for path, m in nnx.iter_modules(model)
            if hasattr(m, "quant") and hasattr(m, "kernel")]


def kernel_shape(lin) -> tuple:
    """A Linear's logical kernel shape [..., din, dout], quantized or not."""
    shape = tuple(lin.kernel.get_value().shape)
    return shape if lin.quant is None else shape[:-2] + (lin.quant.din, shape[-1])


def quantize_model(model, fmt: str, tile: int = 64, skip=()):
    """Quantize every Linear's kernel in place except those at the paths in `skip` (module paths,
    e.g. ('lm_head',)) and those already quantized; returns the model."""
    mesh = getattr(model, "mesh", None)
    for path, lin in _linears(model):
        if path in skip or lin.quant is not None:
            continue
        var = lin.kernel
        w = var.get_value()
        check(fmt, tile, w.shape[-2])
        spec = QuantSpec(fmt, tile, w.shape[-2])
        axes = tuple(var.axes)
        cshape, cdtype, sshape = shapes(w.shape, fmt, tile)
        if isinstance(w, jax.ShapeDtypeStruct):  # abstract model: shapes and shardings only
            sh = lambda s: named_sharding(mesh, axes, s) if mesh is not None else None
            codes = jax.ShapeDtypeStruct(cshape, cdtype, sharding=sh(cshape))
            scale = jax.ShapeDtypeStruct(sshape, jnp.float32, sharding=sh(sshape))
        else:
            codes, scale = quantize(w, fmt, tile)
            if mesh is not None:
                codes = jax.device_put(codes, named_sharding(mesh, axes, cshape))
                scale = jax.device_put(scale, named_sharding(mesh, axes, sshape))
        lin.kernel = nnx.Param(codes, axes=axes)
        lin.kernel_scale = QuantScale(scale, axes=axes)
        lin.quant = spec
    return model


def dequantize_model(model, dtype=None):
    """Turn quantized kernels back into float kernels (dtype: the model's param_dtype); in place."""
    dtype = jnp.dtype(dtype or model.config.param_dtype)
    for _, lin in _linears(model):
        if lin.quant is None:
            continue
        axes = tuple(lin.kernel.axes)
        codes = lin.kernel.get_value()
        w = _dequantize_jit(codes, lin.kernel_scale.get_value(), lin.quant, dtype)
        if getattr(model, "mesh", None) is not None:
            w = jax.device_put(w, named_sharding(model.mesh, axes, w.shape))
        lin.kernel = nnx.Param(w, axes=axes)
        del lin.kernel_scale
        lin.quant = None
    return model


def is_quantized(model) -> bool:
    return any(lin.quant is not None for _, lin in _linears(model))
