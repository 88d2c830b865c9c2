"""HF tokenizer files (tokenizer.json & co.) that encode exactly like the sentencepiece model.

How sentencepiece BPE encodes, and how each step is mirrored with `tokenizers`:

* normalize: identity, prepend '▁' (add_dummy_prefix), every ' ' -> '▁'
  -> normalizers Prepend('▁') + Replace(' ', '▁') over the whole text, no pre-tokenizer.
  (The Metaspace pre-tokenizer does not add '▁' when the text already starts with a
  space, while sentencepiece does, so " x" would differ.)
* user-defined pieces (e.g. `<pad>`) are matched in the text and kept whole
  -> AddedToken(normalized=False).
* start from characters; a character that is not a piece becomes its UTF-8 byte pieces
  -> BPE(byte_fallback=True).
* repeatedly join the adjacent pair whose result has the highest score, leftmost first
  on ties -> merges listed by descending score of the result; every split of a piece into
  two pieces is a merge. HF breaks ties between equal ranks leftmost too, but two pieces
  with the same score get different ranks, so exactness needs distinct scores: true for
  merge's default below-base scores, and LLaMA-2's only tie (its whitespace-run pieces at
  -1e9) gives the same result for runs of spaces (tested).
* no BOS in sentencepiece by default; LLaMA-2's HF tokenizer prepends `<s>`
  -> TemplateProcessing("<s> $A"), add_bos_token=True, add_eos_token=False.

tokenizer_config.json names PreTrainedTokenizerFast, which loads tokenizer.json as is. (In
transformers 5, LlamaTokenizer rebuilds its normalizer/pre-tokenizer from its own defaults.)

Known difference, the same as with LLaMA-2's own HF tokenizer: HF turns "<s>", "</s>",
"<unk>" and "<pad>" written in the input text into special tokens and normalizes the text on
each side of one separately, while sentencepiece never matches control pieces in text.
Text without those strings encodes identically (tested on the corpora and edge cases).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from ..fsutil import write_text_atomic
from .sp_model import CONTROL, NORMAL, UNKNOWN, USER_DEFINED, WHITESPACE, ModelProto

# Settings of an HF tokenizer_config.json of the base directory worth keeping.
_CARRIED_CONFIG_KEYS = ("model_max_length", "padding_side", "chat_template")


class UnsupportedNormalizerError(ValueError):
    """The sentencepiece normalizer cannot be reproduced exactly by our tokenizer.json."""


def vocab_and_merges(proto: ModelProto) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    mergeable = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    # Descending score = sentencepiece's merge priority; ids break score ties so the order
    # is deterministic (only LLaMA-2's whitespace-run pieces share a score).
    by_priority = sorted(
        (i for i, p in enumerate(proto.pieces) if p.type == NORMAL and len(p.piece) > 1),
        key=lambda i: (-proto.pieces[i].score, i),
    )
    merges = []
    for i in by_priority:
        piece = proto.pieces[i].piece
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                merges.append((left, right))
    return vocab, merges


def _special_ids(proto: ModelProto) -> dict[str, int]:
    spec = proto.trainer_spec
    roles = {"unk_token": spec.unk_id, "bos_token": spec.bos_id, "eos_token": spec.eos_id, "pad_token": spec.pad_id}
    return {role: i for role, i in roles.items() if 0 <= i < len(proto.pieces)}


def _check_normalizer(proto: ModelProto) -> None:
    spec = proto.normalizer_spec
    if spec.name not in ("identity", "") or spec.precompiled_charsmap:
        raise UnsupportedNormalizerError(
            f"normalizer {spec.name!r} is not supported; LLaMA-style models use 'identity'"
        )
    if spec.remove_extra_whitespaces:
        raise UnsupportedNormalizerError("remove_extra_whitespaces=true is not supported (LLaMA-2 uses false)")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise UnsupportedNormalizerError("treat_whitespace_as_suffix=true is not supported")


def build_hf_tokenizer(proto: ModelProto) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the sentencepiece BPE model (+ BOS)."""
    _check_normalizer(proto)
    vocab, merges = vocab_and_merges(proto)
    special = _special_ids(proto)
    unk_piece = proto.pieces[special["unk_token"]].piece if "unk_token" in special else None
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=unk_piece, fuse_unk=True, byte_fallback=True, dropout=None)
    )

    steps = []
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(WHITESPACE))
    if proto.normalizer_spec.escape_whitespaces:  # proto default: true
        steps.append(normalizers.Replace(" ", WHITESPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = None

    decoder_steps = [decoders.Replace(WHITESPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        decoder_steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decoder_steps)

    role_ids = set(special.values())
    added = []
    for i, p in enumerate(proto.pieces):
        if p.type in (CONTROL, UNKNOWN) and i in role_ids:
            # Like LLaMA-2's HF tokenizer: <s>, </s>, <unk> are special tokens.
            added.append(AddedToken(p.piece, special=True, normalized=False))
        elif p.type == USER_DEFINED:
            # sentencepiece matches user-defined pieces in the normalized text.
            added.append(AddedToken(p.piece, special=i in role_ids, normalized=False))
        # Other CONTROL pieces (fillers) stay plain vocab entries: no merge builds them,
        # so, as in sentencepiece, no text encodes to them.
    tokenizer.add_tokens(added)

    if "bos_token" in special:
        bos = proto.pieces[special["bos_token"]].piece
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, special["bos_token"])],
        )
    return tokenizer


def _added_tokens_decoder(tokenizer: Tokenizer) -> dict[str, dict]:
    out = {}
    for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items()):
        out[str(token_id)] = {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
    return out


def hf_config_files(proto: ModelProto, base_hf_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """File name -> text of tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    tokenizer = build_hf_tokenizer(proto)
    special = {role: proto.pieces[i].piece for role, i in _special_ids(proto).items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": "bos_token" in special,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special,
        "added_tokens_decoder": _added_tokens_decoder(tokenizer),
    }
    if base_hf_dir is not None:
        base_config_path = Path(base_hf_dir) / "tokenizer_config.json"
        if base_config_path.is_file():
            base_config = json.loads(base_config_path.read_text(encoding="utf-8"))
            config.update({k: base_config[k] for k in _CARRIED_CONFIG_KEYS if k in base_config})
    special_map = {
        role: {"content": piece, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
        for role, piece in special.items()
    }
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special_map, ensure_ascii=False, indent=2) + "\n",
    }


def write_hf_files(proto: ModelProto, out_dir: str | os.PathLike, base_hf_dir: str | os.PathLike | None = None) -> None:
    files = hf_config_files(proto, base_hf_dir)  # build everything before writing anything
    for name, text in files.items():
        write_text_atomic(Path(out_dir) / name, text)
