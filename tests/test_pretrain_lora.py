"""LoRA pretraining through the shared loop: frozen weights untouched, PEFT export parity."""
import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import llama_jax
from llama_jax import lora
from llama_jax.cli import main
from llama_jax.stages import pretrain
from llama_jax.train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("lora")
    base = llama_jax.init_model(llama_jax.preset("toy"), seed=0)
    llama_jax.save_hf(base, tmp / "base", tokenizer=str(data_dir / "llama2-tokenizer" / "tokenizer.model"))
    cfg = load_config(pretrain.PretrainConfig, os.path.join(REPO, "configs/toy/pretrain.yaml"), [
        f"model.init={tmp / 'base'}", "tokenizer=null", "data.block_size=64", "train.batch_size=8",
        "data.max_documents=300", "train.progress=false", "train.steps=6", "train.log_every=2",
        "train.eval_every=0", "train.checkpoint_every=6", "mesh.fsdp=1", "lora.enabled=true", "lora.rank=4",
        "lora.alpha=8", "lora.dropout=0.05", "lora.trainable_modules=[embed_tokens, lm_head]", "train.lr=1e-2"])
    r = pretrain.run_config(cfg, str(tmp / "run"))
    return tmp, r


def _flat(model):
    return {tuple(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_frozen_weights_bitwise_unchanged_and_trainable_count(run):
    tmp, r = run
    trained, base = _flat(r["model"]), _flat(llama_jax.load(tmp / "base"))
    changed = {k for k in base if not np.array_equal(base[k], trained[k])}
    assert changed == {("embed_tokens", "embedding"), ("lm_head", "kernel")}  # everything else frozen, bit for bit
    cfg = llama_jax.preset("toy")
    d, f, L, r_ = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, 4
    kv = cfg.num_key_value_heads * cfg.head_dim
    lora_n = L * r_ * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 2 + (f + d))
    assert r["trainable_params"] == lora_n + 2 * cfg.vocab_size * d
    assert any(np.abs(v).max() > 0 for k, v in trained.items() if "lora" in k and k[-1] == "b")


def test_merged_equals_unmerged_and_peft_export(run, tmp_path):
    tmp, r = run
    model = r["model"]
    model.eval()
    ids = np.random.RandomState(0).randint(3, 32000, (2, 16))
    unmerged = np.asarray(model(jnp.asarray(ids)))
    assert main(["export", "--model", r["run_dir"], "--out", str(tmp_path / "adapter"), "--peft"]) == 0
    assert main(["export", "--model", r["run_dir"], "--out", str(tmp_path / "merged")]) == 0
    import peft

    hf_base = transformers.LlamaForCausalLM.from_pretrained(tmp / "base").eval()
    pm = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = pm(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ref, unmerged, atol=1e-4)
    merged = llama_jax.load(tmp_path / "merged")
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray(ids))), unmerged, atol=1e-5)
