"""QLoRA: quantise -> dequantise error bounds per format, a toy QLoRA SFT through the SFT stage
(loss falls, only LoRA + modules_to_save train, the quantized base never moves, PEFT / merged
exports load in peft + transformers), and the int8-base loss of SmolLM2 against its float base."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import llama_jax
from llama_jax import lora, quant
from llama_jax.cli import main
from llama_jax.stages import sft
from llama_jax.train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "toy", "sft.yaml")


# ----------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_roundtrip_error_bounds(fmt):
    """Per-element bounds from each format's grid, and the relative RMS error on Gaussian weights."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 128, 48)) * 0.02, jnp.float32)
    tile = 32
    codes, scale = quant.quantize(w, fmt, tile)
    spec = quant.QuantSpec(fmt, tile, 128)
    assert codes.shape == quant.shapes(w.shape, fmt, tile)[0] and scale.shape == quant.shapes(w.shape, fmt, tile)[2]
    back = quant.dequantize(codes, scale, spec)
    err = np.abs(np.asarray(back - w))
    if fmt == "int8":  # half a step of the channel's scale
        bound = np.broadcast_to(np.asarray(scale) / 2, w.shape)
        rel = 0.01
    else:
        s = np.repeat(np.asarray(scale), tile, axis=-2)
        # int4: half a step (absmax / 7); nf4: half the widest gap of the code book (-1 .. -0.696) x absmax
        bound = s / 2 if fmt == "int4" else s * np.max(np.diff(quant.NF4)) / 2
        rel = 0.15 if fmt == "int4" else 0.12
    assert np.all(err <= bound * (1 + 1e-5) + 1e-9)
    rms = float(np.sqrt(np.mean(err ** 2)) / np.sqrt(np.mean(np.asarray(w) ** 2)))
    assert rms < rel, rms
    # values on the grid come back exactly (packing order, code book lookup)
    again = quant.dequantize(*quant.quantize(back, fmt, tile), spec)
    np.testing.assert_allclose(np.asarray(again), np.asarray(back), rtol=1e-6, atol=1e-9)
    # storage: int8 1 byte per weight; 4-bit 0.5 + 4 / tile bytes
    nbytes = codes.size * codes.dtype.itemsize + scale.size * 4
    assert nbytes / w.size == (1 + 4 / 128 if fmt == "int8" else 0.5 + 4 / tile)


# ----------------------------------------------------------------------------- QLoRA through the SFT stage
def _metrics(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


@pytest.mark.slow
def test_qlora_sft_trains_only_lora_and_exports(tmp_path, data_dir):
    base = llama_jax.init_model(llama_jax.preset("toy"), seed=1)
    llama_jax.save_hf(base, tmp_path / "base", tokenizer=str(data_dir / "llama2-tokenizer" / "tokenizer.model"))
    cfg = load_config(sft.SFTConfig, CONFIG, [
        f"model.init={tmp_path / 'base'}", "tokenizer=null", "train.steps=12", "train.log_every=1",
        "train.eval_every=0", "train.checkpoint_every=12", "train.progress=false", "mesh.fsdp=1",
        "data.max_length=64", "lora.enabled=true", "lora.rank=4", "lora.alpha=8", "train.lr=1e-2",
        "lora.trainable_modules=[lm_head]", "model.quantization=nf4", "model.quant_tile=4",
        "data.batching=bucket", "train.warmup_ratio=0"])
    r = sft.run_config(cfg, str(tmp_path / "run"))
    model = r["model"]
    losses = [m["loss"] for m in _metrics(r["run_dir"]) if "loss" in m]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses

    # what trains: the LoRA factors and lm_head (float32); every other Linear holds nf4 codes that
    # equal the quantized initial base (the frozen state never moved)
    _, trainable, frozen, _ = lora.split_trainable(model)
    paths = {tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(trainable)}
    assert all("lora" in p or p == ("lm_head", "kernel") for p in paths) and ("lm_head", "kernel") in paths
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(trainable))
    q = model.layers.mlp.down_proj
    assert q.quant == quant.QuantSpec("nf4", 4, 172) and q.kernel.get_value().dtype == jnp.uint8
    want, _ = quant.quantize(base.layers.mlp.down_proj.kernel.get_value(), "nf4", 4)
    np.testing.assert_array_equal(np.asarray(q.kernel.get_value()), np.asarray(want))
    assert float(jnp.max(jnp.abs(model.layers.mlp.down_proj.lora.b.get_value()))) > 0

    # exports: merged = LoRA folded into the dequantised base (the QLoRA model's own function);
    # the PEFT adapter applies to the original float base, in peft as in llama_jax
    model.eval()
    ids = np.random.RandomState(0).randint(3, 32000, (2, 12))
    ours = np.asarray(model(jnp.asarray(ids)))
    assert main(["export", "--model", r["run_dir"], "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", "--model", r["run_dir"], "--out", str(tmp_path / "adapter"), "--peft"]) == 0
    import peft

    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                        tmp_path / "adapter").eval()
    on_float = lora.load_peft(llama_jax.load(tmp_path / "base"), tmp_path / "adapter")
    on_float.eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4)
        np.testing.assert_allclose(pm(torch.tensor(ids)).logits.numpy(), np.asarray(on_float(jnp.asarray(ids))),
                                   atol=1e-4)


# ----------------------------------------------------------------------------- real weights
def _nll(model, ids):
    logits = model(ids)
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return float(-jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1)))


def test_int8_base_loss_close_to_float_on_smollm2(smollm2_dir):
    """SmolLM2-135M with LoRA attached (B = 0): the next-token loss on real text with the frozen base
    stored int8 is within 0.5% of the float32 base's; nf4 (tile 64) within 10%."""
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    text = ["The capital of France is Paris. It is known for the Eiffel Tower and its museums, "
            "including the Louvre, which is the most visited art museum in the world.",
            "Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees."]
    rows = [tok(t)["input_ids"] for t in text]
    n = min(len(r) for r in rows)
    assert n >= 16
    ids = jnp.asarray([r[:n] for r in rows], jnp.int32)

    def loss(fmt):
        m = lora.apply(llama_jax.load(smollm2_dir), rank=4, alpha=8)
        lora.prepare_frozen(m, frozen_dtype="float32", quantization=fmt)
        return _nll(m, ids)

    ref, l8, l4 = loss(None), loss("int8"), loss("nf4")
    assert ref < 4.0  # real weights, real text
    assert abs(l8 - ref) / ref < 0.005, (ref, l8)
    assert abs(l4 - ref) / ref < 0.10, (ref, l4)  # measured: 2.960 -> 3.187 (+7.7%): 135M quantizes badly
    print(f"smollm2 nll: float {ref:.4f}, int8 {l8:.4f}, nf4 {l4:.4f}")
    assert l8 != ref


def test_generate_int8_weights_smollm2(smollm2_dir, capsys):
    """`llama-jax generate --quantization int8` (weight-only, every Linear) on SmolLM2 still says
    " Paris" after "The capital of France is" (greedy)."""
    assert main(["generate", "--model", str(smollm2_dir), "--prompt", "The capital of France is",
                 "--max-new-tokens", "3", "--temperature", "0", "--quantization", "int8"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_ppo_reward_model_and_lora_critic_are_stored_like_the_policys_base():
    """QLoRA PPO (the 7B ppo.yaml on the toy preset, abstract as the planner builds it): the reward
    model and the LoRA critic's frozen base are stored as the policy's (int8 kernels, the rest in
    the bf16 compute dtype, no float32 copy); trained leaves (LoRA factors, value head) stay float32."""
    from llama_jax import plan as pl
    from llama_jax.sharding import make_mesh
    from llama_jax.stages.ppo import PPOTrainer

    cfg = pl.stage_config("ppo", "toy", vocab_size=512, overrides=[
        "model.quantization=int8", "model.dtype=bfloat16", "model.param_dtype=float32", "ppo.max_new_tokens=8"])
    mesh = make_mesh({"fsdp": -1})
    policy, rm, critic = (pl.abstract_stage_model(cfg, mesh, head=h) for h in ("lm", "score", "score"))
    tr = PPOTrainer.abstract(cfg, mesh, policy, critic, rm, 16)

    def dtypes(state):
        return {tuple(str(p) for p in path): v.get_value().dtype for path, v in nnx.to_flat_state(state)}

    for name, frozen in (("rm", tr.rm_state), ("critic", tr.critic_frozen), ("policy", tr.policy_frozen)):
        d = dtypes(frozen)
        kernels = {p: t for p, t in d.items() if p[-1] == "kernel" and p[0] != "score"}
        assert kernels and all(t == jnp.int8 for t in kernels.values()), (name, kernels)
        floats = {p: t for p, t in d.items() if p[-1] != "kernel" and jnp.issubdtype(t, jnp.floating)
                  and "scale" not in p[-1]}
        assert all(t == jnp.bfloat16 for t in floats.values()), (name, floats)
    assert dtypes(tr.rm_state)[("score", "kernel")] == jnp.float32
    trained = dtypes(tr.abstract_state()["critic_params"])
    assert ("score", "kernel") in trained and all(t == jnp.float32 for t in trained.values())
