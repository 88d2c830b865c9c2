"""SFT on the shared loop: loss parity with transformers, held-out loss falls, LoRA export parity."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import llama_jax
from llama_jax.cli import main
from llama_jax.stages import sft
from llama_jax.train.config import load_config
from hf_ref import hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "toy", "sft.yaml")


def test_sft_loss_equals_transformers(tmp_path):
    hf = hf_model(seed=0, std=0.1)
    hf.save_pretrained(tmp_path)
    model = llama_jax.load(tmp_path)
    rs = np.random.RandomState(0)
    ids = rs.randint(3, 256, (3, 20))
    mask = np.ones_like(ids)
    mask[1, 14:] = 0  # right padding
    labels = np.where(rs.rand(3, 20) < 0.5, ids, -100)
    labels[mask == 0] = -100
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss.item()
    s, w = sft.sft_loss(model, {"tokens": jnp.asarray(ids), "labels": jnp.asarray(labels),
                                "attention_mask": jnp.asarray(mask)})
    assert abs(float(s / w) - ref) <= 1e-5


def _metrics(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_toy_sft_lowers_heldout_loss_and_writes_samples(tmp_path, data_dir):
    cfg = load_config(sft.SFTConfig, CONFIG, ["train.steps=30", "train.eval_every=10", "train.log_every=10",
                                             "train.checkpoint_every=0", "train.progress=false", "mesh.fsdp=1",
                                             "data.max_length=128", "train.eval_batches=2",
                                             "data.sample_max_new_tokens=8"])
    r = sft.run_config(cfg, str(tmp_path / "run"))
    ev = [m["eval_loss"] for m in _metrics(r["run_dir"]) if "eval_loss" in m]
    assert len(ev) == 3 and ev[0] > ev[1] > ev[2], ev
    samples = [json.loads(l) for l in open(os.path.join(r["run_dir"], "samples.jsonl"))]
    assert [s["step"] for s in samples] == [10, 10, 20, 20, 30, 30] and samples[0]["prompt"] == "请介绍一下中国的首都。"


@pytest.mark.slow
def test_lora_sft_exports_merged_and_peft_with_same_logits(tmp_path, data_dir):
    base = llama_jax.init_model(llama_jax.preset("toy"), seed=1)
    llama_jax.save_hf(base, tmp_path / "base", tokenizer=str(data_dir / "llama2-tokenizer" / "tokenizer.model"))
    cfg = load_config(sft.SFTConfig, CONFIG, [
        f"model.init={tmp_path / 'base'}", "tokenizer=null", "train.steps=4", "train.log_every=2",
        "train.eval_every=0", "train.checkpoint_every=4", "train.progress=false", "mesh.fsdp=1",
        "data.max_length=128", "lora.enabled=true", "lora.rank=4", "lora.alpha=8", "train.lr=1e-2",
        "data.batching=bucket", "data.template=llama2-chat"])
    r = sft.run_config(cfg, str(tmp_path / "run"))
    model = r["model"]
    model.eval()
    ids = np.random.RandomState(0).randint(3, 32000, (2, 12))
    ours = np.asarray(model(jnp.asarray(ids)))
    assert main(["export", "--model", r["run_dir"], "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", "--model", r["run_dir"], "--out", str(tmp_path / "adapter"), "--peft"]) == 0
    # both record the template the run trained with, which serve / chat then use by default
    from llama_jax.data.templates import resolve_template

    want = cfg.data.template
    assert resolve_template(None, tmp_path / "merged")[0] == want
    assert resolve_template(None, tmp_path / "adapter")[0] == want
    assert resolve_template("alpaca", tmp_path / "merged")[0] == "alpaca"
    import peft

    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                        tmp_path / "adapter").eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4)
        np.testing.assert_allclose(pm(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4)
    assert not np.allclose(ours, np.asarray(llama_jax.load(tmp_path / "base")(jnp.asarray(ids))), atol=1e-4)
