"""`llama-jax convert`: a Meta-layout checkpoint built from a random HF model (split over two
model-parallel ranks exactly as Meta's release is, rotary rows in Meta's interleaved order)
converts back to the same logits, MHA and GQA; every kind of bad input gives one error naming the
file and leaves nothing behind.  (The llama2.c path against real weights: tests/test_real_weights.py.)"""
import copy
import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import llama_jax
from hf_ref import hf_logits, hf_model
from conftest import DATA
from llama_jax.cli import main
from llama_jax.convert import (ConvertConfig, ConvertError, convert, ffn_hidden_size, rope_half_to_interleaved,
                               rope_interleaved_to_half)

# (HF name suffix, Meta name suffix, model-parallel split dim (None = replicated), rotary heads key)
_LAYER = [("self_attn.q_proj.weight", "attention.wq.weight", 0, "nh"),
          ("self_attn.k_proj.weight", "attention.wk.weight", 0, "nkv"),
          ("self_attn.v_proj.weight", "attention.wv.weight", 0, None),
          ("self_attn.o_proj.weight", "attention.wo.weight", 1, None),
          ("mlp.gate_proj.weight", "feed_forward.w1.weight", 0, None),
          ("mlp.down_proj.weight", "feed_forward.w2.weight", 1, None),
          ("mlp.up_proj.weight", "feed_forward.w3.weight", 0, None),
          ("input_layernorm.weight", "attention_norm.weight", None, None),
          ("post_attention_layernorm.weight", "ffn_norm.weight", None, None)]


def write_meta(hf, out, mp=2, multiple_of=32, ffn_dim_multiplier=None, dtype=torch.float32):
    """What Meta's release looks like for this HF model: params.json + consolidated.NN.pth, one per rank."""
    c = hf.config
    sd = {k: v.detach().to(dtype) for k, v in hf.state_dict().items()}
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    meta = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], 1),  # ParallelEmbedding: dim 1
            "norm.weight": (sd["model.norm.weight"], None), "output.weight": (sd["lm_head.weight"], 0)}
    for i in range(c.num_hidden_layers):
        for hf_name, m_name, cat, heads in _LAYER:
            w = sd[f"model.layers.{i}.{hf_name}"]
            if heads:
                w = torch.from_numpy(rope_half_to_interleaved(w.float().numpy(), nh if heads == "nh" else nkv)).to(dtype)
            meta[f"layers.{i}.{m_name}"] = (w, cat)
    out.mkdir(parents=True)
    for r in range(mp):
        shard = {k: (w.clone() if cat is None else torch.chunk(w, mp, dim=cat)[r].clone()) for k, (w, cat) in meta.items()}
        torch.save(shard, out / f"consolidated.{r:02d}.pth")
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": nh, "multiple_of": multiple_of,
              "norm_eps": c.rms_norm_eps, "vocab_size": -1}
    if nkv != nh:
        params["n_kv_heads"] = nkv
    if ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    (out / "params.json").write_text(json.dumps(params))
    return out


CASES = {
    # MHA, float32 shards, Llama-2-7B's sizing rule (no multiplier)
    "mha": dict(heads=4, kv=4, multiple_of=32, mult=None, dtype=torch.float32),
    # GQA with Llama-2-70B's sizing rule (ffn_dim_multiplier) and bfloat16 shards, as Meta ships them
    "gqa": dict(heads=4, kv=2, multiple_of=16, mult=1.3, dtype=torch.bfloat16),
}


@pytest.fixture(scope="module")
def meta_ckpts(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("meta")
    # Meta ships tokenizer.model one level above the model directories: found there by default
    shutil.copy(data_dir / "models" / "stories260K" / "tok512.model", root / "tokenizer.model")
    out = {}
    for name, c in CASES.items():
        inter = ffn_hidden_size(64, c["multiple_of"], c["mult"])
        hf = hf_model(seed=1, num_attention_heads=c["heads"], num_key_value_heads=c["kv"], intermediate_size=inter,
                      vocab_size=512)
        if c["dtype"] == torch.bfloat16:  # the reference computes with the weights Meta's file holds
            hf = hf.to(torch.bfloat16).float()
        out[name] = (hf, write_meta(hf, root / name, multiple_of=c["multiple_of"], ffn_dim_multiplier=c["mult"],
                                    dtype=c["dtype"]))
    return out


def test_rope_permutation_is_the_inverse_and_matches_interleaved_rotation():
    w = np.random.RandomState(0).randn(2 * 8, 5).astype(np.float32)  # 2 heads of head_dim 8
    np.testing.assert_array_equal(rope_interleaved_to_half(rope_half_to_interleaved(w, 2), 2), w)
    # rotating interleaved pairs of x = W_meta v equals rotating halves of x' = W_hf v
    v, ang = np.random.RandomState(1).randn(5), np.random.RandomState(2).rand(4)
    meta = rope_half_to_interleaved(w, 2) @ v
    hf = w @ v
    for h in range(2):
        xm, xh = meta[h * 8:(h + 1) * 8], hf[h * 8:(h + 1) * 8]
        rm = np.empty(8)
        rm[0::2] = xm[0::2] * np.cos(ang) - xm[1::2] * np.sin(ang)
        rm[1::2] = xm[0::2] * np.sin(ang) + xm[1::2] * np.cos(ang)
        c, s = np.cos(np.concatenate([ang, ang])), np.sin(np.concatenate([ang, ang]))
        rh = xh * c + np.concatenate([-xh[4:], xh[:4]]) * s
        # the same vector up to the row order: HF row i <-> Meta row 2i, HF row 4+i <-> Meta row 2i+1
        np.testing.assert_allclose(rh, np.concatenate([rm[0::2], rm[1::2]]), atol=1e-12)


def test_ffn_sizes_of_the_llama2_releases():
    assert ffn_hidden_size(4096, 256, None) == 11008   # 7B
    assert ffn_hidden_size(5120, 256, None) == 13824   # 13B
    assert ffn_hidden_size(8192, 4096, 1.3) == 28672   # 70B


@pytest.mark.parametrize("case", list(CASES))
def test_meta_two_shards_convert_to_the_same_logits(case, meta_ckpts, tmp_path):
    hf, src = meta_ckpts[case]
    out = tmp_path / "hf"
    # a tiny shard size so the index + several safetensors files are exercised
    assert main(["convert", "--format", "meta", str(src), "--out", str(out), "--max-shard-gb", "0.0001"]) == 0
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == CASES[case]["kv"] and cfg["intermediate_size"] == hf.config.intermediate_size
    assert cfg["torch_dtype"] == ("bfloat16" if case == "gqa" else "float32")  # the source's dtype by default
    assert (out / "tokenizer.model").read_bytes() == (src.parent / "tokenizer.model").read_bytes()
    ids = np.random.RandomState(0).randint(0, 512, (2, 11))
    ref = hf_logits(hf, ids)
    ours = np.asarray(llama_jax.load(out, dtype="float32")(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    theirs = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), ids)
    np.testing.assert_allclose(theirs, ref, atol=1e-5, rtol=0)


def test_meta_output_dtype_option(meta_ckpts, tmp_path):
    hf, src = meta_ckpts["mha"]
    out = convert(ConvertConfig("meta", src, tmp_path / "bf16", dtype="bfloat16", progress=False))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ids = np.random.RandomState(0).randint(0, 512, (1, 7))
    ref = hf_logits(copy.deepcopy(hf).to(torch.bfloat16).float(), ids)  # .to() is in place
    np.testing.assert_allclose(np.asarray(llama_jax.load(out, dtype="float32")(jnp.asarray(ids))), ref, atol=1e-5)


# ----------------------------------------------------------------------------- bad input
def _mutate_meta(src, dst, how):
    shutil.copytree(src, dst)
    if how == "unknown_key":
        p = json.loads((dst / "params.json").read_text())
        p["rope_scaling_factor"] = 8
        (dst / "params.json").write_text(json.dumps(p))
        return dst / "params.json", "rope_scaling_factor"
    if how == "missing_shard":
        (dst / "consolidated.00.pth").unlink()
        return dst, "consolidated.00.pth missing"
    if how == "one_shard_of_two":  # only rank 0 of a 2-way model-parallel checkpoint
        (dst / "consolidated.01.pth").unlink()
        return dst, "merges to"
    if how == "shape":
        sd = torch.load(dst / "consolidated.01.pth", weights_only=True)
        sd["layers.1.attention.wv.weight"] = sd["layers.1.attention.wv.weight"][:-2]
        torch.save(sd, dst / "consolidated.01.pth")
        return dst / "consolidated.01.pth", "layers.1.attention.wv.weight"
    if how == "truncated":
        f = dst / "consolidated.01.pth"
        f.write_bytes(f.read_bytes()[:-1000])
        return f, "cannot be read"
    if how == "replicated_differ":
        sd = torch.load(dst / "consolidated.01.pth", weights_only=True)
        sd["norm.weight"] = sd["norm.weight"] + 1
        torch.save(sd, dst / "consolidated.01.pth")
        return dst / "consolidated.01.pth", "replicated tensor 'norm.weight'"
    if how == "tokenizer":  # LLaMA-2's 32000 pieces for a 512-row embedding
        shutil.copy(DATA / "llama2-tokenizer" / "tokenizer.model", dst / "tokenizer.model")
        return dst / "tokenizer.model", "32000 pieces"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["unknown_key", "missing_shard", "one_shard_of_two", "shape", "truncated",
                                 "replicated_differ", "tokenizer"])
def test_meta_bad_input_one_clear_error_nothing_written(how, meta_ckpts, tmp_path, capsys):
    src, needle = _mutate_meta(meta_ckpts["mha"][1], tmp_path / "src", how)
    where = tmp_path / "outs"
    assert main(["convert", "--format", "meta", str(tmp_path / "src"), "--out", str(where / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llama-jax convert: error: ") and str(src) in err and needle in err, err
    assert not where.exists() or list(where.iterdir()) == []  # no output, no temporary directory left


def _llama2c(path, dim=16, hidden=32, L=1, nh=2, nkv=1, vocab=-24, seq=8, extra=0):
    hs, kv = dim // nh, nkv * (dim // nh)
    n = (abs(vocab) * dim + L * dim + L * dim * dim + 2 * L * kv * dim + L * dim * dim + L * dim + 3 * L * hidden * dim
         + dim + seq * hs + (abs(vocab) * dim if vocab < 0 else 0))
    body = np.random.RandomState(0).randn(n + extra).astype("<f4")
    path.write_bytes(np.array([dim, hidden, L, nh, nkv, vocab, seq], "<i4").tobytes() + body.tobytes())
    return path


@pytest.mark.parametrize("how,needle", [("ok", None), ("truncated", "truncated"), ("longer", "longer than its header"),
                                        ("short", "too short"), ("magic", "versioned"), ("header", "must be positive")])
def test_llama2c_bad_input(how, needle, tmp_path, capsys):
    f = tmp_path / "m.bin"
    if how in ("ok", "truncated", "longer"):
        _llama2c(f, extra=3 if how == "longer" else 0)
        if how == "truncated":
            f.write_bytes(f.read_bytes()[:-40])
    elif how == "short":
        f.write_bytes(b"\0" * 12)
    elif how == "magic":
        f.write_bytes(np.array([0x616B3432, 2, 16], "<i4").tobytes() + b"\0" * 256)
    else:
        f.write_bytes(np.array([16, 0, 1, 2, 1, 24, 8], "<i4").tobytes() + b"\0" * 64)
    where = tmp_path / "outs"
    rc = main(["convert", "--format", "llama2c", str(f), "--out", str(where / "hf")])
    if how == "ok":  # the generator above is right: the same layout converts and loads
        assert rc == 0
        m = llama_jax.load(where / "hf")
        assert (m.config.num_key_value_heads, m.config.tie_word_embeddings, m.config.vocab_size) == (1, False, 24)
        return
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llama-jax convert: error: ") and str(f) in err and needle in err, err
    assert not where.exists() or list(where.iterdir()) == []


def test_llama2c_convert_does_not_import_torch(tmp_path):
    f = _llama2c(tmp_path / "m.bin", vocab=24)
    code = ("import sys; from llama_jax.convert import ConvertConfig, convert; "
            f"convert(ConvertConfig('llama2c', {str(f)!r}, {str(tmp_path / 'hf')!r}, progress=False)); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False" and (tmp_path / "hf" / "model.safetensors").exists()


def test_convert_config_refuses_unknown_format_and_dtype(tmp_path):
    with pytest.raises(ConvertError, match="--format"):
        ConvertConfig("gguf", tmp_path, tmp_path / "o")
    with pytest.raises(ConvertError, match="--dtype"):
        ConvertConfig("meta", tmp_path, tmp_path / "o", dtype="int8")
