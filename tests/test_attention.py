"""Splash attention (Pallas, interpret mode on CPU) against the XLA path with the model's dense mask.

Batches mix the two layouts the pipeline produces: a left-padded row (segment 0 = padding) and
packed rows (several documents, positions restarting).  Outputs and gradients are compared on real
query tokens (padding rows are unused by every caller, see llama_jax/attention.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import attention
from llama_jax.config import preset
from llama_jax.model import Llama, make_mask
from llama_jax.sharding import make_mesh

T = 256  # two 128-blocks: the kernel skips and partially masks blocks


def _layout(B=3):
    """segment ids, positions and a real-token mask: row 0 left-padded, rows 1.. packed."""
    seg = np.ones((B, T), np.int32)
    seg[0, :37] = 0                     # 37 pad tokens on the left
    seg[1, 100:] = 2                    # two documents (boundary inside the first block)
    seg[2, 130:200] = 2
    seg[2, 200:] = 3                    # three documents, the last two in the second block
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        for s in np.unique(seg[b]):
            idx = np.nonzero(seg[b] == s)[0]
            pos[b, idx] = 0 if s == 0 else np.arange(len(idx))
    return jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(seg > 0)


def _qkv(N, K, D=16, B=3, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.normal(size=(B, T, h, D)), jnp.float32) for h in (N, K, K)]


def _loss(fn, ct, real):
    def f(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(jnp.where(real[:, :, None, None], out * ct, 0.0))
    return f


@pytest.fixture(scope="module")
def layout():
    return _layout()


@pytest.mark.parametrize("N,K", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_splash_equals_xla_forward_and_grads(layout, N, K):
    seg, pos, real = layout
    q, k, v = _qkv(N, K)
    scale = 16 ** -0.5
    mask = make_mask(seg, pos, seg, pos)
    xla = lambda q, k, v: attention.attend(q, k, v, seg, mask, impl="xla", scale=scale)
    spl = lambda q, k, v: attention.attend(q, k, v, seg, mask, impl="splash", scale=scale)
    ct = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    r = real[:, :, None, None]
    ox, os_ = xla(q, k, v), spl(q, k, v)
    np.testing.assert_allclose(np.where(r, os_, 0), np.where(r, ox, 0), atol=1e-5, rtol=0)
    gx = jax.grad(_loss(xla, ct, real), argnums=(0, 1, 2))(q, k, v)
    gs = jax.grad(_loss(spl, ct, real), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(gs, gx):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)

    # control: the same kernel with a causal-only mask (no segment ids) differs on real tokens, so
    # the segment mask above was really applied
    causal = attention.splash_attention(q, k, v, None, scale=scale)
    assert float(jnp.max(jnp.abs(jnp.where(r, causal - ox, 0)))) > 1e-2


def test_splash_sharded_over_batch_and_heads(layout):
    """Under a data x fsdp x tensor mesh the kernel runs in shard_map (batch over data/fsdp, heads
    over tensor; GQA with kv heads not divisible by tensor repeats them) and gives the same values."""
    seg, pos, real = layout
    seg, pos, real = (jnp.concatenate([x, x[:1]]) for x in (seg, pos, real))  # batch 4 over data x fsdp
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    scale = 16 ** -0.5
    mask = make_mask(seg, pos, seg, pos)
    r = real[:, :, None, None]
    for N, K in ((4, 2), (4, 1)):
        q, k, v = _qkv(N, K, B=4, seed=N + K)
        ref = attention.attend(q, k, v, seg, mask, impl="xla", scale=scale)
        out = jax.jit(lambda q, k, v: attention.attend(q, k, v, seg, mask, impl="splash", scale=scale,
                                                       mesh=mesh))(q, k, v)
        np.testing.assert_allclose(np.where(r, out, 0), np.where(r, ref, 0), atol=1e-5, rtol=0)


def test_model_loss_and_grads_splash_vs_xla(layout):
    """The whole (toy, GQA) model: next-token loss on a packed + left-padded batch and its
    gradients with attention_impl=splash equal attention_impl=xla."""
    seg, pos, real = layout
    cfg = preset("toy", vocab_size=128, num_hidden_layers=1)
    ids = jnp.asarray(np.random.default_rng(2).integers(1, 128, seg.shape), jnp.int32)

    def loss_and_grads(impl):
        model = Llama(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state):
            logits = nnx.merge(graphdef, state)(ids, positions=pos, segment_ids=seg)
            lp = jax.nn.log_softmax(logits[:, :-1])
            nll = -jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
            w = (real[:, 1:] & (seg[:, 1:] == seg[:, :-1])).astype(jnp.float32)
            return jnp.sum(nll * w) / jnp.sum(w)
        return jax.value_and_grad(loss)(state)

    (lx, gx), (ls, gs) = loss_and_grads("xla"), loss_and_grads("splash")
    np.testing.assert_allclose(float(ls), float(lx), atol=1e-5)
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gx)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_resolve():
    assert attention.resolve(None) == "xla" and attention.resolve("splash") == "splash"
    assert attention.resolve("auto") == "xla"  # CPU
    assert attention.splash_block(2048) == 512 and attention.splash_block(384) == 128
    with pytest.raises(ValueError, match="multiple of 128"):
        attention.splash_block(100)
    with pytest.raises(ValueError):
        preset("toy", attention_impl="flash")


def test_right_padded_batch_through_sequence_lengths_equals_the_dense_mask(monkeypatch):
    """The GPU path for SFT's length buckets: `lengths_attention` (is_causal + per-row sequence
    lengths, the form cuDNN's flash kernel takes; here jax's XLA implementation of the same call)
    equals the dense-mask path on every real token, forward and gradients; `auto` picks it on GPU
    for right-padded 16-bit batches only (packed rows and float32 stay on XLA)."""
    B, N, K = 3, 4, 2
    lens = np.array([T, 200, 57])
    seg = jnp.asarray((np.arange(T)[None] < lens[:, None]).astype(np.int32))
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask = make_mask(seg, pos, seg, pos)
    q, k, v = _qkv(N, K, B=B, seed=3)
    real = seg > 0
    ct = jnp.asarray(np.random.default_rng(4).normal(size=(B, T, N, 16)), jnp.float32)
    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.25)  # noqa: E731
    lengths = lambda q, k, v: attention.lengths_attention(q, k, v, seg, scale=0.25, implementation="xla")  # noqa: E731
    a, b = dense(q, k, v), lengths(q, k, v)
    np.testing.assert_allclose(np.where(real[..., None, None], b, 0), np.where(real[..., None, None], a, 0),
                               atol=1e-5)
    ga = jax.grad(_loss(dense, ct, real), argnums=(0, 1, 2))(q, k, v)
    gb = jax.grad(_loss(lengths, ct, real), argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(y, x, atol=1e-5)
    # under a causal mask real queries never reach right padding (it comes later), so the lengths
    # spare the padding rows' work (cuDNN skips those blocks) and give them finite values; plain
    # causal differs from the dense mask only there
    c = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    assert float(jnp.max(jnp.abs(c[2, :57] - a[2, :57]))) < 1e-5 < float(jnp.max(jnp.abs(c[2, 57:] - a[2, 57:])))
    assert bool(jnp.all(jnp.isfinite(b)))

    monkeypatch.setattr(attention, "platform_of", lambda mesh=None: "gpu")
    bf = jnp.bfloat16
    assert attention.resolve("auto", masked=True, right_padded=True, dtype=bf) == "cudnn"
    assert attention.resolve("auto", masked=False, dtype=bf) == "cudnn"
    assert attention.resolve("auto", masked=True, dtype=bf) == "xla"  # packed rows
    assert attention.resolve("auto", masked=True, right_padded=True, dtype=jnp.float32) == "xla"


def test_sft_batching_auto_buckets_on_gpu_only():
    from llama_jax.stages.sft import batching_mode

    assert batching_mode("auto", "gpu") == "bucket" and batching_mode("auto", "tpu") == "pack"
    assert batching_mode("auto", "cpu") == "pack" and batching_mode("bucket", "tpu") == "bucket"
