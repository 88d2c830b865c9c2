"""Attention kernels behind one mask convention (segment ids + positions, see model.py).

Contract: `attend(q, k, v, segment_ids, mask, impl=..., scale=..., mesh=...)` with q [B, T, N, D],
k / v [B, T, K, D] (GQA: N a multiple of K), segment_ids [B, T] int32 (0 = padding) or None for a
plain causal batch, and `mask` the dense [B, 1, T, T] bool mask of model.make_mask (or None for
plain causal) returns [B, T, N, D].  For every query token that has a key (a real token), all
implementations give the same output; rows of padding queries are unused by every caller and may
differ between implementations.

Implementations (`model.attention_impl`):
* `xla`: `jax.nn.dot_product_attention` with the dense mask (the reference; scores materialised).
* `cudnn`: the same call with implementation='cudnn' (GPU flash attention): `is_causal` for a plain
  causal batch; a right-padded batch (`right_padded`: each row one sequence, real tokens first, as
  SFT's length buckets) as `is_causal` + per-row sequence lengths (cuDNN masks the padding itself,
  no scores materialised); packed batches hand cuDNN the dense mask, which it takes as a bias
  (packed documents reach cuDNN's flash kernel only through a private API in jax 0.10).
* `splash`: the Pallas TPU splash-attention kernel that ships with jax
  (`jax.experimental.pallas.ops.tpu.splash_attention`): a static causal mask and'ed with segment
  ids, so scores are never materialised and fully masked blocks are skipped.  One example per
  call, so it is vmapped over the batch, and under a mesh it runs in `shard_map` over the batch
  axes (`data`, `fsdp`) and the head axis (`tensor`).  Off TPU it runs in Pallas interpret mode
  (slow; used by the CPU tests).  Sequence length must be a multiple of 128 (the kernel's lane
  width); `auto` falls back to XLA otherwise.
* `auto`: splash on TPU; cuDNN on GPU for 16-bit batches that are plain causal or right-padded;
  XLA elsewhere (packed batches on GPU).  (None, the default, is `xla`.)  So on GPU, SFT's length
  buckets take the flash kernel and packed rows the XLA path: `data.batching: auto` buckets there.

Why splash equals the dense mask: within a segment, positions grow by one per token, so
"pos_k <= pos_q and same segment" equals "index_k <= index_q and same segment", i.e. CausalMask
and SegmentIds.  Padding tokens share segment 0 with each other, so a padding query attends to
earlier padding keys (never to a real token): finite, unused outputs instead of the XLA path's
uniform average over all keys.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .config import ATTENTION_IMPLS as IMPLS
from .sharding import spec_for
SPLASH_LANES = 128  # block sizes (and so sequence lengths) must be multiples of this


def platform_of(mesh=None) -> str:
    """The platform the computation is compiled for: the mesh's devices' (the planner compiles for
    TPU devices from a CPU-only process), else jax's default backend."""
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def resolve(impl: str | None, mesh=None, seq_len: int | None = None, masked: bool = False, dtype=None,
            right_padded: bool = False) -> str:
    """'xla' | 'cudnn' | 'splash' for a configured `attention_impl` (None = 'xla').  `auto` takes
    cuDNN only where its flash kernel surely applies: a plain causal (masked=False) or right-padded
    batch in a 16-bit dtype; packed batches on GPU stay on XLA (cuDNN would take the dense mask as
    a bias; untested here, no GPU in this project's CI)."""
    if impl is None or impl == "xla":
        return "xla"
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        plat = platform_of(mesh)
        if plat == "tpu" and (seq_len is None or seq_len % SPLASH_LANES == 0):
            return "splash"
        if (plat in ("gpu", "cuda") and (not masked or right_padded) and dtype is not None
                and jnp.dtype(dtype).itemsize == 2):
            return "cudnn"
        return "xla"
    return impl


def splash_block(seq_len: int, largest: int = 512) -> int:
    """Block size for a sequence: the largest of 512 / 256 / 128 dividing it (MaxText's default
    splash blocks are 512; shorter sequences get one block)."""
    for b in (largest, 256, 128):
        if b <= largest and seq_len % b == 0:
            return b
    raise ValueError(f"splash attention needs a sequence length that is a multiple of {SPLASH_LANES}, "
                     f"got {seq_len} (use attention_impl: xla or auto, or pad the batch)")


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, seq_len: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len)) for _ in range(heads)])
    bs = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                       block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # built while tracing but cached across traces: its block tables must be constants, not tracers
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask, block_sizes=bs, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, seg, interpret: bool):
    """One shard: q [b, T, n, D], k / v [b, T, kv, D], seg [b, T] -> [b, T, n, D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    T, n = q.shape[1], q.shape[2]
    kernel = _splash_kernel(n, T, splash_block(T), interpret)
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # kernel layout [heads, T, D] per example
    out = jax.vmap(kernel)(qt, kt, vt, SegmentIds(seg, seg))
    return out.transpose(0, 2, 1, 3)


def splash_attention(q, k, v, segment_ids, *, scale: float, mesh=None, interpret: bool | None = None):
    """Splash attention with causal + segment masking (see the module docstring)."""
    B, T, N, D = q.shape
    K = k.shape[2]
    if interpret is None:
        interpret = platform_of(mesh) != "tpu"
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    q = (q * scale).astype(q.dtype)  # the kernel does not scale
    if mesh is None or mesh.size == 1:
        return _splash_local(q, k, v, segment_ids, interpret)
    qspec = spec_for(("batch", None, "act_heads", None), q.shape, mesh)
    head_axes = qspec[2]
    if head_axes is not None:
        n_shards = 1
        for a in (head_axes,) if isinstance(head_axes, str) else head_axes:
            n_shards *= mesh.shape[a]
        if K % n_shards:  # kv heads do not split like the query heads: give each query head its own
            k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    kvspec = P(qspec[0], None, head_axes, None)
    fn = jax.shard_map(functools.partial(_splash_local, interpret=interpret), mesh=mesh,
                       in_specs=(qspec, kvspec, kvspec, P(qspec[0], None)), out_specs=qspec, check_vma=False)
    return fn(q, k, v, segment_ids)


def lengths_attention(q, k, v, segment_ids, *, scale: float, implementation: str | None = "cudnn"):
    """Causal attention of a right-padded batch (row b: real tokens 0 .. n_b - 1, then padding,
    n_b = its non-zero segment ids) through `jax.nn.dot_product_attention`'s sequence lengths, the
    form cuDNN's flash kernel takes for padding (instead of a dense mask as a bias, which would
    materialise the scores).  Real tokens' outputs equal the dense-mask path's (causally they never
    reach right padding); the lengths let the kernel skip the padding rows' blocks, whose outputs
    are unused (see the module docstring)."""
    n = jnp.sum(segment_ids > 0, axis=-1).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, query_seq_lengths=n,
                                        key_value_seq_lengths=n, implementation=implementation)


def attend(q, k, v, segment_ids, mask, *, impl: str | None, scale: float, mesh=None, right_padded: bool = False):
    """Dispatch to the configured kernel (see the module docstring).  right_padded: the caller
    promises one right-padded sequence per row (cuDNN then takes sequence lengths, not the mask)."""
    impl = resolve(impl, mesh, q.shape[1], masked=mask is not None, dtype=q.dtype, right_padded=right_padded)
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids if mask is not None else None, scale=scale, mesh=mesh)
    if impl == "cudnn" and mask is not None and right_padded:
        return lengths_attention(q, k, v, segment_ids, scale=scale, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None, scale=scale,
                                        implementation=impl)
