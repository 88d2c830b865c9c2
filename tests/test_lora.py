"""LoRA: exactness at B=0, merge, PEFT export/import parity with peft, trainable split, HF export."""
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

import llama_jax
from llama_jax import lora
from llama_jax.safetensors_io import SafetensorsFile, write_file
from hf_ref import hf_logits, hf_model

STD = 0.1
VARIANTS = {"mha": {}, "gqa": dict(num_key_value_heads=2), "tied": dict(tie_word_embeddings=True)}
PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """Variant name -> directory of a saved HF base model (built once per module)."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = tmp_path_factory.mktemp(name)
            hf_model(seed=1, std=STD, **VARIANTS[name]).save_pretrained(made[name])
        return made[name]

    return get


def _ids(b=2, t=12, seed=0):
    return np.random.RandomState(seed).randint(3, 256, (b, t))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def _logits(model, ids):
    # jit keyed on the graphdef: models of the same structure share one compilation (an eager call
    # of the scanned model would recompile the scan body every time)
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(ids)))


def _randomise(model, seed=0, std=0.2):
    """Non-zero A and B everywhere, so every LoRA path changes the output."""
    rs = np.random.RandomState(seed)  # numpy: no per-shape compilation
    for _, m in nnx.iter_modules(model):
        if isinstance(m, lora.LoRA):
            for f in (m.a, m.b):
                f.set_value(jnp.asarray(rs.normal(0, std, f.get_value().shape), jnp.float32))


def _perturb_full_modules(model):
    """Change the fully trained modules (as training embed_tokens / lm_head would)."""
    e = model.embed_tokens.embedding
    e.set_value(e.get_value() * 1.5 + 0.01)
    if not model.config.tie_word_embeddings:
        k = model.lm_head.kernel
        k.set_value(-k.get_value() + 0.02)


def _params(model):
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _lora_paths():
    return {f"layers.{blk}.{name}.lora.{f}" for blk, names in PROJ.items() for name in names for f in "ab"}


# ----------------------------------------------------------------------------- 1. exactness and merge
def test_zero_b_is_exact_and_merged_equals_unmerged(base_dir):
    model = llama_jax.load(base_dir("gqa"))
    ids = _ids()
    ref = _logits(model, ids)
    lora.apply(model, rank=4, alpha=8)
    assert model.lora_config.scale == 2.0 and lora.has_lora(model)

    q, k, down = (model.layers.self_attn.q_proj.lora, model.layers.self_attn.k_proj.lora,
                  model.layers.mlp.down_proj.lora)
    assert q.a.get_value().shape == (2, 64, 4) and q.b.get_value().shape == (2, 4, 64)
    assert k.b.get_value().shape == (2, 4, 32)  # GQA: 2 kv heads x 16
    assert q.a.axes == ("layers", "embed", "lora_rank") and q.b.axes == ("layers", "lora_rank", "heads")
    assert down.a.axes == ("layers", "mlp", "lora_rank") and down.b.axes == ("layers", "lora_rank", "embed")
    # PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0
    a = np.asarray(down.a.get_value())
    assert 0.9 / np.sqrt(160) < np.abs(a).max() <= 1 / np.sqrt(160)
    assert not np.any(np.asarray(down.b.get_value()))

    np.testing.assert_array_equal(_logits(model, ids), ref)  # B = 0: exactly the base model

    _randomise(model)
    unmerged = _logits(model, ids)
    assert np.abs(unmerged - ref).max() > 0.1  # the factors do change the output
    lora.merge(model)
    assert not lora.has_lora(model) and getattr(model, "lora_config", None) is None
    assert nnx.graphdef(model) == nnx.graphdef(llama_jax.load(base_dir("gqa")))  # a plain model again
    np.testing.assert_allclose(_logits(model, ids), unmerged, atol=1e-5, rtol=0)


def test_merge_folds_in_float32_and_keeps_kernel_dtype(base_dir):
    model = llama_jax.load(base_dir("mha"), dtype="bfloat16")
    lora.apply(model, rank=2, alpha=4, targets=("q_proj",))
    _randomise(model)
    w = np.asarray(model.layers.self_attn.q_proj.kernel.get_value(), np.float32)
    f = model.layers.self_attn.q_proj.lora
    assert f.a.get_value().dtype == jnp.float32  # factors stay float32 on a bf16 model
    expect = (w + 2.0 * np.matmul(np.asarray(f.a.get_value()), np.asarray(f.b.get_value()))).astype(jnp.bfloat16)
    lora.merge(model)
    got = model.layers.self_attn.q_proj.kernel.get_value()
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), expect.astype(np.float32))


# ----------------------------------------------------------------------------- 2. PEFT format
def _hf(d):
    return transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


CASES = {  # variant, LoRA targets, modules trained in full
    "mha": ("mha", lora.ALL_TARGETS, ("embed_tokens", "lm_head")),
    "gqa": ("gqa", lora.ALL_TARGETS, ("embed_tokens", "lm_head")),
    "tied": ("tied", lora.ALL_TARGETS, ("embed_tokens",)),
    # LoRA on lm_head (not stacked); PEFT's modules_to_save is a plain suffix match, so "norm"
    # also trains every input_layernorm / post_attention_layernorm
    "suffix": ("mha", ("q_proj", "lm_head"), ("norm",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_export_loads_in_peft_and_roundtrips(case, base_dir, tmp_path):
    variant, targets, mods = CASES[case]
    d = base_dir(variant)
    tied = variant == "tied"
    model = lora.apply(llama_jax.load(d), rank=4, alpha=8, targets=targets, trainable_modules=mods)
    _randomise(model)
    if case == "suffix":
        for w in (model.norm.weight, model.layers.input_layernorm.weight):
            w.set_value(w.get_value() * 1.3)
        assert {".".join(p) for p in lora._select(model, targets, mods)[1]} == \
            {"norm.weight", "layers.input_layernorm.weight", "layers.post_attention_layernorm.weight"}
    else:
        _perturb_full_modules(model)
    out = lora.save_peft(model, tmp_path / "adapter", base_model_name_or_path=str(d))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == \
        ("LORA", "CAUSAL_LM", 4, 8, "none")
    assert sorted(cfg["target_modules"]) == sorted(targets) and cfg["modules_to_save"] == list(mods)

    # The same key names, shapes and dtypes peft itself writes for this configuration.
    ref = peft.get_peft_model(_hf(d), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), modules_to_save=list(mods),
        task_type="CAUSAL_LM", ensure_weight_tying=tied))
    ref.save_pretrained(tmp_path / "peft_ref")
    ours, theirs = (SafetensorsFile(p / "adapter_model.safetensors") for p in (out, tmp_path / "peft_ref"))
    # (peft adds a copy of the unchanged base lm_head, '...lm_head.base_layer.weight', when lm_head is
    # a LoRA target; it is optional on load, so we do not write it)
    assert {k: (ours.shape(k), ours.dtype(k)) for k in ours.keys()} == \
        {k: (theirs.shape(k), theirs.dtype(k)) for k in theirs.keys() if not k.endswith(".base_layer.weight")}
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in ours.keys()

    # peft loads our adapter and computes the same logits as llama_jax.
    ids = _ids(seed=1)
    ours_logits = _logits(model, ids)
    base_logits = hf_logits(_hf(d), ids)
    assert np.abs(ours_logits - base_logits).max() > 0.1
    pm = peft.PeftModel.from_pretrained(_hf(d), out).eval()
    np.testing.assert_allclose(hf_logits(pm, ids), ours_logits, atol=1e-4, rtol=0)

    # load_peft into a fresh model gives identical parameters.
    back = lora.load_peft(llama_jax.load(d), out)
    assert back.lora_config == model.lora_config
    want, got = _params(model), _params(back)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    # And the other direction: an adapter trained with peft loads into llama_jax.
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.2)
    ref.save_pretrained(tmp_path / "peft_trained")
    from_peft = lora.load_peft(llama_jax.load(d), tmp_path / "peft_trained")
    np.testing.assert_allclose(_logits(from_peft, ids), hf_logits(ref.eval(), ids), atol=1e-4, rtol=0)


def _rewrite(src, dst, change):
    """Copy an adapter dir, passing its tensors through change(name, array) -> array | None (drop)."""
    shutil.copytree(src, dst)
    st = SafetensorsFile(src / "adapter_model.safetensors")
    entries = []
    for k in st.keys():
        arr = change(k, np.array(st.get(k)))
        if arr is not None:
            entries.append((k, arr.shape, arr.dtype, lambda arr=arr: arr))
    write_file(dst / "adapter_model.safetensors", entries)


def test_load_peft_names_file_and_key_on_bad_tensors(base_dir, tmp_path):
    d = base_dir("mha")
    out = lora.save_peft(lora.apply(llama_jax.load(d), rank=4, alpha=8), tmp_path / "ok")
    victim = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    _rewrite(out, tmp_path / "missing", lambda k, a: None if k == victim else a)
    fresh = llama_jax.load(d)
    with pytest.raises(ValueError, match=rf"missing.*adapter_model\.safetensors.*'{victim}' is missing"):
        lora.load_peft(fresh, tmp_path / "missing")
    assert not lora.has_lora(fresh) and getattr(fresh, "lora_config", None) is None  # left as it came

    _rewrite(out, tmp_path / "shape", lambda k, a: a.T.copy() if k == victim else a)
    with pytest.raises(ValueError, match=rf"'{victim}' has shape \[4, 64\], expected \[64, 4\]"):
        lora.load_peft(llama_jax.load(d), tmp_path / "shape")

    # an adapter for more layers than the model has is not silently truncated
    extra = victim.replace("layers.1", "layers.2")
    _rewrite(out, tmp_path / "extra", lambda k, a: a)
    st = SafetensorsFile(out / "adapter_model.safetensors")
    entries = [(k, st.shape(k), st.dtype(k), lambda k=k: st.get(k)) for k in st.keys()]
    write_file(tmp_path / "extra" / "adapter_model.safetensors",
               entries + [(extra, (64, 4), np.dtype(np.float32), lambda: np.zeros((64, 4), np.float32))])
    with pytest.raises(ValueError, match="not used by this model.*layers.2"):
        lora.load_peft(llama_jax.load(d), tmp_path / "extra")

    # settings that differ from the LoRA already attached are refused
    with pytest.raises(ValueError, match="differ"):
        lora.load_peft(lora.apply(llama_jax.load(d), rank=8, alpha=8), out)


def test_apply_rejects_bad_requests(base_dir):
    with pytest.raises(ValueError, match=r"targets \['qkv_proj'\] match nothing"):
        lora.apply(llama_jax.load(base_dir("mha")), rank=4, alpha=8, targets=("qkv_proj",))
    with pytest.raises(ValueError, match="tied embeddings"):
        lora.apply(llama_jax.load(base_dir("tied")), rank=4, alpha=8, trainable_modules=("lm_head",))
    with pytest.raises(ValueError, match="not both"):
        lora.apply(llama_jax.load(base_dir("mha")), rank=4, alpha=8, trainable_modules=("q_proj",))
    m = lora.apply(llama_jax.load(base_dir("mha")), rank=4, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply(m, rank=4, alpha=8)


# ----------------------------------------------------------------------------- 3. training structure
def test_gradients_and_optimizer_state_cover_only_trainable(base_dir):
    model = lora.apply(llama_jax.load(base_dir("mha")), rank=4, alpha=8,
                       trainable_modules=("embed_tokens", "lm_head"))
    _randomise(model, std=0.05)
    before = _params(model)
    graphdef, trainable, frozen, rest = lora.split_trainable(model)
    expected = _lora_paths() | {"embed_tokens.embedding", "lm_head.kernel"}
    paths = lambda s: {".".join(map(str, p)) for p, _ in nnx.to_flat_state(s)}
    assert paths(trainable) == expected
    assert paths(frozen) == set(before) - expected  # every other param, kernels and norms
    assert not paths(rest)  # no dropout: no RNG state

    ids = jnp.asarray(_ids(4, 16, seed=2))

    def loss_fn(tr):
        logits = nnx.merge(graphdef, tr, frozen, rest)(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    tx = optax.adamw(1e-2)
    opt_state = tx.init(trainable)
    assert paths(opt_state[0].mu) == expected and paths(opt_state[0].nu) == expected
    n_trainable = sum(v.size for v in jax.tree.leaves(trainable))
    assert sum(v.size for v in jax.tree.leaves(opt_state)) == 2 * n_trainable + 1  # mu, nu, count

    @jax.jit
    def step(tr, st):
        loss, g = jax.value_and_grad(loss_fn)(tr)
        upd, st = tx.update(g, st, tr)
        return optax.apply_updates(tr, upd), st, loss, g

    losses = []
    for i in range(4):
        trainable, opt_state, loss, grads = step(trainable, opt_state)
        losses.append(float(loss))
        if i == 0:
            assert paths(grads) == expected
            for p, g in nnx.to_flat_state(grads):
                assert np.all(np.isfinite(g.get_value())) and np.any(g.get_value()), p
    assert losses[-1] < losses[0]
    nnx.update(model, trainable)
    after = _params(model)
    for k in before:
        if k in expected:
            assert not np.array_equal(after[k], before[k]), k
        else:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)  # bitwise unchanged

    # the nnx way: an Optimizer restricted to the trainable filter holds state for exactly those
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=lora.trainable_filter(model))
    assert {p.split(".", 3)[-1] for p in paths(nnx.state(opt)) if ".mu." in p} == expected


def test_dropout_only_on_lora_path_and_off_in_eval(base_dir):
    d = base_dir("mha")
    ids = _ids(2, 10, seed=3)
    base = _logits(llama_jax.load(d), ids)
    model = lora.apply(llama_jax.load(d), rank=4, alpha=8, dropout=0.5)
    # B = 0: dropout touches only the LoRA input path, so the output is still exactly the base's
    np.testing.assert_array_equal(_logits(model, ids), base)
    _randomise(model)
    model.eval()
    clean = _logits(model, ids)
    np.testing.assert_array_equal(_logits(nnx.view(model, deterministic=True), ids), clean)
    model.train()
    noisy = _logits(model, ids)
    assert np.abs(noisy - clean).max() > 1e-3
    lora.advance_dropout(model)
    assert not np.array_equal(_logits(model, ids), noisy)  # a fresh mask each step
    lora.merge(model)  # merged = the deterministic LoRA model
    np.testing.assert_allclose(_logits(model, ids), clean, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- 4. merged HF export
def test_merge_then_save_hf_matches_unmerged_in_transformers(base_dir, tmp_path):
    model = lora.apply(llama_jax.load(base_dir("gqa")), rank=4, alpha=8,
                       trainable_modules=("embed_tokens", "lm_head"))
    _randomise(model)
    _perturb_full_modules(model)
    with pytest.raises(ValueError, match="merge"):
        llama_jax.save_hf(model, tmp_path / "no")
    ids = _ids(seed=4)
    unmerged = _logits(model, ids)
    out = llama_jax.save_hf(lora.merge(model), tmp_path / "merged")
    np.testing.assert_allclose(hf_logits(_hf(out), ids), unmerged, atol=1e-4, rtol=0)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_factors_follow_the_kernel_sharding(base_dir):
    from llama_jax.sharding import make_mesh

    d = base_dir("mha")
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharded = lora.apply(llama_jax.load(d, mesh=mesh), rank=4, alpha=8, dropout=0.1)
    single = lora.apply(llama_jax.load(d), rank=4, alpha=8, dropout=0.1)
    q, o = sharded.layers.self_attn.q_proj.lora, sharded.layers.self_attn.o_proj.lora
    assert q.a.get_value().sharding.spec == P(None, "fsdp", None)
    assert q.b.get_value().sharding.spec == P(None, None, "tensor")
    assert o.a.get_value().sharding.spec == P(None, "tensor", None)
    # same init regardless of the mesh; the sharded forward equals the single-device one
    for m in (sharded, single):
        _randomise(m)
        m.eval()
    ids = jnp.asarray(_ids(8, 8, seed=5))
    g, s = nnx.split(sharded)
    out = jax.jit(lambda s, i: nnx.merge(g, s)(i))(s, ids)
    np.testing.assert_allclose(np.asarray(out), _logits(single, ids), atol=1e-5, rtol=0)
