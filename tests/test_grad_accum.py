"""Gradient accumulation (train.loop.build_train_step): grad_accum = 4 micro-batches of b rows is one
step of a 4b-row batch: the same loss, gradient norm, token count, aux sums and updated weights.

Adam's first update is lr x g / (|g| + eps): with the usual tiny eps it is lr x sign(g), blind to the
gradient's scale and ill-conditioned where g is near 0; with eps = 1 it is ~ lr x g, so equal weights
after the step mean equal gradients (and a sum taken for a mean would show)."""
import jax
import numpy as np

from llama_jax.config import preset
from llama_jax.model import init_model
from llama_jax.sharding import host_batch_to_global, make_mesh
from llama_jax.stages.pretrain import lm_loss
from llama_jax.train.config import TrainSection
from llama_jax.train.loop import build_train_step

B_MICRO, ACCUM, T, V = 2, 4, 16, 97


def _loss(m, b, rng):
    s, w = lm_loss(m, b, True)
    return s, w, {"loss_sum": s}  # an aux sum, logged divided by the summed weight


def _batch(rows):
    r = np.random.default_rng(0)
    seg = np.ones((rows, T), np.int32)
    seg[:, T // 2:] = 2
    seg[1, T - 3:] = 0  # some padding: unequal token counts per micro-batch (weights must be summed)
    seg[5, 4:] = 0
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)]).astype(np.int32)
    return {"tokens": r.integers(1, V, (rows, T)).astype(np.int32), "segments": seg,
            "positions": np.broadcast_to(pos, (rows, T)).copy()}


def _step(accum):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    cfg = preset("toy", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)
    model = init_model(cfg, seed=3, mesh=mesh)
    tc = TrainSection(steps=1, batch_size=B_MICRO * ACCUM, grad_accum=accum, lr=1.0, eps=1.0, weight_decay=0.0,
                      warmup_ratio=0.0, schedule="constant", clip_norm=None)
    ts, params, frozen = build_train_step(_loss, model, tc, mesh)
    p0 = jax.device_get(params)
    state, m = ts.step(ts.init_state(params), ts.place_frozen(frozen),
                       host_batch_to_global(_batch(B_MICRO * ACCUM), mesh, accum))
    return jax.device_get(m), jax.device_get(state["params"]), p0


def test_accumulated_step_equals_the_whole_batch():
    (m1, p1, p0), (m4, p4, _) = _step(1), _step(ACCUM)
    assert float(m1["tokens"]) == float(m4["tokens"]) == float(np.sum(_weights()))
    for k in ("loss", "grad_norm", "loss_sum"):
        np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-6, err_msg=k)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), p1, p4))
    assert max(diffs) <= 1e-6
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), p0, p1))
    assert min(moved) > 1e-5  # every parameter took the step


def _weights():
    b = _batch(B_MICRO * ACCUM)
    seg = b["segments"]
    nxt = np.concatenate([seg[:, 1:], np.zeros_like(seg[:, :1])], axis=1)
    return (nxt == seg) & (nxt > 0)
