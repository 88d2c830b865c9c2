"""Pretraining data: tokenise documents, pack BOS ... EOS into fixed blocks, index by step.

Each block row carries tokens, segment ids (1, 2, ... per document in the row; 0 = padding at
the very end of the data) and positions restarting per document, so packed documents can be
kept from attending to each other.  The order is a seeded permutation per epoch and the batch of
step s is rows [s*G, (s+1)*G) of that order (G = global batch): a function of the step alone,
so resuming is exact and the batch does not depend on how many hosts read it; each host
materialises only its own slice of the rows.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources import DataError, fingerprint_files, load_texts


def tokenizer_fingerprint(tok) -> str:
    """A short hash of the tokenizer's type and model file(s): keys caches and token shards."""
    path = getattr(tok, "path", None) or getattr(tok, "name_or_path", None)
    h = hashlib.sha256(str(type(tok)).encode())
    if path and os.path.isfile(path):
        h.update(Path(path).read_bytes())
    elif path and os.path.isdir(path):
        for n in ("tokenizer.json", "tokenizer.model"):
            if os.path.exists(os.path.join(path, n)):
                h.update(Path(path, n).read_bytes())
    else:
        h.update(str(path).encode())
    return h.hexdigest()[:16]


def encode_batch(tok, texts) -> list[list[int]]:
    """Token ids of each text, no BOS/EOS (sentencepiece: one C++ batch call; HF: the fast tokenizer)."""
    if hasattr(tok, "sp"):  # sentencepiece: batch encode in C++
        return tok.sp.encode(list(texts))
    return tok(list(texts), add_special_tokens=False)["input_ids"]


def tokenize_documents(tok, spec, text_field="text", num_proc=1, cache_dir=None) -> list[np.ndarray]:
    """Token ids of every non-empty document, BOS/EOS not included.  Cached by content."""
    files = [spec] if isinstance(spec, str) else list(spec)
    key = hashlib.sha256(f"{fingerprint_files(files)}|{tokenizer_fingerprint(tok)}|{text_field}".encode()).hexdigest()[:20]
    cache = Path(cache_dir) / f"docs-{key}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        z = np.load(cache, allow_pickle=False)
        return np.split(z["ids"], z["offsets"][1:-1])
    ds = load_texts(spec, text_field)

    def enc(batch):
        return {"ids": encode_batch(tok, batch["text"])}

    ds = ds.map(enc, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                remove_columns=ds.column_names, desc="tokenising")
    docs = [np.asarray(x, np.int32) for x in ds["ids"] if len(x)]
    if not docs:
        raise DataError(f"{', '.join(map(str, files))}: no non-empty documents")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        offsets = np.cumsum([0] + [len(d) for d in docs])
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, ids=np.concatenate(docs), offsets=offsets)
        os.replace(tmp, cache)
    return docs


@dataclass
class PackedBlocks:
    tokens: np.ndarray     # [N, T] int32
    segments: np.ndarray   # [N, T] int32, 0 = padding
    positions: np.ndarray  # [N, T] int32

    def __len__(self):
        return len(self.tokens)


def pack(docs: list[np.ndarray], block_size: int, bos: int | None, eos: int | None) -> PackedBlocks:
    """Concatenate BOS+doc+EOS and cut into rows of block_size (the tail row is padded)."""
    pieces = []
    for d in docs:
        seq = np.concatenate([[bos] if bos is not None else [], d, [eos] if eos is not None else []]).astype(np.int32)
        pieces.append(seq)
    flat = np.concatenate(pieces)
    doc_id = np.concatenate([np.full(len(p), i, np.int64) for i, p in enumerate(pieces)])
    pos = np.concatenate([np.arange(len(p), dtype=np.int32) for p in pieces])
    n = -(-len(flat) // block_size)
    pad = n * block_size - len(flat)
    tokens = np.concatenate([flat, np.zeros(pad, np.int32)]).reshape(n, block_size)
    doc_id = np.concatenate([doc_id, np.full(pad, -1)]).reshape(n, block_size)
    pos = np.concatenate([pos, np.zeros(pad, np.int32)]).reshape(n, block_size)
    # segment ids 1.. within each row; a document cut by a row boundary restarts its positions
    first = doc_id[:, :1]
    segments = np.where(doc_id >= 0, doc_id - first + 1, 0).astype(np.int32)
    pos = pos - np.where(doc_id == first, pos[:, :1], 0)
    return PackedBlocks(tokens, segments, pos.astype(np.int32))


class StepIndexedBatches:
    """Batch for step s = rows s*G .. s*G+G-1 of per-epoch seeded permutations (a function of s,
    so a resumed run sees the same batches); this host's contiguous slice of them.

    `blocks`: arrays with one row per example (PackedBlocks or {name: [N, ...]}), or a list of
    examples with `collate(indices) -> {name: array}`, which builds the whole global batch (so
    every host pads to the same width) before this host's slice is taken."""

    def __init__(self, blocks, global_batch: int, seed: int, host: int = 0, num_hosts: int = 1,
                 shuffle: bool = True, collate=None):
        if global_batch % num_hosts:
            raise DataError(f"global batch {global_batch} is not divisible by {num_hosts} hosts")
        if isinstance(blocks, PackedBlocks):
            blocks = {"tokens": blocks.tokens, "segments": blocks.segments, "positions": blocks.positions}
        self.n = len(blocks) if collate is not None else len(next(iter(blocks.values())))
        if self.n == 0:
            raise DataError("no training blocks")
        self.blocks, self.G, self.seed, self.shuffle, self.collate = blocks, global_batch, seed, shuffle, collate
        self.host, self.num_hosts = host, num_hosts
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            n = self.n
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                           else np.arange(n)}
        return self._perms[epoch]

    def _indices(self, start: int, count: int) -> np.ndarray:
        n = self.n
        return np.array([self._perm(i // n)[i % n] for i in range(start, start + count)])

    def rows(self, step: int) -> np.ndarray:
        """This host's example indices of step `step`."""
        per_host = self.G // self.num_hosts
        return self._indices(step * self.G + self.host * per_host, per_host)

    def batch(self, step: int) -> dict:
        if self.collate is None:
            r = self.rows(step)
            return {k: v[r] for k, v in self.blocks.items()}
        b = self.collate(self._indices(step * self.G, self.G))
        per = self.G // self.num_hosts
        return {k: v[self.host * per:(self.host + 1) * per] for k, v in b.items()}


class StepIndexedList:
    """Precomputed batches of differing shapes (length buckets): step s takes batch perm[s % n]
    of a per-epoch seeded permutation; each host its contiguous slice of the batch's rows."""

    def __init__(self, batches: list[dict], seed: int, host: int = 0, num_hosts: int = 1):
        if not batches:
            raise DataError("no training batches")
        self.batches, self.seed, self.host, self.num_hosts = batches, seed, host, num_hosts

    def batch(self, step: int) -> dict:
        n = len(self.batches)
        perm = np.random.default_rng([self.seed, step // n]).permutation(n)
        b = self.batches[perm[step % n]]
        rows = len(next(iter(b.values())))
        per = rows // self.num_hosts
        return {k: v[self.host * per:(self.host + 1) * per] for k, v in b.items()}
