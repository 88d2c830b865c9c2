"""Grow a model's vocabulary to a merged (extended) tokenizer.

`resize_embeddings` returns a new model whose `embed_tokens` (and `lm_head`, when not tied)
have one row per piece of the merged tokenizer (optionally rounded up): a sentencepiece model
(tokenizer/merge.py, LLaMA-2) or an HF byte-level BPE tokenizer.json (tokenizer/byte_bpe.py,
e.g. SmolLM2), whichever the merged tokenizer is; the base must be the same kind. Old rows are
copied bit for bit, so on text made of old tokens the hidden states are bit-identical and the
old-vocabulary logits equal the original's (up to the ~1 ulp a GEMM may round differently at
another output width, e.g. XLA's CPU dot on a 32000- vs 34304-wide product). New rows start at
the mean of the rows of the base pieces that spell the new piece
(`llama_jax.tokenizer.new_rows.rows_from_spellings`; a byte-level token is spelled by the base
BPE model on its bytes). `llama-jax resize` does the same on an HF
directory and writes an HF directory with the merged tokenizer.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from .hf import load, save_hf
from .model import Llama, abstract_model, has_lora
from .sharding import named_sharding, to_host
from .tokenizer import byte_bpe
from .tokenizer.new_rows import base_ids_of_new_pieces, rows_from_spellings
from .tokenizer.sp_model import SP_FILE_NAME, TokenizerFormatError, as_proto, resolve_model_path

# the parameters that grow
_EMBED = ("embed_tokens", "embedding")
_LM_HEAD = ("lm_head", "kernel")


class NotAnExtensionError(ValueError):
    """The merged tokenizer does not keep the base tokenizer's pieces at their ids."""


def check_extension(base, merged, old_vocab: int | None = None) -> None:
    """Raise NotAnExtensionError unless `merged` starts with exactly the pieces of `base`.

    old_vocab: the model's vocab_size, which must equal the base's piece count; otherwise the
    tokenizer is not the one the model was trained with and ids past the base would land on
    rows that already mean something (or on padding rows).
    """
    base_p, merged_p = as_proto(base), as_proto(merged)
    nb, nm = len(base_p.pieces), len(merged_p.pieces)
    if old_vocab is not None and old_vocab != nb:
        raise NotAnExtensionError(
            f"the model has vocab_size {old_vocab} but the base tokenizer has {nb} pieces: "
            "pass the tokenizer the model was trained with as the base")
    if nm < nb:
        raise NotAnExtensionError(
            f"merged tokenizer has {nm} pieces, fewer than the base's {nb}: it does not extend the base")
    for i in range(nb):
        b, m = base_p.pieces[i], merged_p.pieces[i]
        if b.piece != m.piece or b.type != m.type:
            raise NotAnExtensionError(
                f"merged tokenizer does not extend the base: id {i} is {m.piece!r} (type {m.type}), "
                f"the base has {b.piece!r} (type {b.type}); ids < {nb} must be the base's pieces")


def pad_id_of(merged) -> int | None:
    """The merged tokenizer's pad id: trainer_spec.pad_id, else a piece named '<pad>'."""
    proto = as_proto(merged)
    pid = proto.trainer_spec.pad_id
    if 0 <= pid < len(proto.pieces):
        return pid
    for i, p in enumerate(proto.pieces):
        if p.piece == "<pad>":
            return i
    return None


def byte_level_dir(tokenizer) -> Path | None:
    """The directory of an HF byte-level BPE tokenizer.json (SmolLM2-style; a path to the directory or
    to the file), else None: a sentencepiece model (a directory with a tokenizer.model is one)."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return None
    p = Path(tokenizer)
    if p.is_dir():
        if (p / SP_FILE_NAME).is_file():
            return None
        p = p / "tokenizer.json"
    if p.name != "tokenizer.json" or not p.is_file():
        return None
    return p.parent if byte_bpe.is_byte_level_bpe(p) else None


def _check_byte_level(merged_dir: Path, base_tokenizer, old_vocab: int | None) -> Path:
    """The base's tokenizer directory, after checking that `merged_dir` extends it (NotAnExtensionError)."""
    base_dir = byte_level_dir(base_tokenizer)
    if base_dir is None:
        raise NotAnExtensionError(f"{merged_dir} is a byte-level BPE tokenizer.json, so the base "
                                  f"{base_tokenizer} must be one too (the base model's tokenizer directory)")
    try:
        byte_bpe.check_extension(base_dir, merged_dir, old_vocab)
    except ValueError as e:
        raise NotAnExtensionError(str(e)) from None
    return base_dir


def _new_row_spellings(merged_tokenizer, base_tokenizer, old_vocab: int, pad_to_multiple_of):
    """(new vocab size, pad id or None, base ids spelling each new row) for either tokenizer kind,
    after checking that the merged tokenizer extends the base one (NotAnExtensionError)."""
    merged_dir = byte_level_dir(merged_tokenizer)
    if merged_dir is not None:
        base_dir = _check_byte_level(merged_dir, base_tokenizer, old_vocab)
        n_merged = byte_bpe.vocab_size_of(merged_dir)
        new_vocab = _round_up(n_merged, pad_to_multiple_of)
        spell = byte_bpe.base_ids_of_new_tokens(base_dir, merged_dir, old_vocab, n_merged)
        return new_vocab, byte_bpe.pad_id_of(merged_dir), spell + [[]] * (new_vocab - n_merged)
    base_p, merged_p = as_proto(base_tokenizer), as_proto(merged_tokenizer)
    check_extension(base_p, merged_p, old_vocab)
    new_vocab = _round_up(len(merged_p.pieces), pad_to_multiple_of)
    return new_vocab, pad_id_of(merged_p), base_ids_of_new_pieces(base_p, merged_p, old_vocab, new_vocab)


def _round_up(n: int, multiple: int | None) -> int:
    return math.ceil(n / multiple) * multiple if multiple else n


def _target_sharding(old_arr, var, shape, mesh):
    """Where a resized parameter goes: the model's mesh by its logical axes, else the old array's place."""
    if mesh is not None:
        return named_sharding(mesh, var.axes, shape)
    old = old_arr.sharding
    if isinstance(old, jax.sharding.NamedSharding):  # placed by hand on a mesh the model does not know
        return named_sharding(old.mesh, var.axes, shape)
    return jax.sharding.SingleDeviceSharding(next(iter(old_arr.devices())))


def _place(host: np.ndarray, sharding) -> jax.Array:
    # Each device (each host, multi-host) cuts its own shard from the host copy.
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def resize_embeddings(model: Llama, merged_tokenizer, base_tokenizer=None,
                      pad_to_multiple_of: int | None = None) -> Llama:
    """A new model whose vocabulary is the merged tokenizer's (rounded up to pad_to_multiple_of).

    merged_tokenizer / base_tokenizer: a tokenizer.model path, a directory holding one, a
    sentencepiece ModelProto or processor. The base is the tokenizer the model was trained
    with; its pieces must be the merged tokenizer's first pieces (NotAnExtensionError).
    New row i = mean of the old rows of the base pieces spelling merged piece i (lm_head: its
    columns); pad / control / filler rows get the mean of all old rows; old rows are unchanged.
    The config's vocab_size is updated and pad_token_id set when the merged tokenizer has a pad.
    Parameters that do not grow are shared with `model`, not copied (donate neither while the
    other is in use); with a mesh the new ones are placed by their logical axes.
    """
    if base_tokenizer is None:
        raise ValueError("resize_embeddings: base_tokenizer is required (the tokenizer.model the model "
                         "was trained with, e.g. LLaMA-2's)")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    if has_lora(model):
        raise ValueError("resize_embeddings: the model has LoRA factors attached; merge them first "
                         "(llama_jax.lora.merge)")
    cfg = model.config
    new_vocab, pad, spellings = _new_row_spellings(merged_tokenizer, base_tokenizer, cfg.vocab_size,
                                                   pad_to_multiple_of)
    new_cfg = cfg.replace(vocab_size=new_vocab, pad_token_id=cfg.pad_token_id if pad is None else pad)

    mesh = model.mesh
    graphdef, state = nnx.split(abstract_model(new_cfg, head=model.head, mesh=mesh))
    old_flat = {tuple(str(p) for p in path): var for path, var in nnx.to_flat_state(nnx.state(model))}
    new_flat = []
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(p) for p in path)
        if key not in old_flat:
            raise RuntimeError(f"resize_embeddings: no parameter {'.'.join(key)} in the model")
        old_arr = old_flat[key].get_value()
        if key in (_EMBED, _LM_HEAD):
            rows = to_host(old_arr)
            if key == _LM_HEAD:  # kernel [embed, vocab]: a piece's row is a column
                rows = rows.T
            grown = rows_from_spellings(rows, spellings)
            if key == _LM_HEAD:
                grown = np.ascontiguousarray(grown.T)
            shape = var.get_value().shape
            if grown.shape != shape:  # a bug, not bad input
                raise RuntimeError(f"resize_embeddings: {'.'.join(key)} grew to {grown.shape}, expected {shape}")
            value = _place(grown, _target_sharding(old_arr, var, shape, mesh))
        else:
            value = old_arr
        new_flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def _sp_model_path(path, what: str) -> Path:
    try:
        return resolve_model_path(path)
    except TokenizerFormatError:
        raise FileNotFoundError(f"{what} {path}: no {SP_FILE_NAME} (a sentencepiece tokenizer.model is needed)") from None


def cmd_resize(args) -> int:
    """`llama-jax resize --model IN --tokenizer DIR --out OUT [--base-tokenizer PATH] [--pad-to-multiple-of N]`."""
    model_dir = Path(args.model)
    if not model_dir.exists():
        raise FileNotFoundError(f"--model {model_dir}: no such file or directory")
    if byte_level_dir(args.tokenizer) is not None:  # an extended HF byte-level BPE (SmolLM2-style)
        base = args.base_tokenizer or model_dir
        _check_byte_level(byte_level_dir(args.tokenizer), base, None)  # before the (possibly large) model is read
        model = load(model_dir)
        old_vocab = model.config.vocab_size
        new = resize_embeddings(model, args.tokenizer, base, pad_to_multiple_of=args.pad_to_multiple_of)
        out = save_hf(new, args.out, tokenizer=byte_level_dir(args.tokenizer))
        print(f"vocab {old_vocab} -> {new.config.vocab_size} (byte-level BPE; new rows from the base tokens "
              f"spelling them); pad_token_id {new.config.pad_token_id}; written to {out}")
        return 0
    if args.base_tokenizer:
        base_path = _sp_model_path(args.base_tokenizer, "--base-tokenizer")
    elif (model_dir / SP_FILE_NAME).is_file():
        base_path = model_dir / SP_FILE_NAME
    else:
        raise ValueError(f"no base tokenizer: {model_dir} has no {SP_FILE_NAME}; pass --base-tokenizer PATH "
                         "(the tokenizer.model the model was trained with)")
    merged_path = _sp_model_path(args.tokenizer, "--tokenizer")
    base_p, merged_p = as_proto(base_path), as_proto(merged_path)
    check_extension(base_p, merged_p)  # before the (possibly large) model is read

    model = load(model_dir)
    old_vocab = model.config.vocab_size
    new = resize_embeddings(model, merged_p, base_p, pad_to_multiple_of=args.pad_to_multiple_of)
    out = save_hf(new, args.out, tokenizer=args.tokenizer)
    spelled = sum(bool(ids) for ids in base_ids_of_new_pieces(base_p, merged_p, old_vocab, new.config.vocab_size))
    print(f"vocab {old_vocab} -> {new.config.vocab_size}: {spelled} new rows from the base pieces spelling them, "
          f"{new.config.vocab_size - old_vocab - spelled} at the mean of all rows; "
          f"pad_token_id {new.config.pad_token_id}; written to {out}")
    return 0
