"""Pretraining corpora larger than memory: on-disk token shards and a packed view over them.

Contract
--------
`tokenize_corpus(files, tokenizer_path, out)` streams txt / jsonl / parquet files (``.gz`` and
``.zst`` too; no file is ever held whole) and writes, in `out`:

* ``shards/NNNNN.bin``: the token ids of every document of one work unit back to back, uint16 when
  the vocabulary has <= 65,536 pieces, else uint32 (no BOS/EOS: packing adds them);
* ``shards/NNNNN.idx.npy``: int64 document boundaries inside that shard (len = docs + 1);
* ``shards/NNNNN.json``: the shard's counts, written last: a shard is done iff this file exists;
* ``doc_index.npy``: int64 global document starts into the concatenated token stream (len docs + 1);
* ``manifest.json``: tokenizer fingerprint, source fingerprints, counts, shard list; written last,
  atomically.  A directory with a manifest is complete.

A work unit is a byte range (~`chunk_mb`, cut at line starts) of an uncompressed txt/jsonl file,
or a whole compressed or parquet file, so the shards depend on the inputs and `chunk_mb` only,
never on `num_proc` or on where a killed run stopped: rerunning the same command after a SIGKILL
redoes the unfinished units only and gives byte-identical shards.  A txt line is one document;
a jsonl line is one record (its `text_field` is the document).  Undecodable UTF-8 is reported
with file and byte offset (in the decompressed stream for .gz/.zst) and skipped (counted) or
fatal (`on_bad_utf8="error"`).  A directory written with another tokenizer, or from other
sources, is refused.

`PackedView` cuts the token stream (BOS + doc + EOS per document) into rows of `block_size` the
way `packing.pack` does in memory (same tokens, segment ids and positions, the test checks it),
but computes row r on demand from the memory-mapped index and shards: a binary search over the
document index, then only the tokens of that row are read.  `MixtureBatches` gives the batch of
step s as a function of (seed, s) alone: each source's rows are visited in a per-epoch keyed
permutation computed index by index (a Feistel network with cycle walking: O(1) memory and time
per row, no permutation array), sources are mixed by exact integer quotas per step, and each
host reads only its own rows.  Resuming at step 10**6 costs what resuming at step 10 does.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..fsutil import write_text_atomic
from ..text import load_tokenizer
from .packing import encode_batch, tokenizer_fingerprint
from .sources import DataError, expand

FORMAT = 1
_KILL_AFTER_SHARDS = int(os.environ.get("LLAMA_JAX_TEST_KILL_AFTER_SHARDS", "0") or 0)  # test hook


@dataclass
class TokenizeConfig:
    """Options of `llama-jax data tokenize` (and of pretrain's implicit tokenisation)."""
    text_field: str = "text"
    num_proc: int = 1
    chunk_mb: float = 64.0          # work unit of an uncompressed file (shard size ~ chunk_mb / 3 tokens)
    on_bad_utf8: str = "skip"       # skip (count + report) | error
    batch_chars: int = 1 << 20      # characters handed to the tokenizer at once (bounds worker memory)


# ----------------------------------------------------------------------------- reading

def _base_and_codec(path: str) -> tuple[str, str | None]:
    p = path.lower()
    for ext, codec in ((".gz", "gzip"), (".zst", "zstd"), (".zstd", "zstd")):
        if p.endswith(ext):
            return path[: -len(ext)], codec
    return path, None


def file_kind(path: str) -> str:
    base, _ = _base_and_codec(path)
    suf = Path(base).suffix.lower()
    if suf in (".txt", ".text", ".tsv", ""):
        return "text"
    if suf in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suf == ".parquet":
        return "parquet"
    raise DataError(f"{path}: unknown data file type {suf!r} (expected .txt, .jsonl, .parquet, optionally .gz/.zst)")


def open_binary(path: str):
    """A binary stream of the (decompressed) file content, read incrementally."""
    _, codec = _base_and_codec(path)
    if codec == "gzip":
        return gzip.open(path, "rb")
    if codec == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True),
                                 buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


def source_fingerprint(path: str) -> dict:
    """Size + sha256 of the first and last MiB: cheap enough to check at every (re)start of a run
    over 100 GB of text (a full hash would re-read it all), and changes with any append/truncation."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(st.st_size - (1 << 20))
            h.update(f.read(1 << 20))
    return {"path": os.path.abspath(path), "bytes": st.st_size, "sha256_head_tail": h.hexdigest()[:16]}


class _Counts(dict):
    def add(self, k, n=1):
        self[k] = self.get(k, 0) + n


def iter_unit_texts(unit: dict, text_field: str, on_bad_utf8: str, counts: _Counts, examples: list):
    """Documents (str) of one work unit, streamed."""
    path, kind = unit["path"], unit["kind"]
    if kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: record 0 has no field '{text_field}' (fields: {', '.join(pf.schema_arrow.names)})")
        i = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for v in batch.column(0).to_pylist():
                if v is None or not isinstance(v, str):
                    raise DataError(f"{path}: record {i}: field '{text_field}' is {type(v).__name__}, expected a string")
                counts.add("bytes", len(v.encode("utf-8")))
                i += 1
                yield v
        return
    start, end = unit["start"], unit["end"]
    with open_binary(path) as f:
        pos = 0
        if start > 0:  # the line holding byte start-1 belongs to the previous unit
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())
        rec = 0
        while end is None or pos < end:
            raw = f.readline()
            if not raw:
                break
            off = pos
            pos += len(raw)
            counts.add("bytes", len(raw))
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                counts.add("empty_lines")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                msg = f"{path}: byte {off + e.start}: invalid UTF-8 ({e.reason})"
                if on_bad_utf8 == "error":
                    raise DataError(msg + "; rerun with on_bad_utf8=skip to skip such lines") from None
                counts.add("bad_utf8_lines")
                if len(examples) < 5:
                    examples.append(msg)
                continue
            if kind == "jsonl":
                where = f"record {rec}" if start == 0 else f"record at byte {off}"
                rec += 1
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: {where}: not valid JSON ({e})") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    fields = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise DataError(f"{path}: {where} has no field '{text_field}' (fields: {fields}); "
                                    "set the text field (--text-field / data.text_field)")
                text = obj[text_field]
                if not isinstance(text, str):
                    raise DataError(f"{path}: {where}: field '{text_field}' is {type(text).__name__}, expected a string")
                if not text.strip():
                    counts.add("empty_lines")
                    continue
            yield text


def plan_units(files: list[str], chunk_bytes: int) -> list[dict]:
    """Work units: byte ranges of uncompressed txt/jsonl files, whole compressed / parquet files."""
    units = []
    for p in files:
        if not os.path.isfile(p):
            raise DataError(f"{p}: data file not found")
        size = os.path.getsize(p)
        if size == 0:
            raise DataError(f"{p}: data file is empty")
        kind = file_kind(p)
        _, codec = _base_and_codec(p)
        if kind == "parquet" or codec is not None:
            units.append({"path": os.path.abspath(p), "kind": kind, "start": 0, "end": None, "bytes": size})
            continue
        if kind == "jsonl":
            with open(p, "rb") as f:
                head = f.read(4096).lstrip()
            if head.startswith(b"["):
                raise DataError(f"{p}: a JSON array file cannot be streamed; write it as JSON Lines "
                                "(one object per line)")
        n = max(1, -(-size // chunk_bytes))
        for i in range(n):
            a, b = i * size // n, (i + 1) * size // n
            units.append({"path": os.path.abspath(p), "kind": kind, "start": a, "end": b, "bytes": b - a})
    return units


# ----------------------------------------------------------------------------- tokenising

def tokenizer_path(tok) -> str:
    """The path a worker process loads the same tokenizer from."""
    p = getattr(tok, "path", None) or getattr(tok, "name_or_path", None)
    if not p or not os.path.exists(p):
        raise DataError(f"tokenizer {type(tok).__name__} has no local path to load in worker processes")
    return str(p)


_WORKER_TOK = {}


def _load_tok(path: str):
    if path not in _WORKER_TOK:

        _WORKER_TOK.clear()
        _WORKER_TOK[path] = load_tokenizer(path)
    return _WORKER_TOK[path]


def tokenize_unit(args) -> dict:
    """Tokenise one work unit into shards/NNNNN.{bin,idx.npy,json}; returns its counts."""
    idx, unit, tok_path, dtype, cfg, out = args
    cfg = TokenizeConfig(**cfg)
    tok = _load_tok(tok_path)
    sdir = Path(out) / "shards"
    name = f"{idx:05d}"
    tmp_bin = sdir / f"{name}.bin.tmp{os.getpid()}"
    counts, examples = _Counts(docs=0, tokens=0, bytes=0, empty_docs=0), []
    ends = [0]
    t0 = time.perf_counter()
    with open(tmp_bin, "wb") as fout:
        batch, nch = [], 0

        def flush():
            for ids in encode_batch(tok, batch):
                if not len(ids):
                    counts.add("empty_docs")
                    continue
                np.asarray(ids, dtype).tofile(fout)
                ends.append(ends[-1] + len(ids))
            batch.clear()

        for text in iter_unit_texts(unit, cfg.text_field, cfg.on_bad_utf8, counts, examples):
            batch.append(text)
            nch += len(text)
            if nch >= cfg.batch_chars:
                flush()
                nch = 0
        if batch:
            flush()
    counts["docs"], counts["tokens"] = len(ends) - 1, ends[-1]
    os.replace(tmp_bin, sdir / f"{name}.bin")
    with open(sdir / f"{name}.idx.npy.tmp{os.getpid()}", "wb") as f:
        np.save(f, np.asarray(ends, np.int64))
    os.replace(sdir / f"{name}.idx.npy.tmp{os.getpid()}", sdir / f"{name}.idx.npy")
    info = {"name": name, "unit": unit, "counts": dict(counts), "bad_utf8_examples": examples,
            "seconds": time.perf_counter() - t0}
    write_text_atomic(sdir / f"{name}.json", json.dumps(info, ensure_ascii=False))
    return info


def _vocab_size(tok) -> int:
    return int(tok.sp.get_piece_size()) if hasattr(tok, "sp") else len(tok)


def tokenize_corpus(files, tokenizer: str, out: str | os.PathLike, cfg: TokenizeConfig | None = None,
                    progress: bool = True) -> dict:
    """Tokenise `files` (paths / globs) into shards under `out` (see the module docstring); resumable.
    Returns the manifest."""
    cfg = cfg or TokenizeConfig()
    if cfg.on_bad_utf8 not in ("skip", "error"):
        raise DataError(f"on_bad_utf8 must be 'skip' or 'error', not {cfg.on_bad_utf8!r}")
    out = Path(out)
    files = expand(list(files) if not isinstance(files, str) else [files])
    tok = _load_tok(str(tokenizer))
    vocab = _vocab_size(tok)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    tok_info = {"fingerprint": tokenizer_fingerprint(tok), "path": os.path.abspath(str(tokenizer)),
                "vocab_size": vocab, "bos_id": getattr(tok, "bos_token_id", None),
                "eos_id": getattr(tok, "eos_token_id", None)}
    units = plan_units(files, int(cfg.chunk_mb * (1 << 20)))
    sources = [source_fingerprint(p) for p in files]
    plan = {"format": FORMAT, "tokenizer": tok_info, "dtype": dtype, "text_field": cfg.text_field,
            "chunk_mb": cfg.chunk_mb, "on_bad_utf8": cfg.on_bad_utf8, "sources": sources, "units": units}
    out.mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    plan_path = out / "plan.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        _check_same(out, old, plan)
        if (out / "manifest.json").exists():
            return json.loads((out / "manifest.json").read_text())
    else:
        write_text_atomic(plan_path, json.dumps(plan, indent=1, ensure_ascii=False))
    for stale in (out / "shards").glob("*.tmp*"):  # left by a killed run's workers
        stale.unlink(missing_ok=True)
    todo = [i for i in range(len(units)) if not (out / "shards" / f"{i:05d}.json").exists()]
    total = sum(units[i]["bytes"] for i in todo)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1 << 20, desc="tokenising", dynamic_ncols=True)
    jobs = [(i, units[i], tok_info["path"], dtype, asdict(cfg), str(out)) for i in todo]
    done = 0
    t0 = time.perf_counter()

    def finished(info):
        nonlocal done
        done += 1
        if bar is not None:
            bar.update(info["unit"]["bytes"])
            bar.set_postfix({"tok/s": f"{info['counts']['tokens'] / max(info['seconds'], 1e-9):.0f}"}, refresh=False)
        if _KILL_AFTER_SHARDS and done >= _KILL_AFTER_SHARDS:
            os.kill(os.getpid(), 9)

    try:
        if cfg.num_proc > 1 and len(jobs) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn, not fork: the parent may hold jax / XLA threads (implicit tokenisation in pretrain)
            with ProcessPoolExecutor(cfg.num_proc, mp_context=mp.get_context("spawn")) as ex:
                futs = [ex.submit(tokenize_unit, j) for j in jobs]
                for fut in as_completed(futs):
                    finished(fut.result())
        else:
            for j in jobs:
                finished(tokenize_unit(j))
    finally:
        if bar is not None:
            bar.close()
    manifest = _finalize(out, plan, time.perf_counter() - t0)
    return manifest


def _check_same(out: Path, old: dict, new: dict):
    if old.get("format") != FORMAT:
        raise DataError(f"{out}: shard format {old.get('format')} is not this version's ({FORMAT}); re-tokenise")
    if old["tokenizer"]["fingerprint"] != new["tokenizer"]["fingerprint"]:
        raise DataError(f"{out}: these shards were written with tokenizer {old['tokenizer']['path']} (fingerprint "
                        f"{old['tokenizer']['fingerprint']}), not {new['tokenizer']['path']} (fingerprint "
                        f"{new['tokenizer']['fingerprint']}); use another output directory")
    keys = ("sources", "text_field", "chunk_mb", "on_bad_utf8")
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if diff:
        raise DataError(f"{out}: already holds shards of other input ({', '.join(diff)} differ); "
                        "use another output directory or delete it")


def _finalize(out: Path, plan: dict, seconds: float) -> dict:
    """Merge the shards' document indexes into doc_index.npy and write manifest.json (atomically)."""
    sdir = out / "shards"
    shards, totals, examples = [], _Counts(), []
    for i in range(len(plan["units"])):
        info = json.loads((sdir / f"{i:05d}.json").read_text())
        shards.append({"name": info["name"], "docs": info["counts"]["docs"], "tokens": info["counts"]["tokens"],
                       "source": info["unit"]["path"], "start": info["unit"]["start"], "end": info["unit"]["end"]})
        for k, v in info["counts"].items():
            totals.add(k, v)
        examples += info["bad_utf8_examples"][: max(0, 5 - len(examples))]
    if totals.get("docs", 0) == 0:
        raise DataError(f"{', '.join(s['path'] for s in plan['sources'])}: no non-empty documents")
    tmp = out / f"doc_index.npy.tmp{os.getpid()}"
    idx = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(totals["docs"] + 1,))
    d = t = 0
    for s in shards:  # streamed shard by shard: the index is never held twice
        ends = np.load(sdir / f"{s['name']}.idx.npy")
        idx[d: d + len(ends) - 1] = ends[:-1] + t
        d += len(ends) - 1
        t += int(ends[-1])
    idx[d] = t
    idx.flush()
    del idx
    os.replace(tmp, out / "doc_index.npy")
    manifest = {k: plan[k] for k in ("format", "tokenizer", "dtype", "text_field", "chunk_mb", "on_bad_utf8",
                                     "sources")}
    manifest.update(counts=dict(totals), bad_utf8_examples=examples, shards=shards, seconds=round(seconds, 3))
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


# ----------------------------------------------------------------------------- reading shards

class TokenShards:
    """Memory-mapped tokens and document index of a `tokenize_corpus` directory."""

    def __init__(self, path: str | os.PathLike, tokenizer=None):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.exists():
            raise DataError(f"{self.path}: no manifest.json (not a finished `llama-jax data tokenize` directory)")
        self.manifest = json.loads(mf.read_text())
        if tokenizer is not None:
            fp = tokenizer_fingerprint(tokenizer)
            if fp != self.manifest["tokenizer"]["fingerprint"]:
                raise DataError(f"{self.path}: shards were tokenised with {self.manifest['tokenizer']['path']} "
                                f"(fingerprint {self.manifest['tokenizer']['fingerprint']}); the run's tokenizer "
                                f"has fingerprint {fp}: re-tokenise with this tokenizer")
        dtype = np.dtype(self.manifest["dtype"])
        self.shards = [np.memmap(self.path / "shards" / f"{s['name']}.bin", dtype, "r") if s["tokens"] else
                       np.zeros(0, dtype) for s in self.manifest["shards"]]
        self.token_base = np.cumsum([0] + [s["tokens"] for s in self.manifest["shards"]])
        self.doc_index = np.load(self.path / "doc_index.npy", mmap_mode="r")
        self.num_docs = len(self.doc_index) - 1
        self.num_tokens = int(self.doc_index[-1])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Global token range [start, stop) (may cross shards)."""
        out, s = [], int(np.searchsorted(self.token_base, start, "right") - 1)
        while start < stop:
            base = int(self.token_base[s])
            hi = min(stop, int(self.token_base[s + 1]))
            out.append(self.shards[s][start - base: hi - base])
            start = hi
            s += 1
        return np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)


class PackedView:
    """Rows of `block_size` over documents [doc_start, doc_stop) of `shards`, packed as `packing.pack`."""

    def __init__(self, shards: TokenShards, block_size: int, bos: int | None, eos: int | None,
                 doc_start: int = 0, doc_stop: int | None = None):
        self.s, self.T, self.bos, self.eos = shards, int(block_size), bos, eos
        self.d0 = int(doc_start)
        self.d1 = shards.num_docs if doc_stop is None else int(doc_stop)
        if not 0 <= self.d0 < self.d1 <= shards.num_docs:
            raise DataError(f"{shards.path}: document range [{self.d0}, {self.d1}) is empty or out of range")
        self.extra = int(bos is not None) + int(eos is not None)
        self.t0 = int(shards.doc_index[self.d0])
        self.length = self._pstart(np.array([self.d1]))[0]
        self.n = -(-int(self.length) // self.T)

    def __len__(self):
        return self.n

    def _pstart(self, d: np.ndarray) -> np.ndarray:
        """Packed start of documents d (array) in this view's stream."""
        return self.s.doc_index[d] - self.t0 + (d - self.d0) * self.extra

    def _doc_at(self, p: np.ndarray) -> np.ndarray:
        """The document holding packed positions p: a vectorised binary search over the mapped index."""
        lo = np.full(len(p), self.d0, np.int64)
        hi = np.full(len(p), self.d1, np.int64)  # invariant: pstart(lo) <= p < pstart(hi)
        while np.any(hi - lo > 1):
            mid = (lo + hi) // 2
            le = self._pstart(mid) <= p
            lo = np.where(le, mid, lo)
            hi = np.where(le, hi, mid)
        return lo

    def rows(self, rows) -> dict:
        rows = np.asarray(rows, np.int64)
        T = self.T
        tokens = np.zeros((len(rows), T), np.int32)
        segs = np.zeros((len(rows), T), np.int32)
        pos = np.zeros((len(rows), T), np.int32)
        first = self._doc_at(rows * T)
        for i, (r, d) in enumerate(zip(rows.tolist(), first.tolist())):
            p = r * T
            off = p - int(self._pstart(np.array([d]))[0])  # offset into document d's packed sequence
            j, seg = 0, 1
            while j < T and d < self.d1:
                a, b = int(self.s.doc_index[d]), int(self.s.doc_index[d + 1])
                seq_len = b - a + self.extra
                take = min(seq_len - off, T - j)
                # the packed sequence [BOS] + doc + [EOS], sliced [off, off + take): read only that
                lo_t = off - (self.bos is not None)
                body = self.s.tokens(a + max(lo_t, 0), a + min(lo_t + take, b - a)) if lo_t + take > 0 else None
                k = j
                if self.bos is not None and off == 0:
                    tokens[i, k] = self.bos
                    k += 1
                if body is not None and len(body):
                    tokens[i, k:k + len(body)] = body
                    k += len(body)
                if k < j + take:  # the rest is EOS
                    tokens[i, k] = self.eos
                segs[i, j:j + take] = seg
                pos[i, j:j + take] = np.arange(take)  # as pack(): a row's first document restarts at 0
                j += take
                seg += 1
                d += 1
                off = 0
        return {"tokens": tokens, "segments": segs, "positions": pos}




def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wraps mod 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> int:
    h = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little")


def permute(i, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed bijection of [0, n) evaluated at indices i: Feistel rounds over the smallest even
    number of bits covering n, cycle-walking values that land >= n (expected < 4 walks)."""
    i = np.asarray(i, np.uint64)
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = [np.uint64(_key(key, r)) for r in range(rounds)]

    def feistel(x):
        L, R = x >> half, x & mask
        for k in keys:
            L, R = R, L ^ (_mix(R ^ k) & mask)
        return (L << half) | R

    x = feistel(i)
    bad = x >= np.uint64(n)
    while bad.any():
        x[bad] = feistel(x[bad])
        bad = x >= np.uint64(n)
    return x.astype(np.int64)


class MixtureBatches:
    """The batch of step s over weighted `PackedView` sources, a function of (seed, s) alone.

    Source k has given m_k(s) = floor(s*G*C_k) - floor(s*G*C_{k-1}) rows before step s (C = the
    cumulative integer weights / their total): exact long-run shares, computed in O(1).  Its j-th
    row is permute(j mod n_k) under the key (seed, k, epoch j // n_k).  With several sources the
    G rows of a step are interleaved by a keyed permutation of the step, so every host gets the mix;
    host h takes rows [h*G/H, (h+1)*G/H) and reads only those."""

    def __init__(self, sources: list[tuple[PackedView, float]], global_batch: int, seed: int, host: int = 0,
                 num_hosts: int = 1, shuffle: bool = True):
        if global_batch % num_hosts:
            raise DataError(f"global batch {global_batch} is not divisible by {num_hosts} hosts")
        if not sources:
            raise DataError("no data sources")
        if any(w <= 0 for _, w in sources):
            raise DataError(f"mixture weights must be > 0: {[w for _, w in sources]}")
        self.views = [v for v, _ in sources]
        iw = [max(1, round(w / sum(w for _, w in sources) * 1_000_000)) for _, w in sources]
        self.cum = np.cumsum([0] + iw).tolist()
        self.G, self.seed, self.host, self.num_hosts, self.shuffle = int(global_batch), int(seed), host, num_hosts, shuffle
        self.n = sum(len(v) for v in self.views)

    def _given(self, k: int, s: int) -> int:
        tot = self.cum[-1]
        return s * self.G * self.cum[k + 1] // tot - s * self.G * self.cum[k] // tot

    def plan(self, step: int) -> list[tuple[int, int]]:
        """(source, row) of every row of the global batch of `step`, in batch order."""
        out = []
        for k, v in enumerate(self.views):
            a, b = self._given(k, step), self._given(k, step + 1)
            j = np.arange(a, b, dtype=np.int64)
            rows = np.empty(len(j), np.int64)
            for ep in np.unique(j // len(v)):
                m = (j // len(v)) == ep
                rows[m] = permute(j[m] % len(v), len(v), _key(self.seed, k, int(ep))) if self.shuffle else j[m] % len(v)
            out += [(k, int(r)) for r in rows]
        if len(self.views) > 1 and self.shuffle:
            order = permute(np.arange(self.G), self.G, _key(self.seed, "mix", step))
            out = [out[o] for o in order]
        return out

    def rows(self, step: int) -> list[tuple[int, int]]:
        per = self.G // self.num_hosts
        return self.plan(step)[self.host * per:(self.host + 1) * per]

    def batch(self, step: int) -> dict:
        mine = self.rows(step)
        parts = [None] * len(mine)
        for k in sorted({k for k, _ in mine}):
            at = [i for i, (kk, _) in enumerate(mine) if kk == k]
            got = self.views[k].rows([mine[i][1] for i in at])
            for n, i in enumerate(at):
                parts[i] = {name: arr[n] for name, arr in got.items()}
        return {name: np.stack([p[name] for p in parts]) for name in parts[0]}
