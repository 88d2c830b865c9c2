"""Extend LLaMA-2's sentencepiece model with the pieces of another (Chinese) model.

Base pieces, ids, scores, types and the normalizer are copied unchanged; new pieces are
appended. Scores matter: sentencepiece BPE repeatedly joins the adjacent pair whose result
has the highest score. LLaMA-2 scores are <= 0, so new pieces with score 0 (what many
merge scripts do) would be joined *before* any LLaMA merge and can change how English is
split. By default new pieces are scored below every base piece, in source order: all
LLaMA merges happen first and English keeps its LLaMA-2 segmentation unless a new piece
extends it (the tests check that it does not on real English text).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np

from ..fsutil import atomic_output_dir, write_bytes_atomic
from .chinese import has_chinese
from .dead_pieces import find_unreachable_pieces, plan_repair
from .hf_files import UnsupportedNormalizerError, write_hf_files
from .sp_model import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    WHITESPACE,
    ModelProto,
    Piece,
    load_bpe_model_proto,
    load_model_proto,
    processor_from_proto,
)

PAD_PIECE = "<pad>"
FILLER_TEMPLATE = "<reserved_{}>"
SCORE_MODES = ("below-base", "zero")
DEAD_MODES = ("repair", "drop", "keep")


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    add_words: tuple[str, ...] = ()
    # `<pad>` as USER_DEFINED right after the base pieces (id 32000 for LLaMA-2).
    pad_token: bool = False
    # Append CONTROL filler pieces up to a multiple of this (e.g. 64 for TPU-friendly shapes).
    pad_to_multiple_of: int | None = None
    repair_dead: str = "repair"
    new_piece_scores: str = "below-base"
    # By default only pieces with a Chinese character are added: such a piece can only
    # match text that contains one, so any text without Chinese characters (English,
    # code, ...) is guaranteed to keep its LLaMA-2 tokenization, whatever the scores.
    keep_non_chinese_pieces: bool = False

    def __post_init__(self):
        if self.repair_dead not in DEAD_MODES:
            raise ValueError(f"repair_dead must be one of {DEAD_MODES}, got {self.repair_dead!r}")
        if self.new_piece_scores not in SCORE_MODES:
            raise ValueError(f"new_piece_scores must be one of {SCORE_MODES}, got {self.new_piece_scores!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError("pad_to_multiple_of must be >= 1")


@dataclasses.dataclass
class MergeResult:
    proto: ModelProto
    base_size: int
    added_from_model: int  # pieces of the add-model that were new
    added_words: int
    skipped_non_chinese: int
    repair_added: list[str]
    dropped_dead: list[str]
    pad_id: int | None
    filler_count: int
    out_dir: Path | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.proto.pieces)

    def summary(self) -> str:
        lines = [
            f"base pieces: {self.base_size}",
            f"new pieces from model: {self.added_from_model}",
            f"new pieces from word list: {self.added_words}",
            f"skipped pieces without a Chinese character: {self.skipped_non_chinese}",
            f"intermediate pieces added to repair dead pieces: {len(self.repair_added)}",
            f"dead pieces dropped (not repairable): {len(self.dropped_dead)}",
            f"pad id: {self.pad_id}",
            f"filler pieces: {self.filler_count}",
            f"vocab size: {self.vocab_size}",
        ]
        if self.out_dir is not None:
            lines.append(f"written to: {self.out_dir}")
        return "\n".join(lines)


def read_word_list(path: str | os.PathLike) -> list[str]:
    """One word per line; spaces are written as '▁' like sentencepiece pieces."""
    words = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            word = line.rstrip("\r\n").replace(" ", WHITESPACE)
            if word:
                words.append(word)
    return words


def _new_piece(text: str, piece_type: int = NORMAL, score: float = 0.0) -> Piece:
    piece = Piece()
    piece.piece = text
    piece.score = score
    piece.type = piece_type
    return piece


def _descending_float32_scores(start: float, count: int) -> list[float]:
    """`count` float32 values, each strictly below the previous, starting below `start`.

    Scores are stored as float32. Near LLaMA-2's lowest score (-1e9, whitespace runs) one
    float32 step is 64, so "min - 1 - k" would collapse into ties; stepping with nextafter
    keeps every new piece distinct and ordered.
    """
    scores = []
    value = np.float32(start)
    for _ in range(count):
        # floor keeps whole numbers (readable .vocab files); above 2**23 float32 values
        # are whole anyway, so the floor never collapses two steps into one.
        value = np.floor(np.nextafter(value, np.float32(-np.inf), dtype=np.float32))
        scores.append(float(value))
    return scores


def _assign_new_scores(proto: ModelProto, base_size: int, mode: str) -> None:
    new_mergeable = [p for p in proto.pieces[base_size:] if p.type == NORMAL]
    if mode == "zero":
        for p in new_mergeable:
            p.score = 0.0
        return
    base_min = min((p.score for p in proto.pieces[:base_size] if p.type == NORMAL), default=0.0)
    for p, score in zip(new_mergeable, _descending_float32_scores(base_min, len(new_mergeable))):
        p.score = score


def merge_model_protos(
    base: ModelProto, add: ModelProto, options: MergeOptions | None = None
) -> MergeResult:
    """Return base + new pieces of `add` (+ words, pad, repair pieces, fillers)."""
    options = options or MergeOptions()
    merged = ModelProto()
    merged.CopyFrom(base)
    base_size = len(base.pieces)
    known = {p.piece for p in base.pieces}

    pad_id = None
    if options.pad_token:
        if PAD_PIECE in known:
            pad_id = next(i for i, p in enumerate(base.pieces) if p.piece == PAD_PIECE)
        else:
            # USER_DEFINED, not CONTROL: the HF tokenizer turns "<pad>" written in the
            # input text into the pad id, and sentencepiece does the same only for
            # USER_DEFINED pieces (CONTROL pieces are never matched in text). Side effect:
            # sp.pad_id() only reports CONTROL pieces and returns -1; the id is in
            # trainer_spec.pad_id and in the HF config.
            pad_id = len(merged.pieces)
            merged.pieces.append(_new_piece(PAD_PIECE, USER_DEFINED))
            known.add(PAD_PIECE)
        merged.trainer_spec.pad_id = pad_id
        merged.trainer_spec.pad_piece = PAD_PIECE

    def wanted(text: str) -> bool:
        return options.keep_non_chinese_pieces or has_chinese(text)

    skipped = 0
    from_words: set[str] = set()
    candidates = [(p.piece, p.type) for p in add.pieces if p.type not in (CONTROL, UNKNOWN, BYTE, UNUSED)]
    candidates += [(word, NORMAL) for word in options.add_words]
    for n, (text, piece_type) in enumerate(candidates):
        if text in known:
            continue
        if not wanted(text):
            skipped += 1
            continue
        merged.pieces.append(_new_piece(text, USER_DEFINED if piece_type == USER_DEFINED else NORMAL))
        known.add(text)
        if n >= len(candidates) - len(options.add_words):
            from_words.add(text)

    plan = plan_repair(merged, options.repair_dead, protected_ids=base_size, allowed=wanted)
    if plan.dropped:
        dropped = set(plan.dropped)
        kept = [p for i, p in enumerate(merged.pieces) if i < base_size or p.piece not in dropped]
        del merged.pieces[:]
        merged.pieces.extend(kept)
    kept_new = {p.piece for p in merged.pieces[base_size:]}
    added_words = len(from_words & kept_new)
    added_from_model = len(kept_new) - added_words - (pad_id is not None and pad_id >= base_size)
    for piece in plan.added:
        merged.pieces.append(_new_piece(piece))

    _assign_new_scores(merged, base_size, options.new_piece_scores)

    filler_count = 0
    if options.pad_to_multiple_of:
        # CONTROL fillers: sentencepiece never produces them from text and, having no
        # merges, neither does the HF BPE; they only reserve embedding rows.
        filler_count = -len(merged.pieces) % options.pad_to_multiple_of
        k = 0
        while len(merged.pieces) % options.pad_to_multiple_of:
            name = FILLER_TEMPLATE.format(k)
            k += 1
            if name not in known:
                merged.pieces.append(_new_piece(name, CONTROL))
                known.add(name)

    merged.trainer_spec.vocab_size = len(merged.pieces)
    if options.repair_dead != "keep":
        remaining = [(i, s) for i, s in find_unreachable_pieces(merged) if i >= base_size]
        if remaining:  # a bug in plan_repair, not bad input
            raise RuntimeError(f"dead pieces left after {options.repair_dead}: {remaining[:10]}")
    return MergeResult(
        proto=merged,
        base_size=base_size,
        added_from_model=added_from_model,
        added_words=added_words,
        skipped_non_chinese=skipped,
        repair_added=list(plan.added),
        dropped_dead=list(plan.dropped),
        pad_id=pad_id,
        filler_count=filler_count,
    )


def merge_tokenizers(
    base: str | os.PathLike,
    add: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: MergeOptions | None = None,
    add_words_file: str | os.PathLike | None = None,
) -> MergeResult:
    """Merge, then write OUT_DIR/tokenizer.model and the HF tokenizer files atomically.

    BASE is a LLaMA-style `tokenizer.model` or an HF directory holding one; it must be a
    sentencepiece BPE model (NotSentencePieceBPEError / TokenizerFormatError otherwise,
    and nothing is written).
    """
    options = options or MergeOptions()
    base_proto = load_bpe_model_proto(base)
    add_proto = load_model_proto(add)
    if add_words_file is not None:
        words = tuple(options.add_words) + tuple(read_word_list(add_words_file))
        options = dataclasses.replace(options, add_words=words)
    result = merge_model_protos(base_proto, add_proto, options)
    processor_from_proto(result.proto)  # the runtime must accept what we write
    if options.new_piece_scores == "zero":
        warnings.warn(
            "new pieces share score 0: sentencepiece breaks such ties leftmost-first, which an HF "
            "merge list cannot express, so tokenizer.json will disagree with tokenizer.model on "
            "Chinese text (use new_piece_scores='below-base' for an exact HF tokenizer)",
            stacklevel=2,
        )

    base_dir = Path(base) if Path(base).is_dir() else None
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir) as tmp:
        write_bytes_atomic(tmp / "tokenizer.model", result.proto.SerializeToString())
        try:
            write_hf_files(result.proto, tmp, base_hf_dir=base_dir)
        except UnsupportedNormalizerError as e:
            # a base whose normalizer tokenizer.json cannot reproduce (llama2.c's tok512:
            # remove_extra_whitespaces=true): tokenizer.model only, as `llama-jax convert` does;
            # llama_jax reads it directly (text.load_tokenizer)
            warnings.warn(f"{base}: {e}; writing tokenizer.model only (no HF tokenizer files)", stacklevel=2)
    result.out_dir = out_dir
    return result
