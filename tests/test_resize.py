"""Embedding / lm_head resize to a merged tokenizer (llama_jax.vocab_resize, `llama-jax resize`).

A tiny Chinese BPE is trained on a slice of the CLUE sample and merged into LLaMA-2's tokenizer
(pad + multiple of 64); a tiny vocab-32000 Llama saved with LLaMA-2's tokenizer is resized.
"""
import itertools
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from flax import nnx

import llama_jax
from hf_ref import hf_logits, hf_model
from llama_jax.cli import main
from llama_jax.hf import save_tokenizer_files
from llama_jax.vocab_resize import NotAnExtensionError, resize_embeddings
from llama_jax.sharding import make_mesh, named_sharding
from llama_jax.tokenizer import MergeOptions, load_model_proto, merge_tokenizers, train_bpe
from llama_jax.tokenizer.sp_model import CONTROL, NORMAL, USER_DEFINED, WHITESPACE, ModelProto

V_OLD = 32000
SMALL = dict(vocab_size=V_OLD, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
ADD_WORDS = ("▁中国人", "▁人工智能")  # new pieces with a leading space (the zh model has none)
ZH_TEXT = "人工智能是计算机科学的一个分支，它企图了解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。"


@pytest.fixture(scope="module")
def tok(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("tok")
    src = data_dir / "zh-corpus" / "clue_corpus_small_sample.txt"
    with open(src, encoding="utf-8") as f:
        (root / "zh.txt").write_text("".join(itertools.islice(f, 400)), encoding="utf-8")
    trained = train_bpe(root / "zh", input_files=[root / "zh.txt"], vocab_size=3000)
    base = data_dir / "llama2-tokenizer" / "tokenizer.model"
    result = merge_tokenizers(base, trained.model_path, root / "merged",
                              MergeOptions(pad_token=True, pad_to_multiple_of=64, add_words=ADD_WORDS))
    assert result.pad_id == V_OLD and result.vocab_size % 64 == 0 and result.vocab_size > V_OLD + 1000
    return types.SimpleNamespace(base=base, zh=trained.model_path, dir=root / "merged",
                                 proto=load_model_proto(root / "merged"), vocab=result.vocab_size)


@pytest.fixture(scope="module", params=["untied", "tied"])
def src(request, tmp_path_factory, tok):
    tied = request.param == "tied"
    hf = hf_model(seed=2, std=0.1, tie_word_embeddings=tied, **SMALL)
    d = tmp_path_factory.mktemp(f"in_{request.param}")
    hf.save_pretrained(d)
    save_tokenizer_files(tok.base, d)  # IN dir carries LLaMA-2's tokenizer.model: the default base
    model = llama_jax.load(d)
    return types.SimpleNamespace(tied=tied, dir=d, model=model,
                                 new=resize_embeddings(model, tok.dir, tok.base))


def _rows(model, name):
    if name == "embed":
        return np.asarray(model.embed_tokens.embedding[...])
    return np.asarray(model.lm_head.kernel[...]).T  # a piece's lm_head row is a kernel column


def test_shapes_and_config(src, tok):
    new = src.new
    assert new.config.vocab_size == tok.vocab and new.config.pad_token_id == V_OLD
    assert new.embed_tokens.embedding.shape == (tok.vocab, 64)
    assert new.config.tie_word_embeddings == src.tied
    assert hasattr(new, "lm_head") != src.tied
    if not src.tied:
        assert new.lm_head.kernel.shape == (64, tok.vocab)
    assert src.model.config.vocab_size == V_OLD  # the input model is left as it was


def _zero_padded(model, vocab):
    """A copy of `model` whose embedding / lm_head get zero rows up to `vocab` (nothing else changes)."""
    m = nnx.clone(model)
    emb = m.embed_tokens.embedding[...]
    m.embed_tokens.embedding = nnx.Param(jnp.pad(emb, ((0, vocab - emb.shape[0]), (0, 0))), axes=("vocab", "embed"))
    if hasattr(m, "lm_head"):
        k = m.lm_head.kernel[...]
        m.lm_head.kernel = nnx.Param(jnp.pad(k, ((0, 0), (0, vocab - k.shape[1]))), axes=("embed", "vocab"))
    return m


def test_old_tokens_give_the_same_logits(src):
    ids = jnp.asarray(np.random.RandomState(0).randint(3, V_OLD, (2, 17)))
    new, old = src.new, src.model
    for name in ("embed",) + (() if src.tied else ("lm_head",)):
        np.testing.assert_array_equal(_rows(new, name)[:V_OLD], _rows(old, name))
    # Everything up to the output projection is bit-identical ...
    hidden = old(ids, return_hidden=True)  # after the final norm
    np.testing.assert_array_equal(np.asarray(new(ids, return_hidden=True)), np.asarray(hidden))
    after = np.asarray(new(ids))
    assert after.shape == (2, 17, new.config.vocab_size)
    # ... and so are the old-vocabulary logits, compared with the original computed at the same
    # output width: XLA's CPU dot rounds a column differently depending on the matrix width (the
    # last partial 1024-column tile of a 32000-wide product, ~1 ulp), so comparing across widths
    # measures the GEMM, not the resize.
    same_width = np.asarray(_zero_padded(old, new.config.vocab_size).project(hidden))
    np.testing.assert_array_equal(after[..., :V_OLD], same_width[..., :V_OLD])
    before = np.asarray(old.project(hidden))
    np.testing.assert_allclose(after[..., :V_OLD], before, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(after[..., :V_OLD].argmax(-1), before.argmax(-1))


@pytest.fixture(scope="module")
def chosen(tok):
    """Several new NORMAL pieces with the base ids spelling them: multi-piece spellings, pieces with
    a character missing from the base (spelled by byte pieces), pieces with a leading ▁."""
    # Spell each piece's text exactly: without the dummy prefix "中国" is 中 国, not ▁ 中 国.
    proto = load_model_proto(tok.base)
    proto.normalizer_spec.add_dummy_prefix = False
    base_sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    new = [i for i in range(V_OLD, len(tok.proto.pieces)) if tok.proto.pieces[i].type == NORMAL]
    texts = [tok.proto.pieces[i].piece.replace(WHITESPACE, " ") for i in new]
    multi, space, byte = [], [], []
    for i, text, ids in zip(new, texts, base_sp.encode(texts)):
        if len(ids) < 2:
            continue
        if text.startswith(" "):
            space.append((i, ids))
        elif any(base_sp.id_to_piece(j).startswith("<0x") for j in ids):
            byte.append((i, ids))
        else:
            multi.append((i, ids))
    assert len(multi) >= 6 and len(byte) >= 2 and len(space) == len(ADD_WORDS)
    return multi[:4] + multi[-2:] + space[:2] + byte[:2]


@pytest.mark.parametrize("name", ["embed", "lm_head"])
def test_new_rows_are_mean_of_base_spelling(src, tok, chosen, name):
    if name == "lm_head" and src.tied:
        pytest.skip("tied: the output projection is the embedding")
    old, new = _rows(src.model, name).astype(np.float64), _rows(src.new, name)
    for i, ids in chosen:
        assert max(ids) < V_OLD and len(ids) >= 2
        np.testing.assert_allclose(new[i], old[ids].mean(axis=0), rtol=1e-6, atol=1e-7,
                                   err_msg=f"{name} row {i} {tok.proto.pieces[i].piece!r} <- {ids}")
        assert not np.allclose(new[i], old.mean(axis=0), atol=1e-4)  # not the fallback
    # rows that are not text (pad, <reserved_k> fillers) start at the mean of all old rows
    mean_all = old.mean(axis=0)
    not_text = [i for i in range(V_OLD, tok.vocab) if tok.proto.pieces[i].type in (USER_DEFINED, CONTROL)]
    assert V_OLD in not_text and len(not_text) >= 2
    for i in not_text:
        np.testing.assert_allclose(new[i], mean_all, rtol=1e-6, atol=1e-7)


def test_pad_to_multiple_of_rounds_up(src, tok):
    new = resize_embeddings(src.model, tok.dir, tok.base, pad_to_multiple_of=1000)
    assert new.config.vocab_size == -(-tok.vocab // 1000) * 1000 > tok.vocab
    emb = _rows(new, "embed")
    np.testing.assert_array_equal(emb[:tok.vocab], _rows(src.new, "embed"))
    np.testing.assert_allclose(emb[tok.vocab:], np.broadcast_to(_rows(src.model, "embed").astype(np.float64)
                                                                .mean(0), emb[tok.vocab:].shape), rtol=1e-6, atol=1e-7)


def test_cli_export_loads_in_transformers(src, tok, tmp_path, capsys):
    out = tmp_path / "resized"
    assert main(["resize", "--model", str(src.dir), "--tokenizer", str(tok.dir), "--out", str(out)]) == 0
    assert f"{V_OLD} -> {tok.vocab}" in capsys.readouterr().out
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok(ZH_TEXT)["input_ids"]
    merged_sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert ids == [1] + merged_sp.encode(ZH_TEXT)
    assert sum(i > V_OLD for i in ids) >= 5, ids
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.vocab_size == tok.vocab and hf.config.pad_token_id == V_OLD
    assert hf.config.tie_word_embeddings == src.tied
    ours = llama_jax.load(out)
    x = np.asarray([ids])
    got = np.asarray(ours(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.asarray(src.new(jnp.asarray(x))))  # export is lossless
    np.testing.assert_allclose(hf_logits(hf, x), got, atol=1e-4, rtol=0)


def test_keeps_shardings_on_a_mesh(src, tok):
    if src.tied:
        pytest.skip("the untied case covers both embed_tokens and lm_head")
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    sharded = llama_jax.load(src.dir, mesh=mesh)
    new = resize_embeddings(sharded, tok.dir, tok.base)
    assert new.mesh is mesh
    assert new.embed_tokens.embedding[...].sharding == named_sharding(mesh, ("vocab", "embed"), (tok.vocab, 64))
    assert new.lm_head.kernel[...].sharding == named_sharding(mesh, ("embed", "vocab"), (64, tok.vocab))
    assert new.layers.mlp.up_proj.kernel[...].sharding == sharded.layers.mlp.up_proj.kernel[...].sharding
    np.testing.assert_array_equal(_rows(new, "embed"), _rows(src.new, "embed"))
    ids = jnp.asarray(np.random.RandomState(1).randint(3, tok.vocab, (2, 9)))
    np.testing.assert_allclose(np.asarray(new(ids)), np.asarray(src.new(ids)), atol=1e-5, rtol=0)


def _swapped(tok, path):
    """The merged tokenizer with ids 100 and 101 swapped: same size, not an extension."""
    proto = ModelProto()
    proto.CopyFrom(tok.proto)
    a, b = proto.pieces[100].piece, proto.pieces[101].piece
    proto.pieces[100].piece, proto.pieces[101].piece = b, a
    path.mkdir()
    (path / "tokenizer.model").write_bytes(proto.SerializeToString())
    return path


def test_not_an_extension_is_a_clear_error(src, tok, tmp_path, capsys):
    if src.tied:
        pytest.skip("input checks do not depend on tying")
    bad = _swapped(tok, tmp_path / "swapped")
    with pytest.raises(NotAnExtensionError, match="id 100"):
        resize_embeddings(src.model, bad, tok.base)
    with pytest.raises(NotAnExtensionError, match="fewer than the base"):
        resize_embeddings(src.model, tok.zh, tok.base)  # the Chinese model alone
    with pytest.raises(NotAnExtensionError, match="vocab_size 32000"):
        resize_embeddings(src.model, tok.dir, tok.dir)  # base = merged: not the model's tokenizer

    out = tmp_path / "out"
    for argv, msg in [
        (["--tokenizer", str(bad)], "does not extend the base: id 100"),
        (["--tokenizer", str(tok.zh)], "fewer than the base"),
        (["--tokenizer", str(tok.dir), "--base-tokenizer", str(tmp_path / "nope.model")], "nope.model"),
    ]:
        assert main(["resize", "--model", str(src.dir), "--out", str(out)] + argv) == 2
        assert msg in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing written, no temp dir left

    # an IN dir without tokenizer.model and no --base-tokenizer
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy2(src.dir / f, bare / f)
    assert main(["resize", "--model", str(bare), "--tokenizer", str(tok.dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no base tokenizer" in err and "--base-tokenizer" in err
    assert not out.exists()
    # ... which works once the base is named
    assert main(["resize", "--model", str(bare), "--tokenizer", str(tok.dir), "--out", str(out),
                 "--base-tokenizer", str(tok.base)]) == 0
    assert (out / "config.json").exists()


def test_python_api_needs_a_base(src, tok):
    with pytest.raises(ValueError, match="base_tokenizer is required"):
        resize_embeddings(src.model, tok.dir)
