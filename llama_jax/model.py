"""Llama-2 in Flax NNX.

Parameter layout mirrors HF module names (`layers.self_attn.q_proj.kernel` <->
`model.layers.{i}.self_attn.q_proj.weight`), with kernels stored [in, out] and the layers stacked
on a leading `layers` axis.  The stacked block is run by `lax.scan` (compile time independent of
depth) or, with `scan_layers=False`, by a Python loop over the same parameters, so checkpoints
do not depend on that choice.  With a KV cache (inference) the layers are scanned too on
accelerators (`cache_layers`, see `Cache`) and unrolled on CPU.

One mask convention for padding, packing and the KV cache: every token has a segment id
(0 = padding / empty cache slot) and a position; query q may see key k iff they share a
non-zero segment and pos_k <= pos_q.  Without padding, packing or cache we pass `is_causal`
instead of a mask, which lets GPUs take the cuDNN flash-attention path.  Without a cache, attention
runs through `attention.attend` (`attention_impl`: xla / cudnn / splash / auto), which takes the
segment ids (splash: causal mask and'ed with segment ids, no [T, T] scores) or the dense mask.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from .attention import attend, platform_of
from .config import LlamaConfig
from .quant import dequantize
from .sharding import constrain, state_shardings


def _dt(name):
    return jnp.dtype(name)


def platform_compute_dtype(dtype, backend: str | None = None, source=None) -> str:
    """The compute dtype to use for `dtype` on this backend.  XLA:CPU has no float16 matmul (jax
    0.10: "The precision 'F16_F16_F32' is not supported by dot_general on CPU"), so float16 computes
    in float32 there: every float16 value is exact in float32 (bfloat16 has 3 fewer mantissa bits
    and would change the checkpoint's numbers), and the parameters stay float16 in memory.
    Logs a one-line notice (naming `source`) when the answer differs from `dtype`."""
    name = jnp.dtype(dtype).name
    backend = backend or jax.default_backend()
    if name == "float16" and backend == "cpu":
        logging.getLogger(__name__).warning("%s: float16 compute is not supported on %s; computing in float32 "
                                            "(parameters stay float16)", source or "model", backend)
        return "float32"
    return name


# ----------------------------------------------------------------------------- layers
class Linear(nnx.Module):
    """y = x @ kernel (+ LoRA delta when lora.py has attached factors)."""

    def __init__(self, din: int, dout: int, axes: tuple, *, cfg: LlamaConfig, rngs: nnx.Rngs, stack: int = 0):
        shape = (din, dout)
        if stack:
            shape, axes = (stack,) + shape, ("layers",) + tuple(axes)
        init = jax.random.normal(rngs.params(), shape, jnp.float32) * cfg.initializer_range
        self.kernel = nnx.Param(init.astype(_dt(cfg.param_dtype)), axes=tuple(axes))
        self.dtype = cfg.dtype
        self.lora = None  # set by llama_jax.lora.apply
        self.quant = None  # a quant.QuantSpec when llama_jax.quant stored the kernel quantized

    def weight(self, dt):
        """The kernel in compute dtype `dt` (dequantised from its codes when quantized)."""
        if self.quant is not None:
            return dequantize(self.kernel[...], self.kernel_scale[...], self.quant, dt)
        return self.kernel[...].astype(dt)

    def __call__(self, x):
        dt = _dt(self.dtype)
        # As a 2-D [tokens, in] matmul: for a [B, T, in] operand, XLA:CPU computes the kernel's
        # gradient with a strided transposing copy of the output gradient; the 2-D form has none
        # (measured: an MLP's forward + backward 32% faster, docs/benchmarks.md).
        lead = x.shape[:-1]
        x = x.astype(dt).reshape(-1, x.shape[-1])
        y = x @ self.weight(dt)
        if self.lora is not None:
            y = y + self.lora(x)
        # remat 'save_dots' saves this (base + LoRA delta as one tensor; saving every dot output kept
        # the LoRA B product too: twice the activations, 17.6 GiB of temporaries for 7B at 2048)
        y = checkpoint_name(y, "proj")
        return y.reshape(*lead, y.shape[-1])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, cfg: LlamaConfig, stack: int = 0):
        shape, axes = ((stack, dim), ("layers", "norm")) if stack else ((dim,), ("norm",))
        self.weight = nnx.Param(jnp.ones(shape, _dt(cfg.param_dtype)), axes=axes)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x):
        # As HF: normalise in float32, cast back to the input dtype, then scale.
        in_dtype = x.dtype
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(in_dtype) * h.astype(in_dtype)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, cfg: LlamaConfig, rngs: nnx.Rngs):
        init = jax.random.normal(rngs.params(), (vocab, dim), jnp.float32) * cfg.initializer_range
        self.embedding = nnx.Param(init.astype(_dt(cfg.param_dtype)), axes=("vocab", "embed"))
        self.dtype = cfg.dtype

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0).astype(_dt(self.dtype))

    def attend(self, h):  # tied output projection
        dt = _dt(self.dtype)
        return h.astype(dt) @ self.embedding[...].astype(dt).T


# ----------------------------------------------------------------------------- rotary
def rope_inv_freq(cfg: LlamaConfig, positions: jax.Array) -> jax.Array:
    """Inverse frequencies, float32 [head_dim/2]; dynamic NTK depends on the longest position in
    `positions` (HF: max(position_ids) + 1 of the current call, never below max_position_embeddings)."""
    dim = cfg.head_dim
    exponents = jnp.arange(0, dim, 2, dtype=jnp.int32).astype(jnp.float32) / dim
    base = jnp.float32(cfg.rope_theta)
    if cfg.rope_type == "dynamic":
        factor = cfg.rope_scaling["factor"]
        max_pos = cfg.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** exponents)
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / cfg.rope_scaling["factor"]
    return inv_freq


def rope_cos_sin(cfg: LlamaConfig, positions: jax.Array, dtype, longest=None) -> tuple[jax.Array, jax.Array]:
    inv_freq = rope_inv_freq(cfg, positions if longest is None else longest)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
    """HF rotate-half layout.  x: [B, T, heads, D]; cos/sin: [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ----------------------------------------------------------------------------- blocks
def cached_attention(q, ck, cv, mask, scale, seq_major: bool = False):
    """Attention of q [B, T, N, D] to a cache layer k/v [B, K, S, D] (GQA: N = K * G), without
    moving the cache: the score and value contractions have (B, K) as leading batch dims, so XLA:CPU
    reads the buffers in place (a [B, S, K, D] layout costs it a transpose of the whole layer per
    decode step).  seq_major: k/v are [B, S, K, D] (the stacked cache's layer slab, the layout
    XLA:TPU keeps a KV cache in).  Scores and softmax in float32, as HF's eager attention.
    mask [B, 1, T, S]."""
    B, T, N, D = q.shape
    kv = "bskd" if seq_major else "bksd"
    K = ck.shape[2 if seq_major else 1]
    qg = q.reshape(B, T, K, N // K, D).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    sc = jnp.einsum(f"bkgtd,{kv}->bkgts", qg, ck.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    sc = jnp.where(mask[:, :, None], sc, jnp.finfo(jnp.float32).min)  # rows with no key: uniform, unused
    pr = jax.nn.softmax(sc, axis=-1).astype(q.dtype)
    out = jnp.einsum(f"bkgts,{kv}->bkgtd", pr, cv.astype(q.dtype))
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, D)


def cache_write(buf, new, index, axis: int, layer=None):
    """Write `new` into the cache buffer `buf` (both batch-leading) at `index` along `axis`: one
    column for every row (index a scalar, as generate's shared index) or each row at its own
    (index [B], the server's slots, which hold sequences of different lengths).  layer: `buf` is
    the layer-stacked [B, L, ...] buffer and `new` ([B, ...]) goes into layer `layer` (traced)."""
    if layer is not None:
        new, axis = new[:, None], axis + 1
    if jnp.ndim(index) == 0:
        at = [0] * buf.ndim
        at[axis] = index
        if layer is not None:
            at[1] = layer
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), tuple(at))

    def row(b, n, i):
        at = [0] * b.ndim
        at[axis - 1] = i
        if layer is not None:
            at[0] = layer
        return jax.lax.dynamic_update_slice(b, n.astype(b.dtype), tuple(at))

    return jax.vmap(row)(buf, new, index)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, stack: int = 0):
        d, nq, nk, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(d, nq * h, ("embed", "heads"), cfg=cfg, rngs=rngs, stack=stack)
        self.k_proj = Linear(d, nk * h, ("embed", "kv_heads"), cfg=cfg, rngs=rngs, stack=stack)
        self.v_proj = Linear(d, nk * h, ("embed", "kv_heads"), cfg=cfg, rngs=rngs, stack=stack)
        self.o_proj = Linear(nq * h, d, ("heads", "embed"), cfg=cfg, rngs=rngs, stack=stack)
        self.num_heads, self.num_kv_heads, self.head_dim = nq, nk, h
        self.impl = cfg.attention_impl

    def __call__(self, x, cos, sin, attn: "AttnInputs", kv_cache=None, mesh=None):
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
        q = constrain(q, ("batch", "length", "act_heads", None), mesh)
        if kv_cache is not None:
            # Write this call's keys/values into this layer's [B, K, S, D] buffers (in place: they are
            # loop carries; a stacked cache's layer `layer` of [B, L, S, K, D]), then attend: to all
            # slots, reading the buffers as stored; or, into a fresh cache, to this call's own tokens
            # through the attention kernel (splash on TPU: no [T, S] scores).
            ck, cv, layer = kv_cache
            if layer is None:
                ck = cache_write(ck, k.transpose(0, 2, 1, 3), attn.cache_index, axis=2)
                cv = cache_write(cv, v.transpose(0, 2, 1, 3), attn.cache_index, axis=2)
            else:
                ck = cache_write(ck, k, attn.cache_index, axis=1, layer=layer)
                cv = cache_write(cv, v, attn.cache_index, axis=1, layer=layer)
            kv_cache = (ck, cv, layer)
            if attn.fresh:
                out = attend(q, k, v, attn.segment_ids, attn.mask, impl=self.impl, scale=self.head_dim ** -0.5,
                             mesh=mesh)
            else:
                if layer is not None:
                    ck = jax.lax.dynamic_index_in_dim(ck, layer, axis=1, keepdims=False)
                    cv = jax.lax.dynamic_index_in_dim(cv, layer, axis=1, keepdims=False)
                out = cached_attention(q, ck, cv, attn.mask, self.head_dim ** -0.5, seq_major=layer is not None)
        else:
            out = attend(q, k, v, attn.segment_ids, attn.mask, impl=self.impl, scale=self.head_dim ** -0.5,
                         mesh=mesh, right_padded=attn.right_padded)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim)), kv_cache


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, stack: int = 0):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), cfg=cfg, rngs=rngs, stack=stack)
        self.up_proj = Linear(d, f, ("embed", "mlp"), cfg=cfg, rngs=rngs, stack=stack)
        self.down_proj = Linear(f, d, ("mlp", "embed"), cfg=cfg, rngs=rngs, stack=stack)

    def __call__(self, x, mesh=None):
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        h = constrain(h, ("batch", "length", "act_mlp"), mesh)
        return self.down_proj(h)


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, stack: int = 0):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg=cfg, stack=stack)
        self.self_attn = Attention(cfg, rngs=rngs, stack=stack)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg=cfg, stack=stack)
        self.mlp = MLP(cfg, rngs=rngs, stack=stack)

    def __call__(self, x, cos, sin, attn, kv_cache=None, mesh=None):
        h, kv_cache = self.self_attn(self.input_layernorm(x), cos, sin, attn, kv_cache, mesh)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), mesh)
        return constrain(x, ("batch", "length", "act_embed"), mesh), kv_cache


class AttnInputs(NamedTuple):
    mask: jax.Array | None      # [B, 1, T, S] bool, or None = plain causal
    cache_index: jax.Array | None
    segment_ids: jax.Array | None = None  # [B, T] of this call's tokens (splash attention's mask)
    fresh: bool = False         # a cache that was empty before this call: attend within the call
    right_padded: bool = False  # one sequence per row, real tokens first (cuDNN: sequence lengths)


def scan_cache(cfg: LlamaConfig, mesh=None) -> bool:
    """Whether inference with a KV cache scans the layers (a stacked cache) for the platform the
    model is compiled for: `cache_layers` auto = unrolled on CPU, scanned elsewhere."""
    if cfg.cache_layers == "auto":
        return platform_of(mesh) != "cpu"
    return cfg.cache_layers == "scan"


class Cache(NamedTuple):
    """KV cache at num_kv_heads, in one of two layouts (`scan_cache`), both batch-leading:
    * unrolled (CPU): k/v tuples of one [B, kv_heads, S, head_dim] buffer per layer, so a decode
      step updates and reads layer i without slicing it out of a stacked array, which XLA:CPU
      copies; the layers run as a Python loop (compile time grows with depth);
    * stacked (accelerators): k/v each one [B, L, S, kv_heads, head_dim] array carried through a
      `lax.scan` over the layers (one compiled layer at any depth); layer i's new column is written
      in place and its slab read where the attention needs it.  Sequence before heads: the layout
      XLA:TPU picks for the carried cache (kv_heads x head_dim as its tiled minor dims, so a column
      is whole tiles); stored [.., kv_heads, S, ..] it copied both arrays into that layout at the
      entry and out at the exit of every decode call (measured on 7B, docs/plan.md).
    Per-slot segment / position are shared by all layers."""
    k: tuple | jax.Array
    v: tuple | jax.Array
    segment_ids: jax.Array  # [B, S] int32, 0 = empty
    positions: jax.Array    # [B, S] int32
    index: jax.Array        # int32 scalar: next column to write (all rows); or [B]: per row

    @classmethod
    def init(cls, cfg: LlamaConfig, batch: int, length: int, dtype=None, mesh=None) -> "Cache":
        """An empty cache in the layout `scan_cache(cfg, mesh)` picks (mesh: the model's, for the
        platform it is compiled for)."""
        dtype = _dt(dtype or cfg.dtype)
        shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
        L = cfg.num_hidden_layers
        if scan_cache(cfg, mesh):
            stacked = (batch, L, length, cfg.num_key_value_heads, cfg.head_dim)
            k, v = jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype)
        else:
            k, v = tuple(jnp.zeros(shape, dtype) for _ in range(L)), tuple(jnp.zeros(shape, dtype) for _ in range(L))
        return cls(k, v, jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, length), jnp.int32),
                   jnp.zeros((), jnp.int32))

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    @staticmethod
    def layer_axes(stacked: bool = False):
        """Logical axes of one layer's k or v buffer, or of the stacked array (for sharding rules)."""
        return ("batch", "layers", "cache_length", "kv_heads", None) if stacked else (
            "batch", "kv_heads", "cache_length", None)


REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # every projection's output (Linear.__call__ names it): the matmul outputs without batch dims,
    # with a LoRA projection's base product and delta saved as their sum
    "save_dots": jax.checkpoint_policies.save_only_these_names("proj"),
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv"),
}


def _layer(stacked, i: int):
    """Layer i's parameters out of the layer-stacked state."""
    return jax.tree.map(lambda a: a[i], stacked)


def make_mask(q_seg, q_pos, k_seg, k_pos):
    """[B, 1, T, S]: same non-zero segment and key position <= query position."""
    same = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    return (same & causal)[:, None]


# ----------------------------------------------------------------------------- model
class Llama(nnx.Module):
    """Llama-2 decoder.  head='lm' gives next-token logits; head='score' a scalar per token
    (reward / value models; HF LlamaForSequenceClassification with num_labels=1)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, head: str = "lm", mesh=None):
        if head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', got {head!r}")
        self.config = cfg
        self.head = head
        self.mesh = mesh
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, cfg=cfg, rngs=rngs)
        self.layers = Block(cfg, rngs=rngs, stack=cfg.num_hidden_layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg=cfg)
        if head == "score":
            self.score = Linear(cfg.hidden_size, 1, ("embed", None), cfg=cfg, rngs=rngs)
        elif not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg=cfg, rngs=rngs)

    # -- the stacked layers -------------------------------------------------
    def _run_layers(self, x, cos, sin, attn: AttnInputs, cache: Cache | None, layer_params=None):
        cfg, mesh = self.config, self.mesh
        graphdef, params = nnx.split(self.layers)
        if cache is not None and cache.stacked:
            # Inference, scanned: the stacked k/v arrays are carried (XLA updates a while loop's
            # carry in place) and each layer writes and reads its own slab at the scanned index.
            def cached_body(carry, xs):
                x, ks, vs = carry
                layer, i = xs
                x, (ks, vs, _) = nnx.merge(graphdef, layer)(x, cos, sin, attn, (ks, vs, i), mesh)
                return (x, ks, vs), None

            idx = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
            (x, ks, vs), _ = jax.lax.scan(cached_body, (x, cache.k, cache.v), (params, idx))
            return x, ks, vs
        if cache is not None:
            # Inference, unrolled (CPU): each layer with its own KV buffers.  layer_params: per-layer
            # parameter states sliced once by the caller (generate.decode on CPU), else layer i is
            # sliced here.
            ks, vs = list(cache.k), list(cache.v)
            for i in range(cfg.num_hidden_layers):
                p = layer_params[i] if layer_params is not None else _layer(params, i)
                x, (ks[i], vs[i], _) = nnx.merge(graphdef, p)(x, cos, sin, attn, (ks[i], vs[i], None), mesh)
            return x, tuple(ks), tuple(vs)

        def body(x, layer):
            x, _ = nnx.merge(graphdef, layer)(x, cos, sin, attn, None, mesh)
            return x, None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, params)
        else:
            for i in range(cfg.num_hidden_layers):
                x, _ = body(x, _layer(params, i))
        return x, None, None

    def layer_params(self):
        """Per-layer parameter states (copies of the stacked slices): what `__call__(...,
        layer_params=)` takes, so a decode loop slices the stacked weights once, not every step."""
        _, params = nnx.split(self.layers)
        return [_layer(params, i) for i in range(self.config.num_hidden_layers)]

    def __call__(self, input_ids, attention_mask=None, positions=None, *, segment_ids=None,
                 cache: Cache | None = None, return_hidden: bool = False, last_only: bool = False,
                 layer_params=None, fresh: bool = False, right_padded: bool = False):
        """input_ids [B, T] -> logits [B, T, vocab] float32 (scores [B, T] for head='score').

        attention_mask: [B, T] 1 = real token (left or right padding); positions default to
        cumsum(mask) - 1 as HF generate computes them.  segment_ids: packed documents (ids > 0).
        cache: a `Cache`; returns (logits, new_cache) when given.  fresh: the cache holds nothing
        before this call (a prefill) and is written from column 0, so attention stays within this
        call's tokens and takes the configured kernel (splash on TPU) instead of scoring all S
        slots; the caller promises the emptiness (same result, not checked).  right_padded: the
        attention_mask is right padding, one sequence per row (SFT's length buckets): on GPU the
        attention then takes cuDNN's flash kernel with sequence lengths (`attention.attend`).
        """
        cfg = self.config
        B, T = input_ids.shape
        plain_causal = attention_mask is None and segment_ids is None and cache is None
        if segment_ids is None:
            segment_ids = (jnp.ones((B, T), jnp.int32) if attention_mask is None
                           else attention_mask.astype(jnp.int32))
        if positions is None:
            if attention_mask is not None:
                positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
            else:
                positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        positions = positions.astype(jnp.int32)

        if cache is not None:
            seg_all = cache_write(cache.segment_ids, segment_ids.astype(jnp.int32), cache.index, axis=1)
            pos_all = cache_write(cache.positions, positions, cache.index, axis=1)
            if fresh:
                attn = AttnInputs(make_mask(segment_ids, positions, segment_ids, positions), cache.index,
                                  segment_ids.astype(jnp.int32), fresh=True)
            else:
                attn = AttnInputs(make_mask(segment_ids, positions, seg_all, pos_all), cache.index)
            longest = pos_all  # dynamic NTK: longest position in the cache, as HF
        else:
            attn = AttnInputs(None if plain_causal else make_mask(segment_ids, positions, segment_ids, positions),
                              None, None if plain_causal else segment_ids.astype(jnp.int32),
                              right_padded=right_padded and attention_mask is not None)
            longest = positions

        x = self.embed_tokens(input_ids)
        x = constrain(x, ("batch", "length", "act_embed"), self.mesh)
        cos, sin = rope_cos_sin(cfg, positions, x.dtype, longest)
        x, ck, cv = self._run_layers(x, cos, sin, attn, cache, layer_params)
        if last_only:
            x = x[:, -1:]
        h = self.norm(x)
        out = h if return_hidden else self.project(h)
        if cache is not None:
            new_cache = Cache(ck, cv, seg_all, pos_all, cache.index + T)
            return out, new_cache
        return out

    def project(self, h):
        """Final-norm hidden states -> float32 logits (or scores)."""
        if self.head == "score":
            return self.score(h)[..., 0].astype(jnp.float32)
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        return constrain(logits, ("batch", "length", "act_vocab"), self.mesh).astype(jnp.float32)


def has_lora(model) -> bool:
    """Whether any projection of `model` carries LoRA factors (llama_jax.lora applies them)."""
    return any(isinstance(m, Linear) and m.lora is not None for _, m in nnx.iter_modules(model))


def init_model(cfg: LlamaConfig, seed: int = 0, head: str = "lm", mesh=None) -> Llama:
    """A randomly initialised model; with a mesh, parameters are created already sharded."""
    if mesh is None:
        return Llama(cfg, rngs=nnx.Rngs(seed), head=head)
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(seed), head=head, mesh=mesh))
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh)

    @jax.jit
    def make():
        return nnx.state(Llama(cfg, rngs=nnx.Rngs(seed), head=head, mesh=mesh))

    state = jax.jit(make, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_model(cfg: LlamaConfig, head: str = "lm", mesh=None) -> Llama:
    """Shapes and metadata only (no memory): the target for streaming a checkpoint in."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), head=head, mesh=mesh))
