"""8 fake CPU devices (conftest sets XLA_FLAGS): fsdp=4 x tensor=2 must equal one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import llama_jax
from llama_jax.sharding import make_mesh, spec_for
from hf_ref import hf_model

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("shard")
    hf_model(seed=2, std=0.1, num_key_value_heads=2).save_pretrained(d)
    return d


def test_mesh_shapes():
    assert dict(make_mesh({"fsdp": -1, "tensor": 2}).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert dict(make_mesh([2, -1, 1]).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert make_mesh({"fsdp": 2, "tensor": 2}).size == 4  # an explicit smaller mesh uses the first devices
    with pytest.raises(ValueError, match="needs 12 devices"):
        make_mesh({"data": 3, "fsdp": 4})
    with pytest.raises(ValueError, match="unknown axis"):
        make_mesh({"model": 2})


def test_rules_drop_axes_that_do_not_divide():
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    assert spec_for(("embed", "heads"), (64, 64), mesh) == P("fsdp", "tensor")
    assert spec_for(("embed", "kv_heads"), (64, 3), mesh) == P("fsdp", None)
    assert spec_for(("batch", "length"), (8, 5), mesh) == P("fsdp", None)


def test_sharded_forward_equals_single_device(ckpt):
    single = llama_jax.load(ckpt)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharded = llama_jax.load(ckpt, mesh=mesh)
    expect = {
        ("embed_tokens", "embedding"): P("tensor", "fsdp"),
        ("layers", "self_attn", "q_proj", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "self_attn", "k_proj", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "self_attn", "o_proj", "kernel"): P(None, "tensor", "fsdp"),
        ("layers", "mlp", "gate_proj", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "mlp", "down_proj", "kernel"): P(None, "tensor", "fsdp"),
        ("layers", "input_layernorm", "weight"): P(None, None),
        ("lm_head", "kernel"): P("fsdp", "tensor"),
    }
    flat = {tuple(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(sharded, nnx.Param))}
    for path, spec in expect.items():
        arr = flat[path].get_value()
        assert arr.sharding.spec == spec, (path, arr.sharding.spec)
        assert len(arr.addressable_shards) == 8
        # each device holds 1/k of the tensor, k = product of the mesh axes named in its spec
        k = int(np.prod([mesh.shape[a] for a in spec if a is not None]))
        assert arr.addressable_shards[0].data.size * k == arr.size
    for path, var in flat.items():  # every parameter carries logical names
        assert len(var.axes) == var.get_value().ndim, path

    ids = np.random.RandomState(0).randint(3, 256, (8, 16))
    mask = np.ones_like(ids)
    mask[3, :5] = 0
    g, s = nnx.split(sharded)
    fwd = jax.jit(lambda s, i, m: nnx.merge(g, s)(i, m))
    out = fwd(s, jnp.asarray(ids), jnp.asarray(mask))
    ref = single(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
