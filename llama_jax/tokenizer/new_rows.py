"""Initial embedding rows for the pieces a merged tokenizer added.

A new piece starts at the mean of the rows of the base pieces that spell the same text,
so the model sees roughly the input it saw before the merge. Pieces that are not text
(pad and other user-defined pieces, control fillers) start at the mean of all old rows.
"""

from __future__ import annotations

import numpy as np

from .sp_model import NORMAL, WHITESPACE, ModelProto, as_proto, processor_from_proto


def _without_dummy_prefix(proto: ModelProto):
    # With add_dummy_prefix the base would segment "中国" as "▁中国" and pull in a '▁'
    # (or '▁中') row that the new piece does not contain. Turning the prefix off makes the
    # base segment exactly the piece's text: "中国" -> 中 国, "▁中国" -> ▁中 国 (or ▁ 中 国).
    copy = ModelProto()
    copy.CopyFrom(proto)
    copy.normalizer_spec.add_dummy_prefix = False
    return processor_from_proto(copy)


def base_ids_of_new_pieces(base, merged, start: int, stop: int) -> list[list[int]]:
    """For merged ids start..stop-1: base ids spelling the piece ([] = no text to spell)."""
    base_proto, merged_proto = as_proto(base), as_proto(merged)
    base_sp = _without_dummy_prefix(base_proto)
    texts, rows = [], []
    for i in range(start, min(stop, len(merged_proto.pieces))):
        piece = merged_proto.pieces[i]
        if piece.type == NORMAL:  # pad / user-defined / control pieces are not text
            rows.append(i)
            texts.append(piece.piece.replace(WHITESPACE, " "))
    spelled = dict(zip(rows, base_sp.encode(texts)))
    return [spelled.get(i, []) for i in range(start, stop)]


def init_new_rows(old: np.ndarray, base, merged, new_vocab_size: int) -> np.ndarray:
    """Return [new_vocab_size, D]: rows < V_old copied bit for bit, new rows initialised.

    base / merged: sentencepiece processors, ModelProtos or paths. New row i is the mean of
    old[base ids spelling merged piece i] (see base_ids_of_new_pieces); rows with no text
    (pad, user-defined and control pieces, ids past the merged vocabulary) get the mean of
    all old rows.
    Means are taken in float64 and cast to old.dtype.
    """
    old = np.asarray(old)
    if old.ndim != 2:
        raise ValueError(f"expected a [vocab, dim] matrix, got shape {old.shape}")
    old_vocab = old.shape[0]
    if new_vocab_size < old_vocab:
        raise ValueError(f"new_vocab_size {new_vocab_size} is smaller than the old vocabulary {old_vocab}")
    base_proto, merged_proto = as_proto(base), as_proto(merged)
    shared = min(old_vocab, len(base_proto.pieces), len(merged_proto.pieces))
    for i in range(shared):
        if base_proto.pieces[i].piece != merged_proto.pieces[i].piece:
            raise ValueError(f"merged tokenizer does not extend the base: id {i} is "
                             f"{merged_proto.pieces[i].piece!r}, base has {base_proto.pieces[i].piece!r}")

    return rows_from_spellings(old, base_ids_of_new_pieces(base_proto, merged_proto, old_vocab, new_vocab_size))


def rows_from_spellings(old: np.ndarray, spellings: list[list[int]]) -> np.ndarray:
    """[V_old + len(spellings), D]: rows < V_old copied bit for bit; new row V_old + k is the mean of
    old[spellings[k]] (float64, cast to old.dtype), or of all old rows when the spelling is empty.
    The one row initialiser of both tokenizer kinds (sentencepiece above, byte-level BPE:
    tokenizer.byte_bpe.base_ids_of_new_tokens)."""
    old = np.asarray(old)
    old_vocab = old.shape[0]
    out = np.empty((old_vocab + len(spellings), old.shape[1]), dtype=old.dtype)
    out[:old_vocab] = old
    mean_all = np.mean(old, axis=0, dtype=np.float64)
    for row, ids in enumerate(spellings, start=old_vocab):
        ids = [i for i in ids if i < old_vocab]
        value = np.mean(old[ids], axis=0, dtype=np.float64) if ids else mean_all
        out[row] = value.astype(old.dtype)
    return out
