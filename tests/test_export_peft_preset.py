"""`llama-jax export --peft` of a LoRA run whose base was a random preset: the base (rebuilt from
the run's seed) is saved as an HF directory inside the adapter directory and named by absolute
path, so peft's AutoPeftModelForCausalLM loads adapter + base by itself and computes the run's logits."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llama_jax.cli import main
from llama_jax.stages import pretrain
from llama_jax.train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("peft_preset")
    cfg = load_config(pretrain.PretrainConfig, os.path.join(REPO, "configs/toy/pretrain.yaml"), [
        "model.init=toy", "data.block_size=32", "train.batch_size=4", "data.max_documents=100",
        "train.progress=false", "train.steps=2", "train.log_every=1", "train.eval_every=0",
        "train.checkpoint_every=2", "mesh.fsdp=1", "lora.enabled=true", "lora.rank=4", "lora.alpha=8",
        "lora.trainable_modules=[embed_tokens]", "train.lr=1e-2"])
    return tmp, pretrain.run_config(cfg, str(tmp / "run"))


@pytest.mark.slow  # a (2-step) LoRA training run: ~90 s contended; PEFT export's fast test is test_pretrain_lora
def test_peft_export_of_preset_run_loads_in_peft_alone(run, tmp_path):
    import peft

    tmp, r = run
    out = tmp_path / "adapter"
    assert main(["export", "--model", r["run_dir"], "--out", str(out), "--peft"]) == 0
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((out / "base").absolute()) and (out / "base" / "config.json").exists()
    assert (out / "base" / "tokenizer.json").exists()
    model = r["model"]
    model.eval()
    ids = np.random.RandomState(0).randint(3, 32000, (2, 12))
    ours = np.asarray(model(jnp.asarray(ids)))
    pm = peft.AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()  # finds the base by itself
    with torch.no_grad():
        theirs = pm(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    with torch.no_grad():  # and the trained embedding really lives in the adapter, not in the base
        plain = pm.get_base_model()
        with pm.disable_adapter():
            base_logits = plain(torch.tensor(ids)).logits.numpy()
    assert not np.allclose(base_logits, ours, atol=1e-4)
