"""Config reading in both rope layouts, and one clear error per bad input."""
import json
import shutil

import numpy as np
import pytest

import llama_jax
from llama_jax import CheckpointError, LlamaConfig, UnsupportedConfigError
from hf_ref import hf_model


def test_rope_layouts_agree():
    classic = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
               "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 5e5,
               "rope_scaling": {"type": "linear", "factor": 4.0}}
    v5 = {k: v for k, v in classic.items() if not k.startswith("rope")}
    v5["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}
    a, b = LlamaConfig.from_hf_dict(classic), LlamaConfig.from_hf_dict(v5)
    assert a == b and a.rope_theta == 5e5 and a.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert LlamaConfig.from_hf_dict(a.to_hf_dict()) == a  # round trip
    assert a.num_key_value_heads == 2 and a.head_dim == 4


def test_presets():
    c = llama_jax.preset("llama2-70b")
    assert (c.num_key_value_heads, c.num_hidden_layers, c.hidden_size) == (8, 80, 8192)
    assert abs(llama_jax.preset("llama2-7b").num_params() - 6.738e9) < 0.01e9  # the published 6.74B


@pytest.mark.parametrize("patch, field", [
    ({"model_type": "mistral"}, "model_type"),
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, "rope_parameters"),
    ({"rope_scaling": {"type": "linear"}}, "rope_scaling"),
])
def test_unsupported_fields_name_the_field(patch, field):
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(UnsupportedConfigError, match=f"'{field}"):
        LlamaConfig.from_hf_dict({**base, **patch})


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    hf_model(seed=0).save_pretrained(d)
    return d


def _copy(good, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(good, d)
    return d


def _rewrite_weights(d, fn):
    from safetensors.numpy import load_file, save_file

    t = load_file(d / "model.safetensors")
    fn(t)
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


def test_directory_without_weights(good, tmp_path):
    d = _copy(good, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        llama_jax.load(d)


def test_pickle_weights_refused_by_default(good, tmp_path):
    d = _copy(good, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        llama_jax.load(d)


def test_non_llama_config(good, tmp_path):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match=r"config.json: field 'model_type'"):
        llama_jax.load(d)


def test_missing_tensor(good, tmp_path):
    d = _copy(good, tmp_path)
    _rewrite_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        llama_jax.load(d)


def test_wrong_shape(good, tmp_path):
    d = _copy(good, tmp_path)
    _rewrite_weights(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"k_proj.weight' has shape \[8, 64\], expected \[64, 64\]"):
        llama_jax.load(d)


def test_unused_tensor(good, tmp_path):
    d = _copy(good, tmp_path)
    _rewrite_weights(d, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros((64,), np.float32)}))
    with pytest.raises(CheckpointError, match=r"not used.*q_proj.bias"):
        llama_jax.load(d)


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        llama_jax.load(tmp_path)
