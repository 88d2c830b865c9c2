"""A float16 HF checkpoint loads and runs on CPU: XLA:CPU has no float16 matmul, so the compute dtype
becomes float32 (exact for float16 values), the parameters stay float16, and one notice says so."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax
from hf_ref import hf_logits, hf_model
from llama_jax.model import platform_compute_dtype


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the float16 fallback is CPU-only")
def test_float16_checkpoint_computes_in_float32_on_cpu(tmp_path, caplog):
    hf = hf_model(seed=3).half()
    hf.save_pretrained(tmp_path / "f16")
    with caplog.at_level(logging.WARNING):
        model = llama_jax.load(tmp_path / "f16")
    notices = [r.getMessage() for r in caplog.records if "float16 compute" in r.getMessage()]
    assert len(notices) == 1 and str(tmp_path / "f16") in notices[0]
    assert (model.config.dtype, model.config.param_dtype) == ("float32", "float16")
    assert model.embed_tokens.embedding.get_value().dtype == jnp.float16
    ids = np.random.RandomState(0).randint(0, 256, (2, 9))
    ours = np.asarray(model(jnp.asarray(ids)))  # failed before: "F16_F16_F32 is not supported by dot_general on CPU"
    np.testing.assert_allclose(ours, hf_logits(hf.float(), ids), atol=1e-5, rtol=0)


def test_platform_compute_dtype_rule():
    assert platform_compute_dtype("float16", backend="cpu") == "float32"
    assert platform_compute_dtype("float16", backend="gpu") == "float16"
    assert platform_compute_dtype("bfloat16", backend="cpu") == "bfloat16"
    assert platform_compute_dtype(jnp.float32, backend="cpu") == "float32"
