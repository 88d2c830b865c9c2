"""Extend an HF byte-level BPE tokenizer (tokenizer.json, e.g. SmolLM2) with Chinese tokens.

merge.py extends sentencepiece models; this module does the same for `tokenizers` BPE models whose
pre-tokenizer is ByteLevel (GPT-2 style: text is split by the pre-tokenizer, each piece's UTF-8
bytes are written as printable characters, then BPE merges are applied by rank).

How new tokens are learned: continuation training
    The corpus is pre-tokenized with the base tokenizer's own normalizer and pre-tokenizer, each
    unique pre-token is segmented with the base BPE model, and BPE training then *continues* from
    those segmentations: the most frequent adjacent pair (ties: smallest pair of token strings) is
    merged, the segmentations are updated, and so on.  New merges are appended after the base
    merges, in learned order, so they have the highest ranks.  The training segmentation before
    merge k is exactly what the merged tokenizer cut before merge k produces on the corpus (added
    tokens are cut out of the text first, as encoding does; their lstrip/rstrip/single_word flags
    are not modelled), so every new merge fires on the
    training text: its pair occurs there at least `min_frequency` times (overlapping occurrences
    counted) and each new token is produced there; a later merge may absorb all of a token's
    occurrences, as in any BPE.  (With `ignore_merges` set in the base, a pre-token that equals a
    token is taken whole, which training does not model; the guarantee below is unaffected.)
    Training a separate BPE from scratch on Chinese and appending its merges does not give this:
    the base may already merge the bytes of a character (or of neighbouring characters) another
    way, so the appended merge's pair never occurs at encoding time and its token is dead.

The English guarantee (the allowed-pair rule)
    A pair (a, b) may be merged only if the raw bytes of a+b contain a byte in 0xE3..0xE9 or 0xEF.
    In UTF-8 those bytes are lead bytes of 3-byte characters U+3000..U+9FFF (CJK punctuation,
    kana, CJK ideographs) and U+F000..U+FFFF (fullwidth forms etc.), and never occur elsewhere.
    Every base merge ranks below every new merge and the pre-tokenizer is unchanged, so encoding
    first runs the base merges to completion (a new token never takes part in a base merge), and
    a new merge can then only fire where the text contains such a character.  Hence:

        any text with no character in U+3000..U+9FFF or U+F000..U+FFFF (after the base's
        normalizer, if it has one) encodes to exactly the base tokenizer's ids.

    Also, no new token repeats an existing token (base or new): a pair whose concatenation is
    already a token is skipped, so each new token has exactly one merge and base ids, base added
    tokens and base merges are unchanged (the base merges are a prefix of the merged ones).

Output: the base tokenizer.json with the new tokens appended to model.vocab (ids after the largest
id used by the vocab or the added tokens) and the new merges appended in the base's merge format
(list pairs or "a b" strings); optionally a special `<|pad|>` and filler tokens `<|reserved_N|>` (added tokens
only, not in model.vocab; never produced from text) pad the vocabulary to a multiple;
tokenizer_config.json, special_tokens_map.json and chat_template.jinja are copied; a report
`byte_bpe_merge.json` is written beside them.  The directory is published atomically.

Standard library, `tokenizers` and llama_jax.fsutil only (no jax).
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import json
import math
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from ..fsutil import atomic_output_dir

TOKENIZER_JSON = "tokenizer.json"
REPORT_JSON = "byte_bpe_merge.json"
COPIED_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
FILLER_TEMPLATE = "<|reserved_{}|>"
PAD_TOKEN = "<|pad|>"
# UTF-8 lead bytes of the characters U+3000..U+9FFF (0xE3..0xE9) and U+F000..U+FFFF (0xEF).
CJK_LEAD_BYTES = frozenset(range(0xE3, 0xEA)) | {0xEF}


@dataclass(frozen=True)
class ByteBPEOptions:
    num_new_tokens: int = 4000
    min_frequency: int = 2
    # A special `<|pad|>` added token right after the new tokens (as merge.MergeOptions.pad_token
    # puts `<pad>` after LLaMA-2's pieces): many byte-level bases pad with their EOS, which a reward
    # model or a loss mask must be able to tell apart from padding.
    pad_token: bool = False
    # Append special `<|reserved_N|>` added tokens until the vocabulary size is a multiple of this.
    pad_to_multiple_of: int | None = None
    # Cap on a new token's length in characters (an incomplete UTF-8 sequence counts as one).
    max_token_chars: int | None = None

    def __post_init__(self):
        if self.num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {self.num_new_tokens}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {self.min_frequency}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {self.pad_to_multiple_of}")
        if self.max_token_chars is not None and self.max_token_chars < 1:
            raise ValueError(f"max_token_chars must be >= 1 or None, got {self.max_token_chars}")


@dataclass
class ByteBPEResult:
    out_dir: Path
    base_vocab: int  # base largest id + 1
    new_tokens: int  # learned tokens (fillers not counted)
    merged_vocab: int  # merged largest id + 1 (fillers included)
    seconds: float


# ----------------------------------------------------------------------------- byte-level alphabet
def byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> character table used by ByteLevel: printable Latin-1 bytes stand for
    themselves, the other 68 bytes get the characters U+0100, U+0101, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_UNICODE = byte_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def token_bytes(token: str) -> bytes:
    """The raw bytes a byte-level token string stands for (ValueError if it is not byte-level)."""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in token)
    except KeyError as e:
        raise ValueError(f"token {token!r} has a character outside the byte-level alphabet: {e.args[0]!r}") from None


def _has_cjk_lead(token: str) -> bool:
    return any(UNICODE_TO_BYTE.get(c, 0) in CJK_LEAD_BYTES for c in token)


def _char_count(data: bytes) -> int:
    """Characters in `data`; an incomplete UTF-8 sequence at either end counts as one."""
    starts = sum(1 for b in data if b & 0xC0 != 0x80)
    return starts + (1 if data and data[0] & 0xC0 == 0x80 else 0)


# ----------------------------------------------------------------------------- loading, checks
def _json_path(path: str | Path) -> Path:
    p = Path(path)
    return p / TOKENIZER_JSON if p.is_dir() else p


def _load_json(path: str | Path) -> tuple[Path, dict]:
    p = _json_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: tokenizer.json not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not a JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: not a tokenizer.json (top level is not an object)")
    return p, data


def _is_byte_level(data: dict) -> bool:
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return False
    pre = data.get("pre_tokenizer")
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return pre.get("type") == "Sequence" and any(
        isinstance(p, dict) and p.get("type") == "ByteLevel" for p in pre.get("pretokenizers", []))


def is_byte_level_bpe(tokenizer_json: str | Path) -> bool:
    """True for a tokenizer.json (or a directory holding one) whose model is BPE and whose
    pre-tokenizer is ByteLevel (alone or inside a Sequence).  FileNotFoundError if it is missing,
    ValueError if it is not JSON."""
    return _is_byte_level(_load_json(tokenizer_json)[1])


def _load_byte_level(path: str | Path) -> tuple[Path, dict]:
    p, data = _load_json(path)
    if not _is_byte_level(data):
        raise ValueError(f"{p}: not a byte-level BPE tokenizer (needs model.type BPE and a ByteLevel pre_tokenizer)")
    model = data["model"]
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise ValueError(f"{p}: model.vocab or model.merges missing")
    return p, data


def _merge_pairs(path: Path, merges: list) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(merges):
        if isinstance(m, str):
            parts = m.split(" ")
        elif isinstance(m, list):
            parts = m
        else:
            parts = None
        if parts is None or len(parts) != 2:
            raise ValueError(f"{path}: merge {i} is not a pair: {m!r}")
        out.append((parts[0], parts[1]))
    return out


def _largest_id(data: dict) -> int:
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens") or []]
    return max(ids, default=-1)


def _check_supported(path: Path, data: dict) -> None:
    model = data["model"]
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{path}: BPE with continuing_subword_prefix / end_of_word_suffix is not supported")
    if model.get("dropout"):
        raise ValueError(f"{path}: BPE dropout is set; segmentation would not be deterministic")


# ----------------------------------------------------------------------------- training
def _read_pretokens(tok: Tokenizer, added: list[str], files: list[Path]) -> tuple[Counter, dict]:
    """Count the base pre-tokens (byte-level strings) of every non-empty line of `files`, as
    encoding sees them: added tokens (e.g. <|im_start|>) are cut out first, then each remaining
    part is normalized (when the base has a normalizer) and pre-tokenized."""
    special = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None
    counts: Counter = Counter()
    stats = {"files": [str(f) for f in files], "lines": 0, "chars": 0, "pretokens": 0}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: corpus file not found")
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text ({e})") from None
        for line in text.splitlines():
            if not line.strip():
                continue
            stats["lines"] += 1
            stats["chars"] += len(line)
            for part in special.split(line) if special else (line,):
                if tok.normalizer is not None:
                    part = tok.normalizer.normalize_str(part)
                pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(part)]
                stats["pretokens"] += len(pieces)
                counts.update(pieces)
    if not stats["lines"]:
        raise ValueError(f"no non-empty line of text in {', '.join(map(str, files))}")
    stats["unique_pretokens"] = len(counts)
    return counts, stats


class _Learner:
    """Continuation BPE: pair counts, a pair -> words index (a superset, pruned lazily) and a max-heap
    with lazy invalidation.  Only allowed pairs (one side holds a CJK lead byte) are tracked."""

    def __init__(self, words: list[list[int]], freqs: list[int], strings: dict[int, str],
                 vocab: set[str], options: ByteBPEOptions, next_id: int):
        self.words, self.freqs, self.strings, self.vocab = words, freqs, strings, vocab
        self.options, self.next_id = options, next_id
        self.skipped: list[tuple[str, str]] = []  # pairs whose join was already a token
        self.lead = {i: _has_cjk_lead(s) for i, s in strings.items()}
        self.counts: dict[tuple[int, int], int] = {}
        self.where: dict[tuple[int, int], set[int]] = {}
        for w, toks in enumerate(words):
            f = freqs[w]
            for p in zip(toks, toks[1:]):
                if self.lead[p[0]] or self.lead[p[1]]:
                    self.counts[p] = self.counts.get(p, 0) + f
                    self.where.setdefault(p, set()).add(w)
        self.heap = [self._entry(p, c) for p, c in self.counts.items() if self._pushable(p, c)]
        heapq.heapify(self.heap)

    def _entry(self, p, c):
        return (-c, self.strings[p[0]], self.strings[p[1]], p)

    def _pushable(self, p, c) -> bool:
        if c < self.options.min_frequency:
            return False
        cap = self.options.max_token_chars
        # Characters of a+b: a fragment split across the boundary is counted once.
        return cap is None or self._joined_chars(p) <= cap

    def _joined_chars(self, p) -> int:
        return _char_count(token_bytes(self.strings[p[0]] + self.strings[p[1]]))

    def next_pair(self):
        """The most frequent allowed pair whose join is not a token yet, or None."""
        while self.heap:
            negc, sa, sb, p = heapq.heappop(self.heap)
            c = self.counts.get(p, 0)
            if c != -negc:
                if self._pushable(p, c):
                    heapq.heappush(self.heap, self._entry(p, c))
                continue
            if sa + sb in self.vocab:
                self.skipped.append((sa, sb))  # an existing token made another way: never a duplicate
                continue
            return p, c
        return None

    def merge(self, p) -> int:
        """Merge every occurrence of the pair `p` (left to right in each word) into a new token.
        Pair count changes are gathered in `delta` and applied once (a hot loop: locals only)."""
        a, b = p
        c = self.next_id
        self.next_id += 1
        self.strings[c] = self.strings[a] + self.strings[b]
        self.vocab.add(self.strings[c])
        lead = self.lead
        lead[c] = True  # its bytes hold a CJK lead byte: the pair was allowed
        delta: dict[tuple[int, int], int] = {}
        dget = delta.get
        created: dict[tuple[int, int], set[int]] = {}  # new pairs (x, c) / (c, y) -> words
        lead_b = lead[b]
        for w in self.where.pop(p, ()):
            toks = self.words[w]
            n, f = len(toks), self.freqs[w]
            out: list[int] = []
            i = 0
            hits = 0
            while True:
                try:
                    j = toks.index(a, i)
                except ValueError:
                    break
                if j + 1 >= n or toks[j + 1] != b:
                    out.extend(toks[i:j + 1])
                    i = j + 1
                    continue
                out.extend(toks[i:j])
                hits += 1
                if out:
                    left = out[-1]
                    # After an occurrence ending at j - 1 the old pair here is (b, a), now (c, c).
                    old = (b, a) if left == c else (left, a)
                    if lead[old[0]] or lead[old[1]]:  # only allowed pairs are tracked
                        delta[old] = dget(old, 0) - f
                    q = (left, c)
                    delta[q] = dget(q, 0) + f
                    created.setdefault(q, set()).add(w)
                if j + 2 < n:
                    right = toks[j + 2]
                    # When the next occurrence starts at j + 2, it handles the pair between them.
                    if not (right == a and j + 3 < n and toks[j + 3] == b):
                        if lead_b or lead[right]:
                            old = (b, right)
                            delta[old] = dget(old, 0) - f
                        q = (c, right)
                        delta[q] = dget(q, 0) + f
                        created.setdefault(q, set()).add(w)
                out.append(c)
                i = j + 2
            if hits:
                delta[p] = dget(p, 0) - hits * f
                out.extend(toks[i:])
                self.words[w] = out
        counts = self.counts
        for q, d in delta.items():
            v = counts.get(q, 0) + d
            if v:
                counts[q] = v
            else:
                counts.pop(q, None)
        for q, ws in created.items():
            self.where[q] = ws
            v = counts.get(q, 0)
            if self._pushable(q, v):
                heapq.heappush(self.heap, self._entry(q, v))
        return c


def _learn(base_tok: Tokenizer, base: dict, counts: Counter, options: ByteBPEOptions, next_id: int):
    """Segment the unique pre-tokens with the base BPE model alone and learn the new merges.
    Returns (merges as string pairs, new token strings, per-token stats, corpus token counts)."""
    model = base_tok.model
    strings = {i: t for t, i in base["model"]["vocab"].items()}
    lead_chars = {BYTE_TO_UNICODE[b] for b in CJK_LEAD_BYTES}
    base_tokens = 0
    words, freqs = [], []
    for s, f in counts.items():
        ids = [t.id for t in model.tokenize(s)]
        base_tokens += len(ids) * f
        # Only a pre-token holding a CJK lead byte can contain an allowed pair.
        if len(ids) > 1 and not lead_chars.isdisjoint(s):
            words.append(ids)
            freqs.append(f)
    trained_before = sum(len(w) * f for w, f in zip(words, freqs))
    learner = _Learner(words, freqs, dict(strings), set(strings.values()), options, next_id)
    merges, new_tokens, freq_at_merge = [], [], []
    while len(new_tokens) < options.num_new_tokens:
        found = learner.next_pair()
        if found is None:
            break
        (a, b), freq = found
        c = learner.merge((a, b))
        merges.append((learner.strings[a], learner.strings[b]))
        new_tokens.append(learner.strings[c])
        freq_at_merge.append(freq)
    final = Counter()
    for w, f in zip(learner.words, freqs):
        for t in w:
            if t >= next_id:
                final[t] += f
    trained_after = sum(len(w) * f for w, f in zip(learner.words, freqs))
    token_stats = [{"id": next_id + k, "token": t, "text": token_bytes(t).decode("utf-8", errors="replace"),
                    "merge": list(merges[k]), "frequency_at_merge": freq_at_merge[k],
                    "final_count": final[next_id + k]} for k, t in enumerate(new_tokens)]
    corpus = {"base_tokens": base_tokens, "merged_tokens": base_tokens - trained_before + trained_after,
              "skipped_existing": len(learner.skipped),
              "trained_words": len(words)}
    return merges, new_tokens, token_stats, corpus


# ----------------------------------------------------------------------------- public API
def extend_byte_level_bpe(base_dir: str | Path, files: list[str | Path], out_dir: str | Path,
                          options: ByteBPEOptions = ByteBPEOptions()) -> ByteBPEResult:
    """Learn up to `options.num_new_tokens` Chinese tokens on `files` (UTF-8 text, one document or
    paragraph a line) as a continuation of the base's BPE and write the extended tokenizer to
    `out_dir` (replaced atomically; nothing is written on error).  See the module docstring."""
    t0 = time.perf_counter()
    base_json, base = _load_byte_level(base_dir)
    _check_supported(base_json, base)
    try:
        base_tok = Tokenizer.from_file(str(base_json))
    except Exception as e:  # the tokenizers library raises its own exception type
        raise ValueError(f"{base_json}: the tokenizers library cannot load it ({e})") from None
    out_dir = Path(out_dir)
    if out_dir.resolve() == base_json.parent.resolve():
        raise ValueError(f"{out_dir}: the output directory must not be the base tokenizer's directory")
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("no corpus files given")
    base_pairs = _merge_pairs(base_json, base["model"]["merges"])
    added = [t["content"] for t in base.get("added_tokens") or [] if t.get("content")]
    pretokens, corpus = _read_pretokens(base_tok, added, files)
    t_read = time.perf_counter()
    base_vocab = _largest_id(base) + 1
    merges, new_tokens, token_stats, counts = _learn(base_tok, base, pretokens, options, base_vocab)
    corpus.update(counts)
    t_learn = time.perf_counter()

    merged = copy.deepcopy(base)
    vocab = merged["model"]["vocab"]
    for k, t in enumerate(new_tokens):
        vocab[t] = base_vocab + k
    string_format = bool(base_pairs) and isinstance(base["model"]["merges"][0], str)
    merged["model"]["merges"] = list(base["model"]["merges"]) + [
        f"{a} {b}" if string_format else [a, b] for a, b in merges]
    size = base_vocab + len(new_tokens)
    taken = set(vocab) | {t["content"] for t in merged.get("added_tokens") or []}
    if options.pad_token and PAD_TOKEN in taken:
        raise ValueError(f"{base_json}: already has a token {PAD_TOKEN!r}; extend without pad_token")
    fillers = [PAD_TOKEN] if options.pad_token else []
    if options.pad_to_multiple_of:
        target = math.ceil((size + len(fillers)) / options.pad_to_multiple_of) * options.pad_to_multiple_of
        n = 0
        while size + len(fillers) < target:
            name = FILLER_TEMPLATE.format(n)
            n += 1
            if name not in taken:
                fillers.append(name)
    merged["added_tokens"] = list(merged.get("added_tokens") or []) + [
        {"id": size + k, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for k, name in enumerate(fillers)]
    merged_vocab = size + len(fillers)

    report = {
        "base": str(base_json), "base_vocab": base_vocab, "new_tokens": len(new_tokens),
        "fillers": len(fillers), "merged_vocab": merged_vocab, "base_merges": len(base_pairs),
        "options": dataclasses.asdict(options),
        "corpus": {**corpus, "base_chars_per_token": corpus["chars"] / max(corpus["base_tokens"], 1),
                   "merged_chars_per_token": corpus["chars"] / max(corpus["merged_tokens"], 1)},
        "seconds": {"read": round(t_read - t0, 3), "learn": round(t_learn - t_read, 3)},
        "tokens": token_stats,
    }
    text = json.dumps(merged, ensure_ascii=False, indent=2)
    with atomic_output_dir(out_dir, replace=True) as tmp:
        (tmp / TOKENIZER_JSON).write_text(text, encoding="utf-8")
        loaded = Tokenizer.from_file(str(tmp / TOKENIZER_JSON))  # fails here, before publishing
        if loaded.get_vocab_size(with_added_tokens=True) != merged_vocab:
            raise ValueError(f"{out_dir}: merged vocabulary has {loaded.get_vocab_size()} ids, expected {merged_vocab}")
        for name in COPIED_FILES:
            if (base_json.parent / name).is_file():
                shutil.copyfile(base_json.parent / name, tmp / name)
        report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        (tmp / REPORT_JSON).write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    return ByteBPEResult(out_dir=out_dir, base_vocab=base_vocab, new_tokens=len(new_tokens),
                         merged_vocab=merged_vocab, seconds=time.perf_counter() - t0)


def base_ids_of_new_tokens(base_dir: str | Path, merged_dir: str | Path, start: int, stop: int) -> list[list[int]]:
    """For each merged id in start..stop-1, the base ids that spell the token's bytes: [id] for a
    base token, the base BPE model's segmentation of the token's byte-level string for a new one,
    [] for an added (special or filler) token.  Used to initialise new embedding rows."""
    base_json, base = _load_byte_level(base_dir)
    merged_json, merged = _load_byte_level(merged_dir)
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    by_id = {i: t for t, i in merged["model"]["vocab"].items()}
    added = {t["id"] for t in merged.get("added_tokens") or []}
    base_vocab = base["model"]["vocab"]
    model = Tokenizer.from_file(str(base_json)).model
    out = []
    for i in range(start, stop):
        if i in added:
            out.append([])
            continue
        if i not in by_id:
            raise ValueError(f"{merged_json}: no token has id {i}")
        tok = by_id[i]
        if base_vocab.get(tok) == i:
            out.append([i])
            continue
        pieces = model.tokenize(tok)
        if b"".join(token_bytes(t.value) for t in pieces) != token_bytes(tok):
            raise ValueError(f"{base_json}: the base model cannot spell token {i} ({tok!r})")
        out.append([t.id for t in pieces])
    return out


def check_extension(base_dir: str | Path, merged_dir: str | Path, old_vocab: int | None = None) -> None:
    """ValueError unless `merged_dir` extends `base_dir`: every base vocab entry and added token keeps
    its id, the base merges are a prefix of the merged merges and the normalizer and pre-tokenizer
    are unchanged.  old_vocab (a model's vocab_size) must equal the base's largest id + 1."""
    base_json, base = _load_byte_level(base_dir)
    merged_json, merged = _load_byte_level(merged_dir)
    mvocab = merged["model"]["vocab"]
    mby_id: dict[int, str] = {}
    for t, i in mvocab.items():
        if i in mby_id:
            raise ValueError(f"{merged_json}: id {i} is used by two tokens ({mby_id[i]!r}, {t!r})")
        mby_id[i] = t
    for t, i in sorted(base["model"]["vocab"].items(), key=lambda kv: kv[1]):
        if mvocab.get(t) != i:
            raise ValueError(f"{merged_json}: base token {t!r} has id {i} in {base_json} but "
                             f"{mvocab.get(t)} here (id {i} is {mby_id.get(i)!r})")
    madded = {t["id"]: t for t in merged.get("added_tokens") or []}
    for t in sorted(base.get("added_tokens") or [], key=lambda t: t["id"]):
        m = madded.get(t["id"])
        if m is None or m.get("content") != t["content"] or bool(m.get("special")) != bool(t.get("special")):
            raise ValueError(f"{merged_json}: added token id {t['id']} is {t['content']!r} in {base_json} "
                             f"but {None if m is None else m.get('content')!r} here")
    bm = _merge_pairs(base_json, base["model"]["merges"])
    mm = _merge_pairs(merged_json, merged["model"]["merges"])
    for k, pair in enumerate(bm):
        if k >= len(mm) or mm[k] != pair:
            raise ValueError(f"{merged_json}: merge {k} is {mm[k] if k < len(mm) else None} but {pair} in "
                             f"{base_json} (the base merges must be a prefix)")
    for key in ("normalizer", "pre_tokenizer"):
        if merged.get(key) != base.get(key):
            raise ValueError(f"{merged_json}: {key} differs from {base_json}")
    if old_vocab is not None and old_vocab != _largest_id(base) + 1:
        raise ValueError(f"model vocab_size {old_vocab} != {_largest_id(base) + 1} "
                         f"(largest id + 1 of {base_json})")


def pad_id_of(merged_dir: str | Path) -> int | None:
    """The id of the `<|pad|>` token an extension added (`ByteBPEOptions.pad_token`), else None."""
    _, data = _load_byte_level(merged_dir)
    for t in data.get("added_tokens") or []:
        if t["content"] == PAD_TOKEN:
            return int(t["id"])
    return None


def vocab_size_of(tokenizer_dir: str | Path) -> int:
    """Largest id + 1 of a byte-level BPE tokenizer.json (vocab and added tokens): a model's vocab_size."""
    _, data = _load_byte_level(tokenizer_dir)
    return _largest_id(data) + 1
