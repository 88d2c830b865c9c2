"""KV-cached inference with scanned layers (`cache_layers: scan`, the accelerators' default) and
the fresh-cache prefill.

- The stacked cache ([B, L, S, K, D], carried through `lax.scan`) gives the unrolled layout's
  logits and cache contents through a fresh prefill, shared-index decode steps and per-row-index
  steps (the server's slots).
- A fresh prefill attends within the prompt through the attention kernel and equals attending
  to all cache slots, with XLA and with the Pallas splash kernel (interpret mode on CPU).
- The scanned decode's program holds one layer whatever the depth (the point: compile time
  independent of depth); the unrolled one grows with it.
- The server's engine on a stacked cache gives `generate`'s greedy tokens.
(The real-weights check, stories260K's llama2.c golden output through the scanned cache, is in
test_real_weights.py.)
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax.generate import SamplingParams, decode, left_pad, prefill
from llama_jax.model import Cache, init_model

CFG = llama_jax.preset("toy").replace(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
PROMPTS = [[1, 5, 9, 33], [1, 7], [1, 100, 101, 102, 103, 104, 105]]


@functools.partial(jax.jit, static_argnums=0)
def _step(gd, st, tok, pos, cache):
    lg, cache = nnx.merge(gd, st)(tok[:, None], positions=pos[:, None], segment_ids=jnp.ones_like(tok)[:, None],
                                  cache=cache)
    return lg[:, -1], cache


def _run(model, steps=4):
    """Fresh prefill of PROMPTS, `steps` greedy shared-index steps, then two steps with per-row
    indices (rows at different columns, as the server's slots): every logits array and the cache."""
    ids, mask = left_pad(PROMPTS)
    B, T = ids.shape
    gd, st = nnx.split(model)
    lg, cache = prefill(gd, st, jnp.asarray(ids), jnp.asarray(mask), Cache.init(model.config, B, T + steps + 8),
                        fresh=True)
    out = [lg]
    pos = jnp.asarray(mask.sum(-1), jnp.int32)
    for i in range(steps + 2):
        if i == steps:
            cache = cache._replace(index=cache.index + jnp.arange(B, dtype=jnp.int32))  # row b skips b columns
        lg, cache = _step(gd, st, jnp.argmax(out[-1], -1).astype(jnp.int32), pos, cache)
        out.append(lg)
        pos = pos + 1
    return out, cache


def test_stacked_cache_gives_the_unrolled_logits_and_cache():
    runs = {}
    for mode in ("unroll", "scan"):
        model = init_model(CFG.replace(cache_layers=mode), seed=3)
        out, cache = _run(model)
        assert cache.stacked == (mode == "scan")
        runs[mode] = (out, cache)
    (ou, cu), (os_, cs) = runs["unroll"], runs["scan"]
    for a, b in zip(ou, os_):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)
    assert cs.k.shape == (3, CFG.num_hidden_layers, cu.k[0].shape[2], 2, CFG.head_dim)  # [B, L, S, K, D]
    stack = lambda bufs: np.stack([np.asarray(x) for x in bufs], axis=1).transpose(0, 1, 3, 2, 4)  # noqa: E731
    np.testing.assert_allclose(np.asarray(cs.k), stack(cu.k), atol=1e-5)
    np.testing.assert_allclose(np.asarray(cs.v), stack(cu.v), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cs.segment_ids), np.asarray(cu.segment_ids))
    np.testing.assert_array_equal(np.asarray(cs.index), np.asarray(cu.index))
    # control: the per-row steps wrote each row at its own column (row 2 two columns past row 0)
    filled = np.asarray(cs.segment_ids).sum(-1)
    assert list(filled) == [len(p) + 6 for p in PROMPTS]


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_fresh_prefill_equals_attending_to_all_slots(impl):
    """128-token left-padded prompts (splash's lane width); splash runs in Pallas interpret mode."""
    cfg = CFG.replace(attention_impl=impl, num_hidden_layers=2)
    model = init_model(cfg, seed=5)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 256, n)) for n in (128, 77)]
    ids, mask = left_pad(prompts, multiple=128)
    cache = Cache.init(cfg, 2, 160)
    gd, st = nnx.split(model)
    fresh, cf = prefill(gd, st, jnp.asarray(ids), jnp.asarray(mask), cache, fresh=True)
    full, cc = prefill(gd, st, jnp.asarray(ids), jnp.asarray(mask), Cache.init(cfg, 2, 160))
    np.testing.assert_allclose(np.asarray(fresh), np.asarray(full), atol=1e-5, rtol=0)
    real = np.asarray(cc.segment_ids)[:, None, :, None] > 0  # padding slots stay masked forever
    for a, b in zip(cf.k + cf.v, cc.k + cc.v):
        np.testing.assert_allclose(np.where(real, np.asarray(a), 0), np.where(real, np.asarray(b), 0), atol=1e-5)
    # control: without the segment ids (all 1) the padded row's logits change
    other, _ = prefill(gd, st, jnp.asarray(ids), jnp.ones_like(jnp.asarray(mask)), Cache.init(cfg, 2, 160),
                       jnp.broadcast_to(jnp.arange(128, dtype=jnp.int32), (2, 128)), fresh=True)
    assert float(jnp.max(jnp.abs(other[1] - fresh[1]))) > 1e-3


def _decode_dots(layers: int, mode: str) -> int:
    cfg = CFG.replace(num_hidden_layers=layers, cache_layers=mode)
    model = llama_jax.abstract_model(cfg)
    gd, st = nnx.split(model)
    cache = jax.eval_shape(lambda: Cache.init(cfg, 2, 16))
    text = decode.lower(gd, st, cache, jax.ShapeDtypeStruct((2, 256), jnp.float32),
                        jax.ShapeDtypeStruct((2,), jnp.int32), jax.random.key(0), SamplingParams(4), (2,), 0,
                        None).as_text()
    return text.count("stablehlo.dot_general")


def test_scanned_decode_program_holds_one_layer_at_any_depth():
    scan = [_decode_dots(n, "scan") for n in (2, 6)]
    unroll = [_decode_dots(n, "unroll") for n in (2, 6)]
    assert scan[0] == scan[1] > 0
    per_layer = (unroll[1] - unroll[0]) // 4
    assert per_layer >= 7 and unroll[1] == unroll[0] + 4 * per_layer  # 7 projections (+ attention) per layer


@pytest.mark.slow  # ~12 s of compiles; the stacked cache's per-row writes are in the first test
def test_server_engine_on_a_stacked_cache_gives_generates_tokens():
    from llama_jax.serve.engine import Engine, EngineConfig, Request

    class Tok:
        eos_token_id = 2

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    want = llama_jax.generate(init_model(CFG, seed=3), PROMPTS, max_new_tokens=10, eos_ids=[])
    model = init_model(CFG.replace(cache_layers="scan"), seed=3)
    engine = Engine(model, Tok(), EngineConfig(4, 64, 8, (16,))).start()
    try:
        assert engine.cache.stacked
        reqs = [engine.submit(Request(prompt_ids=p, max_tokens=10, temperature=0.0, ignore_eos=True)) for p in PROMPTS]
        t0 = time.time()
        while any(r.finish_reason is None for r in reqs) and time.time() - t0 < 300:
            time.sleep(0.02)
        got = [list(r.output_ids) for r in reqs]
    finally:
        engine.shutdown()
    assert got == want
